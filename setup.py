"""Keep the test lab out of the wheel, and in reach from a checkout.

pyproject.toml holds the whole configuration. Its package list leaves out the lab
(``fabflows.testing``: fixtures and fault injection; ``sandbox``: the local environment), so
``pip install .`` and ``pip wheel .`` ship the product only. An editable install is a checkout
(``make venv`` runs ``pip install -e``), and there the lab is wanted: ``fabflows sandbox``,
``fabflows demo`` and the test suite import it. This hook adds the lab's packages back for
editable installs only, so the editable finder maps ``sandbox`` like any other top-level package.
"""

from setuptools import find_packages, setup
from setuptools.command.editable_wheel import editable_wheel

LAB_PACKAGES = find_packages(
    include=["sandbox", "sandbox.*", "fabflows.testing", "fabflows.testing.*"]
)


class EditableWithLab(editable_wheel):
    """An editable install (a checkout) exposes the lab packages as well."""

    def run(self) -> None:
        packages = list(self.distribution.packages or [])
        self.distribution.packages = packages + [p for p in LAB_PACKAGES if p not in packages]
        super().run()


setup(cmdclass={"editable_wheel": EditableWithLab})
