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


def test_run_help_lists_the_flows_own_options_after_the_generic_ones(capsys) -> None:
    assert main(["run", "update-sysadmin-users", "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    generic, _, own = out.partition("update-sysadmin-users options:")
    assert "--environment" in generic and "--apply" in generic
    # type, default and the docstring's Args text
    assert "--users-dir VALUE" in own and "public-key file per user" in own
    assert "--max-concurrency VALUE" in own and "(str; default: '25%')" in own
    assert "--remove-unlisted, --no-remove-unlisted" in own and "(default: off)" in own
    assert "--environment" not in own and "--dry-run" not in own


def test_run_help_names_the_default_files_the_error_names(capsys, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FABFLOWS_CONFIG", raising=False)
    monkeypatch.setenv("FABFLOWS_SANDBOX_DIR", str(tmp_path / "no-sandbox"))
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert main(["run", "describe-environment", "-e", "staging"]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "no config given" in error
    for name in ("$FABFLOWS_CONFIG", "./fabflows.yaml", "./fabulaws-config.yml"):
        assert name in error
        assert name in help_text.replace("fabulaws- config", "fabulaws-config")


def test_without_a_config_the_running_sandboxs_is_used_and_said(capsys, tmp_path, monkeypatch):
    """`make demo` leaves the sandbox up: the README's commands then work from the checkout."""
    import json
    import os

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FABFLOWS_CONFIG", raising=False)
    sandbox = tmp_path / "sandbox-state"
    sandbox.mkdir()
    config = write_config(sandbox)
    status = {"pid": os.getpid(), "status": "ready", "config": str(config)}
    (sandbox / "daemon.json").write_text(json.dumps(status))
    monkeypatch.setenv("FABFLOWS_SANDBOX_DIR", str(sandbox))
    assert main(["config", "check"]) == EXIT_OK
    captured = capsys.readouterr()
    assert f"{config}: OK" in captured.out
    assert captured.err.count("\n") == 1 and f"using the sandbox's {config}" in captured.err
    # a sandbox that is still starting (or gone) is not used
    (sandbox / "daemon.json").write_text(json.dumps(status | {"status": "starting"}))
    assert main(["config", "check"]) == EXIT_BAD_INPUT
    assert "no config given" in capsys.readouterr().err


def test_flows_shows_whole_first_sentences(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["flows"]) == EXIT_OK
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "start-environment Start an environment stopped by stop-environment (or by hand), role by "
        "role, and restore the web group's recorded sizes; then check that every web server and "
        "the site answer 200. " in out
    )
    assert (
        "primary, cache, with the group's sizes recorded so start-environment restores them "
        "exactly. " in out
    )


def test_config_check_suggests_the_key_a_typo_resembles(capsys, tmp_path: Path) -> None:
    path = write_config(tmp_path, instance_typs={"staging": {"web": "t3.small"}})
    assert main(["config", "check", str(path)]) == EXIT_OK
    assert "unknown key instance_typs: did you mean instance_types?" in capsys.readouterr().out


def test_config_check_warns_of_environments_without_types_or_group(capsys, tmp_path) -> None:
    import yaml

    data = yaml.safe_load(SAMPLE.read_text())
    del data["instance_types"]["testing"]
    del data["auto_scaling_groups"]["myproject"]["staging"]
    path = tmp_path / "fabulaws-config.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["config", "check", str(path)]) == EXIT_OK
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert "warning: instance_types.testing: missing (no instance type for any role)" in warnings
    assert (
        "warning: auto_scaling_groups.myproject.staging: missing (no web group to manage)"
        in warnings
    )
    assert not any("production" in w for w in warnings)


def test_warm_is_in_the_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "warm" in capsys.readouterr().out


# --------------------------------------------------------------------------- engine runbooks


@pytest.fixture
def toy_lab(tmp_path: Path, monkeypatch, aws) -> dict:  # noqa: ANN001
    from fabflows.testing.configs import moto_section

    monkeypatch.setitem(FLOWS, "toy-switch", "tests.fabflows.runtime.toy:toy_switch")
    system = tmp_path / "system"
    system.mkdir()
    cfg = write_config(
        tmp_path, {**moto_section(aws.endpoint, staging={}), "state_dir": str(tmp_path / "s")}
    )
    return {"dir": str(system), "config": str(cfg)}


def test_runbook_bad_input_is_one_line_before_any_run(capsys, toy_lab: dict) -> None:  # noqa: ANN001
    argv = ["run", "toy-switch", "-e", "staging", "-c", toy_lab["config"]]
    code = main([*argv, "--directory", "/no/such/dir", "--apply"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert err.strip() == "toy-switch: bad input: --directory /no/such/dir: no such directory"
    assert "Traceback" not in err and "Flow run" not in err  # no Prefect run was created


@pytest.mark.flow
def test_refused_runs_exit_3_and_recover_resume_shortcuts(
    capsys, toy_lab: dict, prefect_server, tmp_path: Path
) -> None:  # noqa: ANN001
    from datetime import UTC, datetime

    import yaml

    from fabflows.cli import EXIT_REFUSED, shortcuts

    section = yaml.safe_load(Path(toy_lab["config"]).read_text())["fabflows"]
    day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][(datetime.now(UTC).weekday() + 3) % 7]
    section["environments"] = {
        "staging": {"windows": [{"days": [day], "start": "02:00", "end": "03:00"}]}
    }
    (tmp_path / "w").mkdir()
    windowed = write_config(tmp_path / "w", section)
    argv = ["run", "toy-switch", "-e", "staging", "-c", str(windowed), "--directory"]
    code = main([*argv, toy_lab["dir"], "--lines", "a", "--take-site-down", "--apply"])
    assert code == EXIT_REFUSED
    assert "refused:" in capsys.readouterr().err
    # the shortcuts, and resume finding the environment from the run's journal
    assert shortcuts(["recover", "-e", "staging", "--apply"]) == [
        "run",
        "recover-environment",
        "-e",
        "staging",
        "--apply",
    ]
    broken = Path(toy_lab["dir"]) / "broken-write-data"
    broken.write_text("")
    argv = ["run", "toy-switch", "-e", "staging", "-c", toy_lab["config"], "--directory"]
    assert main([*argv, toy_lab["dir"], "--lines", "a", "--apply"]) == 1
    from config import load_config
    from fabflows.runtime.journal import Journal

    journal = Journal.for_environment("myproject/staging", load_config(toy_lab["config"]))
    (entry,) = journal.open_entries()
    assert shortcuts(["resume", entry.run_id, "-c", toy_lab["config"]]) == [
        "run",
        "resume-run",
        "--run-id",
        entry.run_id,
        "-e",
        "staging",
        "-c",
        toy_lab["config"],
    ]
    broken.unlink()
    assert main(["resume", entry.run_id, "-c", toy_lab["config"], "--apply"]) == EXIT_OK
    assert journal.entry(entry.run_id).state == "done"
    assert main(["recover", "-e", "staging", "-c", toy_lab["config"]]) == EXIT_OK
    assert "nothing to change" in capsys.readouterr().out


def test_console_drops_the_traceback_of_a_run_ended_on_bad_input_or_a_refusal() -> None:
    import logging
    import sys

    from fabflows.cli import drop_bad_input_traceback
    from fabflows.errors import BadInput, Refused

    def record(exc: BaseException | None) -> logging.LogRecord:
        info = None
        if exc is not None:
            try:
                raise exc
            except BaseException:  # noqa: BLE001 - only to fill exc_info as logging does
                info = sys.exc_info()
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, "", 0, "x", None, info)

    assert not drop_bad_input_traceback(record(BadInput("no usable availability zone")))
    assert not drop_bad_input_traceback(record(Refused("environment busy")))
    assert drop_bad_input_traceback(record(RuntimeError("a real failure")))
    assert drop_bad_input_traceback(record(None))
