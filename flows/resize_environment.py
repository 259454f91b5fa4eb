"""resize-environment: change servers to config's instance types, safely (the original's
recreate_servers, which took 30-60 minutes, aborted inside its downtime window at HEAD, dropped the
cache's queues, promoted without a lag check and left the old servers running forever)."""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from config.models import EnvironmentSettings
from fabflows import approval, audit, guard, lock
from fabflows.errors import BadInput
from fabflows.registry import FLOWS
from fabflows.report import artifact_key, markdown_table, publish_markdown, text_table
from fabflows.runbook import RunContext, load_context
from fabflows.upgrade_mode import upgrade_window
from flows.environment_power import run_id, servers_and_group
from flows.start_environment import load_passphrase
from tasks.aws.autoscaling import AutoScalingGroup
from tasks.aws.ec2 import Server, describe_servers
from tasks.aws.ec2_writes import (
    RESIZE_TAG,
    STOPPED_TAG,
    InstanceTypeInfo,
    RunRecord,
    clear_instance_tag,
    create_launch_template_version,
    describe_instance_types,
    describe_launch_template_type,
    modify_instance_type,
    start_instances,
    stop_instances,
    tag_instances,
    wait_for_instances,
)
from tasks.aws.group_sizes import use_launch_template_version
from tasks.http.probe import HttpCheck, ProbeSummary, check_site_up
from tasks.plan import StepResult
from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import FleetHost, RateControl, run_fleet
from tasks.ssh.mount import EncryptedVolume, post_start_step, quiet_step, wait_for_ssh

FLOW_NAME = "resize-environment"
REFRESH_FLOW = "deploy-serial"
"""The rolling web refresh (issue 5). resize-environment calls it when it is registered."""

Strategy = Literal["one-at-a-time", "window", "while-stopped", "launch-template", "refresh-pending"]
ONE_AT_A_TIME_ORDER = ("worker", "db-replica", "web")
WINDOW_ORDER = ("db-primary", "cache")


class ResizeChange(BaseModel):
    """One server (or the web launch template) and how it gets its new type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instance_id: str | None = Field(description="None: the web group's launch template.")
    name: str
    role: str
    state: str
    address: str | None = None
    current_type: str
    wanted_type: str
    strategy: Strategy
    note: str = ""


class ResizePlan(BaseModel):
    """What resize-environment does, in order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    changes: list[ResizeChange]
    unchanged: list[str] = Field(description="Servers already of the wanted type.")
    retired: list[str] = Field(
        default_factory=list,
        description="Servers retired by the resize (none: types change in place).",
    )
    problems: list[str] = Field(default_factory=list, description="Refused before any change.")
    warnings: list[str] = Field(default_factory=list)

    def by_strategy(self, *strategies: Strategy) -> list[ResizeChange]:
        return [c for c in self.changes if c.strategy in strategies]

    @property
    def changed(self) -> bool:
        return any(c.strategy != "refresh-pending" for c in self.changes)

    def rows(self) -> list[dict[str, object]]:
        return [
            {
                "role": c.role,
                "server": c.name,
                "state": c.state,
                "from": c.current_type,
                "to": c.wanted_type,
                "how": c.strategy,
                "note": c.note,
            }
            for c in self.changes
        ]


def _address(server: Server, attribute: str) -> str | None:
    try:
        return server.address(attribute)
    except ValueError:
        return None


