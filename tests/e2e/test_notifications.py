"""Notifications end to end, on one real stack: `prefect server start`, process workers,
`fabflows deploy` (the notifier deployment and its automations) and a local HTTP receiver standing
in for the Slack webhook of the environment's notification block.

All scenarios start in the module fixture and run side by side (their waits overlap): a crashed run
(worker and flow process SIGKILLed), a slow run, a run pending approval (then its reminder and its
timeout), a run holding the environment as its window closes, and a failing scheduled run. Each
test then checks that its event produced exactly one message, with its fields, in time, and records
the delay from the event to the message (printed at the end of the module, with ``-s``).

The scheduled run is due less than 5 minutes after deploy: the case where Prefect's scheduler
leaves out the event its state events wait for (``fabflows.notify.ordering``).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter
from prefect.settings import PREFECT_API_URL, temporary_settings

from fabflows.guard import DurationHistory
from fabflows.testing.configs import moto_section, write_config
from fabflows.testing.fake_slack import FakeSlack

from .stack import Stack

pytestmark = [pytest.mark.notifications_e2e]

PROBES = {
    "notify-probe": "fabflows.testing.notify_probe:notify_probe",
    "hold-environment-lock": "fabflows.testing.lock_probe:hold_environment_lock",
}
ZOMBIE_AFTER = 60
WAIT = 300
"""How long a test waits for a message (whether it came in time is asserted separately)."""
WORKER_START = 120
BLOCK = "notify-e2e"  # a bare name: a prefect-slack SlackWebhook block


class Receiver:
    """The webhook: every message with the time it arrived."""

    def __init__(self) -> None:
        self.fake = FakeSlack().start()
        self.messages: list[tuple[float, str]] = []
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            while self._seen < len(self.fake.posts):
                _, data = self.fake.posts[self._seen]
                text = data.get("text", "") if isinstance(data, dict) else str(data)
                self.messages.append((time.time(), text))
                self._seen += 1
            time.sleep(0.05)

    def about(self, run_id: object, contains: str = "") -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.messages if str(run_id) in m and contains in m]

    def wait(self, run_id: object, contains: str, timeout: float) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.about(run_id, contains)
            if found:
                time.sleep(3)  # a duplicate would come right after
                return found[0]
            time.sleep(0.2)
        raise AssertionError(
            f"no message about {run_id} with {contains!r}; got: {[m for _, m in self.messages]}"
        )

    def close(self) -> None:
        self._stop.set()
        self.fake.stop()


def _ceil_minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0) + timedelta(
        minutes=math.ceil(moment.second / 60 + moment.microsecond / 6e7) or 0
    )


def _delay(world: dict, what: str, seconds: float) -> None:
    """Record (and print) the delay from an event to its message: the module prints them all."""
    world["delays"][what] = seconds
    print(f"{what}: message {seconds:.1f} s after the event")


def _wait(predicate, timeout: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _state(s: Stack, run_id) -> tuple[str, datetime]:  # noqa: ANN001
    with temporary_settings({PREFECT_API_URL: s.api}), get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    return run.state.type.value, run.state.timestamp


def _paused_at(s: Stack, run_id) -> float | None:  # noqa: ANN001
    """When the run paused (from its state history: it may have moved on already)."""
    with temporary_settings({PREFECT_API_URL: s.api}), get_client(sync_client=True) as client:
        states = client.read_flow_run_states(run_id)
    paused = [x.timestamp.timestamp() for x in states if x.type.value == "PAUSED"]
    return min(paused) if paused else None


def _create(s: Stack, flow_env: str, **parameters) -> object:  # noqa: ANN003
    with temporary_settings({PREFECT_API_URL: s.api}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(flow_env)
        return client.create_flow_run_from_deployment(
            dep.id, parameters=parameters, tags=["started-by:api:e2e"]
        ).id


def _config(base: Path, probe_dir: Path, t0, fire, window_end, warn_at) -> Path:  # noqa: ANN001
    notifications = {"block": BLOCK}
    return write_config(
        base,
        fabflows=moto_section(
            "http://127.0.0.1:1",  # no AWS call is made
            staging={
                "notifications": notifications | {"slow_minimum_seconds": 0},
                "watchdog_cron": None,
            },
            production={
                # no slow-run messages here: the runs have no usual duration to speak of
                "notifications": notifications
                | {"events": ["failed", "crashed", "cancelled", "approval"]},
                "watchdog_cron": None,
                "schedules": {
                    "notify-probe": {
                        "cron": f"{fire.minute} {fire.hour} * * *",
                        "parameters": {"directory": str(probe_dir), "fail": True},
                    }
                },
            },
            testing={
                "watchdog_cron": None,
                "windows": [
                    {
                        "days": [("mon", "tue", "wed", "thu", "fri", "sat", "sun")[t0.weekday()]],
                        "start": "00:00",
                        "end": window_end.strftime("%H:%M"),
                    }
                ],
                "notifications": notifications
                | {"window_warning_minutes": (window_end - warn_at).total_seconds() / 60},
            },
        )
        | {
            "state_dir": str(probe_dir.parent / "state"),
            "approval": {"timeout_minutes": 1.0, "poll_seconds": 1},
            "deploy": {"heartbeat_seconds": 30, "zombie_after_seconds": ZOMBIE_AFTER},
        },
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory, pg_cluster) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("notify")
    probe_dir = base / "probe"
    probe_dir.mkdir()
    receiver = Receiver()
    # the server on PostgreSQL: under load SQLite answers "database is locked" and drops events
    url = pg_cluster.create_database("prefect_notify")
    s = Stack(base, database_url=url.replace("postgresql://", "postgresql+asyncpg://"))
    release = base / "window.release"
    delays: dict[str, float] = {}
    try:
        s.start_server()
        # the times are taken once the server is up (it may take long on a loaded machine)
        t0 = datetime.now(UTC)
        fire = _ceil_minute(t0 + timedelta(seconds=100))  # the failing scheduled run
        window_end = _ceil_minute(t0 + timedelta(seconds=200))
        warn_at = t0 + timedelta(seconds=120)
        config_path = _config(base, probe_dir, t0, fire, window_end, warn_at)
        with temporary_settings({PREFECT_API_URL: s.api}):
            from prefect_slack import SlackWebhook

            SlackWebhook(url=receiver.fake.url("/notify")).save("notify-e2e", overwrite=True)
        deployed = s.deploy(config_path, PROBES)
        # 1. the crash: alone on worker "wcrash" (nothing but the crash run dies with it)
        s.start_worker("wcrash", limit=1, timeout=WORKER_START)
        crash = _create(
            s, "notify-probe/myproject-production", directory=str(probe_dir), seconds=600
        )
        _wait(lambda: _state(s, crash)[0] != "SCHEDULED", WORKER_START, "wcrash to take its run")
        # 2. the others, on worker "w1", while the crash run starts
        s.start_worker("w1", timeout=WORKER_START)
        with temporary_settings({PREFECT_API_URL: s.api}):
            history = DurationHistory("notify-probe", "myproject/staging")
            history.record("suspend", 0.1)
            history.record("work", 40.0)
        slow = _create(s, "notify-probe/myproject-staging", directory=str(probe_dir), seconds=150)
        approval = _create(
            s, "notify-probe/myproject-production", directory=str(probe_dir), destructive=True
        )
        # the testing window, from now: the setup may have taken minutes on a loaded machine
        # (each run reads the config file as it starts; the schedule stays as deployed)
        t1 = datetime.now(UTC)
        window_end = _ceil_minute(t1 + timedelta(seconds=130))
        warn_at = t1 + timedelta(seconds=70)
        fresh = base / "config-next"
        fresh.mkdir()
        os.replace(_config(fresh, probe_dir, t1, fire, window_end, warn_at), config_path)
        window = _create(
            s, "hold-environment-lock/myproject-testing", seconds=300, release=str(release)
        )
        _wait(lambda: (probe_dir / f"working-{crash}").exists(), 240, "the crash run's work step")
        s.kill_worker("wcrash", signal.SIGKILL)
        # the flow process lives on in its own session: the machine "dies" with it
        os.kill(int((probe_dir / f"working-{crash}").read_text()), signal.SIGKILL)
        killed = time.time()
        yield {
            "stack": s,
            "receiver": receiver,
            "deployed": deployed,
            "crash": crash,
            "killed": killed,
            "slow": slow,
            "approval": approval,
            "window": window,
            "warn_at": warn_at,
            "window_end": window_end,
            "fire": fire,
            "probe_dir": probe_dir,
            "delays": delays,
        }
    finally:
        if delays:
            width = max(map(len, delays))
            sys.stderr.write(
                "\nevent -> message delays:\n"
                + "".join(f"  {k:<{width}}  {v:6.1f} s\n" for k, v in delays.items())
            )
        release.touch()
        s.close()
        receiver.close()


def test_deploy_registers_the_notifier_and_its_automations(world: dict) -> None:
    names = world["deployed"]["notify_automations"]
    assert {n.removeprefix("fabflows: notify ") for n in names} == {
        "run ended",
        "heartbeat late",
        "approval pending",
        "approval reminder",
        "run started",
    }


def test_slow_run(world: dict) -> None:
    s, r, run = world["stack"], world["receiver"], world["slow"]
    at, text = r.wait(run, "is slow", timeout=WAIT)
    state, _ = _state(s, run)
    with temporary_settings({PREFECT_API_URL: s.api}), get_client(sync_client=True) as client:
        start = client.read_flow_run(run).start_time
    # usual 40.1 s, alert at 1.5x: the check is due 60.15 s after the start
    _delay(world, "slow run", at - (start.timestamp() + 60.15))
    assert 0 <= at - (start.timestamp() + 60.15) < 30, text
    assert "Usual duration: 40 s (alert at 1.5x)" in text
    assert "Environment: myproject/staging" in text and "Started by: api:e2e" in text
    assert len(r.about(run, "is slow")) == 1


def test_approval_pending_reminder_and_timeout(world: dict) -> None:
    s, r, run = world["stack"], world["receiver"], world["approval"]
    paused_at = _wait(lambda: _paused_at(s, run), WAIT, "the approval pause")
    at, text = r.wait(run, "approval needed for notify-probe", timeout=WAIT)
    _delay(world, "approval pending", at - paused_at)
    assert at - paused_at < 30, text
    for field in (
        "Asked by: api:e2e",
        "Expected downtime: about 90 s",
        "Plan:",
        "work 0 s",
        "Rejected automatically at",
        f"/runs/flow-run/{run}",
    ):
        assert field in text, (field, text)
    at2, reminder = r.wait(run, "REMINDER: approval needed", timeout=WAIT)
    # due at half the 60 s timeout
    _delay(world, "approval reminder", at2 - (paused_at + 30))
    assert 0 <= at2 - (paused_at + 30) < 30, reminder
    at3, timeout = r.wait(run, "approval timed out", timeout=WAIT)
    state, cancelled_at = _state(s, run)
    assert state == "CANCELLED"
    # the event: the run rejected itself (at its deadline, 60 s after the pause, plus its poll)
    assert cancelled_at.timestamp() - paused_at >= 60
    _delay(world, "approval timeout notice", at3 - cancelled_at.timestamp())
    assert at3 - cancelled_at.timestamp() < 30, timeout
    assert "Left behind: nothing (no journal" in timeout
    for kind in ("fabflows: approval needed for", "REMINDER", "approval timed out"):
        assert len(r.about(run, kind)) == 1, kind
    assert len(r.about(run)) == 3


def test_run_holding_the_environment_as_its_window_closes(world: dict) -> None:
    s, r, run = world["stack"], world["receiver"], world["window"]
    at, text = r.wait(run, "as its window closes", timeout=WAIT)
    with temporary_settings({PREFECT_API_URL: s.api}), get_client(sync_client=True) as client:
        start = client.read_flow_run(run).start_time
    # due at warn_at, or as soon as the run holds the lock if it started later (a loaded machine)
    _delay(world, "window closing", at - max(world["warn_at"], start).timestamp())
    assert at - max(world["warn_at"], start).timestamp() < 30, text
    assert "Holds the environment: yes" in text
    assert f"Window closes: {world['window_end']:%Y-%m-%d %H:%M}" in text
    assert "Flow: hold-environment-lock" in text and "Environment: myproject/testing" in text
    assert len(r.about(run)) == 1


def test_crashed_run(world: dict) -> None:
    s, r, run = world["stack"], world["receiver"], world["crash"]
    at, text = r.wait(run, "CRASHED", timeout=WAIT)
    state, crashed_at = _state(s, run)
    assert state == "CRASHED"
    _delay(world, "crash (from the kill)", at - world["killed"])
    _delay(world, "crash (from CRASHED)", at - crashed_at.timestamp())
    assert at - world["killed"] < ZOMBIE_AFTER + 30, text
    assert "Failing step: work" in text
    assert "Left behind: suspend (done), work (started)" in text
    assert "Started by: api:e2e" in text and "Flow: notify-probe" in text
    assert "fabflows recover -e production" in text
    assert len(r.about(run)) == 1


def test_failing_scheduled_run(world: dict) -> None:
    s, r = world["stack"], world["receiver"]

    def scheduled_run():  # noqa: ANN202
        with temporary_settings({PREFECT_API_URL: s.api}), get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("notify-probe/myproject-production")
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id={"any_": [dep.id]})
            )
        done = [x for x in runs if x.auto_scheduled and x.state and x.state.is_final()]
        return done[0] if done else None

    run = _wait(scheduled_run, WAIT, "the scheduled run to end")
    assert run.state.type.value == "FAILED"
    at, text = r.wait(run.id, "FAILED", timeout=WAIT)
    _delay(world, "failing scheduled run", at - run.state.timestamp.timestamp())
    assert at - run.state.timestamp.timestamp() < 30, text
    for field in (
        "Flow: notify-probe",
        "Environment: myproject/production",
        "Started by: schedule:deployment-schedule",
        "Failing step: work",
        "the probe's work step failed as asked",
        "Left behind: work (failed)",
        f"/runs/flow-run/{run.id}",
    ):
        assert field in text, (field, text)
    assert len(r.about(run.id)) == 1
    assert not os.environ.get("SLACK_WEBHOOK_URL")  # the block holds the URL, no message shows it
    assert all("/notify" not in m for _, m in r.messages)
    assert Path(world["probe_dir"]).exists()
