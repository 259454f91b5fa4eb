"""The fabflows command: option parsing typed by the flow's signature, exit codes, config check."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import flow

from fabflows.cli import EXIT_BAD_INPUT, EXIT_OK, UsageError, main, parse_flow_options
from fabflows.registry import FLOWS
from fabflows.testing.configs import SAMPLE, write_config


@flow(name="example-flow")
def example(
    environment: str,
    users_dir: str,
    remove: bool = False,
    max_errors: int = 0,
    hosts: list[str] | None = None,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
) -> None:
    """An example."""


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--users-dir", "d"], {"users_dir": "d"}),
        (["--users-dir=d", "--remove"], {"users_dir": "d", "remove": True}),
        (["--users-dir", "d", "--no-remove"], {"users_dir": "d", "remove": False}),
        (["--users-dir", "d", "--max-errors", "3"], {"users_dir": "d", "max_errors": 3}),
        (["--users-dir", "d", "--hosts", '["a","b"]'], {"users_dir": "d", "hosts": ["a", "b"]}),
        (["--users-dir", "d", "--hosts", "a, b"], {"users_dir": "d", "hosts": ["a", "b"]}),
        (["--users-dir", "d", "--hosts=web"], {"users_dir": "d", "hosts": ["web"]}),
    ],
)
def test_flow_options_are_typed_by_signature(argv: list[str], expected: dict) -> None:
    assert parse_flow_options(example, argv) == expected


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--bogus", "1"], "has no option --bogus (its options: --users-dir, --remove"),
        (["--max-errors", "many"], "--max-errors 'many'"),
        (["--users-dir"], "needs a value"),
        (["stray"], "unexpected argument"),
    ],
)
def test_bad_flow_options_are_named(argv: list[str], words: str) -> None:
    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace("[", r"\[")):
        parse_flow_options(example, argv)


def test_every_registered_flow_imports_and_has_a_runbook_docstring(capsys) -> None:
    assert main(["flows"]) == EXIT_OK
    out = capsys.readouterr().out
    for name in FLOWS:
        assert name in out
    assert "cannot import" not in out


def test_run_refuses_unknown_environment_before_starting(capsys, tmp_path: Path) -> None:
    code = main(["run", "describe-environment", "-e", "prod", "-c", str(write_config(tmp_path))])
    assert code == EXIT_BAD_INPUT
    assert (
        "unknown environment 'prod'; known: staging, production, testing" in capsys.readouterr().err
    )


def test_run_refuses_unknown_flow(capsys) -> None:
    assert main(["run", "reboot-everything", "-e", "staging"]) == EXIT_BAD_INPUT
    assert "unknown flow 'reboot-everything'" in capsys.readouterr().err


def test_config_check_prints_what_it_understood(capsys) -> None:
    assert main(["config", "check", str(SAMPLE)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "myproject/production (production, protected)" in out
    assert "db-primary=m3.xlarge" in out
    assert "warning: celery_workers.celery_application" in out


def test_config_check_names_the_bad_key(capsys, tmp_path: Path) -> None:
    path = write_config(tmp_path, instance_types={"qa": {"web": "t3.small"}})
    assert main(["config", "check", str(path)]) == EXIT_BAD_INPUT
    assert "instance_types.qa: 'qa' is not in environments" in capsys.readouterr().err
