"""What `pip install .` ships, and what the lock pins.

The wheel holds the product (runbooks, tasks, the CLI) and not the test lab (fabflows.testing,
sandbox); a checkout's editable install still has the lab. requirements.lock pins every
distribution that `pip install -e '.[test]'` installs, and this venv was installed from it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", "build"}


def _copy_source(dest: Path) -> Path:
    """Copy what setuptools builds from (the top-level packages and the build config).

    A copy, so that the build neither reads this checkout's egg-info nor writes its build/.
    """
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy2(ROOT / name, src / name)

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n in SKIP_DIRS or n.endswith(".egg-info")}
        if Path(directory) == ROOT / "sandbox":
            skipped.add("state")  # the running sandbox's state (host images, logs)
        return skipped

    for package in sorted(ROOT.iterdir()):
        if package.is_dir() and (package / "__init__.py").is_file():
            shutil.copytree(package, src / package.name, ignore=ignore)
    return src


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_source(tmp)
    out = tmp / "dist"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    (built,) = out.glob("fabflows-*.whl")
    return built


def test_wheel_ships_the_product_and_not_the_lab(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    lab = [n for n in names if n.startswith(("fabflows/testing/", "sandbox/"))]
    assert lab == []
    assert "fabflows/cli.py" in names
    assert "fabflows/entry.py" in names
    assert any(n.startswith("flows/") and n.endswith(".py") for n in names)
    assert any(n.startswith("tasks/") and n.endswith(".py") for n in names)
    info = "fabflows-0.1.0.dist-info/"
    assert "sandbox" not in zipfile.ZipFile(wheel).read(info + "top_level.txt").decode().split()
    entry_points = zipfile.ZipFile(wheel).read(info + "entry_points.txt").decode()
    assert "fabflows = fabflows.entry:main" in entry_points


@pytest.mark.parametrize("argv", [["sandbox", "up"], ["sandbox", "status"], ["demo"]])
def test_lab_commands_from_a_wheel_say_they_run_from_a_checkout(
    wheel: Path, tmp_path: Path, argv: list[str]
) -> None:
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    # -I -S: only the wheel's files and the standard library (no checkout, no editable finder).
    script = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); "
        "from fabflows.entry import main; sys.exit(main())"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, str(installed), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"fabflows {argv[0]}: runs from a checkout")


def test_the_checkout_keeps_the_lab(tmp_path: Path) -> None:
    # Away from the checkout's directory: only the editable install can make these importable.
    script = (
        "import importlib.util, fabflows.testing, sandbox; from fabflows.entry import lab_missing; "
        "print(importlib.util.find_spec('sandbox.cli').origin); assert not lab_missing()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == ROOT / "sandbox" / "cli.py"


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            assert pinned, f"requirements.lock: not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = pinned.strip()
    return pins


def _needed(name: str = "fabflows", extras: frozenset[str] = frozenset({"test"})) -> set[str]:
    """Every distribution that name[extras] requires on this interpreter, transitively."""
    needed: set[str] = set()
    todo = [(name, extras)]
    seen = set()
    while todo:
        current, wanted = todo.pop()
        if (canonicalize_name(current), wanted) in seen:
            continue
        seen.add((canonicalize_name(current), wanted))
        needed.add(canonicalize_name(current))
        for text in distribution(current).requires or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    needed.discard("fabflows")
    return needed


def test_lock_pins_exactly_what_the_project_installs() -> None:
    pins = _lock()
    needed = _needed() | {"pip", "setuptools"}
    assert sorted(needed - pins.keys()) == [], "not in requirements.lock: run `make lock`"
    assert sorted(pins.keys() - needed) == [], "no longer needed: run `make lock`"


def test_this_venv_was_installed_from_the_lock() -> None:
    differ = {}
    for name, pinned in _lock().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            differ[name] = (pinned, installed)
    assert differ == {}, "installed versions differ from requirements.lock: run `make venv`"
