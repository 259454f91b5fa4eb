"""The ``fabflows-notify`` flow: what the automations run for each event of a fabflows run.

The automations ``fabflows deploy`` registers (``fabflows.notify.automations``) run this flow's one
deployment with the triggering run's id and what happened (``kind``):

- ``ended``: the run FAILED, CRASHED or was CANCELLED (an approval timeout says so), or COMPLETED
  (a message only for scheduled runs, where the environment asks for success messages);
- ``paused``: the run waits for approval; this also plans ``check-reminder`` half way to the
  approval's deadline and ``check-timeout`` at the deadline (the notice of the rejection, sent as
  soon as the run has ended CANCELLED);
- ``reminder``: the reminder automation's (a fallback for ``check-reminder``: each is sent once);
- ``started``: the run is RUNNING; this plans the two later checks: ``check-window`` when the
  environment's window is about to close, ``check-slow`` at ``slow_factor`` times the run's usual
  duration (the step durations the step guard keeps per flow and environment);
- ``check-window`` / ``check-slow``: say so if the run is still at it then.

A check due within ``CHECK_LEAD`` is done by the notifier run that planned it (it waits); a later
one is a run of this same deployment, scheduled ``CHECK_LEAD`` before it is due (no process waits
meanwhile). A deployment run of a runbook plans its own checks and does them in a thread of its own
process (``fabflows.notify.inprocess``), except the approval timeout's. Either way the check is
already running when it is due: its message does not wait for a process to start. The checks of one
state are planned once, by whoever comes first.

A crash is noticed by the zombie automation only; the notice must not then wait for a worker to
start a process. Where crashed runs are notified, every deployment run of a runbook makes sure one
crash watcher is up (``watch``: a run of this deployment that polls for fabflows runs marked CRASHED
while any fabflows run is going; it holds one work-pool slot meanwhile), and the "heartbeat late"
automation starts a ``check-crash`` run that waits for the CRASHED when a run's heartbeats stop.

A run that ended CRASHED (SIGKILL, lost worker: the zombie automation) after applying steps gets
its maintenance state undone at once, unless its environment sets ``recover_on_crash: false``: the
notifier starts the environment's ``recover-environment`` deployment with ``maintenance_only``
(``start_recovery``) and the crash notice links that run. Read-only flows and recover-environment
itself never start one (a crashed recovery is taken over by the next recover run).

Every message goes through the environment's notification block once (``fabflows.notify.send``).
"""

from __future__ import annotations

import statistics
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from prefect import flow
from prefect.logging import get_run_logger

from config import ConfigError, EnvironmentConfig, FabulawsConfig, load_config, resolve_environment
from config.models import EnvironmentSettings
from fabflows.notify import messages
from fabflows.notify.send import send_notice, settings_for, wanted

FLOW_NAME = "fabflows-notify"
DEPLOYMENT_NAME = "all-environments"
NOTIFY_TAG = "fabflows-notify"
FOR_TAG = "notify-for:"
RECOVER_FLOW = "recover-environment"
RECOVERY_STARTER = "recover-on-crash"
"""The recovery run's ``started-by:automation:`` name, and its idempotency key's prefix."""
RECOVERS_TAG = "recovers:"
"""Tag of a recovery run started for a crashed run: ``recovers:<crashed run id>``."""
ZOMBIE_EXPECT = (
    "prefect.flow-run.heartbeat",
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
    "prefect.flow-run.Paused",
)
"""What keeps a running run from counting as a zombie (the "crash zombie runs" automation's)."""


def zombie_after(heartbeat_seconds: int, zombie_after_seconds: int) -> timedelta:
    """When the zombie automation marks a run CRASHED: this long after its last heartbeat."""
    return timedelta(seconds=max(zombie_after_seconds, 2 * heartbeat_seconds))


def heartbeat_late_after(heartbeat_seconds: int, zombie_after_seconds: int) -> timedelta:
    """When a run's heartbeat counts as late: a missed beat (plus 10 s of slack), and at least
    30 s before the zombie automation, so a notifier run has started by then."""
    within = zombie_after(heartbeat_seconds, zombie_after_seconds)
    return max(timedelta(seconds=heartbeat_seconds + 10), within - timedelta(seconds=30))


Kind = Literal[
    "ended",
    "watch",
    "check-crash",
    "paused",
    "reminder",
    "started",
    "check-window",
    "check-slow",
    "check-reminder",
    "check-timeout",
]