def plan_resize_environment(
    environment: str,
    wanted: dict[str, str],
    servers: Sequence[Server],
    group: AutoScalingGroup | None,
    launch_template_type: str | None,
    *,
    known_types: dict[str, InstanceTypeInfo],
    unknown_types: Sequence[str],
    minimum_memory_mib: dict[str, int],
    cache_strategy: str,
    refresh_available: bool = False,
    address_attribute: str = "private_ip_address",
) -> ResizePlan:
    """Pure: per server, current -> wanted type and the strategy that changes it.

    - workers, replicas (and web servers outside the group): one at a time: drained (their
      services stopped), stopped, changed, started, brought back into service;
    - the primary and (``cache_strategy: stop``) the cache: together in one short upgrade
      window (users get the 503 page, autoscaling suspended), stop, change, start;
    - stopped servers: changed while stopped (it takes effect at their next start);
    - web: a new launch template version; running web instances are replaced by the rolling
      refresh.

    Wanted types must be known to EC2 in the region and have at least the role's minimum memory.
    """
    problems: list[str] = []
    warnings: list[str] = []
    changes: list[ResizeChange] = []
    unchanged: list[str] = []
    members = set(group.instance_ids) if group else set()
    in_group = [
        s
        for s in servers
        if s.role == "web"
        and (
            s.instance_id in members
            or (group and s.auto_scaling_group == group.auto_scaling_group_name)
        )
    ]
    others = [s for s in servers if s not in in_group]
    for role in wanted:
        if not any(s.role == role for s in servers) and not (role == "web" and group):
            warnings.append(f"config sizes {role} but the environment has no {role} server")

    def strategy_for(server: Server) -> Strategy | None:
        resizing = RESIZE_TAG in server.tags
        if server.state in ("stopped", "stopping") and not resizing:
            return "while-stopped"
        if server.role in ("db-primary", "cache"):
            return "window"
        return "one-at-a-time"

    needed: dict[str, set[str]] = {}
    for s in others:
        target = wanted.get(s.role)
        resizing = RESIZE_TAG in s.tags
        if target is None or (
            target == s.instance_type and not (resizing and s.state == "stopped")
        ):
            unchanged.append(f"{s.role} {s.name or s.instance_id}: {s.instance_type}")
            continue
        strategy = strategy_for(s)
        note = "finishing an interrupted resize" if resizing else ""
        if s.state == "stopped" and STOPPED_TAG in s.tags and strategy == "while-stopped":
            note = "stopped by stop-environment: the new type applies at start-environment"
        if s.role == "cache" and cache_strategy != "stop" and strategy == "window":
            problems.append(
                f"the cache server {s.name or s.instance_id} uses terminate-and-recreate: change "
                "cache_launch_template's instance type instead (its next recreate uses it)"
            )
            continue
        if s.state in ("pending", "shutting-down"):
            problems.append(f"{s.name or s.instance_id} is {s.state}: run again when it settles")
            continue
        needed.setdefault(target, set()).add(s.role)
        changes.append(
            ResizeChange(
                instance_id=s.instance_id,
                name=s.name or s.instance_id,
                role=s.role,
                state=s.state,
                address=_address(s, address_attribute),
                current_type=s.instance_type,
                wanted_type=target,
                strategy=strategy,
                note=note,
            )
        )
    web_wanted = wanted.get("web")
    if group is not None and web_wanted and launch_template_type != web_wanted:
        needed.setdefault(web_wanted, set()).add("web")
        changes.append(
            ResizeChange(
                instance_id=None,
                name=f"{group.launch_template} (launch template)",
                role="web",
                state="-",
                current_type=launch_template_type or "?",
                wanted_type=web_wanted,
                strategy="launch-template",
                note=f"new version for {group.auto_scaling_group_name}; no downtime",
            )
        )
    if group is not None and web_wanted:
        for s in in_group:
            if s.instance_type != web_wanted:
                changes.append(
                    ResizeChange(
                        instance_id=s.instance_id,
                        name=s.name or s.instance_id,
                        role="web",
                        state=s.state,
                        address=_address(s, address_attribute),
                        current_type=s.instance_type,
                        wanted_type=web_wanted,
                        strategy="refresh-pending",
                        note="replaced by deploy-serial after the resize (surge, no downtime)"
                        if refresh_available
                        else "keeps the old type until deploy-serial replaces it (not run here)",
                    )
                )
        if any(c.strategy == "refresh-pending" for c in changes) and not refresh_available:
            warnings.append(
                "web instances keep their type until they are replaced: this resize does not run "
                "the rolling refresh (deploy-serial not available, or refresh_web off)"
            )
    if any(c.role == "cache" and c.strategy == "window" for c in changes):
        warnings.append(
            "the cache server restarts inside the window: RabbitMQ keeps persistent messages "
            "(Celery's default) and drops transient ones; Redis keeps only what it has saved to "
            "disk; memcached starts empty"
        )
    for itype, roles in sorted(needed.items()):
        if itype in unknown_types:
            problems.append(
                f"{itype} (for {', '.join(sorted(roles))}) is not an instance type EC2 "
                "knows in this region"
            )
            continue
        info = known_types.get(itype)
        if info is None:
            problems.append(f"{itype}: EC2 did not describe it")
            continue
        for role in sorted(roles):
            minimum = minimum_memory_mib.get(role, 0)
            if info.memory_mib < minimum:
                problems.append(
                    f"{itype} has {info.memory_mib} MiB; {role} needs at least {minimum} MiB "
                    "(fabflows.resize.minimum_memory_mib: the original's documented minimums)"
                )
    order = {
        "one-at-a-time": 0,
        "window": 1,
        "while-stopped": 2,
        "launch-template": 3,
        "refresh-pending": 4,
    }
    role_order = {r: i for i, r in enumerate((*ONE_AT_A_TIME_ORDER, *WINDOW_ORDER))}
    changes.sort(key=lambda c: (order[c.strategy], role_order.get(c.role, 9), c.name))
    return ResizePlan(
        environment=environment,
        changes=changes,
        unchanged=unchanged,
        problems=problems,
        warnings=warnings,
    )


