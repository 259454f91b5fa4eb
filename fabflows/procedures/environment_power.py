"""What stop-environment and start-environment plan: pure plans from the servers and the web group.

Order (the original's stop/start procedure, made explicit):

- **down**: record the web group's sizes on the group, scale it to 0/0/0 and wait until its
  instances are gone; stop the app's background services (celery) so nothing runs against the
  databases; stop workers, then replicas, then the primary; then the cache server, stopped or
  terminated (with its location recorded) per ``cache_strategy``.
- **up**: the reverse. The cache (started, or launched again from its launch template at its
  recorded address), the primary, replicas, workers: each role started, waited for until running
  and reachable over SSH with its known host key, then brought into service (the original's
  ``mount_encrypted``: unlock and mount the encrypted volume, start the role's services). Then the
  group's recorded sizes are restored, and every web server (and the site URL) must answer 200.

Every record is durable (instance and group tags, see ``tasks/aws/ec2_writes.py`` and
``tasks/aws/group_sizes.py``). The steps that apply these plans, and their undo, are in
:mod:`fabflows.procedures.power_steps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from config.models import EnvironmentSettings
from fabflows.runbook import RunContext
from fabflows.runtime.plan import Change, RunbookPlan
from tasks.aws.autoscaling import AutoScalingGroup, describe_auto_scaling_group
from tasks.aws.ec2 import Server, describe_servers
from tasks.aws.ec2_writes import stop_record_of
from tasks.aws.group_sizes import CacheRecord, SizesRecord, recorded_cache, recorded_sizes
from tasks.aws.pricing import SavingsReport, StoppedCapacity

DOWN_ORDER: tuple[str, ...] = ("web", "worker", "db-replica", "db-primary", "cache")
"""Roles in the order their servers stop (web: servers outside the autoscaling group)."""

UP_ORDER: tuple[str, ...] = ("cache", "db-primary", "db-replica", "worker", "web")

Action = Literal["stop", "terminate", "start", "check", "none"]


class ServerAction(BaseModel):
    """One server and what the plan does to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instance_id: str
    name: str
    role: str
    instance_type: str
    state: str
    address: str | None = None
    action: Action
    reason: str = ""
    stopped_since: datetime | None = Field(default=None, description="From its stop record.")


class RolePhase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str
    servers: list[ServerAction]

    def ids(self, *actions: Action) -> list[str]:
        return [s.instance_id for s in self.servers if s.action in actions]


