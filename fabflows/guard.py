"""Maintenance windows and the step guard.

Flows that take a site down or touch production call, right after loading the config::

    from fabflows import guard

    window = guard.require_window(ctx.env, override_reason=window_override_reason)
    steps = guard.StepGuard(window, flow_name="reload-production-db", env=ctx.env)
    with steps.step("copy-database"):
        ...
    # StepDoesNotFit / OutsideWindow: undo maintenance state (finally), then
    #     return exc.as_state()   -> the run ends CANCELLED with the reason as its message

- ``require_window`` refuses to start outside every configured window of the environment
  (``fabflows.environments.<env>.windows`` in the environment's ``time_zone``) unless an override
  reason is given; the override is logged, tagged ``window-override`` and published as an artifact.
  An environment with no windows configured is never restricted.
- ``StepGuard.step`` does not start a step whose expected duration (the longest of its last three
  successful runs in this flow and environment, kept in a Prefect Variable) does not fit in the time
  left in the window; the step is skipped by raising ``StepDoesNotFit`` before anything changes.

Pure parts (``check_window``, ``next_window_start``, ``StepGuard`` with an in-memory history) need no
Prefect server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from config.models import WEEKDAYS, slug

MIN_OVERRIDE_REASON = 10
"""An override reason shorter than this is refused ("x", "ok" are not reasons)."""

HISTORY_RUNS = 3
"""Expected step duration: the longest of this many last successful runs."""

SAFETY_FACTOR = 1.2
"""A step must fit in the window with this margin over its expected duration."""


class GuardStop(RuntimeError):
    """A run stops cleanly before changing anything; ``as_state()`` gives the final Prefect state."""

    def as_state(self):  # noqa: ANN201 - prefect State
        from prefect.states import Cancelled

        return Cancelled(message=str(self))


class OutsideWindow(GuardStop):
    """The environment's maintenance window is closed and no override was given."""


class StepDoesNotFit(GuardStop):
    """A step's expected duration does not fit in the time left in the window."""


class WindowDecision(BaseModel):
    """Whether a run may start now, and until when."""

    model_config = ConfigDict(frozen=True)

    environment: str = Field(description="deployment/environment")
    allowed: bool
    checked_at: datetime
    time_zone: str
    window_start: datetime | None = Field(default=None, description="Open window, if any.")
    window_end: datetime | None = Field(default=None, description="When the open window closes.")
    unrestricted: bool = Field(
        default=False, description="The environment has no windows configured."
    )
    override_reason: str | None = Field(
        default=None, description="Set when the run started outside the window on purpose."
    )
    next_start: datetime | None = Field(default=None, description="Next opening, when closed.")

    @property
    def deadline(self) -> datetime | None:
        """When steps must be done by; None when nothing limits them (no windows, or overridden)."""
        if self.unrestricted or self.override_reason is not None:
            return None
        return self.window_end

    def explain(self) -> str:
        if self.unrestricted:
            return f"{self.environment} has no maintenance window configured"
        if self.override_reason is not None and self.window_end is None:
            return f"{self.environment}: outside the window, overridden: {self.override_reason}"
        if self.allowed:
            return (
                f"{self.environment}: inside the window {_local(self.window_start, self.time_zone)}"
                f" - {_local(self.window_end, self.time_zone)}"
            )
        nxt = _local(self.next_start, self.time_zone) if self.next_start else "never"
        return (
            f"{self.environment}: outside its maintenance window (now "
            f"{_local(self.checked_at, self.time_zone)}; next window opens {nxt}). "
            "Run inside the window, or give an override reason (recorded)."
        )


def _local(moment: datetime | None, zone: str) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(ZoneInfo(zone)).strftime("%a %Y-%m-%d %H:%M %Z")


def _now() -> datetime:
    return datetime.now(UTC)


def next_window_start(env: EnvironmentConfig, now: datetime) -> datetime | None:
    """The next time a window opens after ``now`` (within two weeks), or None if there is none."""
    zone = ZoneInfo(env.time_zone)
    local = now.astimezone(zone)
    best: datetime | None = None
    for window in env.windows:
        for days in range(0, 15):
            day = local.date() + timedelta(days=days)
            if WEEKDAYS[day.weekday()] not in window.days:
                continue
            start = datetime.combine(day, window.start, zone)
            if start > local:
                if best is None or start < best:
                    best = start
                break
    return best


def check_window(
    env: EnvironmentConfig, now: datetime | None = None, override_reason: str | None = None
) -> WindowDecision:
    """Pure: may a maintenance run start at ``now``?

    Raises:
        ValueError: an override reason was given but is too short to mean anything.
    """
    now = now or _now()
    if override_reason is not None:
        override_reason = override_reason.strip()
        if len(override_reason) < MIN_OVERRIDE_REASON:
            raise ValueError(
                f"window override reason {override_reason!r} is too short: say why "
                f"(at least {MIN_OVERRIDE_REASON} characters), it is recorded"
            )
    base = dict(environment=env.label, checked_at=now, time_zone=env.time_zone)
    if not env.windows:
        return WindowDecision(**base, allowed=True, unrestricted=True)
    open_window = env.window_at(now)
    if open_window is not None:
        start, end = open_window
        # an override inside an open window changes nothing: the window still bounds the steps
        return WindowDecision(**base, allowed=True, window_start=start, window_end=end)
    nxt = next_window_start(env, now)
    if override_reason:
        return WindowDecision(**base, allowed=True, override_reason=override_reason, next_start=nxt)
    return WindowDecision(**base, allowed=False, next_start=nxt)


