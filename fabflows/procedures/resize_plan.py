"""resize-environment's pure plan: per server, current -> wanted type and the strategy that
changes it (one at a time, by switchover for the primary, inside one short window, while stopped,
a new launch template version, or left to the rolling web refresh).

The primary takes one of two paths (:func:`choose_primary_path`):

- **switchover** (when a db-replica streams from it and the app servers' pgbouncers can be
  paused): the replica is resized first, one at a time (the site stays up), then the primary
  stops cleanly under a pgbouncer PAUSE, the replica is promoted once it has replayed the
  primary's last record, the app servers are repointed, RESUME; the old primary becomes a
  streaming replica of the new one and is resized as a replica. Each server ends with its *new*
  role's type. The expected downtime is the pause (requests held, not refused), not a stop/start;
- **in place** (no streaming replica, pgbouncer cannot be paused, or ``primary_path: in-place``):
  stop, change, start inside the upgrade window (503 page), as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fabflows.procedures.promote_plan import AppServer
from fabflows.runtime.plan import Change, RunbookPlan
from tasks.aws.autoscaling import AutoScalingGroup
from tasks.aws.ec2 import Server
from tasks.aws.ec2_writes import RESIZE_TAG, STOPPED_TAG, InstanceTypeInfo
from tasks.postgres.failover import StandbyState, slot_for
from tasks.postgres.server import DbServer

Strategy = Literal[
    "one-at-a-time", "switchover", "window", "while-stopped", "launch-template", "refresh-pending"
]
PrimaryPath = Literal["auto", "switchover", "in-place"]
SWITCHOVER_EXPECTED_SECONDS = 5.0
"""What the switchover's pause is planned at: a fast shutdown, a promotion, one pgbouncer reload
per app server (measured in bench/resize_switchover.py)."""
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


class ReplicaFact(BaseModel):
    """A db-replica as gathered for the primary's path."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: DbServer
    instance_type: str
    state: str = Field(description="Its EC2 state.")
    standby: StandbyState | None = Field(default=None, description="None: could not be read.")
    streaming_from_primary: bool = Field(
        default=False, description="The primary's pg_stat_replication shows it streaming."
    )
    lag_bytes: int | None = Field(default=None, description="WAL not replayed yet.")


class SwitchoverFacts(BaseModel):
    """What the primary's path is decided on (read by the flow, weighed by the pure plan)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    primary: DbServer | None = None
    replicas: list[ReplicaFact] = Field(default_factory=list)
    apps: list[AppServer] = Field(default_factory=list, description="Web and worker servers.")
    pgbouncer_blockers: list[str] = Field(
        default_factory=list, description="Why an app server's pgbouncer cannot be paused."
    )
    database: str = Field(default="", description="The live database (pgbouncer's alias).")
    hold_seconds: float = Field(default=30.0, description="pgbouncer's auto-resume bound.")


class Switchover(BaseModel):
    """The primary's switchover, as planned (the steps are rebuilt from it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    old: DbServer
    new: DbServer
    old_slot: str = Field(description="The old primary's slot on the new one.")
    open_for: dict[str, str] = Field(
        description="Slot -> address the new primary accepts (the old primary, other replicas)."
    )
    followers: list[DbServer] = Field(
        default_factory=list, description="Other replicas, re-pointed at the new primary."
    )
    apps: list[AppServer] = Field(default_factory=list)
    database: str
    expected_seconds: float
    hold_seconds: float
    old_type_after: str = Field(description="The old primary's type once it is a replica.")