def run_id_of(value: str) -> uuid.UUID:
    """A run id from ``prefect.flow-run.<id>`` (an event's resource id) or the bare id."""
    return uuid.UUID(value.rsplit(".", 1)[-1])


def environment_of(config: FabulawsConfig, run: Any) -> EnvironmentConfig | None:
    params = run.parameters or {}
    if params.get("environment"):
        try:
            return resolve_environment(config, params["environment"], params.get("deployment"))
        except ConfigError:
            return None
    for tag in run.tags or []:
        if tag.startswith("env:") and "/" in tag:
            deployment, _, environment = tag[4:].partition("/")
            try:
                return resolve_environment(config, environment, deployment)
            except ConfigError:
                return None
    return None


def run_facts(client: Any, config: FabulawsConfig, run: Any, env: EnvironmentConfig) -> Any:
    """The notice facts of ``run``: who started it, its state, and what its journal says."""
    from fabflows import audit
    from fabflows.chatops.notify import ui_link
    from fabflows.runtime.journal import Journal

    flow_name = client.read_flow(run.flow_id).name
    first_message = None
    if run.deployment_id is not None:
        states = sorted(client.read_flow_run_states(run.id), key=lambda s: s.timestamp)
        first_message = states[0].message if states else None
    created = getattr(run, "created_by", None)
    starter = audit.identify_starter(
        list(run.tags or []),
        bool(run.auto_scheduled),
        run.deployment_id,
        first_message,
        getattr(created, "type", None),
        getattr(created, "display_value", None),
    )
    entry = Journal.for_environment(env.label, config).entry(str(run.id))
    failing = None
    left: list[str] = []
    if entry is not None:
        failing = next((s.name for s in entry.steps if s.state == "failed"), None)
        if failing is None and entry.state == "running":
            failing = next((s.name for s in reversed(entry.steps) if s.state == "started"), None)
        if entry.open:
            left = [f"{s.name} ({s.state})" for s in entry.applied]
    dry = (run.parameters or {}).get("dry_run")
    return messages.RunFacts(
        run_id=str(run.id),
        run_name=run.name,
        flow=flow_name,
        environment=env.label,
        started_by=starter.label,
        state=run.state.type.value if run.state else "UNKNOWN",
        state_message=(run.state.message or "") if run.state else "",
        link=ui_link(config, run.id),
        auto_scheduled=bool(run.auto_scheduled),
        dry_run=dry if isinstance(dry, bool) else None,
        failing_step=failing,
        left=left,
        journal_state=entry.state if entry is not None else None,
    )


def approval_facts(client: Any, run: Any) -> messages.ApprovalFacts:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
    )
    request = [a for a in artifacts if (a.key or "").endswith("-request")]
    request.sort(key=lambda a: a.created)
    plan, downtime, asked = ("", "unknown", "unknown")
    if request:
        plan, downtime, asked = messages.plan_summary(str(request[-1].data or ""))
    details = run.state.state_details if run.state else None
    rejects_at = getattr(details, "pause_timeout", None)
    return messages.ApprovalFacts(
        plan_summary=plan,
        expected_downtime=downtime,
        requested_by=asked,
        rejects_at=rejects_at.astimezone(UTC) if rejects_at else None,
    )


def usual_duration(flow_name: str, env: EnvironmentConfig) -> timedelta | None:
    """The run's usual duration: the sum, over its steps, of the median of their last 5 runs."""
    from fabflows.guard import DurationHistory

    history = DurationHistory(flow_name, env.label)._load()
    total = sum(statistics.median(v[-5:]) for v in history.values() if v)
    return timedelta(seconds=total) if total > 0 else None


