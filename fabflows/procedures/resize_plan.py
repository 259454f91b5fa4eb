"""resize-environment's pure plan: per server, current -> wanted type and the strategy that
changes it (one at a time, inside one short window, while stopped, a new launch template version,
or left to the rolling web refresh)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fabflows.runtime.plan import Change, RunbookPlan
from tasks.aws.autoscaling import AutoScalingGroup
from tasks.aws.ec2 import Server
from tasks.aws.ec2_writes import RESIZE_TAG, STOPPED_TAG, InstanceTypeInfo

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


def step_of(change: ResizeChange) -> str:
    """Pure: the step that changes ``change`` ("" for what the rolling refresh replaces)."""
    return {
        "one-at-a-time": f"resize-{change.role}-{change.instance_id}",
        "window": "resize-window",
        "while-stopped": "resize-stopped",
        "launch-template": "new-launch-template-version",
    }.get(change.strategy, "")


class ResizeRunbookPlan(RunbookPlan):
    """resize-environment's plan: the resize plan and what its steps need."""

    resize: ResizePlan
    auto_scaling_group_name: str | None = None
    launch_template: str | None = None
    goal_seconds: float


def resize_runbook_plan(
    plan: ResizePlan,
    *,
    title: str,
    goal_seconds: float,
    auto_scaling_group_name: str | None,
    launch_template: str | None,
) -> ResizeRunbookPlan:
    """Pure: the runbook plan (changes by step; the window's upgrade mode around its step)."""
    changes: list[Change] = []
    notes = list(plan.warnings)
    window = plan.by_strategy("window")
    for c in plan.changes:
        step = step_of(c)
        if not step:
            notes.append(
                f"web {c.name} ({c.instance_id}): {c.current_type} -> {c.wanted_type}: {c.note}"
            )
            continue
        if step == "resize-window" and not any(x.step == "upgrade-mode-on" for x in changes):
            changes.append(
                Change(
                    target="web servers and group",
                    action="upgrade mode on (503 page, autoscaling suspended)",
                    step="upgrade-mode-on",
                )
            )
        changes.append(
            Change(
                target=c.name if c.instance_id is None else f"{c.name} ({c.instance_id})",
                action=f"{c.current_type} -> {c.wanted_type}",
                detail=f"{c.role}, {c.strategy}" + (f": {c.note}" if c.note else ""),
                step=step,
            )
        )
        if step == "resize-window" and c is window[-1]:
            changes.append(
                Change(
                    target="web servers and group",
                    action="upgrade mode off",
                    step="upgrade-mode-off",
                )
            )
    if window:
        notes.append(
            f"one upgrade window for {', '.join(c.name for c in window)} (stop, change type, "
            f"start): goal under {goal_seconds:.0f} s, independent of the database's size"
        )
    notes.append("no server is retired: every type changes in place")
    return ResizeRunbookPlan(
        title=title,
        environment=plan.environment,
        changes=changes,
        noops=list(plan.unchanged),
        destructive=bool(changes),
        downtime_seconds=goal_seconds if window else None,
        problems=list(plan.problems),
        notes=notes,
        resize=plan,
        auto_scaling_group_name=auto_scaling_group_name,
        launch_template=launch_template,
        goal_seconds=goal_seconds,
    )
