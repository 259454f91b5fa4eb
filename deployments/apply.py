"""``fabflows deploy``: register everything the runbooks need on a Prefect server.

    fabflows deploy [--config PATH] [--flow NAME ...] [--dry-run] [--prune]

In order, idempotently (run it again after every change of config or registry):

1. block types: every Block in ``blocks/``, prefect-aws ``AwsCredentials``, prefect-slack
   ``SlackWebhook`` and Prefect's ``Secret``, so the UI can create their documents;
2. the process work pool (``fabflows.deploy.work_pool``) with its concurrency limit
   (``max_parallel_runs``). Workers: ``prefect worker start --pool <pool>``;
3. every deployment of ``deployments.generate.plan_deployments`` (upserted; ``--prune`` deletes
   fabflows-tagged deployments that are no longer generated), schedules active, never paused;
4. the automation "fabflows: crash zombie runs" that marks a run CRASHED when its heartbeats stop
   (a worker or machine died mid-run), so nothing stays RUNNING forever.
5. notifications (``fabflows.notify.automations``): the ``fabflows-notify/all-environments``
   deployment and the "fabflows: notify ..." automations that run it for failed, crashed and
   cancelled runs, approvals pending, runs near their window's end and slow runs, per the
   environments' ``notifications`` (none when no environment names a notification block).

Not registered on purpose: Prefect global concurrency limits (including a deployment
``concurrency_limit``, which is one). Their slots live in server memory and leak for good on a server
restart; one maintenance per environment is ``fabflows.lock`` instead.

Schedules belong to deployments served by workers, never to ``flow.serve()``: ``serve`` pauses its
deployments (deleting their scheduled runs) when it stops, so a restart would silently skip a window.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import pkgutil
import sys
from datetime import timedelta
from typing import Any

from config import ConfigError, load_config
from config.loader import find_config
from deployments.generate import (
    DEPLOYMENT_TAG,
    DeployConfigError,
    DeploymentPlan,
    DeploymentSpec,
    plan_deployments,
)
from fabflows.notify import automations as notify_automations

ZOMBIE_AUTOMATION = "fabflows: crash zombie runs"


def block_classes() -> list[type]:
    """Every Block subclass defined in the ``blocks`` package, plus the integrations fabflows uses."""
    from prefect.blocks.core import Block
    from prefect.blocks.system import Secret
    from prefect_aws import AwsCredentials
    from prefect_slack import SlackWebhook

    import blocks

    found: list[type] = [AwsCredentials, SlackWebhook, Secret]
    for info in pkgutil.iter_modules(blocks.__path__):
        module = importlib.import_module(f"blocks.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Block) and obj.__module__ == module.__name__ and obj not in found:
                found.append(obj)
    return found


async def register_block_types(client: Any) -> list[str]:
    names = []
    for cls in block_classes():
        await cls.register_type_and_schema(client=client)
        names.append(cls.get_block_type_slug())
    return names


async def ensure_work_pool(client: Any, name: str, concurrency_limit: int) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    try:
        await client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type="process",
                base_job_template=template,
                concurrency_limit=concurrency_limit,
                description="fabflows runbooks (process workers: prefect worker start --pool "
                f"{name})",
            )
        )
    except ObjectAlreadyExists:
        await client.update_work_pool(
            name, WorkPoolUpdate(concurrency_limit=concurrency_limit, is_paused=False)
        )


async def upsert_deployment(
    client: Any, spec: DeploymentSpec, flow_ids: dict[str, Any] | None = None
) -> Any:
    """Create or update ``spec``'s deployment, its schedules exactly the generated ones.

    ``flow_ids`` (flow name -> id) is filled and reused across calls: a flow is registered once
    per deploy, not once per environment (each registration is a request of ~0.15 s).
    """
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule

    flow_ids = {} if flow_ids is None else flow_ids
    if spec.flow_name not in flow_ids:
        flow_ids[spec.flow_name] = await client.create_flow_from_name(spec.flow_name)
    flow_id = flow_ids[spec.flow_name]
    schedules = [
        DeploymentScheduleCreate(
            schedule=CronSchedule(cron=s.cron, timezone=s.timezone),
            active=True,
            parameters=s.parameters,
            slug=s.slug,
        )
        for s in spec.schedules
    ]
    deployment_id = await client.create_deployment(
        flow_id=flow_id,
        name=spec.name,
        schedules=schedules,
        parameters=spec.parameters,
        description=spec.description,
        work_pool_name=spec.work_pool,
        tags=spec.tags,
        path=spec.job_variables["working_dir"],
        entrypoint=spec.entrypoint,
        parameter_openapi_schema=spec.parameter_schema,
        paused=False,
        pull_steps=[
            {
                "prefect.deployments.steps.set_working_directory": {
                    "directory": spec.job_variables["working_dir"]
                }
            }
        ],
        enforce_parameter_schema=True,
        job_variables=spec.job_variables,
    )
    # an upsert keeps old schedules: make the stored ones exactly the generated ones
    existing = await client.read_deployment_schedules(deployment_id)
    wanted = {s.slug for s in spec.schedules}
    have = set()
    for schedule in existing:
        if schedule.slug not in wanted:
            await client.delete_deployment_schedule(deployment_id, schedule.id)
        else:
            have.add(schedule.slug)
    missing = [s for s in schedules if s.slug not in have]
    if missing:
        await client.create_deployment_schedules(deployment_id, missing)
    return deployment_id


async def prune(client: Any, keep: set[str]) -> list[str]:
    """Delete fabflows-tagged deployments that are no longer generated."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    removed = []
    found = await client.read_deployments(
        deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[DEPLOYMENT_TAG]))
    )
    flows = {f.id: f.name for f in await client.read_flows()}
    for dep in found:
        full = f"{flows.get(dep.flow_id, '?')}/{dep.name}"
        if full not in keep:
            await client.delete_deployment(dep.id)
            removed.append(full)
    return removed


