"""What ``fabflows deploy`` registers for notifications: the notifier deployment and automations.

Prefect OSS automations match the state-change events of every run tagged as a fabflows run
(``env:<deployment>/<environment>``, set by every runbook at its start; deployment runs also carry
``fabflows``) and run the ``fabflows-notify`` deployment with the run's id:

- "fabflows: notify run ended": FAILED, CRASHED (also the zombie automation's), CANCELLED, and
  COMPLETED when an environment asks for success messages of scheduled runs. CRASHED is matched
  whenever some environment has ``recover_on_crash`` (the default), notification block or not: the
  notifier starts the crashed run's recovery (``fabflows.notify.notifier.start_recovery``);
- "fabflows: notify heartbeat late": a run's heartbeats stopped for a while, before the zombie
  automation marks it CRASHED (a proactive trigger): a notifier run starts and waits for that
  CRASHED, so the crash notice goes out as soon as it is set (``check-crash``);
- "fabflows: notify approval pending": PAUSED (a runbook waiting for approval);
- "fabflows: notify approval reminder": still PAUSED half the approval timeout later (a proactive
  trigger: no RUNNING or final state within that time);
- "fabflows: notify run started": RUNNING, to plan the window and slow-run checks.

The notifier runs on the fabflows work pool like every runbook, so what it sends comes from the
same config, journal and blocks the runs use. No automation exists when no environment names a
notification block and none recovers on crash. (Prefect's webhooks are Cloud-only; automations
with a run-deployment action are OSS.)
"""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

from config import FabulawsConfig
from config.models import EnvironmentSettings
from fabflows.notify.notifier import (
    DEPLOYMENT_NAME,
    FLOW_NAME,
    NOTIFY_TAG,
    ZOMBIE_EXPECT,
    heartbeat_late_after,
)

PREFIX = "fabflows: notify "
IMPORT_PATH = "fabflows.notify.notifier:notify_run"
RUN_TAGS = ["prefect.tag.env:*"]
STARTED_TAGS = ["prefect.tag.fabflows", "prefect.tag.env:*", "prefect.tag.started-by:*"]


def _settings(config: FabulawsConfig) -> list[EnvironmentSettings]:
    return [
        config.fabflows.environments.get(e) or EnvironmentSettings() for e in config.environments
    ]


def events_wanted(config: FabulawsConfig) -> set[str]:
    """Every event some environment with a notification block wants."""
    out: set[str] = set()
    for s in _settings(config):
        if s.notifications.block:
            out |= set(s.notifications.events)
    return out


def recovers_on_crash(config: FabulawsConfig) -> bool:
    """Does some environment start a recovery when a run crashes (``recover_on_crash``)?"""
    return any(s.recover_on_crash for s in _settings(config))


def notifier_spec(config: FabulawsConfig, job_variables: dict[str, Any], work_pool: str) -> Any:
    """The one ``fabflows-notify/all-environments`` deployment (no schedule)."""
    from prefect.utilities.callables import parameter_schema

    from deployments.generate import DeploymentSpec, entrypoint_of, load_flow

    flow = load_flow(IMPORT_PATH)
    schema = parameter_schema(flow.fn).model_dump(mode="json", by_alias=True, exclude_none=True)
    schema = copy.deepcopy(schema)
    schema.get("properties", {}).pop("config", None)
    schema["additionalProperties"] = False
    from pathlib import Path

    source = Path(job_variables["working_dir"])
    return DeploymentSpec(
        flow_name=FLOW_NAME,
        import_path=IMPORT_PATH,
        entrypoint=entrypoint_of(IMPORT_PATH, source),
        name=DEPLOYMENT_NAME,
        deployment="all",
        environment="all",
        description=flow.fn.__doc__ or FLOW_NAME,
        tags=[NOTIFY_TAG],
        parameters={},
        parameter_schema=schema,
        schedules=[],
        job_variables=job_variables,
        work_pool=work_pool,
    )


def _trigger(events: set[str], tags: list[str], **kwargs: Any) -> Any:
    from prefect.events.schemas.automations import EventTrigger, Posture

    return EventTrigger(
        expect=events,
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "tag", "prefect.resource.id": tags},
        for_each={"prefect.resource.id"},
        posture=kwargs.pop("posture", Posture.Reactive),
        threshold=1,
        within=kwargs.pop("within", timedelta(0)),
        **kwargs,
    )


