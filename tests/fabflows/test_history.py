"""`fabflows runs` and `fabflows show` read real runs from a real Prefect server (the test harness)."""

from __future__ import annotations

import itertools
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from config import load_config, resolve_environment
from fabflows import audit, history
from fabflows.cli import EXIT_BAD_INPUT, EXIT_OK, main
from fabflows.report import publish_markdown
from fabflows.testing.configs import SAMPLE, moto_section, write_config
from sandbox.aws_seed import seed

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(autouse=True)
def _harness_api(monkeypatch, tmp_path: Path) -> None:
    """The CLI reads the harness's API, never a `fabflows server` the developer keeps running."""
    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))
    monkeypatch.setenv("FABFLOWS_SERVER_STATE", str(tmp_path / "no-server"))


@flow(name="history-probe")
def history_probe(fail: bool) -> str:
    env = resolve_environment(load_config(SAMPLE), "production")
    starter = audit.record_start(env)
    publish_markdown(
        "history-probe-myproject-production-plan",
        "| step | where |\n|---|---|\n| stop nginx | web-1 (i-0abc) |",
        "plan",
    )
    audit.record_summary(
        env, outcome="stopped at step 2", downtime=timedelta(seconds=4.5), starter=starter
    )
    if fail:
        raise RuntimeError("step 2 failed: nginx did not stop")
    return "done"


def test_runs_and_show_of_real_cli_runs(tmp_path: Path, aws, capsys) -> None:
    config = write_config(
        tmp_path,
        fabflows=moto_section(aws.endpoint, staging={"target_groups": ["myproject-staging-web"]}),
    )
    seed(
        aws.endpoint,
        load_config(config),
        ["staging"],
        "10.222.0.0/24",
        (f"10.222.0.{i}" for i in itertools.count(10)),
    )
    assert main(["run", "describe-environment", "-e", "staging", "-c", str(config)]) == EXIT_OK
    capsys.readouterr()

    assert main(["runs", "--environment", "staging", "--limit", "1"]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "run", "flow", "environment", "state", "started", "by", "start", "duration", "downtime"
    ]  # fmt: skip
    assert len(lines) == 3  # header, rule, one run
    row = lines[2]
    for cell in ("describe-environment", "myproject/staging", "COMPLETED", "cli:"):
        assert cell in row, row
    assert row.split()[-1] == "none"  # describe causes no downtime: its summary says so
    name = row.split()[0]

    assert main(["runs", "-e", "myproject/staging"]) == EXIT_OK
    assert name in capsys.readouterr().out
    assert main(["runs", "-e", "nowhere"]) == EXIT_OK
    assert "no fabflows runs on nowhere" in capsys.readouterr().out

    assert main(["show", name]) == EXIT_OK
    shown = capsys.readouterr().out
    assert f"run:          {name} (" in shown
    assert "state:        COMPLETED" in shown
    assert "flow:         describe-environment" in shown
    assert "# describe-environment on myproject/staging: " in shown  # the run summary
    assert "/runs/flow-run/" in shown

    for unknown in ("no-such-run", str(uuid4())):
        assert main(["show", unknown]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "fabflows show: no flow run" in err, err


def test_failed_run_shows_state_message_plan_and_downtime(capsys) -> None:
    state = history_probe.with_options(flow_run_name=f"probe-{uuid4().hex[:8]}")(
        fail=True, return_state=True
    )
    assert state.is_failed()
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        rows = history.recent_runs(client, environment="production", flow_names=["history-probe"])
    ours = next(r for r in rows if r["run"].startswith("probe-"))
    assert ours["state"] == "FAILED"
    assert ours["downtime"] == "4.5 s"
    assert ours["environment"] == "myproject/production"
    assert ours["started by"].startswith("cli:")

    assert main(["show", str(run_id)]) == EXIT_OK
    shown = capsys.readouterr().out
    assert "state:        FAILED" in shown
    assert "step 2 failed: nginx did not stop" in shown  # the state message
    assert "Measured downtime:** 4.5 s" in shown  # the run summary
    assert "## Plan" in shown and "web-1 (i-0abc)" in shown  # the plan artifact


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (3.25, "3.2s"), (61, "1m01s"), (3725, "1h02m")],
)
def test_format_duration(seconds, text) -> None:
    assert history.format_duration(seconds) == text
