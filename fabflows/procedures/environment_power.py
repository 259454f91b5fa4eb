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
``tasks/aws/group_sizes.py``). The runbook plans built from these are in
:mod:`fabflows.procedures.power_plans`; the steps that apply them, and their undo, in
:mod:`fabflows.procedures.power_steps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fabflows.runbook import RunContext
from tasks.aws.autoscaling import AutoScalingGroup, describe_auto_scaling_group
from tasks.aws.ec2 import Server, describe_servers
from tasks.aws.ec2_writes import stop_record_of
from tasks.aws.group_sizes import CacheRecord, SizesRecord, recorded_cache, recorded_sizes
from tasks.aws.pricing import StoppedCapacity

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
