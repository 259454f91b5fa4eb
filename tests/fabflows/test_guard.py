"""Windows and the step guard: pure, table-driven."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from config import load_config, resolve_environment
from config.models import MaintenanceWindow
from fabflows import guard
from fabflows.testing.configs import SAMPLE

NY = ZoneInfo("America/New_York")
BASE = resolve_environment(load_config(SAMPLE), "production")
# weeknights 20:00-23:30 and Saturday 22:00 to Sunday 02:00, New York time
ENV = BASE.model_copy(
    update={
        "time_zone": "America/New_York",
        "windows": [
            MaintenanceWindow(
                days=["mon", "tue", "wed", "thu", "fri"], start=time(20), end=time(23, 30)
            ),
            MaintenanceWindow(days=["sat"], start=time(22), end=time(2)),
        ],
    }
)


def at(day: int, hour: int, minute: int = 0) -> datetime:
    """November 2026: the 23rd is a Monday."""
    return datetime(2026, 11, day, hour, minute, tzinfo=NY)


WINDOW_CASES = [
    ("monday evening inside", at(23, 21), True, at(23, 23, 30)),
    ("monday before", at(23, 19, 59), False, None),
    ("monday at close", at(23, 23, 30), False, None),
    ("saturday late", at(28, 23), True, at(29, 2)),
    ("past midnight into sunday", at(29, 1, 30), True, at(29, 2)),
    ("sunday afternoon", at(29, 15), False, None),
]


@pytest.mark.parametrize(
    ("what", "now", "allowed", "end"), WINDOW_CASES, ids=[c[0] for c in WINDOW_CASES]
)
def test_check_window(what, now, allowed, end) -> None:
    d = guard.check_window(ENV, now)
    assert d.allowed is allowed
    assert d.window_end == end
    if not allowed:
        assert "outside its maintenance window" in d.explain()
        assert d.next_start is not None and d.next_start > now


def test_window_in_utc_moment_is_read_in_the_env_zone() -> None:
    # 01:30 UTC Tuesday = 20:30 Monday in New York
    d = guard.check_window(ENV, datetime(2026, 11, 24, 1, 30, tzinfo=ZoneInfo("UTC")))
    assert d.allowed and d.window_end == at(23, 23, 30)


def test_next_window_start() -> None:
    assert guard.next_window_start(ENV, at(29, 15)) == at(30, 20)  # sunday -> monday 20:00
    assert guard.next_window_start(ENV, at(27, 23, 45)) == at(28, 22)  # friday late -> saturday


def test_refused_outside_without_override_and_recorded_with_one() -> None:
    with pytest.raises(guard.OutsideWindow, match="next window opens Mon 2026-11-30 20:00"):
        guard.require_window(ENV, now=at(29, 15))
    d = guard.require_window(
        ENV, override_reason="database corruption, vendor on call", now=at(29, 15)
    )
    assert d.allowed and d.override_reason and d.deadline is None
    assert "overridden" in d.explain()


@pytest.mark.parametrize("reason", ["", "  ok  ", "because"])
def test_override_reason_must_say_something(reason) -> None:
    with pytest.raises(ValueError, match="too short"):
        guard.check_window(ENV, at(29, 15), override_reason=reason)


def test_no_windows_means_unrestricted() -> None:
    env = ENV.model_copy(update={"windows": []})
    d = guard.require_window(env, now=at(29, 15))
    assert d.unrestricted and d.deadline is None


def _steps(now: datetime, history: dict) -> guard.StepGuard:
    decision = guard.check_window(ENV, now)
    return guard.StepGuard(
        decision,
        "reload-production-db",
        ENV,
        history=guard.DurationHistory("reload-production-db", ENV.label, store=history),
        clock=lambda: now,
    )


STEP_CASES = [
    # (what, now, history seconds, expected override, fits)
    ("no history: allowed", at(23, 23, 25), [], None, True),
    ("fits easily", at(23, 21), [600, 900], None, True),
    ("longest of last three decides", at(23, 22, 40), [4000, 600, 900, 1000], None, True),
    ("longest recent run does not fit", at(23, 23, 1), [600, 1500, 900], None, False),
    ("margin counts", at(23, 23, 10), [1100], None, False),  # 1100 s x1.2 > 20 min
    ("explicit expectation", at(23, 23), [], timedelta(hours=1), False),
]


@pytest.mark.parametrize(
    ("what", "now", "past", "expected", "fits"), STEP_CASES, ids=[c[0] for c in STEP_CASES]
)
def test_step_guard(what, now, past, expected, fits) -> None:
    steps = _steps(now, {"copy-database": past} if past else {})
    if fits:
        steps.check("copy-database", expected)
    else:
        with pytest.raises(guard.StepDoesNotFit, match="'copy-database' is not started.*closes in"):
            steps.check("copy-database", expected)


def test_step_records_its_duration_only_on_success() -> None:
    store: dict = {}
    steps = _steps(at(23, 21), store)
    with steps.step("swap"):
        pass
    assert len(store["swap"]) == 1
    with pytest.raises(RuntimeError), steps.step("swap"):
        raise RuntimeError("boom")
    assert len(store["swap"]) == 1


def test_stops_are_cancelled_states_with_the_reason() -> None:
    state = guard.StepDoesNotFit("window closing").as_state()
    assert state.is_cancelled() and state.message == "window closing"


def test_durations_are_kept_in_a_prefect_variable(prefect_server) -> None:
    from prefect.variables import Variable

    history = guard.DurationHistory("reload-production-db", "myproject/staging")
    for seconds in (100, 700, 200, 300):
        history.record("copy-database", seconds)
    assert history.expected("copy-database").total_seconds() == 700  # longest of the last three
    history.record("copy-database", 50)
    assert history.expected("copy-database").total_seconds() == 300
    stored = Variable.get("fabflows-durations-reload-production-db-myproject-staging")
    assert stored["copy-database"][-1] == 50
    assert (
        guard.DurationHistory("other-flow", "myproject/staging").expected("copy-database") is None
    )


# --------------------------------------------------------------------------- DST
# Saturday 23:00 to Sunday 03:00 New York time, across the two change nights of 2026: on
# 2026-03-08 clocks jump 02:00 -> 03:00 (the window lasts 3 real hours), on 2026-11-01 they fall
# back 02:00 -> 01:00 (5 real hours). Opening, closing and the step guard count real hours.

UTC_ = ZoneInfo("UTC")
OVERNIGHT = BASE.model_copy(
    update={
        "time_zone": "America/New_York",
        "windows": [MaintenanceWindow(days=["sat"], start=time(23), end=time(3))],
    }
)


def utc(month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC_)


DST_CASES = [
    # spring: Sat 23:00 EST = 04:00Z; Sun 03:00 EDT = 07:00Z
    ("spring before open", utc(3, 8, 3, 59), False),
    ("spring open", utc(3, 8, 4, 0), True),
    ("spring 01:59 EST", utc(3, 8, 6, 59), True),
    ("spring 03:00 EDT closed", utc(3, 8, 7, 0), False),
    # fall: Sat 23:00 EDT = 03:00Z; Sun 03:00 EST = 08:00Z; 01:30 happens twice
    ("fall open", utc(11, 1, 3, 0), True),
    ("fall first 01:30 EDT", utc(11, 1, 5, 30), True),
    ("fall second 01:30 EST", utc(11, 1, 6, 30), True),
    ("fall 02:59 EST", utc(11, 1, 7, 59), True),
    ("fall 03:00 EST closed", utc(11, 1, 8, 0), False),
]


@pytest.mark.parametrize(("what", "now", "allowed"), DST_CASES, ids=[c[0] for c in DST_CASES])
def test_overnight_window_on_dst_nights(what, now, allowed) -> None:
    decision = guard.check_window(OVERNIGHT, now)
    assert decision.allowed is allowed
    if allowed:
        assert decision.window_end.astimezone(UTC_) == (
            utc(3, 8, 7) if now.month == 3 else utc(11, 1, 8)
        )


@pytest.mark.parametrize(
    ("now", "left_hours"), [(utc(3, 8, 4, 0), 3), (utc(11, 1, 3, 0), 5)], ids=["spring", "fall"]
)
def test_step_guard_counts_real_hours_on_dst_nights(now: datetime, left_hours: int) -> None:
    decision = guard.check_window(OVERNIGHT, now)
    steps = guard.StepGuard(
        decision,
        "reload-production-db",
        OVERNIGHT,
        history=guard.DurationHistory("reload-production-db", OVERNIGHT.label, store={}),
        clock=lambda: now,
    )
    # 2.6 h x 1.2 = 3.12 h: more than the 3 real hours of the spring night, less than the fall's 5
    needed = timedelta(hours=2.6)
    if left_hours == 3:
        with pytest.raises(guard.StepDoesNotFit, match="closes in 3h00m"):
            steps.check("copy-database", needed)
    else:
        assert steps.check("copy-database", needed) == needed
        with pytest.raises(guard.StepDoesNotFit, match="closes in 5h00m"):
            steps.check("copy-database", timedelta(hours=4.5))
