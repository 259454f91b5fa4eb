"""The ``fabflows`` console script: hand ``run``/``flows`` to the warm runner if one is up.

Kept tiny on purpose (stdlib only): with a warm runner the whole call costs a fork instead of
Prefect's imports. Anything else, or no warm runner, goes to the full CLI in this process.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

# The test lab (the sandbox and the fixtures it starts) lives in a checkout only: the wheel
# built by `pip install .` leaves it out (see setup.py).
LAB_COMMANDS = ("sandbox", "demo")
LAB_MODULES = ("sandbox", "fabflows.testing")
EXIT_BAD_INPUT = 2


def lab_missing() -> bool:
    """True when this install has no test lab (installed from a wheel, not from a checkout)."""
    return any(find_spec(name) is None for name in LAB_MODULES)


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] and argv[0] in LAB_COMMANDS and lab_missing():
        print(
            f"fabflows {argv[0]}: runs from a checkout of fabflows only "
            "(git clone, then `make demo`); this install has no sandbox",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if argv[:1] in (["run"], ["flows"]):
        from fabflows.warm import try_run

        code = try_run(argv)
        if code is not None:
            return code
    if argv[:1] == ["warm"]:
        from fabflows.warm import main as warm_main

        return warm_main(argv[1:])
    from fabflows.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
