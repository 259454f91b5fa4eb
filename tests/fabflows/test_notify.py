"""Notifications and the watchdog without peers: the messages, the automations deploy registers,
the watchdog's schedule and report (the real stack is in tests/e2e/test_notifications.py and
tests/flows/test_watchdog.py)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from config import load_config, resolve_environment
from fabflows.notify import messages
from fabflows.notify.automations import automations, events_wanted
from fabflows.notify.notifier import run_id_of, slow_after
from fabflows.testing.configs import write_config

FACTS = messages.RunFacts(
    run_id="r1",
    run_name="brave-otter",
    flow="restart-app",
    environment="myproject/staging",
    started_by="schedule:deployment-schedule",
    state="FAILED",
    state_message="Flow run encountered an exception: RuntimeError: boom",
    link="http://ui/runs/flow-run/r1",
    failing_step="restart",
    left=["suspend (done)", "restart (failed)"],
    journal_state="failed",
)


def test_failed_run_message_has_every_field() -> None:
    notice = messages.ended_notice(FACTS)
    assert notice is not None and notice.event == "failed" and notice.key == "r1-ended"
    text = notice.render()
    for line in (
        "Flow: restart-app",
        "Environment: myproject/staging",
        "Started by: schedule:deployment-schedule",
        "Failing step: restart",
        "Message: Flow run encountered an exception: RuntimeError: boom",
        "Left behind: suspend (done), restart (failed)",
        "To recover: fabflows recover -e staging",
        "Run: brave-otter http://ui/runs/flow-run/r1",
    ):
        assert line in text.splitlines(), (line, text)


@pytest.mark.parametrize(
    ("state", "message", "event"),
    [
        ("CRASHED", "No heartbeat", "crashed"),
        ("CANCELLED", "plan rejected by dana", "cancelled"),
        (
            "CANCELLED",
            "no approval for myproject/staging within 3600 s: rejected",
            "approval-timeout",
        ),
        ("COMPLETED", "", None),
    ],
)
def test_end_states(state: str, message: str, event: str | None) -> None:
    notice = messages.ended_notice(
        FACTS.model_copy(update={"state": state, "state_message": message})
    )
    assert (notice.event if notice else None) == event


def test_no_journal_says_nothing_was_applied() -> None:
    notice = messages.ended_notice(FACTS.model_copy(update={"journal_state": None, "left": []}))
    assert "Left behind: nothing (no journal: it applied nothing)" in notice.render()


def test_plan_summary_from_the_approval_request(tmp_path: Path) -> None:
    from fabflows.approval import describe_request

    config = load_config(write_config(tmp_path))
    env = resolve_environment(config, "staging")
    text = describe_request(env, "reload", "| a | b |\n" * 30, timedelta(seconds=90), "slack:U1")
    plan, downtime, asked = messages.plan_summary(text)
    assert downtime == "about 1 min 30 s" and asked == "slack:U1"
    assert plan.count("| a | b |") == 15 and "15 more lines" in plan


def test_slow_after_is_the_factor_and_at_least_the_minimum() -> None:
    assert slow_after(timedelta(seconds=100), 1.5, 0) == timedelta(seconds=150)
    assert slow_after(timedelta(seconds=2), 1.5, 60) == timedelta(seconds=62)


def test_run_id_from_an_event_resource() -> None:
    rid = uuid.uuid4()
    assert run_id_of(f"prefect.flow-run.{rid}") == rid == run_id_of(str(rid))


def test_automations_follow_the_config(tmp_path: Path) -> None:
    off = {e: {"recover_on_crash": False} for e in ("staging", "production", "testing")}
    none = load_config(write_config(tmp_path, fabflows={"environments": off}))
    assert automations(none, uuid.uuid4()) == []  # no block, no crash recovery: nothing registered
    default = load_config(write_config(tmp_path, fabflows={}))
    (crashed,) = automations(default, uuid.uuid4())  # recover_on_crash (default), no block
    assert crashed.name == "fabflows: notify run ended"
    assert crashed.trigger.expect == {"prefect.flow-run.Crashed"}
    notified = load_config(
        write_config(
            tmp_path,
            fabflows={"environments": {"staging": {"notifications": {"block": "ops"}}}},
        )
    )
    late = {a.name: a for a in automations(notified, uuid.uuid4())}[
        "fabflows: notify heartbeat late"
    ]
    # heartbeats late: a notifier run waits for the zombie automation's CRASHED (30 s before it)
    assert late.trigger.after == {"prefect.flow-run.heartbeat"}
    assert late.trigger.within == timedelta(seconds=90)  # zombie after 120 s (the default)
    assert late.actions[0].parameters["kind"] == "check-crash"
    some = load_config(
        write_config(
            tmp_path,
            fabflows={
                "environments": {
                    "production": {"notifications": {"block": "ops", "events": ["failed"]}},
                    "staging": {"notifications": {"block": "ops", "events": ["approval", "slow"]}},
                },
                "approval": {"timeout_minutes": 30},
            },
        )
    )
    assert events_wanted(some) == {"failed", "approval", "slow"}
    made = {a.name.removeprefix("fabflows: notify "): a for a in automations(some, uuid.uuid4())}
    # no "heartbeat late": no environment here notifies crashed runs
    assert set(made) == {"run ended", "approval pending", "approval reminder", "run started"}
    assert made["run ended"].trigger.expect == {
        "prefect.flow-run.Failed",
        "prefect.flow-run.Crashed",  # not notified here, but recovered (recover_on_crash)
        "prefect.flow-run.Cancelled",  # an approval timeout ends the run CANCELLED
    }
    assert made["approval reminder"].trigger.within == timedelta(minutes=15)
    action = made["run ended"].actions[0]
    assert action.parameters == {"flow_run_id": "{{ event.resource.id }}", "kind": "ended"}


def test_watchdog_is_scheduled_per_environment_unless_switched_off(tmp_path: Path) -> None:
    from deployments.generate import plan_deployments

    path = write_config(tmp_path, fabflows={"environments": {"testing": {"watchdog_cron": None}}})
    plan = plan_deployments(load_config(path), {"watchdog": "flows.watchdog:watchdog"}, path)
    crons = {d.environment: [s.cron for s in d.schedules] for d in plan.deployments}
    assert crons == {"staging": ["*/5 * * * *"], "production": ["*/5 * * * *"], "testing": []}
    assert plan.warnings == []


def test_watchdog_report_lists_findings(tmp_path: Path) -> None:
    from flows.watchdog import Finding, WatchdogFacts, plan_watchdog

    config = load_config(write_config(tmp_path))
    env = resolve_environment(config, "staging")
    facts = WatchdogFacts(
        findings=[Finding(kind="upgrade-page", what="page on web-1", recovery="end-upgrade")]
    )
    plan = plan_watchdog(facts, env)
    assert plan.notes == ["FOUND upgrade-page: page on web-1 -> end-upgrade"]
    assert not plan.changed
    assert plan_watchdog(WatchdogFacts(), env).noops == ["no maintenance state left behind"]


def test_crash_notice_names_the_recovery_it_started() -> None:
    started = (
        "started: calm-fox http://ui/runs/flow-run/r2 (recover-environment, maintenance state)"
    )
    crashed = FACTS.model_copy(update={"state": "CRASHED", "recovery": started})
    lines = messages.ended_notice(crashed).render().splitlines()
    assert f"Recovery: {started}" in lines
    assert "To recover: fabflows recover -e staging" in lines  # the data steps it leaves
    assert not any(
        x.startswith("Recovery:") for x in messages.ended_notice(FACTS).render().split("\n")
    )
