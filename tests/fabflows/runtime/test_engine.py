"""The runbook engine, through a real Prefect server and the file journal, on a toy runbook
whose system is a directory (tests/fabflows/runtime/toy.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from fabflows.errors import BadInput
from fabflows.registry import FLOWS
from fabflows.runtime.engine import prevalidate
from fabflows.runtime.journal import Journal
from fabflows.testing import faults
from fabflows.testing.configs import moto_section, write_config
from flows.recover_environment import recover_environment
from tests.fabflows.runtime import toy

pytestmark = [pytest.mark.flow]

LABEL = "myproject/staging"


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FLOWS, toy.NAME, "tests.fabflows.runtime.toy:toy_switch")


@pytest.fixture
def lab(tmp_path: Path, aws, prefect_server) -> dict:  # noqa: ANN001
    system = tmp_path / "system"
    system.mkdir()
    (system / "suspended.json").write_text(json.dumps(["AZRebalance"]))
    state = tmp_path / "state"
    cfg = write_config(
        tmp_path, {**moto_section(aws.endpoint, staging={}), "state_dir": str(state)}
    )
    return {"dir": system, "config": str(cfg), "state": state}


def _run(lab: dict, **kw):  # noqa: ANN202
    args = dict(environment="staging", directory=str(lab["dir"]), config=lab["config"])
    args.update(kw)
    return toy.toy_switch(**args, return_state=True)


def _journal(lab: dict) -> Journal:
    from config import load_config

    return Journal.for_environment(LABEL, load_config(lab["config"]))


def test_dry_run_plans_and_changes_nothing(lab: dict) -> None:
    state = _run(lab, lines=["a", "b"])
    report = state.result()
    assert report.dry_run and "would apply 3 step(s)" in report.outcome
    assert "add a" in report.plan_text and report.plan_digest
    assert toy.read(lab["dir"]).data == []
    assert _journal(lab).entries() == []


def test_apply_journals_every_step_and_closes(lab: dict) -> None:
    report = _run(lab, lines=["a"], dry_run=False).result()
    assert [s.state for s in report.steps] == ["done", "done", "done"]
    assert toy.read(lab["dir"]).data == ["a"]
    assert toy.read(lab["dir"]).suspended == ["AZRebalance"]  # put back exactly
    (entry,) = _journal(lab).entries()
    assert entry.state == "done" and entry.flow == toy.NAME
    assert entry.step("suspend").data == {"before": ["AZRebalance"]}
    assert entry.plan_digest == report.plan_digest
    again = _run(lab, lines=["a"], dry_run=False).result()
    assert again.outcome == "nothing to change"


def test_failure_undoes_maintenance_and_leaves_data_for_recover(lab: dict) -> None:
    (lab["dir"] / "broken-write-data").write_text("")
    state = _run(lab, lines=["a", "b"], dry_run=False)
    assert state.is_failed()
    facts = toy.read(lab["dir"])
    assert facts.suspended == ["AZRebalance"]  # undone at once, exactly as before
    assert facts.data == ["a"]  # the data step is left as it is
    (entry,) = _journal(lab).open_entries()
    assert entry.state == "failed"
    assert entry.step("suspend").state == "undone"
    assert entry.step("write-data").state == "failed"
    # an automatic recovery (maintenance only) leaves the data step, for a person
    auto = recover_environment(
        environment="staging", config=lab["config"], dry_run=False, maintenance_only=True
    )
    assert "write-data: changes data; left" in auto.plan_text and "resume" in auto.plan_text
    assert toy.read(lab["dir"]).data == ["a"]
    # a person's recover undoes it from the journal
    full = recover_environment(environment="staging", config=lab["config"], dry_run=False)
    assert [s.name for s in full.steps] == [f"undo-{entry.run_id[:8]}-write-data"]
    assert toy.read(lab["dir"]).data == []
    assert _journal(lab).entry(entry.run_id).state == "recovered"


def test_resume_goes_on_from_the_failed_step(lab: dict) -> None:
    (lab["dir"] / "broken-write-data").write_text("")
    failed = _run(lab, lines=["a", "b"], dry_run=False)
    assert failed.is_failed()
    (run_id,) = [e.run_id for e in _journal(lab).open_entries()]
    (lab["dir"] / "broken-write-data").unlink()
    from flows.resume_run import resume_run

    report = resume_run(environment="staging", run_id=run_id, config=lab["config"], dry_run=False)
    states = {s.name: s.state for s in report.steps}
    assert states["write-data"] == "done" and states["resume"] == "done"
    assert toy.read(lab["dir"]).data == ["a", "b"]  # 'a' not written twice
    assert toy.read(lab["dir"]).suspended == ["AZRebalance"]
    assert _journal(lab).entry(run_id).state == "done"


def test_plan_changed_under_the_lock_is_refused(lab: dict, monkeypatch) -> None:  # noqa: ANN001
    calls = {"n": 0}
    real = toy.Toy.gather

    def gather(self, scope, params):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 2:  # someone else changed the system between plan and lock
            (lab["dir"] / "data.txt").write_text("a\n")
        return real(self, scope, params)

    monkeypatch.setattr(toy.Toy, "gather", gather)
    state = _run(lab, lines=["a", "b"], dry_run=False)
    assert state.is_cancelled()
    assert "the plan changed" in state.message and "add a" in state.message
    assert toy.read(lab["dir"]).suspended == ["AZRebalance"]
    assert _journal(lab).entries() == []


def test_outside_the_window_apply_is_refused_and_dry_run_says_so(tmp_path: Path, lab: dict) -> None:
    now = datetime.now(UTC)
    day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][(now.weekday() + 3) % 7]
    wdir = tmp_path / "windowed"
    wdir.mkdir()
    section = _section(lab)
    section["environments"] = {
        "staging": {"windows": [{"days": [day], "start": "02:00", "end": "03:00"}]}
    }
    cfg = write_config(wdir, section)
    state = _run(lab, config=str(cfg), lines=["a"], take_site_down=True, dry_run=False)
    assert state.is_cancelled() and "outside its maintenance window" in state.message
    assert toy.read(lab["dir"]).data == []
    dry = _run(lab, config=str(cfg), lines=["a"], take_site_down=True).result()
    assert "would be refused" in dry.details["Window"]


def _section(lab: dict) -> dict:
    import yaml

    return yaml.safe_load(Path(lab["config"]).read_text())["fabflows"]


def test_bad_input_is_refused_before_a_run(lab: dict) -> None:
    with pytest.raises(BadInput, match="no such directory"):
        prevalidate(
            toy.toy_switch,
            {"environment": "staging", "config": lab["config"], "directory": "/nonexistent"},
        )
    with pytest.raises(BadInput, match="directory"):
        prevalidate(toy.toy_switch, {"environment": "staging", "config": lab["config"]})


def test_sigkill_inside_the_site_down_step_then_recover(lab: dict, tmp_path: Path) -> None:
    marker = tmp_path / "paused"
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        FABFLOWS_TEST_PAUSE_AT=f"{toy.NAME}/write-data",
        FABFLOWS_TEST_PAUSE_MARKER=str(marker),
    )
    code = (
        "import sys; from fabflows.registry import FLOWS; "
        f"FLOWS[{toy.NAME!r}] = 'tests.fabflows.runtime.toy:toy_switch'; " + faults.CLI_CODE
    )
    argv = [sys.executable, "-c", code, "run", toy.NAME, "-e", "staging", "-c", lab["config"]]
    argv += ["--directory", str(lab["dir"]), "--lines", "a", "--take-site-down", "--apply"]
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=Path(__file__).resolve().parents[3],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(proc.stderr.read().decode()[-3000:])
            assert time.monotonic() < deadline, "never reached write-data"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    facts = toy.read(lab["dir"])
    assert facts.page and "Launch" in facts.suspended  # what the dead run left
    dry = recover_environment(environment="staging", config=lab["config"])
    assert "undo page-on" in dry.plan_text and "undo suspend" in dry.plan_text
    report = recover_environment(environment="staging", config=lab["config"], dry_run=False)
    assert not report.problems, report.render_text()
    facts = toy.read(lab["dir"])
    assert not facts.page and facts.suspended == ["AZRebalance"]
    (entry,) = _journal(lab).entries()[:1]
    assert entry.state == "recovered"
    # a second recover finds nothing
    again = recover_environment(environment="staging", config=lab["config"], dry_run=False)
    assert again.outcome == "nothing to change"


def test_prefects_retry_of_a_failed_run_resumes_it(lab: dict) -> None:
    """`prefect flow-run retry` (the UI's Retry) runs the same flow run id again: the engine finds
    that run's open journal and goes on from the failed step instead of starting over."""
    (lab["dir"] / "broken-write-data").write_text("")
    failed = _run(lab, lines=["a", "b"], dry_run=False)
    assert failed.is_failed()
    run_id = str(failed.state_details.flow_run_id)
    (lab["dir"] / "broken-write-data").unlink()
    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    entrypoint = str(Path(toy.__file__).resolve()) + ":toy_switch"
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "flow-run", "retry", run_id, "--entrypoint", entrypoint],
        env=env,
        cwd=Path(__file__).resolve().parents[3],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    entry = _journal(lab).entry(run_id)
    assert entry.state == "done"
    kinds = [e["kind"] for e in _journal(lab).backend.events(run_id)]
    assert kinds.count("open") == 1 and "reopen" in kinds  # the same journal, gone on with
    assert toy.read(lab["dir"]).data == ["a", "b"]  # 'a' once: write-data went on, not over
    assert toy.read(lab["dir"]).suspended == ["AZRebalance"]


def test_a_plan_with_downtime_needs_the_window_even_if_the_params_did_not_say(
    tmp_path: Path, lab: dict, monkeypatch
) -> None:  # noqa: ANN001
    monkeypatch.setattr(toy.Toy, "window_required", lambda self, env, params: False)
    day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][(datetime.now(UTC).weekday() + 3) % 7]
    wdir = tmp_path / "windowed"
    wdir.mkdir()
    section = _section(lab)
    section["environments"] = {
        "staging": {"windows": [{"days": [day], "start": "02:00", "end": "03:00"}]}
    }
    cfg = str(write_config(wdir, section))
    state = _run(lab, config=cfg, lines=["a"], take_site_down=True, dry_run=False)
    assert state.is_cancelled() and "the plan expects downtime" in state.message
    assert toy.read(lab["dir"]).data == []
    # no downtime planned: the same runbook applies outside the window
    assert _run(lab, config=cfg, lines=["a"], dry_run=False).result().steps