def require_window(
    env: EnvironmentConfig,
    override_reason: str | None = None,
    now: datetime | None = None,
    flow_name: str | None = None,
) -> WindowDecision:
    """Refuse to start outside the environment's window unless overridden with a reason.

    Inside a flow run the decision is logged; an override is also tagged ``window-override`` on the
    run and published as a markdown artifact ``window-override-<flow>-<deployment>-<environment>``.

    Raises:
        OutsideWindow: the window is closed and no override reason was given.
        ValueError: the override reason is too short.
    """
    decision = check_window(env, now=now, override_reason=override_reason)
    _log(decision)
    if not decision.allowed:
        raise OutsideWindow(decision.explain())
    if decision.override_reason is not None and decision.window_end is None:
        _record_override(env, decision, flow_name)
    return decision


def _log(decision: WindowDecision) -> None:
    from fabflows.report import in_flow_run

    if not in_flow_run():
        return
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    if decision.allowed and decision.override_reason and decision.window_end is None:
        logger.warning("%s", decision.explain())
    elif decision.allowed:
        logger.info("%s", decision.explain())
    else:
        logger.error("%s", decision.explain())


def _record_override(
    env: EnvironmentConfig, decision: WindowDecision, flow_name: str | None
) -> None:
    from fabflows.report import artifact_key, in_flow_run, publish_markdown

    if not in_flow_run():
        return
    from fabflows import audit

    name = flow_name or audit.current_flow_name() or "flow"
    starter = audit.current_starter()
    audit.add_run_tags(["window-override"])
    publish_markdown(
        artifact_key("window-override", name, env.deployment, env.environment),
        "\n".join(
            [
                f"# Window override: {name} on {env.label}",
                "",
                f"- **Started outside the window at** {_local(decision.checked_at, env.time_zone)}",
                f"- **Next window** {_local(decision.next_start, env.time_zone)}",
                f"- **Reason:** {decision.override_reason}",
                f"- **Started by:** {starter.label if starter else 'unknown'}",
            ]
        ),
        f"Window override on {env.label}",
    )


# --------------------------------------------------------------------------- step guard


class DurationHistory:
    """Durations of the last successful runs of each step, per flow and environment.

    Kept in a Prefect Variable ``fabflows-durations-<flow>-<deployment>-<environment>`` (JSON:
    step -> list of seconds, newest last) so every worker sees the same history. ``store`` may be any
    mutable mapping instead (tests, runs without a server).
    """

    def __init__(
        self, flow_name: str, env_label: str, store: MutableMapping[str, list[float]] | None = None
    ):
        self.flow_name = flow_name
        self.env_label = env_label
        self.variable = slug(f"fabflows-durations-{flow_name}-{env_label}")[:255]
        self._store = store

    def _load(self) -> dict[str, list[float]]:
        if self._store is not None:
            return {k: list(v) for k, v in self._store.items()}
        from prefect.variables import Variable

        value = Variable.get(self.variable, default=None)
        return dict(value) if isinstance(value, dict) else {}

    def expected(self, step: str) -> timedelta | None:
        """The longest of the last ``HISTORY_RUNS`` successful durations, or None without history."""
        past = self._load().get(step) or []
        if not past:
            return None
        return timedelta(seconds=max(past[-HISTORY_RUNS:]))

    def record(self, step: str, seconds: float) -> None:
        if self._store is not None:
            self._store[step] = [*self._store.get(step, []), round(seconds, 3)][-10:]
            return
        from prefect.variables import Variable

        data = self._load()
        data[step] = [*data.get(step, []), round(seconds, 3)][-10:]
        Variable.set(self.variable, data, overwrite=True)


class StepGuard:
    """Starts a step only if its expected duration fits in what is left of the window."""

    def __init__(
        self,
        window: WindowDecision,
        flow_name: str,
        env: EnvironmentConfig,
        history: DurationHistory | None = None,
        clock: Callable[[], datetime] = _now,
        safety_factor: float = SAFETY_FACTOR,
    ):
        self.window = window
        self.history = history or DurationHistory(flow_name, env.label)
        self.clock = clock
        self.safety_factor = safety_factor

    def check(self, name: str, expected: timedelta | None = None) -> timedelta | None:
        """Raise StepDoesNotFit if ``name`` cannot finish before the window closes.

        Args:
            name: Step name (kebab-case), the key of its duration history.
            expected: Overrides the history (e.g. computed from the database size).
        Returns:
            The expected duration used (None without history: the step is allowed).
        """
        expected = expected if expected is not None else self.history.expected(name)
        deadline = self.window.deadline
        if deadline is None or expected is None:
            return expected
        now = self.clock()
        left = deadline - now
        needed = expected * self.safety_factor
        if needed > left:
            raise StepDoesNotFit(
                f"step {name!r} is not started: it is expected to take {_span(expected)} "
                f"(x{self.safety_factor} margin: {_span(needed)}) but the window on "
                f"{self.window.environment} closes in {_span(max(left, timedelta(0)))} "
                f"({_local(deadline, self.window.time_zone)}). Nothing of this step was done."
            )
        return expected

    @contextmanager
    def step(self, name: str, expected: timedelta | None = None) -> Iterator[None]:
        """Check, run the body, and record its duration when it succeeds."""
        used = self.check(name, expected)
        if used is not None:
            from fabflows.report import in_flow_run

            if in_flow_run():
                from prefect.logging import get_run_logger

                get_run_logger().info("step %s: expected %s, fits the window", name, _span(used))
        started = time.monotonic()
        yield
        self.history.record(name, time.monotonic() - started)


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