def render_plan(plan: ResizePlan, goal_seconds: float) -> str:
    out = [f"# resize-environment: {plan.environment}", "", markdown_table(plan.rows())]
    window = plan.by_strategy("window")
    if window:
        out += [
            "",
            f"**Downtime:** one upgrade window for {', '.join(c.name for c in window)} "
            f"(stop, change type, start): goal under {goal_seconds:.0f} s, independent of the "
            "database's size (no copy, no replica rebuild).",
        ]
    else:
        out += ["", "**Downtime:** none (no window needed)."]
    out.append("**Retired servers:** none; every type changes in place, nothing is left running.")
    if plan.unchanged:
        out += ["", "Already as wanted: " + "; ".join(plan.unchanged)]
    if plan.problems:
        out += ["", "**Refused:**", *[f"- {p}" for p in plan.problems]]
    if plan.warnings:
        out += ["", "**Warnings:**", *[f"- {w}" for w in plan.warnings]]
    return "\n".join(out)


class ResizeReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: str
    environment: str
    dry_run: bool
    outcome: str
    plan: ResizePlan
    steps: list[StepResult] = Field(default_factory=list)
    window_seconds: float | None = Field(default=None, description="Time in upgrade mode.")
    downtime: ProbeSummary | None = Field(default=None, description="Measured at the probe URL.")
    downtime_goal_seconds: float
    site_checks: list[HttpCheck] = Field(default_factory=list)
    web_refresh: str | None = Field(
        default=None, description="What deploy-serial did to the web instances (None: not run)."
    )

    def render_text(self) -> str:
        out = [f"{self.deployment}/{self.environment}: {self.outcome}", ""]
        out.append(text_table(self.plan.rows()))
        out += [f"problem: {p}" for p in self.plan.problems]
        out += [f"warning: {w}" for w in self.plan.warnings]
        out += [f"- {s.summary}" for s in self.steps]
        if self.downtime is not None:
            out.append(f"measured downtime: {self.downtime.describe()}")
        elif self.window_seconds is not None:
            out.append(f"upgrade window: {self.window_seconds:.1f} s")
        return "\n".join(out)


# --------------------------------------------------------------------------- applying