class GroupStep(BaseModel):
    """The web autoscaling group: what the plan does to its sizes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    auto_scaling_group_name: str
    current: tuple[int, int, int] = Field(description="min, desired, max now.")
    recorded: SizesRecord | None = Field(description="The sizes record on the group, if any.")
    target: tuple[int, int, int] | None = Field(description="Sizes to set (None: leave).")
    reason: str


class CacheRecreate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    launch_template: str
    record: CacheRecord


class PowerPlan(BaseModel):
    """A stop-environment or start-environment plan."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    direction: Literal["stop", "start"]
    environment: str
    group: GroupStep | None
    quiet: list[ServerAction] = Field(
        default_factory=list, description="Servers whose app services stop first (stop only)."
    )
    phases: list[RolePhase]
    cache_strategy: str
    cache_record: CacheRecord | None = Field(
        default=None, description="stop: recorded before the cache is terminated."
    )
    cache_recreate: CacheRecreate | None = Field(
        default=None, description="start: the cache server launched again."
    )
    queued_messages: dict[str, int] | None = None
    problems: list[str] = Field(default_factory=list, description="Refused before any change.")
    warnings: list[str] = Field(default_factory=list)

    @property
    def changed(self) -> bool:
        acting = any(
            s.action in ("stop", "terminate", "start") for p in self.phases for s in p.servers
        )
        return bool(acting or self.cache_recreate or (self.group and self.group.target))

    def phase(self, role: str) -> RolePhase | None:
        return next((p for p in self.phases if p.role == role), None)

    def rows(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        if self.group:
            g = self.group
            out.append(
                {
                    "role": "web (group)",
                    "server": g.auto_scaling_group_name,
                    "type": "",
                    "state": "/".join(map(str, g.current)),
                    "action": "set " + "/".join(map(str, g.target)) if g.target else "none",
                    "why": g.reason,
                }
            )
        for s in self.quiet:
            out.append(
                {
                    "role": s.role,
                    "server": s.name or s.instance_id,
                    "type": s.instance_type,
                    "state": s.state,
                    "action": "quiet",
                    "why": s.reason,
                }
            )
        if self.cache_recreate:
            r = self.cache_recreate.record
            out.append(
                {
                    "role": "cache",
                    "server": f"new, at {r.ip}",
                    "type": r.type,
                    "state": "terminated",
                    "action": "launch",
                    "why": f"from {self.cache_recreate.launch_template}",
                }
            )
        for p in self.phases:
            for s in p.servers:
                out.append(
                    {
                        "role": s.role,
                        "server": s.name or s.instance_id,
                        "type": s.instance_type,
                        "state": s.state,
                        "action": s.action,
                        "why": s.reason,
                    }
                )
        return out


def _action(server: Server, action: Action, reason: str, attr: str) -> ServerAction:
    record = stop_record_of(server)
    try:
        address = server.address(attr)
    except ValueError:
        address = None
    return ServerAction(
        instance_id=server.instance_id,
        name=server.name,
        role=server.role,
        instance_type=server.instance_type,
        state=server.state,
        address=address,
        action=action,
        reason=reason,
        stopped_since=record.since if record else None,
    )


def _in_group(server: Server, group: AutoScalingGroup | None) -> bool:
    if group is None:
        return False
    return (
        server.instance_id in group.instance_ids
        or server.auto_scaling_group == group.auto_scaling_group_name
    )


def plan_stop_environment(
    environment: str,
    servers: Sequence[Server],
    group: AutoScalingGroup | None,
    *,
    group_configured: str | None,
    cache_strategy: str,
    queued_messages: dict[str, int] | None = None,
    drop_queued_messages: bool = False,
    cache_subnet_id: str | None = None,
    address_attribute: str = "private_ip_address",
    now: datetime,
) -> PowerPlan:
    """Pure: what stop-environment does, role by role, from the servers and the group as they are."""
    problems: list[str] = []
    warnings: list[str] = []
    if group_configured and group is None:
        problems.append(f"autoscaling group {group_configured} does not exist")
    step = None
    if group is not None:
        current = (group.min_size, group.desired_capacity, group.max_size)
        recorded = recorded_sizes(group)
        if current == (0, 0, 0):
            reason = "already at 0/0/0"
            if recorded is None:
                warnings.append(
                    f"{group.auto_scaling_group_name} is at 0/0/0 with no recorded sizes: "
                    "start-environment will leave it at 0/0/0"
                )
            else:
                reason += f"; {recorded.min}/{recorded.desired}/{recorded.max} recorded"
            step = GroupStep(
                auto_scaling_group_name=group.auto_scaling_group_name,
                current=current,
                recorded=recorded,
                target=None,
                reason=reason,
            )
        else:
            reason = "record the sizes on the group, then scale to zero"
            if recorded is not None:
                reason = (
                    f"scale to zero (the first record, {recorded.min}/{recorded.desired}/"
                    f"{recorded.max}, is kept)"
                )
            step = GroupStep(
                auto_scaling_group_name=group.auto_scaling_group_name,
                current=current,
                recorded=recorded,
                target=(0, 0, 0),
                reason=reason,
            )
    by_role: dict[str, list[Server]] = {}
    for s in servers:
        if s.role == "web" and _in_group(s, group):
            continue
        by_role.setdefault(s.role, []).append(s)
    quiet = [
        _action(s, "none", "stop background services first", address_attribute)
        for s in by_role.get("worker", [])
        if s.state == "running"
    ]
    phases = []
    cache_record = None
    for role in DOWN_ORDER:
        actions = []
        for s in by_role.get(role, []):
            terminate = role == "cache" and cache_strategy == "terminate-and-recreate"
            if terminate:
                actions.append(
                    _action(
                        s,
                        "terminate",
                        "broker cannot survive an address change; relaunched by start-environment",
                        address_attribute,
                    )
                )
            elif s.state in ("running", "pending"):
                actions.append(_action(s, "stop", "", address_attribute))
            else:
                actions.append(_action(s, "none", f"already {s.state}", address_attribute))
        if actions:
            phases.append(RolePhase(role=role, servers=actions))
    cache_phase = next((p for p in phases if p.role == "cache"), None)
    terminating = [
        s for s in (cache_phase.servers if cache_phase else []) if s.action == "terminate"
    ]
    if terminating:
        if group is None:
            problems.append(
                "cache_strategy terminate-and-recreate records the cache's location on the web "
                "autoscaling group, and this environment has none"
            )
        if len(terminating) > 1:
            problems.append(f"{len(terminating)} cache servers: terminate-and-recreate handles one")
        first = next(s for s in servers if s.instance_id == terminating[0].instance_id)
        prior = recorded_cache(group) if group else None
        cache_record = prior or CacheRecord(
            ip=first.private_ip_address,
            subnet=cache_subnet_id,
            type=first.instance_type,
            name=first.name,
            since=now,
        )
        if first.state != "running":
            if not drop_queued_messages:
                problems.append(
                    f"the cache server {first.instance_id} is {first.state}: its queues cannot be "
                    "read, and terminating it loses whatever they hold; run with "
                    "drop_queued_messages to accept that"
                )
        elif queued_messages is None:
            warnings.append("no RabbitMQ found on the cache server: no queued messages to lose")
        else:
            total = sum(queued_messages.values())
            if total and not drop_queued_messages:
                busy = ", ".join(f"{q} ({n})" for q, n in queued_messages.items() if n)
                problems.append(
                    f"terminating the cache server drops {total} queued message(s): {busy}. Let "
                    "the workers drain the queues, or run with drop_queued_messages"
                )
            elif total:
                warnings.append(f"{total} queued message(s) will be dropped (drop_queued_messages)")
        warnings.append(
            "terminating the cache also empties Redis and memcached: sessions (users are logged "
            "out) and Celery results are lost"
        )
    return PowerPlan(
        direction="stop",
        environment=environment,
        group=step,
        quiet=quiet,
        phases=phases,
        cache_strategy=cache_strategy,
        cache_record=cache_record,
        queued_messages=queued_messages,
        problems=problems,
        warnings=warnings,
    )


def plan_start_environment(
    environment: str,
    servers: Sequence[Server],
    group: AutoScalingGroup | None,
    *,
    group_configured: str | None,
    cache_strategy: str,
    cache_launch_template: str | None,
    address_attribute: str = "private_ip_address",
) -> PowerPlan:
    """Pure: what start-environment does, role by role (the reverse order of a stop)."""
    problems: list[str] = []
    warnings: list[str] = []
    if group_configured and group is None:
        problems.append(f"autoscaling group {group_configured} does not exist")
    by_role: dict[str, list[Server]] = {}
    for s in servers:
        if s.role == "web" and _in_group(s, group):
            continue
        by_role.setdefault(s.role, []).append(s)
    phases = []
    for role in UP_ORDER:
        actions = []
        for s in by_role.get(role, []):
            if s.state in ("stopped", "stopping"):
                actions.append(_action(s, "start", "", address_attribute))
            elif s.state in ("running", "pending"):
                actions.append(
                    _action(s, "check", "running: make sure it is in service", address_attribute)
                )
        if actions:
            phases.append(RolePhase(role=role, servers=actions))
    recreate = None
    record = recorded_cache(group) if group else None
    has_cache = bool(by_role.get("cache"))
    if record is not None and not has_cache:
        if cache_launch_template:
            recreate = CacheRecreate(launch_template=cache_launch_template, record=record)
            warnings.append(
                f"the new cache server at {record.ip} has a new SSH host key: add it to "
                "known_hosts before runbooks connect to it; it starts with empty queues and caches"
            )
        else:
            problems.append(
                "the cache server was terminated (recorded on the group) but no "
                "cache_launch_template is configured to launch it again"
            )
    elif cache_strategy == "terminate-and-recreate" and not has_cache and record is None:
        warnings.append("no cache server and no record of one: nothing to launch")
    step = None
    if group is not None:
        current = (group.min_size, group.desired_capacity, group.max_size)
        recorded = recorded_sizes(group)
        if recorded is not None:
            target = (recorded.min, recorded.desired, recorded.max)
            step = GroupStep(
                auto_scaling_group_name=group.auto_scaling_group_name,
                current=current,
                recorded=recorded,
                target=target if target != current else None,
                reason=f"restore the sizes recorded {recorded.since:%Y-%m-%d %H:%M}Z",
            )
        else:
            if current == (0, 0, 0):
                warnings.append(
                    f"{group.auto_scaling_group_name} is at 0/0/0 with no recorded sizes: left "
                    "as it is (set its sizes by hand)"
                )
            step = GroupStep(
                auto_scaling_group_name=group.auto_scaling_group_name,
                current=current,
                recorded=None,
                target=None,
                reason="no recorded sizes: left as it is",
            )
    return PowerPlan(
        direction="start",
        environment=environment,
        group=step,
        phases=phases,
        cache_strategy=cache_strategy,
        cache_recreate=recreate,
        problems=problems,
        warnings=warnings,
    )


def servers_and_group(ctx: RunContext) -> tuple[list[Server], AutoScalingGroup | None]:
    """Read tasks: the environment's servers (every state) and its web autoscaling group (None
    when the config names none, or it does not exist)."""
    env = ctx.env
    servers = describe_servers(ctx.creds, env.deployment, env.environment)
    group = (
        describe_auto_scaling_group(ctx.creds, env.auto_scaling_group)
        if env.auto_scaling_group
        else None
    )
    return servers, group


def gather_start_plan(
    ctx: RunContext, settings: EnvironmentSettings
) -> tuple[AutoScalingGroup | None, PowerPlan]:
    """Gather the servers and the web group as they are now (read tasks) and plan a start.

    start-environment plans with it, and a failed stop-environment plans its way back up with it.
    """
    env = ctx.env
    servers, group = servers_and_group(ctx)
    plan = plan_start_environment(
        env.label,
        servers,
        group,
        group_configured=env.auto_scaling_group,
        cache_strategy=settings.cache_strategy,
        cache_launch_template=settings.cache_launch_template,
        address_attribute=env.address_attribute,
    )
    return group, plan


def stopped_capacity(
    plan: PowerPlan, now: datetime, web_instance_type: str | None
) -> list[StoppedCapacity]:
    """Pure: what was off and for how long, from a start plan's records (for the savings)."""
    out = []
    for p in plan.phases:
        for s in p.servers:
            if s.stopped_since is not None and s.action == "start":
                hours = max(0.0, (now - s.stopped_since).total_seconds() / 3600)
                out.append(
                    StoppedCapacity(
                        what=s.instance_id, role=s.role, instance_type=s.instance_type, hours=hours
                    )
                )
    if plan.cache_recreate:
        r = plan.cache_recreate.record
        out.append(
            StoppedCapacity(
                what="cache (terminated)",
                role="cache",
                instance_type=r.type,
                hours=max(0.0, (now - r.since).total_seconds() / 3600),
            )
        )
    g = plan.group
    if g and g.recorded and g.recorded.desired:
        out.append(
            StoppedCapacity(
                what=f"{g.auto_scaling_group_name} (autoscaling group)",
                role="web",
                instance_type=web_instance_type or "unknown",
                count=g.recorded.desired,
                hours=max(0.0, (now - g.recorded.since).total_seconds() / 3600),
            )
        )
    return out


def render_plan(plan: PowerPlan, title: str) -> str:
    from fabflows.report import markdown_table

    out = [f"# {title}", "", markdown_table(plan.rows())]
    if plan.queued_messages is not None:
        out += ["", f"Queued messages on the cache: {sum(plan.queued_messages.values())}"]
    if plan.problems:
        out += ["", "**Refused:**", *[f"- {p}" for p in plan.problems]]
    if plan.warnings:
        out += ["", "**Warnings:**", *[f"- {w}" for w in plan.warnings]]
    return "\n".join(out)


def hourly_cost(plan: PowerPlan, prices: dict[str, float], web_instance_type: str | None) -> float:
    """Pure: USD per hour of what a stop plan turns off (known prices only)."""
    total = 0.0
    for p in plan.phases:
        for s in p.servers:
            if s.action in ("stop", "terminate"):
                total += prices.get(s.instance_type, 0.0)
    g = plan.group
    if g and g.target == (0, 0, 0) and web_instance_type:
        total += prices.get(web_instance_type, 0.0) * g.current[1]
    return round(total, 4)


# --------------------------------------------------------------------------- the runbook plans


def _label(s: ServerAction) -> str:
    return f"{s.name} ({s.instance_id})" if s.name and s.name != s.instance_id else s.instance_id


def stop_step_names(plan: PowerPlan) -> list[str]:
    """Pure: the steps of a stop plan, in order (each one undone by its part of a start)."""
    out = []
    if plan.group is not None and plan.group.target is not None:
        out.append("scale-web-group-to-zero")
    if plan.quiet:
        out.append("quiet-workers")
    for p in plan.phases:
        if p.ids("stop"):
            out.append(f"stop-{p.role}")
        if p.ids("terminate"):
            out.append(f"terminate-{p.role}")
    return out


def start_step_names(plan: PowerPlan) -> list[str]:
    """Pure: the steps of a start plan, in order."""
    out = ["launch-cache"] if plan.cache_recreate is not None else []
    out += [f"start-{p.role}" for p in plan.phases if p.ids("start", "check")]
    if plan.group is not None and plan.group.recorded is not None:
        out.append("restore-web-group")
    if out:
        out += ["check-site", "clear-records"]
    return out


class StopPlan(RunbookPlan):
    """stop-environment's plan: the power plan and what the stopped capacity costs per hour."""

    power: PowerPlan
    usd_per_hour: float = Field(description="On-demand price of what the stop turns off.")

    def digest(self) -> str:  # the cache's record time is the planning time: not the plan
        import hashlib
        import json

        data: dict[str, Any] = self.model_dump(
            mode="json", exclude={"power": {"cache_record": {"since"}}}
        )
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class StartPlan(RunbookPlan):
    """start-environment's plan: the power plan and the saving so far (not part of the digest)."""

    DIGEST_EXCLUDE = {"savings"}

    power: PowerPlan
    savings: SavingsReport | None = None

    def render_markdown(self) -> str:
        out = super().render_markdown()
        if self.savings is not None and self.savings.rows:
            out += "\n\n## Saved while stopped\n\n" + self.savings.markdown()
        return out

    def render_text(self) -> str:
        out = super().render_text()
        if self.savings is not None and self.savings.rows:
            roles = ", ".join(sorted({r.role for r in self.savings.rows}))
            out += f"\nsaved while stopped: about ${self.savings.total_usd:,.2f} ({roles})"
        return out


def stop_runbook_plan(plan: PowerPlan, usd_per_hour: float, title: str) -> StopPlan:
    """Pure: the runbook plan (changes by step) of a stop plan."""
    changes: list[Change] = []
    noops: list[str] = []
    g = plan.group
    if g is not None:
        if g.target is not None:
            changes.append(
                Change(
                    target=f"{g.auto_scaling_group_name} (web group)",
                    action="set " + "/".join(map(str, g.target)),
                    detail=f"{'/'.join(map(str, g.current))}: {g.reason}",
                    step="scale-web-group-to-zero",
                )
            )
        else:
            noops.append(f"{g.auto_scaling_group_name}: {g.reason}")
    for s in plan.quiet:
        changes.append(
            Change(target=_label(s), action="stop background services", step="quiet-workers")
        )
    for p in plan.phases:
        for s in p.servers:
            if s.action in ("stop", "terminate"):
                changes.append(
                    Change(
                        target=_label(s),
                        action=s.action,
                        detail=f"{s.role}, {s.instance_type}"
                        + (f": {s.reason}" if s.reason else ""),
                        step=f"{s.action}-{p.role}",
                    )
                )
            else:
                noops.append(f"{s.role} {_label(s)}: {s.reason or s.state}")
    notes = list(plan.warnings)
    if plan.queued_messages is not None:
        notes.append(f"queued messages on the cache: {sum(plan.queued_messages.values())}")
    notes.append(f"while stopped this saves about ${usd_per_hour:.3f} per hour (on-demand)")
    return StopPlan(
        title=title,
        environment=plan.environment,
        changes=changes,
        noops=noops,
        destructive=plan.cache_record is not None,
        downtime_seconds=None,
        problems=list(plan.problems),
        notes=notes,
        power=plan,
        usd_per_hour=usd_per_hour,
    )


def start_runbook_plan(plan: PowerPlan, savings: SavingsReport | None, title: str) -> StartPlan:
    """Pure: the runbook plan of a start plan; running servers are checked (a change too, so a
    start of a running environment still makes sure everything is in service)."""
    changes: list[Change] = []
    noops: list[str] = []
    if plan.cache_recreate is not None:
        r = plan.cache_recreate.record
        changes.append(
            Change(
                target=f"cache at {r.ip}",
                action="launch",
                detail=f"{r.type} from {plan.cache_recreate.launch_template}",
                step="launch-cache",
            )
        )
    for p in plan.phases:
        for s in p.servers:
            changes.append(
                Change(
                    target=_label(s),
                    action="start, bring into service"
                    if s.action == "start"
                    else "check in service",
                    detail=f"{s.role}, {s.instance_type}, {s.state}",
                    step=f"start-{p.role}",
                )
            )
    g = plan.group
    if g is not None and g.recorded is not None:
        changes.append(
            Change(
                target=f"{g.auto_scaling_group_name} (web group)",
                action=("set " + "/".join(map(str, g.target))) if g.target else "wait InService",
                detail=f"{'/'.join(map(str, g.current))}: {g.reason}",
                step="restore-web-group",
            )
        )
    elif g is not None:
        noops.append(f"{g.auto_scaling_group_name}: {g.reason}")
    if changes:
        changes.append(Change(target="web servers and site", action="check 200", step="check-site"))
        changes.append(
            Change(target="stop records", action="remove once in service", step="clear-records")
        )
    return StartPlan(
        title=title,
        environment=plan.environment,
        changes=changes,
        noops=noops,
        problems=list(plan.problems),
        notes=list(plan.warnings),
        power=plan,
        savings=savings,
    )
