"""resize-environment: change servers to config's instance types, safely (the original's
recreate_servers, which took 30-60 minutes, aborted inside its downtime window at HEAD, dropped the
cache's queues, promoted without a lag check and left the old servers running forever)."""

from __future__ import annotations

import importlib

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from config.models import EnvironmentSettings
from fabflows.errors import BadInput
from fabflows.procedures.environment_power import servers_and_group
from fabflows.procedures.resize_plan import (
    ResizeRunbookPlan,
    plan_resize_environment,
    resize_runbook_plan,
)
from fabflows.procedures.resize_steps import resize_steps
from fabflows.registry import FLOWS
from fabflows.runbook import RunContext
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from tasks.aws.autoscaling import AutoScalingGroup
from tasks.aws.ec2 import Server, describe_servers
from tasks.aws.ec2_writes import (
    InstanceTypeInfo,
    describe_instance_types,
    describe_launch_template_type,
)
from tasks.http.probe import check_site_up

FLOW_NAME = "resize-environment"
REFRESH_FLOW = "deploy-serial"
"""The rolling web refresh, run by name after this run's lock is released (when registered)."""

__all__ = ["RUNBOOK", "plan_resize_environment", "resize_environment"]


class ResizeEnvironmentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refresh_web: bool = Field(default=True, description="Replace the web instances afterwards.")
    config_path: str | None = Field(
        default=None, description="The config file (set by the flow): upgrade pages relative to it."
    )