class _Applier:
    """The resize sequences; every result goes to ``log`` as it happens."""

    def __init__(
        self,
        ctx: RunContext,
        opts: SshOptions,
        pool: ConnectionPool,
        passphrase: SecretStr | None,
        log: list[StepResult],
    ):
        self.ctx = ctx
        self.creds = ctx.creds
        self.env = ctx.env
        self.settings = ctx.config.fabflows.stop_start
        self.opts = opts
        self.pool = pool
        self.passphrase = passphrase
        self.log = log
        self.volume = None
        cfg = ctx.config
        if cfg.instance_settings.fs_encrypt:
            env_settings = cfg.fabflows.environments.get(self.env.environment)
            self.volume = EncryptedVolume(
                device=self.settings.encrypted_device,
                mapper_name=self.settings.encrypted_mapper_name,
                mount_command=list(self.settings.mount_command),
                passphrase_block=env_settings.luks_passphrase_block if env_settings else None,
            )

    def _services(self, table: dict[str, list[str]], role: str) -> list[str]:
        return [s.replace("{environment}", self.env.environment) for s in table.get(role, [])]

    def _fleet(self, hosts: list[FleetHost], step, name: str) -> None:
        if not hosts:
            return
        result = run_fleet(
            hosts,
            step,
            pool=self.pool,
            rate=RateControl(max_concurrency="100%", max_errors=0),
            dry_run=False,
            name=name,
        )
        result.raise_for_errors()
        self.log.append(
            StepResult(changed=bool(result.changed), dry_run=False, summary=result.summary())
        )

    def quiet(self, hosts: list[FleetHost], role: str) -> None:
        self._fleet(
            hosts, quiet_step(self._services(self.settings.quiet_services, role)), f"drain-{role}"
        )

    def in_service(self, hosts: list[FleetHost], role: str) -> None:
        wait_for_ssh(
            hosts,
            self.opts,
            timeout=self.settings.reachable_wait_seconds,
            poll=min(2.0, self.settings.poll_seconds),
        )
        self._fleet(
            hosts,
            post_start_step(
                self._services(self.settings.role_services, role),
                volume=self.volume,
                passphrase=self.passphrase,
            ),
            f"in-service-{role}",
        )

    def back_in_service(self, hosts: list[FleetHost], role: str) -> None:
        """After a failed resize was rolled back: serve again, without hiding the first error."""
        try:
            self.in_service(hosts, role)
        except Exception as exc:  # the resize's own error is what gets raised
            get_run_logger().error("could not bring %s back into service: %s", role, exc)

    def change_hosts(self, changes: list[ResizeChange]) -> list[FleetHost]:
        return [
            FleetHost(name=c.name, address=c.address, role=c.role, instance_id=c.instance_id)
            for c in changes
            if c.address
        ]

    def _wait(self, ids: list[str], state: str) -> list[Server]:
        return wait_for_instances(
            self.creds,
            ids,
            state,
            timeout=self.settings.instance_wait_seconds,
            poll=self.settings.poll_seconds,
        )

    def _hosts(self, servers: list[Server]) -> list[FleetHost]:
        return [
            FleetHost(
                name=s.name or s.instance_id,
                address=s.address(self.env.address_attribute),
                role=s.role,
                instance_id=s.instance_id,
            )
            for s in servers
        ]

    def record(self, changes: list[ResizeChange]) -> None:
        since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for c in changes:
            value = json.dumps(
                {"run": run_id(), "from": c.current_type, "to": c.wanted_type, "since": since},
                separators=(",", ":"),
            )
            self.log.append(
                tag_instances(self.creds, [c.instance_id], {RESIZE_TAG: value}, dry_run=False)
            )

    def stop_change_start(self, changes: list[ResizeChange]) -> list[Server]:
        """Stop, change the type, start, wait until running. On a failure after the change, put
        the previous types back and start the servers again before raising."""
        ids = [c.instance_id for c in changes]
        record = RunRecord(run=run_id(), flow=FLOW_NAME, since=datetime.now(UTC))
        self.log.append(stop_instances(self.creds, ids, record, dry_run=False))
        self._wait(ids, "stopped")
        done: list[tuple[ResizeChange, str]] = []
        try:
            for c in changes:
                result = modify_instance_type(
                    self.creds, c.instance_id, c.wanted_type, dry_run=False
                )
                self.log.append(result)
                done.append((c, result.previous_type))
            self.log.append(start_instances(self.creds, ids, dry_run=False))
            return self._wait(ids, "running")
        except BaseException:
            get_run_logger().error(
                "resizing %s failed: putting the previous types back", ", ".join(ids)
            )
            stop_instances(self.creds, ids, record, dry_run=False)
            self._wait(ids, "stopped")
            for c, previous in done:
                self.log.append(
                    modify_instance_type(self.creds, c.instance_id, previous, dry_run=False)
                )
            self.log.append(start_instances(self.creds, ids, dry_run=False))
            self._wait(ids, "running")
            self.finish(ids)
            raise

    def finish(self, ids: list[str]) -> None:
        self.log.append(clear_instance_tag(self.creds, ids, RESIZE_TAG, dry_run=False))
        self.log.append(clear_instance_tag(self.creds, ids, STOPPED_TAG, dry_run=False))