def _run_notifier(deployment_id: Any, kind: str) -> Any:
    from prefect.events.actions import RunDeployment

    return RunDeployment(
        source="selected",
        deployment_id=deployment_id,
        parameters={"flow_run_id": "{{ event.resource.id }}", "kind": kind},
    )


def automations(config: FabulawsConfig, deployment_id: Any) -> list[Any]:
    """The automations for what the environments want (empty: no notification block anywhere
    and no recovery on crash)."""
    from prefect.automations import AutomationCore
    from prefect.events.schemas.automations import Posture

    wanted = events_wanted(config)
    out = []
    ended = {
        f"prefect.flow-run.{s}"
        for e, s in (("failed", "Failed"), ("crashed", "Crashed"), ("cancelled", "Cancelled"))
        if e in wanted or (e == "cancelled" and "approval" in wanted)
    }
    if recovers_on_crash(config):
        ended.add("prefect.flow-run.Crashed")
    if "success" in wanted:
        ended.add("prefect.flow-run.Completed")
    if ended:
        out.append(
            AutomationCore(
                name=PREFIX + "run ended",
                description="A fabflows run failed, crashed or was cancelled (or a scheduled run "
                "completed): tell the environment's notification block; a crashed run that applied "
                "steps gets its maintenance state undone (recover_on_crash).",
                trigger=_trigger(ended, RUN_TAGS),
                actions=[_run_notifier(deployment_id, "ended")],
            )
        )
    if "crashed" in wanted:
        deploy = config.fabflows.deploy
        late = heartbeat_late_after(deploy.heartbeat_seconds, deploy.zombie_after_seconds)
        out.append(
            AutomationCore(
                name=PREFIX + "heartbeat late",
                description=f"A fabflows run sent no heartbeat for {late.total_seconds():.0f} s: "
                "start a notifier run that waits for the zombie automation's CRASHED, so the "
                "crash notice does not wait for a process to start.",
                trigger=_trigger(
                    set(ZOMBIE_EXPECT),
                    RUN_TAGS,
                    after={"prefect.flow-run.heartbeat"},
                    posture=Posture.Proactive,
                    within=late,
                ),
                actions=[_run_notifier(deployment_id, "check-crash")],
            )
        )
    if "approval" in wanted:
        half = timedelta(minutes=config.fabflows.approval.timeout_minutes) / 2
        out.append(
            AutomationCore(
                name=PREFIX + "approval pending",
                description="A fabflows run waits for approval.",
                trigger=_trigger({"prefect.flow-run.Paused"}, RUN_TAGS),
                actions=[_run_notifier(deployment_id, "paused")],
            )
        )
        out.append(
            AutomationCore(
                name=PREFIX + "approval reminder",
                description=f"A fabflows run still waits for approval after {half} (half the "
                "approval timeout).",
                trigger=_trigger(
                    {
                        "prefect.flow-run.Running",
                        "prefect.flow-run.Completed",
                        "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled",
                        "prefect.flow-run.Crashed",
                    },
                    RUN_TAGS,
                    after={"prefect.flow-run.Paused"},
                    posture=Posture.Proactive,
                    within=max(half, timedelta(seconds=10)),
                ),
                actions=[_run_notifier(deployment_id, "reminder")],
            )
        )
    if wanted & {"window", "slow"}:
        out.append(
            AutomationCore(
                name=PREFIX + "run started",
                description="A fabflows run started: plan its window and slow-run checks.",
                trigger=_trigger({"prefect.flow-run.Running"}, STARTED_TAGS),
                actions=[_run_notifier(deployment_id, "started")],
            )
        )
    return out


async def register(client: Any, config: FabulawsConfig, plan: Any) -> list[str]:
    """Upsert the notifier deployment and replace the notify automations; returns their names."""
    from deployments.apply import upsert_deployment

    names = [
        PREFIX + n for n in ("run ended", "heartbeat late", "approval pending", "approval reminder")
    ]
    names.append(PREFIX + "run started")
    for name in names:
        for existing in await client.read_automations_by_name(name):
            await client.delete_automation(existing.id)
    if not plan.deployments:
        return []
    spec = notifier_spec(config, plan.deployments[0].job_variables, plan.work_pool)
    deployment_id = await upsert_deployment(client, spec)
    created = []
    for automation in automations(config, deployment_id):
        await client.create_automation(automation)
        created.append(automation.name)
    return created