def zombie_automation(heartbeat_seconds: int, within_seconds: int) -> Any:
    """Proactive trigger: a running flow run that sends no heartbeat for ``within`` is CRASHED."""
    from prefect.automations import AutomationCore
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    within = max(within_seconds, 2 * heartbeat_seconds)
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=(
            f"Runs send a heartbeat every {heartbeat_seconds} s; none for {within} s means the "
            "process is gone (worker or machine died). Marks the run CRASHED."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
                "prefect.flow-run.Paused",
            },
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {within} s: the run's process is gone (marked by fabflows).",
            )
        ],
    )


async def ensure_automation(client: Any, automation: Any) -> None:
    for existing in await client.read_automations_by_name(automation.name):
        await client.delete_automation(existing.id)
    await client.create_automation(automation)


async def apply_plan(
    plan: DeploymentPlan, heartbeat: int, zombie_after: int, do_prune: bool, config: Any = None
) -> dict:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        await client.api_healthcheck()
        block_types = await register_block_types(client)
        await ensure_work_pool(client, plan.work_pool, plan.max_parallel_runs)
        names = []
        flow_ids: dict[str, Any] = {}
        for spec in plan.deployments:
            await upsert_deployment(client, spec, flow_ids)
            names.append(spec.full_name)
        removed = await prune(client, set(names)) if do_prune else []
        await ensure_automation(client, zombie_automation(heartbeat, zombie_after))
        notify = await notify_automations.register(client, config, plan) if config else []
    return {
        "block_types": block_types,
        "deployments": names,
        "removed": removed,
        "notify_automations": notify,
    }


def deploy(
    config_path: str | None = None,
    only: list[str] | None = None,
    dry_run: bool = False,
    do_prune: bool = False,
    flows: dict[str, str] | None = None,
) -> dict:
    """Generate and register everything; returns what was done (or would be, with dry_run)."""
    from fabflows.registry import FLOWS

    path = find_config(config_path)
    config = load_config(path)
    plan = plan_deployments(config, flows or FLOWS, path, only=only)
    result: dict[str, Any] = {
        "work_pool": plan.work_pool,
        "deployments": [d.full_name for d in plan.deployments],
        "schedules": [
            f"{d.full_name}: {s.cron} ({s.timezone})" for d in plan.deployments for s in d.schedules
        ],
        "warnings": plan.warnings,
    }
    if dry_run:
        return result
    settings = config.fabflows.deploy
    done = asyncio.run(
        apply_plan(
            plan, settings.heartbeat_seconds, settings.zombie_after_seconds, do_prune, config
        )
    )
    return result | done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fabflows deploy`` arguments, for the CLI to register."""
    parser.add_argument("--config", default=None, help="config file (default: $FABFLOWS_CONFIG)")
    parser.add_argument("--flow", action="append", default=None, help="only this flow (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be registered")
    parser.add_argument(
        "--prune", action="store_true", help="delete fabflows deployments no longer generated"
    )


def run(args: argparse.Namespace) -> int:
    try:
        result = deploy(args.config, args.flow, args.dry_run, args.prune)
    except (ConfigError, DeployConfigError) as exc:
        print(f"fabflows deploy: {exc}", file=sys.stderr)
        return 2
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    verb = "would register" if args.dry_run else "registered"
    print(f"{verb} work pool {result['work_pool']} and {len(result['deployments'])} deployments:")
    for name in result["deployments"]:
        print(f"  {name}")
    for line in result["schedules"]:
        print(f"  schedule {line}")
    for name in result.get("removed", []):
        print(f"  removed {name}")
    if not args.dry_run:
        print("start workers with: prefect worker start --pool " + result["work_pool"])
    return 0


def main_deploy(argv: list[str] | None = None) -> int:
    """Entry point: ``main_deploy(["--config", "fabflows.yaml"])``."""
    parser = argparse.ArgumentParser(prog="fabflows deploy")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main_deploy())
