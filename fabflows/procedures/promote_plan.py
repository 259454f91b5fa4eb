"""promote-replica's facts and its pure plan (facts in, steps and refusals out).

The plan compares what is with what a finished failover looks like, so running it again after a
crash (or ``fabflows resume``) plans only what is left, and running it after a finished failover
plans nothing -- unless the old primary came back, which it then fences again.

A failover in progress is recognised by the old primary's ``fabflows:decommissioned`` tag: it
names the replica promoted in its place.
"""

from __future__ import annotations

import json
import re

from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows.runtime.plan import Change, RunbookPlan
from tasks.postgres.failover import Reachability, StandbyState, lsn_value
from tasks.postgres.server import DbServer
from tasks.ssh.fleet import FleetHost

DECOMMISSIONED_ROLE = "decommissioned"
DECOMMISSIONED_TAG = "fabflows:decommissioned"


class DbNode(BaseModel):
    """A database server as the inventory and PostgreSQL see it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: DbServer
    role: str = Field(description="Its role tag: db-primary, db-replica or decommissioned.")
    tags: dict[str, str] = Field(default_factory=dict)
    standby: StandbyState | None = Field(default=None, description="None: could not be read.")
    error: str = ""

    @property
    def name(self) -> str:
        return self.server.name

    @property
    def promoted_for(self) -> str | None:
        """On a fenced primary: the instance id promoted in its place."""
        raw = self.tags.get(DECOMMISSIONED_TAG)
        if not raw:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return None if record.get("done") else record.get("promoted")

    @property
    def promoted_id(self) -> str | None:
        """On a fenced primary: the instance id promoted in its place (finished or not)."""
        try:
            return json.loads(self.tags.get(DECOMMISSIONED_TAG) or "{}").get("promoted")
        except ValueError:
            return None

    @property
    def fenced_before(self) -> bool:
        return self.role == DECOMMISSIONED_ROLE and DECOMMISSIONED_TAG in self.tags

    @property
    def writable(self) -> bool:
        return self.standby is not None and not self.standby.in_recovery


class AppServer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: FleetHost
    groups: list[str] = Field(description="Supervisor groups to restart (pgbouncer first).")
    database_hosts: list[str] = Field(default_factory=list, description="Hosts its files name.")

    @property
    def step_key(self) -> str:
        """Names its step: the instance id (app servers of a group share their Name tag)."""
        return self.host.instance_id or self.host.name


class FenceTarget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server: DbServer
    stop_postgres: bool = Field(description="It answers SSH and PostgreSQL takes writes.")
    tag: bool = Field(description="Its role tag is not decommissioned yet.")


class PromoteFacts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    nodes: list[DbNode] = Field(default_factory=list)
    others: dict[str, str] = Field(
        default_factory=dict, description="Every other server: name and instance id -> role."
    )
    reach: list[Reachability] = Field(
        default_factory=list, description="The old primary, seen from the flow and each replica."
    )
    comebacks: dict[str, Reachability] = Field(
        default_factory=dict, description="Primaries fenced before, seen from the flow."
    )
    apps: list[AppServer] = Field(default_factory=list)


class PromoteReplicaPlan(RunbookPlan):
    """What promote-replica does; the steps are rebuilt from these fields."""

    old: DbServer | None = None
    new: DbServer | None = None
    fence: list[FenceTarget] = Field(default_factory=list)
    promote: bool = False
    retag: bool = False
    follow: list[DbServer] = Field(default_factory=list, description="Replicas to re-point.")
    open_for: dict[str, str] = Field(
        default_factory=dict, description="Slot -> replica address the new primary accepts."
    )
    apps: list[AppServer] = Field(default_factory=list, description="App servers to re-point.")
    page: list[FleetHost] = Field(
        default_factory=list, description="Web servers showing the upgrade page meanwhile."
    )
    finish: bool = Field(default=False, description="Mark the failover done on the old primary.")


def slot_for(host_name: str) -> str:
    from tasks.postgres.failover import slot_for as _slot

    return _slot(host_name)


def conninfo_host(conninfo: str) -> str | None:
    """The ``host=`` of a ``primary_conninfo`` (pure)."""
    found = re.search(r"(?:^|\s)host\s*=\s*'?([^'\s]+)", conninfo)
    return found.group(1) if found else None


def old_primary(nodes: list[DbNode]) -> DbNode | None:
    """The primary being replaced: a fenced one whose replacement is known (a failover under
    way), else the only server tagged db-primary."""
    by_id = {n.server.instance_id for n in nodes}
    for n in nodes:
        if n.role == DECOMMISSIONED_ROLE and n.promoted_for in by_id:
            return n
    primaries = [n for n in nodes if n.role == "db-primary"]
    return primaries[0] if len(primaries) == 1 else None


def _find(facts: PromoteFacts, wanted: str) -> tuple[DbNode | None, str | None]:
    """The db node named ``wanted`` (name or instance id), or the role of another server."""
    for node in facts.nodes:
        if wanted in (node.name, node.server.instance_id):
            return node, None
    return None, facts.others.get(wanted)


def _fence_change(t: FenceTarget, detail: str) -> Change:
    action = "fence: " + ("stop PostgreSQL, leave standby.signal; " if t.stop_postgres else "")
    action += f"role tag -> {DECOMMISSIONED_ROLE} (never deleted)" if t.tag else "tag kept"
    return Change(
        target=f"{t.server.name} ({t.server.instance_id})",
        action=action,
        detail=detail,
        step=f"fence-{t.server.name}",
    )


def _comebacks(facts: PromoteFacts, skip: str | None) -> list[FenceTarget]:
    """Primaries fenced earlier that answer again and take writes: fence them again."""
    out = []
    for n in facts.nodes:
        reach = facts.comebacks.get(n.name)
        if n.name == skip or not n.fenced_before or reach is None:
            continue
        if reach.ssh and reach.postgres and n.writable:
            out.append(FenceTarget(server=n.server, stop_postgres=True, tag=False))
    return out


def plan_promote_replica(  # noqa: C901 - one decision table, read top to bottom
    facts: PromoteFacts,
    *,
    replica: str | None,
    primary_is_lost: bool,
    env: EnvironmentConfig,
) -> PromoteReplicaPlan:
    """Pure: which replica, what to fence, promote, retag and re-point; or why not."""
    title = f"promote-replica on {env.label}"
    problems: list[str] = []
    notes: list[str] = []
    by_id = {n.server.instance_id: n for n in facts.nodes}
    old = old_primary(facts.nodes)
    ongoing = old is not None and old.role == DECOMMISSIONED_ROLE
    comebacks = _comebacks(facts, old.name if old else None)
    comeback_changes = [_fence_change(t, "answers again and takes writes") for t in comebacks]

    def refused() -> PromoteReplicaPlan:
        return PromoteReplicaPlan(title=title, environment=env.label, problems=problems)

    if old is None:
        primaries = [n.name for n in facts.nodes if n.role == "db-primary"]
        problems.append(
            f"{len(primaries)} servers are tagged db-primary in {env.label}"
            + (f": {', '.join(primaries)}" if primaries else "")
        )
        return refused()
    if ongoing:
        new = by_id[old.promoted_for or ""]
        if replica and replica not in (new.name, new.server.instance_id):
            problems.append(
                f"a failover to {new.name} is under way (fenced {old.name}): "
                f"it cannot go to {replica}"
            )
            return refused()
    else:
        answering = [r for r in facts.reach if r.answers]
        finished = [
            n for n in facts.nodes if n.fenced_before and n.promoted_id == old.server.instance_id
        ]
        if answering and finished and not comebacks and not replica and not primary_is_lost:
            # the failover to this primary is finished (a resume after its last step)
            return PromoteReplicaPlan(
                title=title,
                environment=env.label,
                noops=[f"the failover from {finished[0].name} to {old.name} is done"],
            )
        if answering and not primary_is_lost:
            if comebacks and not replica:
                return PromoteReplicaPlan(
                    title=title,
                    environment=env.label,
                    changes=comeback_changes,
                    noops=[f"the db-primary {old.name} answers: nothing to promote"],
                    fence=comebacks,
                )
            problems.append(
                f"the db-primary {old.name} answers ("
                + "; ".join(r.text() for r in answering)
                + "): promote-replica is for a primary that is gone (say primary_is_lost "
                "to fence it anyway)"
            )
        if not facts.reach:
            problems.append(f"{old.name}'s reachability could not be checked")
        candidates = [
            n
            for n in facts.nodes
            if n.role == "db-replica" and n.standby is not None and n.standby.in_recovery
        ]
        chosen: DbNode | None = None
        if replica:
            node, other_role = _find(facts, replica)
            if node is None and other_role is None:
                problems.append(f"unknown replica {replica!r}: no server of {env.label} has it")
            elif node is None:
                problems.append(f"{replica} is a {other_role} server, not a db-replica")
            elif node.role != "db-replica":
                problems.append(f"{replica} is the {node.role}, not a db-replica")
            elif node.standby is None:
                problems.append(f"{replica} cannot be read: {node.error}")
            elif not node.standby.in_recovery:
                problems.append(f"{replica} is not in recovery: it is not a replica")
            else:
                chosen = node
        else:
            chosen = max(
                candidates,
                key=lambda n: max(
                    lsn_value(n.standby.receive_lsn if n.standby else None),
                    lsn_value(n.standby.replay_lsn if n.standby else None),
                ),
                default=None,
            )
            if chosen is None:
                problems.append(f"no readable db-replica in recovery in {env.label}")
        if problems or chosen is None:
            return refused()
        new = chosen
    changes: list[Change] = []
    noops: list[str] = []
    reach_text = "; ".join(r.text() for r in facts.reach) or "not checked"
    ssh_answers = any(r.ssh for r in facts.reach if r.seen_from == "flow")
    pg_answers = any(r.postgres for r in facts.reach)
    stop_postgres = ssh_answers and pg_answers and not (old.standby and old.standby.in_recovery)
    fence = list(comebacks)
    if not ongoing or stop_postgres:
        target = FenceTarget(server=old.server, stop_postgres=stop_postgres, tag=not ongoing)
        fence.insert(0, target)
        changes.append(_fence_change(target, reach_text))
        if pg_answers and not ssh_answers:
            notes.append(
                f"PostgreSQL on {old.name} answers but SSH does not: it cannot be stopped; the "
                "tag and the re-pointed app servers keep writes away from it"
            )
    else:
        noops.append(f"{old.name} is fenced ({reach_text})")
    changes += comeback_changes
    promote = not ongoing or bool(new.standby and new.standby.in_recovery)
    replicas = [
        n
        for n in facts.nodes
        if n.role == "db-replica" and n.server.instance_id != new.server.instance_id
    ]
    # each replica keeps its own slot name (primary_slot_name), made on the new primary
    open_for = {
        (n.standby.slot_name if n.standby and n.standby.slot_name else slot_for(n.name)): (
            n.server.db_address
        )
        for n in replicas
    }
    if promote:
        lsn = new.standby.replay_lsn if new.standby else None
        changes.append(
            Change(
                target=f"{new.server.name} ({new.server.instance_id})",
                action="pg_promote; accept replication from the other replicas",
                detail=f"replayed up to {lsn}" + ("" if replica else " (the least lag)"),
                step=f"promote-{new.name}",
            )
        )
    else:
        noops.append(f"{new.name} takes writes")
    retag = new.role != "db-primary"
    if retag:
        changes.append(
            Change(
                target=new.server.name,
                action="role tag -> db-primary",
                detail=f"was {new.role}",
                step=f"retag-{new.name}",
            )
        )
    apps = [a for a in facts.apps if old.server.db_address in a.database_hosts]
    for a in apps:
        changes.append(
            Change(
                target=a.host.label,
                action=f"database {old.server.db_address} -> {new.server.db_address}; "
                + ", ".join(
                    f"reload {g[4:]}" if g.startswith("HUP:") else f"restart {g}" for g in a.groups
                ),
                detail="pgbouncer config and app settings",
                step=f"repoint-{a.step_key}",
            )
        )
    noops += [
        f"{a.host.name} uses {', '.join(a.database_hosts) or 'no database host it names'}"
        for a in facts.apps
        if a not in apps
    ]
    follow = [
        n
        for n in replicas
        if n.standby is not None
        and n.standby.in_recovery
        and conninfo_host(n.standby.primary_conninfo) != new.server.db_address
    ]
    for n in follow:
        was = conninfo_host(n.standby.primary_conninfo if n.standby else "")
        changes.append(
            Change(
                target=n.server.name,
                action=f"follow {new.name} ({new.server.db_address})",
                detail=f"primary_conninfo names {was or 'no host'}",
                step=f"follow-{n.name}",
            )
        )
    notes += [
        f"{n.name} cannot be read ({n.error}): not re-pointed; rebuild it with reset-replicas"
        for n in replicas
        if n.standby is None
    ]
    site_down = promote or bool(apps) or (not ongoing)
    page = [a.host for a in facts.apps if a.host.role == "web"] if site_down else []
    if page:
        names = ", ".join(h.name for h in page)
        changes.insert(
            0,
            Change(
                target=names,
                action="upgrade page on, until the app reaches the new primary",
                step="upgrade-page-on",
            ),
        )
        at = max(i for i, c in enumerate(changes) if not c.step.startswith("follow-")) + 1
        changes.insert(at, Change(target=names, action="upgrade page off", step="upgrade-page-off"))
    finish = bool(changes) or ongoing
    if finish:
        changes.append(
            Change(
                target=old.server.name,
                action="mark the failover done on its fence record",
                step="finish-failover",
            )
        )
    if ongoing:
        notes.append(f"continues the failover from {old.name} to {new.name}")
    notes.append(
        "no undo: a promoted replica and a fenced primary stay so (reset-replicas rebuilds)"
    )
    return PromoteReplicaPlan(
        title=title,
        environment=env.label,
        changes=changes,
        noops=noops,
        notes=notes,
        destructive=promote,
        downtime_seconds=30.0 if page else None,
        old=old.server,
        new=new.server,
        fence=fence,
        promote=promote,
        retag=retag,
        follow=[n.server for n in follow],
        open_for=open_for,
        apps=apps,
        page=page,
        finish=finish,
    )
