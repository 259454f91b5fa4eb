"""resize-environment: change servers to config's instance types, safely (the original's
recreate_servers, which took 30-60 minutes, aborted inside its downtime window at HEAD, dropped the
cache's queues, promoted without a lag check and left the old servers running forever)."""

from __future__ import annotations

import importlib
import time
from typing import Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from config.models import EnvironmentSettings
from fabflows.errors import BadInput
from fabflows.procedures.db_servers import db_server
from fabflows.procedures.environment_power import servers_and_group
from fabflows.procedures.promote_plan import AppServer
from fabflows.procedures.resize_plan import (
    ReplicaFact,
    ResizeRunbookPlan,
    SwitchoverFacts,
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
from tasks.postgres.failover import describe_standby
from tasks.postgres.replication import describe_primary_replication
from tasks.ssh.fleet import FleetHost
from tasks.ssh.pgbouncer import get_pgbouncer_state

FLOW_NAME = "resize-environment"
REFRESH_FLOW = "deploy-serial"
"""The rolling web refresh, run by name after this run's lock is released (when registered)."""

__all__ = ["RUNBOOK", "plan_resize_environment", "resize_environment"]


class ResizeEnvironmentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refresh_web: bool = Field(default=True, description="Replace the web instances afterwards.")
    primary_path: Literal["auto", "switchover", "in-place"] = Field(
        default="auto",
        description="The primary's resize: auto (switchover when a replica streams and pgbouncer "
        "can be paused, else the upgrade window), switchover (refused when impossible) or "
        "in-place (the upgrade window).",
    )
    pause_hold_seconds: float = Field(
        default=30, ge=5, le=300, description="pgbouncer's auto-resume bound for the switchover."
    )
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
    switchover: SwitchoverFacts | None = None


def gather_switchover(
    scope: Scope, servers: list[Server], hold_seconds: float
) -> SwitchoverFacts | None:
    """What the primary's path is decided on (read tasks only): who streams from the primary and
    how far behind, each replica's recovery state, the app servers' pgbouncers."""
    env = scope.env
    running = [s for s in servers if s.state == "running"]
    (primary,) = [s for s in running if s.role == "db-primary"]
    old = db_server(primary, env)
    try:
        seen = describe_primary_replication.fn(scope.pool, old)
    except Exception as exc:  # noqa: BLE001 - unreadable: the plan takes the upgrade window
        scope.log("replication on %s not read: %s", old.name, exc, level="warning")
        return SwitchoverFacts(primary=old, replicas=[])
    senders = {s.client_addr: s for s in seen.streaming}
    replicas = []
    for s in servers:
        if s.role != "db-replica":
            continue
        server = db_server(s, env)
        try:
            standby = describe_standby.fn(scope.pool, server) if s.state == "running" else None
        except Exception:  # noqa: BLE001 - an unreadable replica is not a candidate
            scope.pool.discard(server.address)
            standby = None
        sender = senders.get(server.db_address)
        replicas.append(
            ReplicaFact(
                server=server,
                instance_type=s.instance_type,
                state=s.state,
                standby=standby,
                streaming_from_primary=sender is not None,
                lag_bytes=sender.lag_bytes if sender else None,
            )
        )
    apps = [
        FleetHost(
            name=s.name or s.instance_id,
            address=s.address(env.address_attribute),
            role=s.role,
            instance_id=s.instance_id,
        )
        for s in running
        if s.role in ("web", "worker")
    ]
    states = get_pgbouncer_state.fn(apps, scope.pool, env.home, env.environment, env.database_name)
    reload = "HUP:" + env.supervisor_groups["pgbouncer"]
    return SwitchoverFacts(
        primary=old,
        replicas=replicas,
        apps=[AppServer(host=h, groups=[reload]) for h in apps],
        pgbouncer_blockers=[b for st in states for b in st.pause_blockers()],
        database=env.database_name,
        hold_seconds=hold_seconds,
    )


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
        wanted = env.instance_types.get("db-primary")
        primaries = [s for s in servers if s.role == "db-primary" and s.state == "running"]
        switchover = None
        if (
            params.primary_path != "in-place"
            and wanted
            and len(primaries) == 1
            and primaries[0].instance_type != wanted
        ):
            switchover = gather_switchover(scope, servers, params.pause_hold_seconds)
        return ResizeFacts(
            servers=servers,
            group=group,
            launch_template_type=lt_type,
            known=known,
            unknown=list(unknown),
            minimum_memory_mib=dict(rc.config.fabflows.resize.minimum_memory_mib),
            cache_strategy=settings.cache_strategy,
            goal_seconds=rc.config.fabflows.resize.downtime_goal_seconds,
            switchover=switchover,
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
            switchover_facts=facts.switchover,
            primary_path=params.primary_path,
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
        sw = plan.resize.switchover
        if sw is not None:
            problems += self._switched_over(scope, sw)
        web = [s for s in after.values() if s.role == "web" and s.state == "running"]
        upgrade = rc.config.fabflows.upgrade
        checks = check_site_up(
            [upgrade.web_server_url.format(address=s.address(env.address_attribute)) for s in web],
            upgrade.healthcheck_path,
            site_url=env.site_url,
            timeout=rc.config.fabflows.stop_start.site_wait_seconds,
        )
        return problems + [c.describe() for c in checks if not c.ok]

    def _switched_over(self, scope: Scope, sw) -> list[str]:  # noqa: ANN001
        """The new primary takes writes; the old one streams from it (waits up to 60 s)."""
        if describe_standby.fn(scope.pool, sw.new).in_recovery:
            return [f"{sw.new.name} is still in recovery"]
        deadline = time.monotonic() + 60
        while True:
            st = describe_standby.fn(scope.pool, sw.old)
            if st.receiver_status == "streaming" and st.sender_host == sw.new.db_address:
                return []
            if time.monotonic() > deadline:
                return [
                    f"{sw.old.name} does not stream from {sw.new.name} "
                    f"(receiver {st.receiver_status}, from {st.sender_host})"
                ]
            time.sleep(0.5)


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
    primary_path: str = "auto",
    pause_hold_seconds: float = 30,
) -> RunbookReport:
    """Change servers to `instance_types[env][role]` (the original's `recreate_servers`, done safely).

    **When to run:** after changing `instance_types` in the config. The plan (dry run) shows, per
    server, current -> wanted type and the step that changes it, and which path the primary
    takes and why; run it to apply.

    **Steps (the plan says which per server):**
    - **workers, replicas** (and web servers outside the group): `resize-<role>-<instance id>`, one
      at a time while the others keep working: drained (celery stopped, finishing its tasks),
      stopped, type changed, started, waited for until SSH answers, brought back into service
      (encrypted volume, services).
    - **primary, by switchover** (`primary_path: auto` when a db-replica streams from it and every
      app server's pgbouncer can be paused; `switchover` insists): the streaming replica with the
      least lag is resized first to the *primary's* type (one at a time, the site stays up);
      then `switchover-pause` (once it streams with zero lag: pgbouncer PAUSE on every app
      server: requests are held, not refused, and each pgbouncer RESUMEs by itself after
      `pause_hold_seconds` whatever happens), `switchover-stop-<old>` (fast shutdown, so the
      replica has all WAL; the final LSN is journaled; meanwhile every app server's pgbouncer
      and settings are repointed at the replica and pgbouncer RELOADed, still paused),
      `switchover-promote-<new>` (only once it has replayed past that LSN), `switchover-resume`,
      `switchover-retag` (role tags swapped, so inventory finds the new primary),
      `switchover-rejoin-<old>` (the old primary becomes a streaming replica of the new one:
      `standby.signal` and `primary_conninfo`, no pg_rewind after a clean shutdown),
      `switchover-follow-<replica>`
      for other replicas, then the old primary is resized as a replica (one at a time, to the
      replicas' type). The expected downtime is the pause (a few seconds of held requests, no
      error page), not a stop/start.
    - **primary in place** and the **cache** (`cache_strategy: stop`): with no streaming
      replica, pgbouncer not pausable, or `primary_path: in-place`: `upgrade-mode-on` (503 page
      with the health check kept green, autoscaling suspended and recorded), `resize-window`
      (workers drained, stop, change type, start, back in service, workers started),
      `upgrade-mode-off`. The downtime is measured from the steps and published; it depends on
      EC2's stop/start time, not on the database's size (nothing is copied, no replica is
      rebuilt). With `cache_strategy: terminate-and-recreate` the cache is not resized here:
      change its launch template.
    - **stopped servers** (e.g. by stop-environment): `resize-stopped`, changed while stopped.
    - **web**: `new-launch-template-version` with the wanted type (no downtime); then, after this
      run has released the environment's lock, `deploy-serial` replaces the running web
      instances with surge capacity (its new version starts from this one, so it keeps the new
      type). With `refresh_web` off, or without deploy-serial, they keep their type until
      replaced, and the plan says so.

    **Refused before any change:** a wanted type EC2 does not know in the region, or with less
    memory than the role's minimum (`fabflows.resize.minimum_memory_mib`: the original's
    documented m1.small, m1.medium for workers); the cache with terminate-and-recreate; servers in
    transition; `primary_path: switchover` when it is not possible (the plan says why). Outside
    the maintenance window when the config sizes the primary or the cache, or the environment is
    protected, unless overridden. The environment is read again under its lock and the run
    refused if the plan changed meanwhile.

    **Blast radius:** every server whose type changes restarts. No data moves; no server is
    retired (types change in place, so nothing old is left running, unlike the original). By
    switchover, the primary moves to another server: the app is repointed, and the old primary
    serves as a replica afterwards.

    **Dry run:** the plan: per server its path and new type, the primary's path and the reason,
    the expected downtime (the pause, or the window), and what the old primary becomes.

    **Approval:** protected environments approve the plan (with its expected downtime).

    **Rollback:** every server's previous type is journaled (and tagged `fabflows:resize`) before
    its stop. When a step fails, the steps done so far are undone, newest first: upgrade mode
    ends (exactly the recorded autoscaling processes resumed), each server gets its previous
    type back and is started and brought into service again, the launch template gets a version
    with the previous type. A switchover that fails **before the promotion** is undone: the old
    primary is started again, the app servers pointed back at it, pgbouncer RESUMEd. **After the
    promotion there is no way back automatically** (two primaries must never run): a failure,
    or `fabflows recover` for a run that died, finishes it forward instead: every app server
    repointed, pgbouncer RESUMEd, roles retagged, the old primary rejoined as a replica, the new
    primary kept on its new type (if the rejoin fails, rebuild it with
    reset-replicas). To go back, resize again (or switch over again) deliberately.
    `fabflows recover` undoes a run that died the same way, from its journal.

    Args:
        environment: Environment to resize (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Untick to apply.
        window_override_reason: Resize the primary outside the maintenance window, for this
            recorded reason.
        refresh_web: Replace the running web instances with deploy-serial afterwards.
        primary_path: The primary's resize: auto (switchover when possible, else the upgrade
            window), switchover (refused when not possible) or in-place (the upgrade window).
        pause_hold_seconds: The switchover's pgbouncer pause never lasts longer than this.
    """
    args = dict(locals())
    args["config_path"] = config
    report = execute(RUNBOOK, args)
    if isinstance(report, RunbookReport) and not report.dry_run and report.changed:
        return _refresh_web(report, environment, deployment, config)
    return report
