"""The ``fabflows-notify`` flow: what the automations run for each event of a fabflows run.

The automations ``fabflows deploy`` registers (``fabflows.notify.automations``) run this flow's one
deployment with the triggering run's id and what happened (``kind``):

- ``ended``: the run FAILED, CRASHED or was CANCELLED (an approval timeout says so), or COMPLETED
  (a message only for scheduled runs, where the environment asks for success messages);
- ``paused`` / ``reminder``: the run waits for approval (the reminder fires at half the timeout);
- ``started``: the run is RUNNING; this schedules the two later checks as runs of this same
  deployment (no process waits meanwhile): ``check-window`` when the environment's window is about to
  close, ``check-slow`` at ``slow_factor`` times the run's usual duration (the step durations the
  step guard keeps per flow and environment);
- ``check-window`` / ``check-slow``: say so if the run is still at it then.

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
Kind = Literal["ended", "paused", "reminder", "started", "check-window", "check-slow"]


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


def _pending_checks(client: Any, run_id: uuid.UUID) -> list[Any]:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"{FOR_TAG}{run_id}"]),
            state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING])
            ),
        )
    )


def cancel_checks(client: Any, run_id: uuid.UUID) -> int:
    """Delete the checks still scheduled for ``run_id`` (it ended or was paused and resumed)."""
    pending = _pending_checks(client, run_id)
    for check in pending:
        client.delete_flow_run(check.id)
    return len(pending)


CHECK_LEAD = timedelta(seconds=45)
"""A check run is scheduled this much before it is due and waits: a process start (seconds, more
on a loaded worker machine) does not make the message late."""


def schedule_check(
    client: Any, run_id: uuid.UUID, kind: str, due: datetime, extra: dict[str, str]
) -> None:
    from prefect.states import Scheduled

    deployment = client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT_NAME}")
    at = max(due - CHECK_LEAD, datetime.now(UTC))
    client.create_flow_run_from_deployment(
        deployment.id,
        parameters={"flow_run_id": str(run_id), "kind": kind, "due": due.isoformat(), **extra},
        state=Scheduled(scheduled_time=at),
        tags=[NOTIFY_TAG, f"{FOR_TAG}{run_id}"],
    )


def wait_until(due: str) -> None:
    """Sleep until ``due`` (ISO time; empty: now)."""
    import time

    if due:
        left = (datetime.fromisoformat(due) - datetime.now(UTC)).total_seconds()
        if left > 0:
            time.sleep(left)


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


def _started(client: Any, config: FabulawsConfig, run: Any, env: EnvironmentConfig) -> str:
    from fabflows import guard

    if run.state is None or not run.state.is_running():
        return (
            f"run {run.name} is not running any more ({run.state.type.value if run.state else '?'})"
        )
    flow_name = client.read_flow(run.flow_id).name
    if _read_only(flow_name):
        return f"{flow_name} is read-only: no checks"
    cancel_checks(client, run.id)  # a resume after a pause plans them again from now
    settings = settings_for(config, env.environment)
    now = datetime.now(UTC)
    since = run.state.timestamp.astimezone(UTC)
    planned = []
    if wanted(config, env.environment, "window"):
        decision = guard.check_window(env, now=now)
        end = decision.window_end
        if end is not None:
            due = max(end - timedelta(minutes=settings.window_warning_minutes), now)
            due = max(due, now + timedelta(seconds=3))  # after the run has taken its lock
            if due < end:
                extra = {"since": since.isoformat(), "window_end": end.isoformat()}
                schedule_check(client, run.id, "check-window", due, extra)
                planned.append(f"window check at {due:%H:%M:%S}")
    usual = usual_duration(flow_name, env) if wanted(config, env.environment, "slow") else None
    if usual is not None:
        due = since + slow_after(usual, settings.slow_factor, settings.slow_minimum_seconds)
        schedule_check(client, run.id, "check-slow", due, {"since": since.isoformat()})
        planned.append(f"slow check at {due:%H:%M:%S} (usual {usual.total_seconds():.1f} s)")
    return f"{flow_name} run {run.name}: " + ("; ".join(planned) or "no checks wanted")


def slow_after(usual: timedelta, factor: float, minimum_seconds: float) -> timedelta:
    """How long after its start a run counts as slow: ``factor`` x usual, and at least
    ``minimum_seconds`` more than usual."""
    return usual + max(usual * (factor - 1), timedelta(seconds=minimum_seconds))


def _same_running(run: Any, since: str) -> bool:
    """Still in the RUNNING stretch the check was planned for (not paused or resumed since)."""
    if run.state is None or not run.state.is_running() or not since:
        return False
    planned = datetime.fromisoformat(since)
    return abs((run.state.timestamp.astimezone(UTC) - planned).total_seconds()) < 1


def handle(
    client: Any,
    config: FabulawsConfig,
    kind: str,
    run_id: uuid.UUID,
    since: str,
    window_end: str,
    due: str = "",
) -> str:
    """Do what ``kind`` asks for the run ``run_id``; returns what was done (for the log)."""
    if kind.startswith("check-"):
        wait_until(due)
    run = client.read_flow_run(run_id)
    env = environment_of(config, run)
    if env is None:
        return f"run {run_id} has no fabflows environment: nothing to say"
    if kind == "started":
        return _started(client, config, run, env)
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
    return said


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
    elif kind in ("paused", "reminder"):
        if facts.state == "PAUSED":
            from fabflows.approval import AWAITING_TAG

            if AWAITING_TAG in (run.tags or []):
                notice = messages.approval_notice(
                    facts, approval_facts(client, run), reminder=kind == "reminder"
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
        kind: ended, paused, reminder, started, check-window or check-slow.
        since: For the checks: the RUNNING state they were planned for.
        window_end: For check-window: when the window closes.
        due: For the checks: when they are due (the run starts earlier and waits).
        config: Path of the config file (default: $FABFLOWS_CONFIG).
    """
    from prefect.client.orchestration import get_client

    cfg = load_config(config)
    with get_client(sync_client=True) as client:
        said = handle(client, cfg, kind, run_id_of(flow_run_id), since, window_end, due)
    get_run_logger().info("%s", said)
    return said