def _running_workers(ctx: RunContext) -> list[Server]:
    return describe_servers(
        ctx.creds, ctx.env.deployment, ctx.env.environment, roles=["worker"], states=("running",)
    )


@flow(name=FLOW_NAME, log_prints=False)
def resize_environment(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    window_override_reason: str | None = None,
    refresh_web: bool = True,
) -> ResizeReport:
    """Change servers to `instance_types[env][role]` (the original's `recreate_servers`, done safely).

    **When to run:** after changing `instance_types` in the config. The plan (dry run) shows, per
    server, current -> wanted type and how it changes; run it to apply.

    **Strategies (the plan says which per server):**
    - **workers, replicas** (and web servers outside the group): one at a time, while the
      others keep working: drained (celery stopped, finishing its tasks), stopped, type changed,
      started, waited for until SSH answers, brought back into service (encrypted volume,
      services). A failure after the change puts the previous type back and starts it again.
    - **primary** and the **cache** (`cache_strategy: stop`): together inside one short upgrade
      window (shared upgrade mode: 503 page with the health check kept green, autoscaling
      suspended, undone in `finally`): workers drained, stop, change type, start, back in
      service, workers started. The downtime is measured by polling the site every 100 ms and
      published; it depends on EC2's stop/start time, not on the database's size (nothing is
      copied, no replica is rebuilt). Promoting a resized replica instead is not implemented.
      With `cache_strategy: terminate-and-recreate` the cache is not resized here: change its
      launch template.
    - **web**: a new launch template version with the wanted type (no downtime); then, after
      everything else and outside this run's lock, `deploy-serial` replaces the running web
      instances with surge capacity (its new version starts from this one, so it keeps the new
      type). With `refresh_web` off, or without deploy-serial, they keep their type until
      replaced, and the report says so.
    - **stopped servers** (e.g. by stop-environment): changed while stopped.

    **Refused before any change:** a wanted type EC2 does not know in the region, or with less
    memory than the role's minimum (`fabflows.resize.minimum_memory_mib`: the original's
    documented m1.small, m1.medium for workers); the cache with terminate-and-recreate; servers in
    transition. Outside the maintenance window (when the primary needs one) unless overridden.

    **Blast radius:** every server whose type changes restarts. No data moves; no server is
    retired (types change in place, so nothing old is left running, unlike the original).

    **Approval:** protected environments approve the plan (with its expected downtime).

    **Rollback:** per server, the previous type is recorded (`fabflows:resize` tag) before its
    stop and put back if starting with the new type fails; upgrade mode always ends.

    Args:
        environment: Environment to resize (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Untick to apply.
        window_override_reason: Resize the primary outside the maintenance window, for this
            recorded reason.
        refresh_web: Replace the running web instances with deploy-serial afterwards.
    """
    logger = get_run_logger()
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    cfg = ctx.config
    settings = cfg.fabflows.environments.get(env.environment) or EnvironmentSettings()
    resize_settings = cfg.fabflows.resize
    audit.record_start(env)
    if not env.instance_types:
        raise BadInput(f"instance_types has no entry for {env.environment}: nothing to resize to")

    servers, group = servers_and_group(ctx)
    lt_type = None
    if group is not None and group.launch_template:
        lt_type = describe_launch_template_type(
            ctx.creds, group.launch_template, group.launch_template_version
        )
    known, unknown = describe_instance_types(ctx.creds, sorted(set(env.instance_types.values())))
    plan = plan_resize_environment(
        env.label,
        dict(env.instance_types),
        servers,
        group,
        lt_type,
        known_types=known,
        unknown_types=unknown,
        minimum_memory_mib=resize_settings.minimum_memory_mib,
        cache_strategy=settings.cache_strategy,
        refresh_available=REFRESH_FLOW in FLOWS and refresh_web,
        address_attribute=env.address_attribute,
    )
    plan_md = render_plan(plan, resize_settings.downtime_goal_seconds)
    key = artifact_key(FLOW_NAME, env.deployment, env.environment)
    publish_markdown(key + "-plan", plan_md, f"Resize plan for {env.label}")
    if plan.problems:
        raise BadInput("; ".join(plan.problems))

    def report(outcome: str, **kw) -> ResizeReport:
        downtime = kw.get("downtime")
        audit.record_summary(
            env,
            outcome=outcome,
            plan_markdown=plan_md,
            flow_name=FLOW_NAME,
            downtime=timedelta(seconds=downtime.total_downtime_s) if downtime else None,
        )
        return ResizeReport(
            deployment=env.deployment,
            environment=env.environment,
            dry_run=dry_run,
            outcome=outcome,
            plan=plan,
            downtime_goal_seconds=resize_settings.downtime_goal_seconds,
            **kw,
        )

    if dry_run:
        return report(
            "dry run: "
            + (
                f"{len(plan.by_strategy('one-at-a-time', 'window', 'while-stopped', 'launch-template'))} change(s)"
                if plan.changed
                else "no change"
            )
        )
    if not plan.changed:
        return report("no change: every server already has its type")
    window_changes = plan.by_strategy("window")
    if window_changes:
        try:
            guard.require_window(env, override_reason=window_override_reason, flow_name=FLOW_NAME)
        except guard.OutsideWindow as exc:
            return exc.as_state()
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    if approval.approval_required(env, destructive=True):
        try:
            approval.request_approval(
                env,
                cfg,
                plan_markdown=plan_md,
                flow_name=FLOW_NAME,
                expected_downtime=timedelta(seconds=resize_settings.downtime_goal_seconds)
                if window_changes
                else None,
            )
        except approval.ApprovalRejected as exc:
            report(f"rejected: {exc}")
            return exc.as_state()

    opts = SshOptions.from_settings(cfg.fabflows.ssh, env.deploy_user)
    log: list[StepResult] = []
    window_report = None
    with lock.environment_lock(env, cfg), ConnectionPool(opts) as pool:
        apply = _Applier(ctx, opts, pool, load_passphrase(ctx), log)
        # 1. one at a time: the others keep serving
        for change in plan.by_strategy("one-at-a-time"):
            apply.record([change])
            host = (
                [
                    FleetHost(
                        name=change.name,
                        address=change.address,
                        role=change.role,
                        instance_id=change.instance_id,
                    )
                ]
                if change.address
                else []
            )
            if change.state == "running":
                apply.quiet(host, change.role)
            try:
                fresh = apply.stop_change_start([change])
            except BaseException:
                apply.back_in_service(host, change.role)  # on its previous type
                raise
            apply.in_service(apply._hosts(fresh), change.role)
            apply.finish([change.instance_id])
        # 2. the primary (and cache) in one short upgrade window
        if window_changes:
            started = time.monotonic()
            with upgrade_window(ctx, pool=pool, config_path=config) as window:
                workers = _running_workers(ctx)
                apply.quiet(apply._hosts(workers), "worker")
                apply.record(window_changes)
                try:
                    try:
                        fresh = apply.stop_change_start(window_changes)
                    except BaseException:
                        for role in WINDOW_ORDER:  # on their previous types
                            apply.back_in_service(
                                [h for h in apply.change_hosts(window_changes) if h.role == role],
                                role,
                            )
                        raise
                    for role in WINDOW_ORDER:
                        apply.in_service(apply._hosts([s for s in fresh if s.role == role]), role)
                finally:
                    apply.in_service(apply._hosts(workers), "worker")
                apply.finish([c.instance_id for c in window_changes])
            window_report = window.report
            logger.info("window: %.1f s", time.monotonic() - started)
        # 3. stopped servers: only the type
        for change in plan.by_strategy("while-stopped"):
            log.append(
                modify_instance_type(
                    ctx.creds, change.instance_id, change.wanted_type, dry_run=False
                )
            )
        # 4. web: the launch template (the refresh replaces the instances)
        for change in plan.by_strategy("launch-template"):
            created = create_launch_template_version(
                ctx.creds, group.launch_template, change.wanted_type, dry_run=False
            )
            log.append(created)
            log.append(
                use_launch_template_version(
                    ctx.creds,
                    group.auto_scaling_group_name,
                    group.launch_template,
                    created.version,
                    dry_run=False,
                )
            )
        # verify: types as wanted, site answering
        after = {
            s.instance_id: s for s in describe_servers(ctx.creds, env.deployment, env.environment)
        }
        wrong = [
            f"{c.name} is {after[c.instance_id].instance_type}, not {c.wanted_type}"
            for c in plan.changes
            if c.instance_id
            and c.strategy != "refresh-pending"
            and c.instance_id in after
            and after[c.instance_id].instance_type != c.wanted_type
        ]
        if wrong:
            raise RuntimeError("resize verification failed: " + "; ".join(wrong))
        web = [s for s in after.values() if s.role == "web" and s.state == "running"]
        upgrade = cfg.fabflows.upgrade
        checks = check_site_up(
            [upgrade.web_server_url.format(address=s.address(env.address_attribute)) for s in web],
            upgrade.healthcheck_path,
            site_url=env.site_url,
            timeout=cfg.fabflows.stop_start.site_wait_seconds,
        )
    downtime = window_report.downtime if window_report else None
    seconds = window_report.seconds_in_upgrade_mode if window_report else None
    outcome = "resized"
    if downtime is not None:
        outcome += f"; measured downtime {downtime.total_downtime_s:.1f} s"
        if downtime.total_downtime_s > resize_settings.downtime_goal_seconds:
            logger.warning(
                "downtime %.1f s is over the %.0f s goal",
                downtime.total_downtime_s,
                resize_settings.downtime_goal_seconds,
            )
    web_refresh = None
    if plan.by_strategy("refresh-pending"):
        if refresh_web and REFRESH_FLOW in FLOWS:
            # after this run's lock is released: deploy-serial takes the environment's lock itself
            module, _, attr = FLOWS[REFRESH_FLOW].partition(":")
            refresh = getattr(importlib.import_module(module), attr)
            try:
                result = refresh(
                    environment=env.environment,
                    deployment=env.deployment,
                    config=config,
                    dry_run=False,
                )
            except Exception as exc:
                raise RuntimeError(
                    f"{env.label} resized ({outcome}), but replacing the web instances with "
                    f"{REFRESH_FLOW} failed: {exc}. Run {REFRESH_FLOW} again."
                ) from exc
            probe = getattr(result, "probe", None)
            web_refresh = (
                f"{REFRESH_FLOW}: {len(getattr(result, 'replaced', {}))} web instance(s) replaced"
                + (f"; {probe.describe()}" if probe else "")
            )
            outcome += f"; {web_refresh}"
        else:
            outcome += "; web instances await the rolling refresh (deploy-serial)"
    publish_markdown(
        key + "-result",
        f"# {FLOW_NAME}: {outcome}\n\n" + "\n".join(f"- {s.summary}" for s in log),
        f"Resize of {env.label}",
    )
    return report(
        outcome,
        steps=log,
        window_seconds=seconds,
        downtime=downtime,
        site_checks=checks,
        web_refresh=web_refresh,
    )