class ResizeFacts(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    servers: list[Server]
    group: AutoScalingGroup | None
    launch_template_type: str | None
    known: dict[str, InstanceTypeInfo]
    unknown: list[str]
    minimum_memory_mib: dict[str, int]
    cache_strategy: str
    goal_seconds: float


class ResizeEnvironment(Runbook[ResizeEnvironmentParams, ResizeFacts, ResizeRunbookPlan]):
    name = FLOW_NAME
    Params = ResizeEnvironmentParams
    plan_type = ResizeRunbookPlan

    def validate(self, rc: RunContext, params: ResizeEnvironmentParams) -> None:
        if not rc.env.instance_types:
            raise BadInput(
                f"instance_types has no entry for {rc.env.environment}: nothing to resize to"
            )

    def window_required(self, env: EnvironmentConfig, params: ResizeEnvironmentParams) -> bool:
        # the primary and the cache change inside a short upgrade window
        return env.protected or bool({"db-primary", "cache"} & set(env.instance_types))

    def gather(self, scope: Scope, params: ResizeEnvironmentParams) -> ResizeFacts:
        rc, env = scope.rc, scope.env
        servers, group = servers_and_group(rc)
        lt_type = None
        if group is not None and group.launch_template:
            lt_type = describe_launch_template_type(
                rc.creds, group.launch_template, group.launch_template_version
            )
        known, unknown = describe_instance_types(rc.creds, sorted(set(env.instance_types.values())))
        settings = rc.config.fabflows.environments.get(env.environment) or EnvironmentSettings()
        return ResizeFacts(
            servers=servers,
            group=group,
            launch_template_type=lt_type,
            known=known,
            unknown=list(unknown),
            minimum_memory_mib=dict(rc.config.fabflows.resize.minimum_memory_mib),
            cache_strategy=settings.cache_strategy,
            goal_seconds=rc.config.fabflows.resize.downtime_goal_seconds,
        )

    def plan(
        self, facts: ResizeFacts, params: ResizeEnvironmentParams, env: EnvironmentConfig
    ) -> ResizeRunbookPlan:
        resize = plan_resize_environment(
            env.label,
            dict(env.instance_types),
            facts.servers,
            facts.group,
            facts.launch_template_type,
            known_types=facts.known,
            unknown_types=facts.unknown,
            minimum_memory_mib=facts.minimum_memory_mib,
            cache_strategy=facts.cache_strategy,
            refresh_available=REFRESH_FLOW in FLOWS and params.refresh_web,
            address_attribute=env.address_attribute,
        )
        return resize_runbook_plan(
            resize,
            title=f"{FLOW_NAME} on {env.label}",
            goal_seconds=facts.goal_seconds,
            auto_scaling_group_name=facts.group.auto_scaling_group_name if facts.group else None,
            launch_template=facts.group.launch_template if facts.group else None,
        )

    def steps(self, plan: ResizeRunbookPlan, params: ResizeEnvironmentParams) -> list[Step]:
        return resize_steps(plan, FLOW_NAME)

    def verify(
        self, scope: Scope, plan: ResizeRunbookPlan, params: ResizeEnvironmentParams
    ) -> list[str]:
        rc, env = scope.rc, scope.env
        after = {
            s.instance_id: s for s in describe_servers(rc.creds, env.deployment, env.environment)
        }
        problems = [
            f"{c.name} is {after[c.instance_id].instance_type}, not {c.wanted_type}"
            for c in plan.resize.changes
            if c.instance_id
            and c.strategy != "refresh-pending"
            and c.instance_id in after
            and after[c.instance_id].instance_type != c.wanted_type
        ]
        web = [s for s in after.values() if s.role == "web" and s.state == "running"]
        upgrade = rc.config.fabflows.upgrade
        checks = check_site_up(
            [upgrade.web_server_url.format(address=s.address(env.address_attribute)) for s in web],
            upgrade.healthcheck_path,
            site_url=env.site_url,
            timeout=rc.config.fabflows.stop_start.site_wait_seconds,
        )
        return problems + [c.describe() for c in checks if not c.ok]


RUNBOOK = ResizeEnvironment()

REFRESH_NOTE = "replaced by deploy-serial after the resize"


def _refresh_web(
    report: RunbookReport, environment: str, deployment: str | None, config: str | None
):  # noqa: ANN202
    """After the resize (its lock released): deploy-serial replaces the running web instances."""
    if REFRESH_NOTE not in report.plan_text or REFRESH_FLOW not in FLOWS:
        return report
    module, _, attr = FLOWS[REFRESH_FLOW].partition(":")
    refresh = getattr(importlib.import_module(module), attr)
    try:
        result = refresh(
            environment=environment, deployment=deployment, config=config, dry_run=False
        )
    except Exception as exc:
        raise RuntimeError(
            f"{report.environment} resized ({report.outcome}), but replacing the web instances "
            f"with {REFRESH_FLOW} failed: {exc}. Run {REFRESH_FLOW} again."
        ) from exc
    details = getattr(result, "details", None) or {}
    replaced = getattr(result, "replaced", None) or details.get("replaced") or {}
    probe = getattr(result, "probe", None)
    seen = probe.describe() if probe is not None else details.get("Site probe")
    done = f"{REFRESH_FLOW}: {len(replaced)} web instance(s) replaced" + (
        f"; {seen}" if seen else ""
    )
    return report.model_copy(
        update={
            "outcome": f"{report.outcome}; {done}",
            "details": {**report.details, "web_refresh": done},
        }
    )


@flow(name=FLOW_NAME, log_prints=False)
def resize_environment(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    window_override_reason: str | None = None,
    refresh_web: bool = True,
) -> RunbookReport:
    """Change servers to `instance_types[env][role]` (the original's `recreate_servers`, done safely).

    **When to run:** after changing `instance_types` in the config. The plan (dry run) shows, per
    server, current -> wanted type and the step that changes it; run it to apply.

    **Steps (the plan says which per server):**
    - **workers, replicas** (and web servers outside the group): `resize-<role>-<instance id>`, one
      at a time while the others keep working: drained (celery stopped, finishing its tasks),
      stopped, type changed, started, waited for until SSH answers, brought back into service
      (encrypted volume, services).
    - **primary** and the **cache** (`cache_strategy: stop`): `upgrade-mode-on` (503 page with the
      health check kept green, autoscaling suspended and recorded), `resize-window` (workers
      drained, stop, change type, start, back in service, workers started), `upgrade-mode-off`.
      The downtime is measured from the steps and published; it depends on EC2's stop/start
      time, not on the database's size (nothing is copied, no replica is rebuilt). With
      `cache_strategy: terminate-and-recreate` the cache is not resized here: change its launch
      template.
    - **stopped servers** (e.g. by stop-environment): `resize-stopped`, changed while stopped.
    - **web**: `new-launch-template-version` with the wanted type (no downtime); then, after this
      run has released the environment's lock, `deploy-serial` replaces the running web
      instances with surge capacity (its new version starts from this one, so it keeps the new
      type). With `refresh_web` off, or without deploy-serial, they keep their type until
      replaced, and the plan says so.

    **Refused before any change:** a wanted type EC2 does not know in the region, or with less
    memory than the role's minimum (`fabflows.resize.minimum_memory_mib`: the original's
    documented m1.small, m1.medium for workers); the cache with terminate-and-recreate; servers in
    transition. Outside the maintenance window when the config sizes the primary or the cache, or
    the environment is protected, unless overridden. The environment is read again under its lock
    and the run refused if the plan changed meanwhile.

    **Blast radius:** every server whose type changes restarts. No data moves; no server is
    retired (types change in place, so nothing old is left running, unlike the original).

    **Approval:** protected environments approve the plan (with its expected downtime).

    **Rollback:** every server's previous type is journaled (and tagged `fabflows:resize`) before
    its stop. When a step fails, the steps done so far are undone, newest first: upgrade mode
    ends (exactly the recorded autoscaling processes resumed), each server gets its previous
    type back and is started and brought into service again, the launch template gets a version
    with the previous type. `fabflows recover` undoes a run that died the same way, from its
    journal.

    Args:
        environment: Environment to resize (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Untick to apply.
        window_override_reason: Resize the primary outside the maintenance window, for this
            recorded reason.
        refresh_web: Replace the running web instances with deploy-serial afterwards.
    """
    args = dict(locals())
    args["config_path"] = config
    report = execute(RUNBOOK, args)
    if isinstance(report, RunbookReport) and not report.dry_run and report.changed:
        return _refresh_web(report, environment, deployment, config)
    return report
