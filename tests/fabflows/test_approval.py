"""Approval under a real Prefect server: approve and reject through the API, timeout rejects,
every decision recorded with who made it; plus the audit trail of the same runs."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.settings import PREFECT_API_URL

from config import load_config, resolve_environment
from fabflows import approval, audit
from fabflows.testing.configs import SAMPLE

pytestmark = pytest.mark.usefixtures("prefect_server")


@flow(name="approval-probe")
def approval_probe(environment: str, timeout_seconds: int = 60):
    env = resolve_environment(load_config(SAMPLE), environment)
    starter = audit.record_start(env)
    assert approval.approval_required(env, destructive=True)
    try:
        decision = approval.request_approval(
            env,
            plan_markdown="| change | where |\n|---|---|\n| drop database | db-primary |",
            expected_downtime=timedelta(minutes=2),
            timeout=timedelta(seconds=timeout_seconds),
            poll=timedelta(seconds=1),
        )
    except approval.ApprovalRejected as exc:
        audit.record_summary(env, outcome=f"rejected: {exc}", starter=starter)
        return exc.as_state()
    audit.record_summary(env, outcome="completed", downtime=timedelta(seconds=3), starter=starter)
    return decision


def _run_in_thread(run_name: str, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target() -> None:
        out["result"] = approval_probe.with_options(flow_run_name=run_name)(
            environment="production", return_state=True, **kwargs
        )

    thread = threading.Thread(target=target)
    thread.start()
    return thread, out


def _paused_run(run_name: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name]))
            )
            if runs and runs[0].state and runs[0].state.is_paused():
                return runs[0]
            time.sleep(0.2)
    raise AssertionError(f"{run_name} never paused")


def _resume(run_id, run_input: dict) -> dict:
    """POST the resume as any API caller would; a 503 (the server's database busy under load)
    is retried, as Prefect's own client does."""
    for attempt in range(6):
        response = httpx.post(
            f"{PREFECT_API_URL.value()}/flow_runs/{run_id}/resume",
            json={"run_input": run_input},
            timeout=10,
        )
        if response.status_code != 503:
            break
        time.sleep(0.5 * (attempt + 1))
    response.raise_for_status()
    return response.json()


def _artifact(key: str) -> str:
    from prefect.artifacts import Artifact

    found = Artifact.get(key)
    assert found is not None, key
    return str(found.data)


def test_approved_through_the_api_records_who() -> None:
    thread, out = _run_in_thread("approve-case")
    run = _paused_run("approve-case")
    # a malformed decision is refused and the run stays paused
    assert _resume(run.id, {"approve": "yes please"})["status"] == "REJECT"
    assert (
        _resume(run.id, {"approve": True, "approver": "alice", "reason": "checked plan"})["status"]
        == "ACCEPT"
    )
    thread.join(60)
    decision = out["result"].result()
    assert decision.approved and decision.approver == "alice"
    with get_client(sync_client=True) as client:
        tags = client.read_flow_run(run.id).tags
    assert "approved-by:alice" in tags
    assert "started-by:cli:" in " ".join(tags)  # called in-process: the OS user
    request = _artifact("approval-approval-probe-myproject-production-request")
    assert "drop database" in request and "Expected downtime:** about 2 min" in request
    assert "approved" in _artifact("approval-approval-probe-myproject-production")
    summary = _artifact("run-summary-approval-probe-myproject-production")
    assert "Started by:** cli:" in summary and "Measured downtime:** 3.0 s" in summary


def test_rejected_run_ends_cancelled_with_who_and_why() -> None:
    thread, out = _run_in_thread("reject-case")
    run = _paused_run("reject-case")
    _resume(run.id, {"approve": False, "approver": "bob", "reason": "not tonight"})
    thread.join(60)
    state = out["result"]
    assert state.is_cancelled()
    assert "rejected by bob: not tonight" in state.message
    with get_client(sync_client=True) as client:
        assert "rejected-by:bob" in client.read_flow_run(run.id).tags


def test_no_decision_before_the_timeout_rejects() -> None:
    thread, out = _run_in_thread("timeout-case", timeout_seconds=2)
    thread.join(60)
    state = out["result"]
    assert state.is_cancelled(), state
    assert "no approval for myproject/production" in state.message
    assert "timeout" in _artifact("approval-approval-probe-myproject-production")


STARTER_CASES = [
    ("slack tag", ["started-by:slack:U42", "chatops"], False, "d", None, "slack:U42"),
    ("schedule", [], True, "d", None, "schedule:deployment-schedule"),
    ("ui quick run", [], False, "d", "Run from the Prefect UI with defaults", "ui:prefect-ui"),
    ("ui custom run form", [], False, "d", "", "ui:prefect-ui"),
    ("api without tag", [], False, "d", None, "api:unidentified"),
    ("in-process", [], False, None, None, "cli:"),
]


@pytest.mark.parametrize(
    ("what", "tags", "auto", "dep", "message", "label"),
    STARTER_CASES,
    ids=[c[0] for c in STARTER_CASES],
)
def test_identify_starter(what, tags, auto, dep, message, label) -> None:
    from uuid import uuid4

    starter = audit.identify_starter(tags, auto, uuid4() if dep else None, message)
    assert starter.label.startswith(label)


def test_started_by_tags_refuse_nonsense() -> None:
    assert audit.started_by_tags("api", "deploy-bot") == ["started-by:api:deploy-bot"]
    with pytest.raises(ValueError):
        audit.started_by_tags("nobody", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        audit.started_by_tags("api", " ")


WAITING_SCRIPT = """
import faulthandler
import signal
import sys
from datetime import timedelta

from prefect import flow

from config import load_config, resolve_environment
from fabflows import approval
from fabflows.cli import _quiet_console
from fabflows.testing.configs import SAMPLE


@flow(name="approval-terminal-probe")
def probe():
    env = resolve_environment(load_config(SAMPLE), "production")
    approval.request_approval(
        env, plan_markdown="drop database", expected_downtime=None,
        timeout=timedelta(seconds=120), poll=timedelta(seconds=1),
    )


faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if it hangs
signal.signal(  # and which SIGINT handler is in place then
    signal.SIGUSR2, lambda *_: print("SIGINT handler:", signal.getsignal(signal.SIGINT), file=sys.stderr)
)
_quiet_console(verbose=False)  # what `fabflows run` does without --verbose
probe.with_options(flow_run_name=sys.argv[1])()
"""


def test_terminal_wait_names_the_run_and_ctrl_c_removes_the_waiting_tag(tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "probe.py"
    script.write_text(WAITING_SCRIPT)
    stderr = tmp_path / "stderr"
    env = os.environ | {"PREFECT_API_URL": str(PREFECT_API_URL.value())}
    with open(stderr, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(script), "ctrl-c-case"],
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            # A terminal's Ctrl-C: a full run's worker process had come to ignore SIGINT (the
            # probe reported SIG_IGN), and a child inherits that; an operator's shell does not.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        run = _paused_run("ctrl-c-case", timeout=90)
        with get_client(sync_client=True) as client:
            assert approval.AWAITING_TAG in client.read_flow_run(run.id).tags
        deadline = time.monotonic() + 30
        while str(run.id) not in stderr.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        shown = stderr.read_text()
        assert f"resume run ctrl-c-case ({run.id})" in shown, shown
        assert f"/runs/flow-run/{run.id}" in shown  # the UI link
        assert f"curl -X POST {PREFECT_API_URL.value()}/flow_runs/{run.id}/resume" in shown
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            # seen once in a full parallel run: say where every thread of the probe was
            proc.send_signal(signal.SIGUSR2)
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            proc.send_signal(signal.SIGINT)  # does a second Ctrl-C end it?
            try:
                proc.wait(20)
                second = f"a second Ctrl-C ended it (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                second = "a second Ctrl-C did not end it either"
            raise AssertionError(
                f"still running 60 s after Ctrl-C; {second}; its output and threads:\n"
                + stderr.read_text()[-8000:]
            ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with get_client(sync_client=True) as client:
        after = client.read_flow_run(run.id)
    assert after.state.is_crashed(), after.state
    assert approval.AWAITING_TAG not in after.tags, after.tags