class PrimaryDecision(BaseModel):
    """Which path the primary takes, and why (pure result of :func:`choose_primary_path`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Literal["switchover", "in-place"]
    reason: str
    switchover: Switchover | None = None
    problem: str = ""


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
    primary_path: str = Field(default="", description="switchover, in-place or '' (no change).")
    primary_reason: str = ""
    switchover: Switchover | None = None

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


def choose_primary_path(
    primary: ResizeChange,
    wanted: dict[str, str],
    facts: SwitchoverFacts | None,
    mode: PrimaryPath,
) -> PrimaryDecision:
    """Pure: the primary's path (switchover or in place) and why.

    Switchover needs a running db-replica in recovery that the primary's ``pg_stat_replication``
    shows streaming (the least lag wins), and every app server's pgbouncer pausable (transaction
    or statement pooling, its admin console answering, not paused already). ``mode`` ``in-place``
    always takes the upgrade window; ``switchover`` refuses (a problem) when it is not possible.
    """

    def in_place(reason: str) -> PrimaryDecision:
        problem = f"primary_path is switchover, but {reason}" if mode == "switchover" else ""
        return PrimaryDecision(
            path="in-place", reason=f"{reason}: the upgrade window instead", problem=problem
        )

    if mode == "in-place":
        return PrimaryDecision(
            path="in-place",
            reason="primary_path is in-place: the upgrade window (stop, change type, start)",
        )
    if facts is None or facts.primary is None:
        return in_place("the primary's replication was not read")
    candidates = [
        r
        for r in facts.replicas
        if r.state == "running"
        and r.standby is not None
        and r.standby.in_recovery
        and r.streaming_from_primary
    ]
    if not candidates:
        return in_place("no db-replica streams from the primary")
    if facts.pgbouncer_blockers:
        shown = facts.pgbouncer_blockers[:2]
        more = len(facts.pgbouncer_blockers) - len(shown)
        return in_place(
            "the app servers' pgbouncer cannot be paused ("
            + "; ".join(shown)
            + (f"; {more} more" if more else "")
            + ")"
        )
    if not facts.database:
        return in_place("no live database name for pgbouncer's PAUSE")
    best = min(
        candidates,
        key=lambda r: (r.lag_bytes if r.lag_bytes is not None else 1 << 62, r.server.name),
    )
    old = facts.primary
    followers = [
        r
        for r in facts.replicas
        if r is not best and r.state == "running" and r.standby and r.standby.in_recovery
    ]
    old_slot = slot_for(old.name)
    open_for = {old_slot: old.db_address}
    for r in followers:
        assert r.standby is not None
        open_for[r.standby.slot_name or slot_for(r.server.name)] = r.server.db_address
    switchover = Switchover(
        old=old,
        new=best.server,
        old_slot=old_slot,
        open_for=open_for,
        followers=[r.server for r in followers],
        apps=list(facts.apps),
        database=facts.database,
        expected_seconds=SWITCHOVER_EXPECTED_SECONDS,
        hold_seconds=facts.hold_seconds,
        old_type_after=wanted.get("db-replica", primary.current_type),
    )
    return PrimaryDecision(
        path="switchover",
        reason=(
            f"{best.server.name} streams from the primary (the least lag of "
            f"{len(candidates)} streaming): it is resized first, then takes over; the app "
            "waits under a pgbouncer pause for the switchover instead of a 503 page for a "
            "stop/start"
        ),
        switchover=switchover,
    )


def _switch_roles(
    changes: list[ResizeChange],
    unchanged: list[str],
    primary: ResizeChange,
    sw: Switchover,
    wanted: dict[str, str],
    servers: Sequence[Server],
    address_attribute: str,
) -> list[ResizeChange]:
    """Pure: each server gets its new role's type: the replica that takes over the primary's
    (resized one at a time first), the old primary the replicas' (resized after, as a replica)."""
    out: list[ResizeChange] = []
    target = wanted["db-primary"]
    new_id = sw.new.instance_id
    found = False
    for c in changes:
        if c is primary:
            keeps = sw.old_type_after == c.current_type
            out.append(
                c.model_copy(
                    update={
                        "strategy": "switchover",
                        "wanted_type": sw.old_type_after,
                        "note": f"switched over to {sw.new.name}, then a db-replica of it"
                        + (" (keeps its type)" if keeps else ", resized as a replica"),
                    }
                )
            )
        elif c.instance_id == new_id:
            found = True
            if c.current_type != target:
                out.append(
                    c.model_copy(
                        update={
                            "wanted_type": target,
                            "note": "takes the primary's type: it becomes the db-primary",
                        }
                    )
                )
            else:
                unchanged.append(f"db-replica {c.name}: {c.current_type} (the primary's type)")
        else:
            out.append(c)
    if not found:
        server = next((s for s in servers if s.instance_id == new_id), None)
        if server is not None and server.instance_type != target:
            label = f"db-replica {server.name or server.instance_id}: "
            unchanged[:] = [u for u in unchanged if not u.startswith(label)]
            out.append(
                ResizeChange(
                    instance_id=server.instance_id,
                    name=server.name or server.instance_id,
                    role="db-replica",
                    state=server.state,
                    address=_address(server, address_attribute),
                    current_type=server.instance_type,
                    wanted_type=target,
                    strategy="one-at-a-time",
                    note="takes the primary's type: it becomes the db-primary",
                )
            )
    return out


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
    switchover_facts: SwitchoverFacts | None = None,
    primary_path: PrimaryPath = "auto",
) -> ResizePlan:
    """Pure: per server, current -> wanted type and the strategy that changes it.

    - workers, replicas (and web servers outside the group): one at a time: drained (their
      services stopped), stopped, changed, started, brought back into service;
    - the primary: by switchover when :func:`choose_primary_path` says so (the replica that
      takes over resized first, the old primary resized after as a replica), else with the cache;
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
    decision: PrimaryDecision | None = None
    primary_change = next(
        (c for c in changes if c.role == "db-primary" and c.strategy == "window"), None
    )
    if primary_change is not None:
        decision = choose_primary_path(primary_change, wanted, switchover_facts, primary_path)
        if decision.problem:
            problems.append(decision.problem)
        if decision.switchover is not None:
            sw = decision.switchover
            changes = _switch_roles(
                changes, unchanged, primary_change, sw, wanted, servers, address_attribute
            )
            if sw.old_type_after != primary_change.current_type:
                needed.setdefault(sw.old_type_after, set()).add("db-replica")
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
        "switchover": 1,
        "window": 2,
        "while-stopped": 3,
        "launch-template": 4,
        "refresh-pending": 5,
    }
    role_order = {r: i for i, r in enumerate((*ONE_AT_A_TIME_ORDER, *WINDOW_ORDER))}
    changes.sort(key=lambda c: (order[c.strategy], role_order.get(c.role, 9), c.name))
    return ResizePlan(
        environment=environment,
        changes=changes,
        unchanged=unchanged,
        problems=problems,
        warnings=warnings,
        primary_path=decision.path if decision else "",
        primary_reason=decision.reason if decision else "",
        switchover=decision.switchover if decision else None,
    )


def step_of(change: ResizeChange) -> str:
    """Pure: the step that changes ``change`` ("" for what the rolling refresh replaces)."""
    return {
        "one-at-a-time": f"resize-{change.role}-{change.instance_id}",
        "window": "resize-window",
        "while-stopped": "resize-stopped",
        "launch-template": "new-launch-template-version",
    }.get(change.strategy, "")


SWITCHOVER_NO_WAY_BACK = (
    "after the promotion there is no automatic way back (the old primary is a replica of the new "
    "one from then on); a run that dies after it is finished forward by `fabflows recover`: "
    "repointed, pgbouncer resumed, the old primary rejoined as a replica"
)


def switchover_rows(change: ResizeChange, sw: Switchover) -> list[Change]:
    """Pure: the switchover's steps as plan rows (the step names the steps are built with)."""
    old, new = sw.old, sw.new
    apps = f"{len(sw.apps)} app server(s)"
    rows = [
        Change(
            target=f"{apps}' pgbouncer",
            action=f"PAUSE {sw.database} (requests held, not refused)",
            detail=f"auto-resume after {sw.hold_seconds:g} s whatever happens; undo: RESUME",
            step="switchover-pause",
        ),
        Change(
            target=f"{old.name} ({old.instance_id})",
            action="fast shutdown of the primary (final LSN recorded); meanwhile the app servers' "
            f"database host {old.db_address} -> {new.db_address}, pgbouncer reloaded while paused",
            detail="undo (before the promotion): start it again, the app servers pointed back",
            step=f"switchover-stop-{old.name}",
        ),
        Change(
            target=f"{new.name} ({new.instance_id})",
            action="promote once it has replayed past the final LSN",
            detail="no undo: " + SWITCHOVER_NO_WAY_BACK,
            step=f"switchover-promote-{new.name}",
        ),
        Change(target=f"{apps}' pgbouncer", action="RESUME", step="switchover-resume"),
        Change(
            target=f"{new.name}, {old.name}",
            action="role tags: db-primary, db-replica",
            step="switchover-retag",
        ),
        Change(
            target=f"{old.name} ({old.instance_id})",
            action=f"standby.signal + primary_conninfo -> {new.name}, started: streams from it",
            detail=f"{new.name} accepts replication from "
            + ", ".join(sorted(sw.open_for.values()))
            + "; no pg_rewind: it stopped cleanly",
            step=f"switchover-rejoin-{old.name}",
        ),
    ]
    rows += [
        Change(target=r.name, action=f"follow {new.name}", step=f"switchover-follow-{r.name}")
        for r in sw.followers
    ]
    if change.wanted_type != change.current_type:
        rows.append(
            Change(
                target=f"{old.name} ({old.instance_id})",
                action=f"{change.current_type} -> {change.wanted_type}",
                detail="db-replica now, one-at-a-time",
                step=f"resize-db-replica-{old.instance_id}",
            )
        )
    return rows


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
        if c.strategy == "switchover" and plan.switchover is not None:
            changes += switchover_rows(c, plan.switchover)
            continue
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
    downtime = goal_seconds if window else None
    if plan.primary_path:
        notes.append(f"the primary takes the {plan.primary_path} path: {plan.primary_reason}")
    if plan.switchover is not None:
        sw = plan.switchover
        notes.append(
            f"switchover: expected pause about {sw.expected_seconds:.0f} s (requests held by "
            f"pgbouncer, bounded by its auto-resume after {sw.hold_seconds:g} s), not a "
            f"stop/start; {sw.old.name} becomes a streaming db-replica of {sw.new.name}"
        )
        notes.append(SWITCHOVER_NO_WAY_BACK)
        downtime = (downtime or 0.0) + sw.expected_seconds
    notes.append("no server is retired: every type changes in place")
    return ResizeRunbookPlan(
        title=title,
        environment=plan.environment,
        changes=changes,
        noops=list(plan.unchanged),
        destructive=bool(changes),
        downtime_seconds=downtime,
        problems=list(plan.problems),
        notes=notes,
        resize=plan,
        auto_scaling_group_name=auto_scaling_group_name,
        launch_template=launch_template,
        goal_seconds=goal_seconds,
    )