def _check_runs(client: Any, run_id: uuid.UUID, pending_only: bool = False) -> list[Any]:
    """The notifier's check runs for ``run_id`` (only those not started yet: ``pending_only``)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    state = None
    if pending_only:
        state = FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING])
        )
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"{FOR_TAG}{run_id}"]), state=state
        )
    )


def cancel_checks(client: Any, run_id: uuid.UUID, keep_since: str = "") -> int:
    """Delete the checks still scheduled for ``run_id`` (it ended, or was paused and resumed),
    except those planned for the state that started at ``keep_since``."""
    pending = [
        c
        for c in _check_runs(client, run_id, pending_only=True)
        if not keep_since or (c.parameters or {}).get("since") != keep_since
    ]
    for check in pending:
        client.delete_flow_run(check.id)
    return len(pending)


CHECK_LEAD = timedelta(seconds=60)
"""A check due later than this is a run of the notifier deployment scheduled this much before it is
due, which then waits: a process start (seconds, more on a loaded worker machine) does not make the
message late. A check due sooner is done by the notifier run that planned it, after its own work
(no process start at all)."""

TIMEOUT_GRACE = timedelta(seconds=120)
"""How long ``check-timeout`` waits, after the approval's deadline, for the run to end (it polls
every ``POLL_SECONDS``): the run notices the timeout at its next approval poll, then undoes what it
must and ends CANCELLED."""

POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Check:
    """A later look at a run: ``kind`` (a ``check-*`` kind) at ``due``, with its parameters."""

    kind: str
    due: datetime
    extra: dict[str, str] = field(default_factory=dict)


def schedule_check(client: Any, run_id: uuid.UUID, check: Check) -> None:
    from prefect.states import Scheduled

    deployment = client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT_NAME}")
    at = max(check.due - CHECK_LEAD, datetime.now(UTC))
    client.create_flow_run_from_deployment(
        deployment.id,
        parameters={
            "flow_run_id": str(run_id),
            "kind": check.kind,
            "due": check.due.isoformat(),
            **check.extra,
        },
        state=Scheduled(scheduled_time=at),
        tags=[NOTIFY_TAG, f"{FOR_TAG}{run_id}"],
    )


def plan_checks(
    client: Any,
    config: FabulawsConfig,
    run_id: uuid.UUID,
    checks: list[Check],
    now: datetime | None = None,
    in_run: bool = False,
) -> tuple[list[Check], list[str]]:
    """Plan ``checks``; returns those to do here, after the current work, by due time (and what
    was planned, for the log).

    In a notifier run, the checks due within ``CHECK_LEAD`` are done here and the others are
    scheduled runs. In the watched run itself (``in_run``: ``fabflows.notify.inprocess``) every
    check is done here (a thread that sleeps until each is due: if the run ends first, there is
    nothing to check), except ``check-timeout``: the run ends right after the state it reports.

    The checks of one state (``since``) are planned once, by whoever comes first (the run itself,
    or the notifier run an automation started): the others find them planned."""
    from fabflows.notify.send import claim

    now = now or datetime.now(UTC)
    here: list[Check] = []
    said: list[str] = []
    todo = []
    for check in sorted(checks, key=lambda c: c.due):
        if claim(config, f"{run_id}-{check.kind}-{check.extra.get('since', '')}") is None:
            said.append(f"{check.kind}: already planned")
        else:
            todo.append(check)
    for check in todo:
        if (in_run and check.kind != "check-timeout") or (
            not in_run and check.due - now <= CHECK_LEAD
        ):
            here.append(check)
            said.append(f"{check.kind} at {check.due:%H:%M:%S} (here)")
        else:
            schedule_check(client, run_id, check)
            said.append(f"{check.kind} at {check.due:%H:%M:%S}")
    return here, said


def wait_until(due: str) -> None:
    """Sleep until ``due`` (ISO time; empty: now)."""
    import time

    if due:
        left = (datetime.fromisoformat(due) - datetime.now(UTC)).total_seconds()
        if left > 0:
            time.sleep(left)


def _pause_expired(state: Any) -> bool:
    """The FAILED the server sets when a paused run is touched after its pause's deadline: the
    approval wait then sets RUNNING again (``fabflows.approval``) and the run ends CANCELLED."""
    return state.is_failed() and "never resumed" in (state.message or "")


def wait_for_end(client: Any, run_id: uuid.UUID, since: str, limit: timedelta) -> Any:
    """Poll the run every ``POLL_SECONDS`` until it has ended (returns it) or has left the approval
    wait that started at ``since`` otherwise (None: resumed, nothing to say), at most ``limit``."""
    import time

    deadline = datetime.now(UTC) + limit
    while True:
        run = client.read_flow_run(run_id)
        state = run.state
        if state is None:
            return None
        final = state.is_final()
        if final and not _pause_expired(state):
            return run
        paused = state.is_paused() and _same_state(run, since)
        rejecting = state.is_running() and (state.message or "").startswith("approval timed out")
        if not (final or paused or rejecting):
            return None
        if datetime.now(UTC) >= deadline:
            return run if final else None
        time.sleep(POLL_SECONDS)


def _wait_for_crash(client: Any, config: FabulawsConfig, run: Any) -> Any:
    """For a run whose heartbeats are late: get ready to send (imports, the block), then poll the
    run every ``POLL_SECONDS`` until it has ended (returns it: CRASHED by the zombie automation, or
    any end), at most until the zombie automation is due plus 60 s (None: it is alive)."""
    import time

    import fabflows.audit  # noqa: F401 - imported now, not after the crash
    import fabflows.chatops.notify  # noqa: F401
    import fabflows.runtime.journal  # noqa: F401

    env = environment_of(config, run)
    if env is None:
        return None
    settings = settings_for(config, env.environment)
    if settings.block:
        from fabflows.notify.send import load_block

        load_block(settings.block)
    _read_only(client.read_flow(run.flow_id).name)
    deploy = config.fabflows.deploy
    left = zombie_after(deploy.heartbeat_seconds, deploy.zombie_after_seconds) - (
        heartbeat_late_after(deploy.heartbeat_seconds, deploy.zombie_after_seconds)
    )
    deadline = datetime.now(UTC) + left + timedelta(seconds=60)
    while datetime.now(UTC) < deadline:
        run = client.read_flow_run(run.id)
        if run.state is None or not run.state.is_running():
            return run if run.state is not None and run.state.is_final() else None
        time.sleep(POLL_SECONDS)
    return None


def _wait_for_lock(
    client: Any, config: FabulawsConfig, run_id: uuid.UUID, since: str, window_end: str
) -> None:
    """Until the run holds its environment's lock (polled every 5 s; a run checked right after
    its start may not have taken it yet), while it runs and its window is open."""
    import time

    from fabflows import lock

    end = datetime.fromisoformat(window_end) if window_end else datetime.now(UTC)
    while datetime.now(UTC) < end:
        run = client.read_flow_run(run_id)
        env = environment_of(config, run)
        if env is None or not _same_running(run, since):
            return
        holder = lock.read_holder(env, config)
        if holder and holder.flow_run_id == str(run_id):
            return
        time.sleep(5)


def _read_only(flow_name: str) -> bool:
    from fabflows.registry import FLOWS

    if flow_name not in FLOWS:
        return False
    from fabflows.runtime.engine import load_runbook

    try:
        return load_runbook(flow_name).read_only
    except Exception:  # noqa: BLE001 - a flow not on the engine: not read-only as far as we know
        return False


def recovery_skipped(config: FabulawsConfig, env: EnvironmentConfig, facts: Any) -> str | None:
    """Why a crashed run gets no automatic recovery (None: start one)."""
    settings = config.fabflows.environments.get(env.environment) or EnvironmentSettings()
    if not settings.recover_on_crash:
        return f"recover_on_crash is off for {env.environment}"
    if facts.flow == RECOVER_FLOW:
        return "a recover-environment run: the next recover run takes its journal over"
    if _read_only(facts.flow):
        return f"{facts.flow} is read-only"
    if not facts.left:
        return "its journal holds no applied step left open"
    return None


def recover_by_hand(config: FabulawsConfig, env: EnvironmentConfig) -> str:
    """The command that starts the same recovery from a terminal."""
    command = f"fabflows recover -e {env.environment}"
    if env.deployment != (config.default_deployment or config.deployments[0]):
        command += f" -d {env.deployment}"
    return command + " --maintenance-only --apply"


def start_recovery(
    config: FabulawsConfig, run: Any, env: EnvironmentConfig
) -> tuple[str, str, Exception | None]:
    """Start ``recover-environment/<deployment>-<environment>`` with ``maintenance_only`` for the
    crashed ``run`` (once per run: the crashed run's id is the idempotency key).

    Returns (what was done, for the log; the notice's Recovery line; the error that kept it from
    starting, if any other than the deployment missing).
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from fabflows import audit
    from fabflows.chatops.notify import ui_link

    name = f"{RECOVER_FLOW}/{env.deployment}-{env.environment}"
    by_hand = recover_by_hand(config, env)
    try:
        started = run_deployment(
            name,
            parameters={
                "environment": env.environment,
                "deployment": env.deployment,
                "maintenance_only": True,
                "dry_run": False,
            },
            timeout=0,
            as_subflow=False,
            tags=[
                *audit.started_by_tags("automation", RECOVERY_STARTER),
                RECOVERS_TAG + str(run.id),
            ],
            idempotency_key=f"{RECOVERY_STARTER}-{run.id}",
        )
    except ObjectNotFound:
        line = (
            f"not started: no deployment {name} (fabflows deploy registers it); "
            f"start it by hand: {by_hand}"
        )
        return f"no recovery: deployment {name} not found", line, None
    except Exception as exc:  # noqa: BLE001 - the crash notice still goes out; the run fails after
        line = f"not started ({type(exc).__name__}: {exc}); start it by hand: {by_hand}"
        return f"recovery not started: {type(exc).__name__}: {exc}", line, exc
    link = ui_link(config, started.id)
    line = f"started: {started.name} {link} (recover-environment, maintenance state only)"
    return f"recovery started: {name} run {started.name} ({started.id})", line, None


def _started(
    client: Any, config: FabulawsConfig, run: Any, env: EnvironmentConfig, in_run: bool = False
) -> tuple[str, list[Check]]:
    """Plan the window and slow-run checks of a run that (re)started RUNNING."""
    from fabflows import guard

    if run.state is None or not run.state.is_running():
        state = run.state.type.value if run.state else "?"
        return f"run {run.name} is not running any more ({state})", []
    flow_name = client.read_flow(run.flow_id).name
    if _read_only(flow_name):
        return f"{flow_name} is read-only: no checks", []
    since = run.state.timestamp.astimezone(UTC)
    # a resume after a pause plans them again from now
    cancel_checks(client, run.id, keep_since=since.isoformat())
    settings = settings_for(config, env.environment)
    now = datetime.now(UTC)
    checks = []
    if wanted(config, env.environment, "window"):
        decision = guard.check_window(env, now=now)
        end = decision.window_end
        if end is not None:
            due = max(end - timedelta(minutes=settings.window_warning_minutes), now)
            due = max(due, now + timedelta(seconds=3))  # after the run has taken its lock
            if due < end:
                extra = {"since": since.isoformat(), "window_end": end.isoformat()}
                checks.append(Check("check-window", due, extra))
    usual = usual_duration(flow_name, env) if wanted(config, env.environment, "slow") else None
    if usual is not None:
        due = since + slow_after(usual, settings.slow_factor, settings.slow_minimum_seconds)
        checks.append(Check("check-slow", due, {"since": since.isoformat()}))
    here, planned = plan_checks(client, config, run.id, checks, now, in_run)
    if usual is not None:
        planned.append(f"usual duration {usual.total_seconds():.1f} s")
    return f"{flow_name} run {run.name}: " + ("; ".join(planned) or "no checks wanted"), here


def _awaiting_approval(run: Any) -> bool:
    from fabflows.approval import AWAITING_TAG

    return bool(run.state and run.state.is_paused() and AWAITING_TAG in (run.tags or []))


def _approval_checks(run: Any) -> list[Check]:
    """The reminder (half way to the deadline) and the timeout notice of a run pausing for
    approval now (none if its pause has no deadline)."""
    details = run.state.state_details if run.state else None
    deadline = getattr(details, "pause_timeout", None)
    if deadline is None:
        return []
    # plain datetimes (arithmetic on Prefect's DateTime can drop the time zone)
    since = datetime.fromtimestamp(run.state.timestamp.timestamp(), UTC)
    deadline = datetime.fromtimestamp(deadline.timestamp(), UTC)
    extra = {"since": since.isoformat()}
    return [
        Check("check-reminder", since + (deadline - since) / 2, extra),
        Check("check-timeout", deadline, extra),
    ]


def slow_after(usual: timedelta, factor: float, minimum_seconds: float) -> timedelta:
    """How long after its start a run counts as slow: ``factor`` x usual, and at least
    ``minimum_seconds`` more than usual."""
    return usual + max(usual * (factor - 1), timedelta(seconds=minimum_seconds))


def _same_state(run: Any, since: str) -> bool:
    """The run's state is still the one the check was planned for (same timestamp)."""
    if run.state is None or not since:
        return False
    planned = datetime.fromisoformat(since)
    return abs((run.state.timestamp.astimezone(UTC) - planned).total_seconds()) < 1


def _same_running(run: Any, since: str) -> bool:
    """Still in the RUNNING stretch the check was planned for (not paused or resumed since)."""
    return run.state is not None and run.state.is_running() and _same_state(run, since)


def handle(
    client: Any,
    config: FabulawsConfig,
    kind: str,
    run_id: uuid.UUID,
    since: str,
    window_end: str,
    due: str = "",
    in_run: bool = False,
) -> str:
    """Do what ``kind`` asks for the run ``run_id``, then the checks it planned to do here (in due
    order; ``in_run``: called by the run itself, see ``plan_checks``); returns what was done (for
    the log)."""
    said, here = _handle_one(client, config, kind, run_id, since, window_end, due, in_run)
    for check in here:
        extra = check.extra
        done = handle(
            client,
            config,
            check.kind,
            run_id,
            extra.get("since", ""),
            extra.get("window_end", ""),
            check.due.isoformat(),
        )
        said = f"{said}\n{done}"
    return said


def _handle_one(
    client: Any,
    config: FabulawsConfig,
    kind: str,
    run_id: uuid.UUID,
    since: str,
    window_end: str,
    due: str,
    in_run: bool = False,
) -> tuple[str, list[Check]]:
    if kind.startswith("check-"):
        wait_until(due)
    run = client.read_flow_run(run_id)
    if kind == "ended" and run.state is not None and _pause_expired(run.state):
        kind = "check-timeout"  # not the end yet: the run rejects itself, then ends
    if kind == "check-window":
        _wait_for_lock(client, config, run_id, since, window_end)
        run = client.read_flow_run(run_id)
    if kind == "check-crash":
        ended = _wait_for_crash(client, config, run)
        if ended is None:
            return f"check-crash: run {run.name} is alive (its heartbeats went on)", []
        run, kind = ended, "ended"
    if kind == "check-timeout":
        # the deadline passed: the run rejects itself at its next approval poll, then ends
        ended = wait_for_end(client, run_id, since, TIMEOUT_GRACE)
        if ended is None:
            return f"check-timeout: run {run.name} left its approval wait: nothing to say", []
        run, kind = ended, "ended"
    env = environment_of(config, run)
    if env is None:
        return f"run {run_id} has no fabflows environment: nothing to say", []
    if kind == "started":
        return _started(client, config, run, env, in_run)
    if kind == "ended":
        cancel_checks(client, run.id)
    facts = run_facts(client, config, run, env)
    recovery, failure = "", None
    if kind == "ended" and facts.state == "CRASHED":
        skipped = recovery_skipped(config, env, facts)
        if skipped is None:
            recovery, line, failure = start_recovery(config, run, env)
            facts = facts.model_copy(update={"recovery": line})
        else:
            recovery = f"no recovery: {skipped}"
    said = _notify(client, config, env, kind, run, facts, since, window_end)
    said = f"{said}; {recovery}" if recovery else said
    if failure is not None:
        raise RuntimeError(said) from failure
    here: list[Check] = []
    if kind == "paused" and _awaiting_approval(run) and wanted(config, env.environment, "approval"):
        here, planned = plan_checks(client, config, run.id, _approval_checks(run), in_run=in_run)
        said += "; " + "; ".join(planned)
    return said, here


def _notify(
    client: Any,
    config: FabulawsConfig,
    env: EnvironmentConfig,
    kind: str,
    run: Any,
    facts: messages.RunFacts,
    since: str,
    window_end: str,
) -> str:
    """Send the notice ``kind`` asks for, if any; returns what was done."""
    from fabflows import lock

    notice: messages.Notice | None = None
    if kind == "ended":
        if facts.state == "COMPLETED":
            if facts.auto_scheduled:
                notice = messages.success_notice(facts)
        else:
            notice = messages.ended_notice(facts)
    elif kind in ("paused", "reminder", "check-reminder"):
        same = kind != "check-reminder" or _same_state(run, since)
        if facts.state == "PAUSED" and same:
            if _awaiting_approval(run):
                notice = messages.approval_notice(
                    facts, approval_facts(client, run), reminder=kind != "paused"
                )
    elif kind == "check-window":
        holder = lock.read_holder(env, config)
        if _same_running(run, since) and holder and holder.flow_run_id == str(run.id):
            notice = messages.window_notice(
                facts, datetime.fromisoformat(window_end), datetime.now(UTC)
            )
    elif kind == "check-slow":
        usual = usual_duration(facts.flow, env)
        if _same_running(run, since) and usual is not None:
            start = datetime.fromisoformat(since)
            settings = settings_for(config, env.environment)
            notice = messages.slow_notice(
                facts, usual, datetime.now(UTC) - start, settings.slow_factor
            )
    if notice is None:
        return f"{kind}: nothing to say about {facts.flow} run {run.name} ({facts.state})"
    sent = send_notice(config, env.environment, notice)
    return f"{kind}: {'sent' if sent else 'not sent (not wanted or sent before)'}: {notice.subject}"


WATCH_TAG = "notify-watch"
RUNBOOK_TAG = "fabflows"
"""The tag of every fabflows deployment's runs (``deployments.generate.DEPLOYMENT_TAG``)."""
WATCH_IDLE = timedelta(seconds=60)
"""The watcher ends once no fabflows deployment run has been running (or paused) this long."""


def ensure_watcher(client: Any, run_id: uuid.UUID) -> str:
    """Start the crash watcher (a ``watch`` run of the notifier deployment) unless one is
    scheduled or running: a process already up when the zombie automation marks a run CRASHED,
    so the crash notice does not wait for a worker to start one (tens of seconds on a loaded
    machine). Two runs starting at once may start two: each notice is still sent once."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    live = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[WATCH_TAG]),
            state=FlowRunFilterState(
                type=FlowRunFilterStateType(
                    any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
                )
            ),
        ),
        limit=1,
    )
    if live:
        return f"crash watcher {live[0].name} is up"
    from prefect.exceptions import ObjectNotFound

    try:
        deployment = client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT_NAME}")
    except ObjectNotFound:
        return "no crash watcher: the notifier is not deployed (fabflows deploy)"
    started = client.create_flow_run_from_deployment(
        deployment.id,
        parameters={"flow_run_id": str(run_id), "kind": "watch"},
        tags=[NOTIFY_TAG, WATCH_TAG],
    )
    return f"crash watcher {started.name} started"


def watch(client: Any, config: FabulawsConfig) -> str:
    """The crash watcher: every ``POLL_SECONDS``, the crash notice (and recovery) of each fabflows
    run marked CRASHED since it started; ends after ``WATCH_IDLE`` with no fabflows run going."""
    import time

    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterEndTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    import fabflows.audit  # noqa: F401 - imported now, not after a crash
    import fabflows.chatops.notify  # noqa: F401
    import fabflows.runtime.journal  # noqa: F401

    began = datetime.now(UTC) - timedelta(seconds=5)

    def runs(*types: StateType, ended_after: datetime | None = None) -> list[Any]:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[RUNBOOK_TAG]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(types))),
                end_time=FlowRunFilterEndTime(after_=ended_after) if ended_after else None,
            ),
            limit=200,
        )

    seen: set[uuid.UUID] = set()
    said: list[str] = []
    idle_since = datetime.now(UTC)
    while datetime.now(UTC) - idle_since < WATCH_IDLE:
        for run in runs(StateType.CRASHED, ended_after=began):
            if run.id in seen or run.state is None:
                continue
            if datetime.fromtimestamp(run.state.timestamp.timestamp(), UTC) < began:
                continue
            seen.add(run.id)
            said.append(handle(client, config, "ended", run.id, "", ""))
            get_run_logger().info("watch: %s", said[-1])
        going = runs(StateType.RUNNING, StateType.PAUSED, StateType.PENDING, StateType.CANCELLING)
        if going:
            idle_since = datetime.now(UTC)
        time.sleep(POLL_SECONDS)
    return "\n".join(said) or "watch: no crash"


@flow(name=FLOW_NAME, log_prints=False)
def notify_run(
    flow_run_id: str,
    kind: Kind,
    since: str = "",
    window_end: str = "",
    due: str = "",
    config: str | None = None,
) -> str:
    """Tell the environment's operators about a fabflows run (run by the fabflows automations).

    Args:
        flow_run_id: The run (or the event's resource id ``prefect.flow-run.<id>``).
        kind: ended, paused, reminder, started, check-window, check-slow, check-reminder,
            check-timeout, check-crash or watch (the crash watcher: ``watch``).
        since: For the checks: the RUNNING (or PAUSED) state they were planned for.
        window_end: For check-window: when the window closes.
        due: For the checks: when they are due (the run starts earlier and waits).
        config: Path of the config file (default: $FABFLOWS_CONFIG).
    """
    from prefect.client.orchestration import get_client

    cfg = load_config(config)
    with get_client(sync_client=True) as client:
        if kind == "watch":
            said = watch(client, cfg)
            get_run_logger().info("%s", said)
            return said
        said = handle(client, cfg, kind, run_id_of(flow_run_id), since, window_end, due)
    get_run_logger().info("%s", said)
    return said
