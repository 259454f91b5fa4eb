"""Repairs of what a dead reload-production-db left on the systems themselves.

Shared by reload-production-db (which repairs first, before its own steps) and
recover-environment. Everything here reads the state from the hosts and databases (markers on the
databases and app servers, the upgrade-mode record on the web group), not from the dead process.
"""

from __future__ import annotations

from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows.errors import BadInput
from fabflows.runbook import RunContext
from fabflows.upgrade_mode import (
    UpgradeStatus,
    check_web_up,
    gather_upgrade_status,
    holder_alive,
    turn_off,
)
from tasks.aws.ec2 import Server, describe_servers
from tasks.postgres.copy import stop_copy
from tasks.postgres.databases import (
    DatabaseServerFacts,
    allow_connections,
    describe_databases,
    drop_database,
    mark_database,
    swap_back_databases,
)
from tasks.postgres.names import previous_of, side_name
from tasks.postgres.server import DbServer
from tasks.ssh.app import HostAppState, get_app_state, groups_for_role, start_app
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.fleet import FleetHost, FleetResult
from tasks.ssh.pgbouncer import resume_pgbouncer

FLOW_NAME = "reload-production-db"


class RecoveryPlan(BaseModel):
    """What a dead run left behind, and how it is repaired (pure)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stop_copies: list[str] = Field(
        default_factory=list, description="Side databases whose copy job to kill."
    )
    drop: list[str] = Field(default_factory=list, description="Side databases to drop.")
    swap_back: str | None = Field(
        default=None, description="Previous database to put back as live."
    )
    clear_marker: bool = False
    allow_connections: bool = False
    start_app: list[str] = Field(
        default_factory=list, description="Hosts whose app a dead run stopped."
    )
    end_upgrade_mode: str | None = Field(
        default=None, description="The dead run whose upgrade mode to end."
    )
    resume_pgbouncer: list[str] = Field(
        default_factory=list,
        description="App servers whose pgbouncer a dead run left paused (its auto-resume pending).",
    )
    notes: list[str] = Field(default_factory=list)

    @property
    def needed(self) -> bool:
        return bool(
            self.stop_copies
            or self.drop
            or self.swap_back
            or self.clear_marker
            or self.allow_connections
            or self.start_app
            or self.end_upgrade_mode
            or self.resume_pgbouncer
        )

    def lines(self) -> list[str]:
        out = []
        out += [f"kill the copy into {s}" for s in self.stop_copies]
        if self.swap_back:
            out.append(
                f"put {self.swap_back} back as the live database (migrations never confirmed)"
            )
        out += [f"drop {d}" for d in self.drop]
        if self.clear_marker:
            out.append("clear the live database's reload marker (the new database stays)")
        if self.allow_connections:
            out.append("let the live database accept connections again")
        if self.resume_pgbouncer:
            out.append(f"RESUME pgbouncer on {', '.join(self.resume_pgbouncer)} (left paused)")
        if self.start_app:
            out.append(f"start the app on {', '.join(self.start_app)}")
        if self.end_upgrade_mode:
            out.append(f"end upgrade mode left by run {self.end_upgrade_mode}")
        return out + self.notes


def plan_recovery(
    live: str,
    databases: DatabaseServerFacts,
    app: list[HostAppState],
    upgrade_holder: tuple[str, str] | None,
    run: str,
) -> RecoveryPlan:
    """Pure: what a dead reload left on the target, and how to repair it.

    - a side database (by name or marker): kill its copy job, drop it;
    - a live database marked ``swapped`` (migrations never confirmed): put its previous back;
    - a live database marked ``migrated``: keep it, clear the marker (its previous stays);
    - no live database but previous ones: put the newest back;
    - the live database refusing connections: allow them again;
    - app servers with a stop marker from a reload run: start their app;
    - upgrade mode held by another reload run (dead: this run holds the environment's lock).
    """
    plan: dict[str, object] = {"stop_copies": [], "drop": [], "notes": []}
    side = side_name(live)
    names = databases.names
    for db in databases.databases:
        marker = db.marker
        if db.name == side or (marker and marker.live == live and marker.state == "side"):
            plan["stop_copies"].append(db.name)  # type: ignore[union-attr]
            plan["drop"].append(db.name)  # type: ignore[union-attr]
    live_db = databases.get(live)
    if live_db is None:
        previous = sorted((n for n in names if previous_of(n, live)), reverse=True)
        if previous:
            plan["swap_back"] = previous[0]
            plan["notes"].append(f"the live database {live} is missing")  # type: ignore[union-attr]
    else:
        marker = live_db.marker
        if marker and marker.run != run:
            if marker.state == "swapped" and marker.previous and marker.previous in names:
                plan["swap_back"] = marker.previous
            elif marker.state in ("swapped", "migrated"):
                plan["clear_marker"] = True
        if not live_db.allow_connections and "swap_back" not in plan:
            plan["allow_connections"] = True
    plan["start_app"] = sorted(
        h.host for h in app if h.marker is not None and h.marker.flow in (FLOW_NAME, "unknown")
    )
    if upgrade_holder is not None:
        holder_run, holder_flow = upgrade_holder
        if holder_flow == FLOW_NAME and holder_run != run:
            plan["end_upgrade_mode"] = holder_run
    return RecoveryPlan.model_validate(plan)


def _running(servers: list[Server], role: str) -> list[Server]:
    return [s for s in servers if s.role == role and s.state == "running"]


def _db_server(servers: list[Server], env: EnvironmentConfig) -> DbServer:
    primaries = _running(servers, "db-primary")
    if not primaries:
        raise BadInput(f"{env.label} has no running db-primary server")
    s = primaries[0]
    address = s.address(env.address_attribute)
    return DbServer(
        name=s.name or s.instance_id,
        address=address,
        db_address=s.private_ip_address or address,
        instance_id=s.instance_id,
    )


def _hosts(servers: list[Server], role: str, attribute: str) -> list[FleetHost]:
    return [
        FleetHost(
            name=s.name or s.instance_id,
            address=s.address(attribute),
            role=role,
            instance_id=s.instance_id,
        )
        for s in sorted(_running(servers, role), key=lambda s: (s.name, s.instance_id))
    ]


def apply_recovery(
    ctx: RunContext,
    pool: ConnectionPool,
    target: DbServer,
    live: str,
    recovery: RecoveryPlan,
    app_hosts: list[FleetHost],
    *,
    dry_run: bool,
) -> list[str]:
    """Repair a dead run's leftovers (copies, side databases, the swap, the app, upgrade mode).

    Every action is attempted; what failed is raised at the end, naming it.
    """
    logger = get_run_logger()
    done: list[str] = []
    problems: list[str] = []

    def attempt(what: str, fn) -> None:  # noqa: ANN001
        try:
            result = fn()
            if getattr(result, "changed", True):
                done.append(what)
        except Exception as exc:
            problems.append(f"{what}: {type(exc).__name__}: {exc}")
            logger.error("recovery: %s failed: %s", what, exc)

    for side in recovery.stop_copies:
        attempt(
            f"stopped the copy into {side}",
            lambda side=side: stop_copy(pool, target, side, dry_run=dry_run),
        )
    if recovery.swap_back:
        attempt(
            f"put {recovery.swap_back} back as {live}",
            lambda: swap_back_databases(pool, target, live, recovery.swap_back, dry_run=dry_run),
        )
    for name in recovery.drop:
        attempt(
            f"dropped {name}", lambda name=name: drop_database(pool, target, name, dry_run=dry_run)
        )
    if recovery.clear_marker:
        attempt(
            "kept the new database (migrated)",
            lambda: mark_database(pool, target, live, None, dry_run=dry_run),
        )
    if recovery.allow_connections:
        attempt(
            f"{live} accepts connections again",
            lambda: allow_connections(pool, target, live, True, dry_run=dry_run),
        )
    if recovery.resume_pgbouncer:
        paused = [h for h in app_hosts if h.name in recovery.resume_pgbouncer]

        def _resume() -> FleetResult:
            result = resume_pgbouncer(
                paused, pool, ctx.env.home, ctx.env.environment, live, dry_run=dry_run
            )
            result.raise_for_errors()
            return result

        attempt(f"resumed pgbouncer on {', '.join(recovery.resume_pgbouncer)}", _resume)
    if recovery.start_app:
        hosts = [h for h in app_hosts if h.name in recovery.start_app]

        def _start() -> FleetResult:
            result = start_app(hosts, pool, _groups(ctx.env), ctx.env.home, dry_run=dry_run)
            result.raise_for_errors()
            if not dry_run and not recovery.end_upgrade_mode:
                # running is not serving: wait for the site (leaving upgrade mode checks it too)
                check_web_up(ctx)
            return result

        attempt(f"started the app on {', '.join(recovery.start_app)}", _start)
    if recovery.end_upgrade_mode:

        def _off() -> None:
            off = turn_off(ctx, pool, dry_run=dry_run)
            if off.problems:
                raise RuntimeError("; ".join(off.problems))

        attempt(f"ended upgrade mode left by run {recovery.end_upgrade_mode}", _off)
    if problems:
        raise RuntimeError("recovery could not repair everything: " + "; ".join(problems))
    for line in done:
        logger.warning("recovered: %s", line)
    return done


def undo_swap(pool: ConnectionPool, target: DbServer, live: str, run: str) -> bool:
    """If this run's new database is live with its migrations unconfirmed, put the previous one
    back. Reads the databases' markers, so it is right even when the swap itself failed half-way
    (both renames commit together, but its last statements may not have run). True if undone."""
    facts = describe_databases(pool, target)
    current = facts.get(live)
    marker = current.marker if current else None
    if marker and marker.run == run and marker.state == "swapped" and marker.previous:
        swap_back_databases(pool, target, live, marker.previous, dry_run=False)
        return True
    if current is not None and not current.allow_connections:
        allow_connections(pool, target, live, True, dry_run=False)
    return False


def _groups(env: EnvironmentConfig) -> dict[str, list[str]]:
    """Groups that must run on each role (pgbouncer included): started, and checked RUNNING."""
    groups = env.supervisor_groups
    return {"web": groups_for_role(groups, "web"), "worker": groups_for_role(groups, "worker")}


def _app_groups(env: EnvironmentConfig) -> dict[str, list[str]]:
    """Groups stopped in the window: the app (gunicorn, the workers), not pgbouncer.

    FabulAWS also stopped pgbouncer; here it keeps running: the swap refuses new connections and
    ends every session first (pgbouncer's server connections included), and pgbouncer connects to
    the new database by the same name at its next client. That saves a stop and a start of
    pgbouncer on every server inside the window, and migrations need it running anyway.
    """
    groups = env.supervisor_groups
    return {"web": [groups["web"]], "worker": [groups["celery"]]}


def gather_target_state(
    ctx: RunContext, pool: ConnectionPool
) -> tuple[
    DbServer,
    DatabaseServerFacts,
    list[FleetHost],
    list[FleetHost],
    list[HostAppState],
    UpgradeStatus,
]:
    """The target's database server, databases, app servers and their state, and upgrade mode."""
    env = ctx.env
    servers = describe_servers(
        ctx.creds, env.deployment, env.environment, roles=["db-primary", "web", "worker"]
    )
    target = _db_server(servers, env)
    web = _hosts(servers, "web", env.address_attribute)
    workers = _hosts(servers, "worker", env.address_attribute)
    target_db = describe_databases(pool, target)
    app = get_app_state(web + workers, pool, env.home)
    upgrade = gather_upgrade_status(ctx, pool, [s for s in servers if s.role == "web"])
    return target, target_db, web, workers, app, upgrade


def recovery_for(
    ctx: RunContext,
    target_db: DatabaseServerFacts,
    app: list[HostAppState],
    upgrade: UpgradeStatus,
    run: str,
) -> RecoveryPlan:
    holder = upgrade.holder
    dead_holder = None
    if holder is not None and holder.flow == FLOW_NAME and holder.run != run:
        alive = holder_alive(holder)
        if alive is not True:  # we hold the environment's lock: another reload cannot be running
            dead_holder = (holder.run, holder.flow)
    return plan_recovery(ctx.env.database_name, target_db, app, dead_holder, run)
