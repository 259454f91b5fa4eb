"""Which secret-file rollout leftovers are orphans (no open journal claims them): facts in,
findings out, no peer. The servers' side is in tests/flows/test_watchdog.py."""

from __future__ import annotations

import pytest

from fabflows.procedures.staged_secrets import journal_claims, orphans
from fabflows.runtime.journal import JournalEntry, StepRecord
from tasks.ssh.staged_secrets import StagedLeftovers, is_leftover_path

PW = "/home/deploy/database_password"
USERLIST = "/etc/pgbouncer/userlist.txt"


def _entry(state: str, paths: dict | None, step_state: str = "done") -> JournalEntry:
    steps = (
        [] if paths is None else [StepRecord(name="stage", state=step_state, data={"paths": paths})]
    )
    return JournalEntry(
        run_id="r1", flow="push-server-secrets", environment="d/staging", state=state, steps=steps
    )


def _server(address: str = "10.0.0.5", **kw: list[str]) -> StagedLeftovers:
    return StagedLeftovers(host=f"web ({address})", address=address, **kw)


@pytest.mark.parametrize(
    ("found", "entries", "left"),
    [
        # nobody claims them: all of it
        (
            [_server(staged=[PW + ".fabflows-next"], backups=[USERLIST + ".fabflows-prev"])],
            [],
            [[PW + ".fabflows-next", USERLIST + ".fabflows-prev"]],
        ),
        # a dead run's journal staged the password file on this server: its undo owns it
        (
            [_server(staged=[PW + ".fabflows-next"], backups=[USERLIST + ".fabflows-absent"])],
            [_entry("running", {"10.0.0.5": [PW]})],
            [[USERLIST + ".fabflows-absent"]],
        ),
        # ... and started staging (killed mid-step): still its own
        (
            [_server(staged=[PW + ".fabflows-next"])],
            [_entry("failed", {"10.0.0.5": [PW]}, step_state="started")],
            [],
        ),
        # a claim on another server does not cover this one
        (
            [_server(staged=[PW + ".fabflows-next"])],
            [_entry("running", {"10.0.0.6": [PW]})],
            [[PW + ".fabflows-next"]],
        ),
        # an undone stage step claims nothing; upload directories are never claimed
        (
            [_server(staged=[PW + ".fabflows-next"], uploads=["/home/deploy/.fabflows-stage-ab"])],
            [_entry("failed", {"10.0.0.5": [PW]}, step_state="undone")],
            [[PW + ".fabflows-next", "/home/deploy/.fabflows-stage-ab"]],
        ),
        # a journal without a stage step
        (
            [_server(backups=[PW + ".fabflows-prev"])],
            [_entry("running", None)],
            [[PW + ".fabflows-prev"]],
        ),
    ],
)
def test_orphans(found, entries, left) -> None:  # noqa: ANN001
    assert [s.paths for s in orphans(found, journal_claims(entries))] == left


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        (PW + ".fabflows-next", True),
        (PW + ".fabflows-prev", True),
        (PW + ".fabflows-absent", True),
        ("/home/deploy/.fabflows-stage-0123abcd", True),
        (PW, False),  # the live file itself
        ("/home/deploy/.fabflows-stage-", False),
        ("/home/deploy", False),
        ("database_password.fabflows-next", False),  # relative
    ],
)
def test_only_a_rollouts_own_names_can_be_removed(path: str, ok: bool) -> None:
    assert is_leftover_path(path) is ok


def test_recover_plan_removes_each_servers_leftovers() -> None:
    import yaml

    from config import resolve_environment
    from config.models import FabulawsConfig
    from fabflows.testing.configs import SAMPLE
    from flows.recover_environment import (
        RUNBOOK,
        STAGED_STEP,
        RecoverFacts,
        RecoverParams,
        plan_recover_environment,
    )

    data = yaml.safe_load(SAMPLE.read_text())
    data.update(deploy_user="deploy")
    env = resolve_environment(FabulawsConfig.model_validate(data), "staging")
    web = _server(staged=[PW + ".fabflows-next"], uploads=["/home/deploy/.fabflows-stage-ab"])
    worker = _server("10.0.0.6", backups=[PW + ".fabflows-prev"])
    facts = RecoverFacts(staged=[web, worker], staged_notes=["not checked on cache-1: timeout"])
    plan = plan_recover_environment(facts, env)
    assert [(c.target, c.step, c.detail) for c in plan.changes] == [
        (web.host, STAGED_STEP, f"{PW}.fabflows-next, /home/deploy/.fabflows-stage-ab"),
        (worker.host, STAGED_STEP, f"{PW}.fabflows-prev"),
    ]
    assert "not checked on cache-1: timeout" in plan.notes
    assert [s.name for s in RUNBOOK.steps(plan, RecoverParams())] == [STAGED_STEP]
    nothing = plan_recover_environment(RecoverFacts(), env)
    assert nothing.changes == [] and RUNBOOK.steps(nothing, RecoverParams()) == []
