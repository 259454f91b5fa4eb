"""The layers, each importing only those below it, read from the source (no import is run):

kernel (fabflows.errors, report, progress, logfilter, registry) <- tasks (one system each) <-
runtime (fabflows.runtime) <- procedures (fabflows.procedures) <- flows (registered runbooks; no
flow imports another) <- front ends. The test lab (fabflows.testing, sandbox) is imported by no
shipped module but the CLI's sandbox commands, which find it at run time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ("fabflows.errors", "fabflows.report", "fabflows.progress", "fabflows.logfilter")
KERNEL += ("fabflows.registry",)
LAB = ("fabflows.testing", "sandbox")


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _imports(package: str) -> list[tuple[str, str]]:
    """(module, what it imports) for every absolute import in ``package``'s files."""
    found = []
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(module, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((module, node.module))
                # ``from fabflows import registry`` imports the module fabflows.registry
                found += [(module, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _ours(name: str) -> bool:
    return _within(name, ("fabflows", "flows", "tasks", "sandbox"))


def _breaches(package: str, allowed: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {name}"
        for module, name in _imports(package)
        if _ours(name)
        and name not in ("fabflows", "flows", "tasks")  # the package itself, not a module in it
        and not _within(name, allowed)
    )


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("tasks", ("tasks", *KERNEL)),
        ("fabflows.runtime", ("fabflows.runtime", "tasks", *KERNEL, "fabflows.audit")),
        ("fabflows.procedures", ("fabflows.procedures", "fabflows.runtime", "tasks", *KERNEL)),
    ],
)
def test_a_layer_imports_only_those_below_it(package: str, allowed: tuple[str, ...]) -> None:
    extra = {
        # modules beside the runtime that it and the procedures share (upgrade page, run context,
        # approval, lock, guard, audit, history); each checked to import no procedure or flow below
        "fabflows.runtime": ("fabflows.",),
        "fabflows.procedures": ("fabflows.",),
    }.get(package, ())
    breaches = [
        b
        for b in _breaches(package, allowed)
        if not (
            extra
            and b.split(" imports ")[1].startswith(extra)
            and not _within(b.split(" imports ")[1], ("fabflows.procedures", *LAB))
        )
    ]
    assert breaches == []


def test_no_flow_imports_another() -> None:
    breaches = [
        f"{module} imports {name}"
        for module, name in _imports("flows")
        if _within(name, ("flows",))
        and name != "flows"
        and name.split(".")[1] != module.split(".")[1]
    ]
    assert breaches == [], "a runbook starts another through fabflows.registry.load"


def test_nothing_below_the_front_ends_imports_a_flow() -> None:
    breaches = [
        f"{module} imports {name}"
        for package in ("tasks", "fabflows.runtime", "fabflows.procedures")
        for module, name in _imports(package)
        if _within(name, ("flows",))
    ]
    assert breaches == []


def test_the_product_does_not_import_the_test_lab() -> None:
    """Only the CLI's sandbox and demo commands reach the lab, inside those commands (a checkout
    has it; an installed fabflows says it is not there)."""
    breaches = [
        f"{module} imports {name}"
        for package in ("flows", "tasks", "fabflows", "config", "blocks", "deployments")
        for module, name in _imports(package)
        if _within(name, LAB) and not _within(module, LAB) and module != "fabflows.cli"
    ]
    assert breaches == []
    cli = ast.parse((ROOT / "fabflows" / "cli.py").read_text())
    at_top = [
        ast.unparse(node)
        for node in cli.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            _within(n, LAB)
            for n in (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
        )
    ]
    assert at_top == []
