"""The notifier's planning without peers: which scheduled state's event a run must emit (the
scheduler inserts it without one), and when the approval checks are due (the real stack is in
tests/e2e/test_notifications.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prefect.client.schemas.objects import StateDetails
from prefect.states import Paused, Pending, Running, Scheduled

from fabflows.notify.notifier import Check, _approval_checks, plan_checks
from fabflows.notify.ordering import missing_leader
from fabflows.testing.configs import write_config

T0 = datetime(2026, 12, 3, 22, 30, tzinfo=UTC)


def _at(state, seconds: float):  # noqa: ANN001, ANN202
    return state.model_copy(update={"timestamp": T0 + timedelta(seconds=seconds)})


@pytest.mark.parametrize(
    ("states", "leader"),
    [
        # scheduled 2 min before it started: the PENDING event follows the SCHEDULED one
        ([_at(Scheduled(), 0), _at(Pending(), 120), _at(Running(), 125)], 0),
        # any order, as the API returns them
        ([_at(Running(), 125), _at(Scheduled(), 0), _at(Pending(), 120)], 0),
        # scheduled long before: no follows, nothing waits
        ([_at(Scheduled(), 0), _at(Pending(), 301), _at(Running(), 305)], None),
        # not created SCHEDULED
        ([_at(Pending(), 0), _at(Running(), 3)], None),
        ([_at(Scheduled(), 0)], None),
    ],
)
def test_missing_leader(states, leader) -> None:  # noqa: ANN001
    found = missing_leader(states)
    if leader is None:
        assert found is None
    else:
        assert found is not None and found.type.value == "SCHEDULED"


def test_approval_checks_half_way_and_at_the_deadline() -> None:
    # Prefect's DateTime as the API returns it: the checks' times are plain aware datetimes
    from prefect.types._datetime import DateTime

    deadline = DateTime(2026, 12, 3, 23, 30, tzinfo=UTC)
    state = Paused().model_copy(
        update={"timestamp": T0, "state_details": StateDetails(pause_timeout=deadline)}
    )

    class Run:
        pass

    run = Run()
    run.state = state
    reminder, timeout = _approval_checks(run)
    assert (reminder.kind, reminder.due) == ("check-reminder", T0 + timedelta(minutes=30))
    assert (timeout.kind, timeout.due) == ("check-timeout", T0 + timedelta(minutes=60))
    assert reminder.extra == timeout.extra == {"since": T0.isoformat()}
    assert reminder.due - timedelta(seconds=60) < timeout.due  # comparable: no TypeError


def test_checks_of_one_state_are_planned_once(tmp_path) -> None:  # noqa: ANN001
    from config import load_config

    config = load_config(write_config(tmp_path, {"state_dir": str(tmp_path / "state")}))
    run_id = uuid.uuid4()
    since = {"since": T0.isoformat()}
    checks = [
        Check("check-slow", T0 + timedelta(hours=2), since),
        Check("check-window", T0 + timedelta(hours=1), since),
    ]
    # the run itself does them (a thread): no client call, in due order
    here, said = plan_checks(None, config, run_id, checks, now=T0, in_run=True)
    assert [c.kind for c in here] == ["check-window", "check-slow"], said
    # the notifier run an automation started finds them planned
    here, said = plan_checks(None, config, run_id, checks, now=T0)
    assert here == [] and said == ["check-window: already planned", "check-slow: already planned"]


@pytest.mark.parametrize(
    ("heartbeat", "zombie", "late"),
    [(30, 60, 40), (30, 120, 90), (60, 60, 90), (30, 600, 570)],
)
def test_heartbeat_late_before_the_zombie_automation(heartbeat, zombie, late) -> None:  # noqa: ANN001
    from fabflows.notify.notifier import heartbeat_late_after, zombie_after

    assert heartbeat_late_after(heartbeat, zombie) == timedelta(seconds=late)
    # a missed beat first, and time for a notifier run to start before CRASHED
    assert late > heartbeat
    assert zombie_after(heartbeat, zombie).total_seconds() - late >= 20
