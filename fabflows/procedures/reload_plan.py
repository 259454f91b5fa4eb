"""reload-production-db's pure parts: the request checks, the facts, the plan and its changes.

Nothing here reads or writes a system: facts in, a plan (or a refusal) out, so the plan is tested
table-driven without any peer, and the journal can rebuild the run's steps from the plan alone.
"""

from __future__ import annotations

import shlex
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from config.models import ReloadProductionDbSettings
from fabflows.errors import BadInput, Refused
from fabflows.procedures.reload_recovery import RecoveryPlan
from fabflows.report import markdown_table
from fabflows.runtime.plan import Change, RunbookPlan
from fabflows.upgrade_mode import UpgradeStatus
from tasks.postgres.copy import SourceFacts, copy_command
from tasks.postgres.databases import DatabaseServerFacts
from tasks.postgres.names import check_names, previous_of, side_name
from tasks.postgres.server import DbServer
from tasks.ssh.app import HostAppState
from tasks.ssh.fleet import FleetHost

FLOW_NAME = "reload-production-db"


class ReloadRequest(BaseModel):
    """What the operator asked for, resolved (deployments and source filled in)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    deployment: str
    source_environment: str
    source_deployment: str


class ReloadFacts(BaseModel):
    """What gather found."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    target: DbServer
    source: DbServer
    target_db: DatabaseServerFacts
    source_db: SourceFacts
    web: list[FleetHost]
    workers: list[FleetHost]
    app: list[HostAppState]
    upgrade: UpgradeStatus


class ReloadChange(Change):
    """One step of the reload: where, what, whether users are kept out, how it is undone."""

    downtime: bool = Field(default=False, description="Runs while users are kept out.")
    compensation: str = Field(default="", description="How it is undone if a later step fails.")


class ReloadPlan(RunbookPlan):
    """What the reload will do (published before anything changes)."""

    DIGEST_EXCLUDE: ClassVar[set[str]] = {"source_bytes", "free_bytes", "needed_bytes"}
    """Sizes move a little between the plan and the apply (a live source, the target's disk)."""

    changes: list[ReloadChange] = Field(default_factory=list)  # type: ignore[assignment]
    target: str
    source: str
    target_server: DbServer
    source_server: DbServer
    web: list[FleetHost]
    workers: list[FleetHost]
    live: str
    side: str
    source_database: str
    source_bytes: int
    free_bytes: int
    needed_bytes: int
    tables: list[str]
    masking_statements: int
    masking_checks: int = 0
    code_root: str
    migrate_command: str
    keep_previous: int
    recovery: RecoveryPlan

    @property
    def step_names(self) -> list[str]:
        return [c.step for c in self.changes]

    def rows(self) -> list[dict[str, str]]:
        return [
            {
                "step": c.step,
                "target": c.target,
                "action": c.action,
                "users": "kept out" if c.downtime else "",
                "undo": c.compensation,
            }
            for c in self.changes
        ]

    def render_text(self) -> str:
        head = (
            f"copy: {self.source_database} ({_mb(self.source_bytes)}) -> {self.side}, then swapped "
            f"in as {self.live}; room: {_mb(self.free_bytes)} free, {_mb(self.needed_bytes)} needed"
        )
        return head + "\n" + super().render_text()

    def render_markdown(self) -> str:
        out = [
            f"# reload-production-db: {self.source} → {self.target}",
            "",
            f"- **copy:** `{self.source_database}` ({_mb(self.source_bytes)}) into the side database "
            f"`{self.side}` while {self.target} stays up; then a short window swaps it in as `{self.live}`",
            f"- **room:** {_mb(self.free_bytes)} free on the target, {_mb(self.needed_bytes)} needed",
            f"- **verified tables:** {', '.join(self.tables) or 'none'}",
            f"- **masking:** {self.masking_statements} statement(s)",
            f"- **migrations:** `{self.migrate_command}`",
            "- **previous database:** "
            + (
                "dropped after success"
                if self.keep_previous == 0
                else f"last {self.keep_previous} kept"
            ),
            f"- **Plan digest:** `{self.digest()}`",
            "",
        ]
        if self.recovery.needed:
            out += [
                "**A dead run's leftovers are repaired first:**",
                *[f"- {x}" for x in self.recovery.lines()],
                "",
            ]
        out.append(markdown_table(self.rows()))
        return "\n".join(out)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def check_request(target: EnvironmentConfig, source: EnvironmentConfig) -> None:
    """Pure: refuse what must never run (before anything is read).

    Raises:
        Refused: the target is a production environment (config's production_environments).
        BadInput: source and target are the same environment.
    """
    if target.is_production:
        raise Refused(
            f"{target.label} is a production environment (production_environments in config); "
            "reload-production-db only replaces non-production databases"
        )
    if (target.deployment, target.environment) == (source.deployment, source.environment):
        raise BadInput(f"source and target are both {target.label}; choose another source")
    if target.database_name == source.database_name and target.deployment == source.deployment:
        raise BadInput(f"source and target databases are both {target.database_name}")
    try:
        check_names(target.database_name)
    except ValueError as exc:
        raise BadInput(str(exc)) from None


def plan_reload_production_db(
    params: ReloadRequest,
    target_env: EnvironmentConfig,
    facts: ReloadFacts,
    settings: ReloadProductionDbSettings,
    recovery: RecoveryPlan,
    code_root: str,
) -> ReloadPlan:
    """Pure: the plan, or a clear refusal (the source is missing, the target has no room...).

    Raises:
        BadInput: no worker to migrate on, or the target lacks room for a second copy.
    """
    live = target_env.database_name
    side = side_name(live)
    source_bytes = facts.source_db.size_bytes
    needed = int(source_bytes * settings.room_factor)
    # a side database left by a dead run is dropped first: its space counts as free
    reclaim = sum(d.size_bytes for d in facts.target_db.databases if d.name in recovery.drop)
    free = facts.target_db.free_bytes + reclaim
    if needed > free:
        raise BadInput(
            f"{facts.target.name} has {_mb(free)} free in {facts.target_db.data_directory}; the copy "
            f"of {facts.source_db.database} needs about {_mb(needed)} ({settings.room_factor}× "
            f"{_mb(source_bytes)}) while the current database is kept"
        )
    if facts.target_db.get(live) is None and recovery.swap_back is None:
        raise BadInput(f"the live database {live} does not exist on {facts.target.name}")
    if not facts.workers:
        raise BadInput(f"{target_env.label} has no running worker to run the migrations on")
    unreachable = [f"{h.host} ({h.error})" for h in facts.app if h.error]
    if unreachable:
        raise BadInput(
            f"{target_env.label}: app server(s) unreachable, the app could not be stopped and started "
            "again: " + "; ".join(unreachable)
        )
    tables = [t.qualified for t in facts.source_db.tables[: settings.verify_tables]]
    migrate = f"cd {shlex.quote(code_root)} && {shlex.join(settings.migrate_command)}"
    t, s = facts.target.name, facts.source.name
    app_hosts = ", ".join(h.name for h in facts.web + facts.workers)
    side_undo = f"drop {side}"
    changes: list[ReloadChange] = []
    if recovery.needed:
        changes.append(
            ReloadChange(
                step="recover",
                target=target_env.label,
                action="repair a dead run's leftovers: " + "; ".join(recovery.lines()),
            )
        )
    changes += [
        ReloadChange(
            step="create-side",
            target=t,
            action=f"create empty {side} (owner {target_env.database_user})",
            compensation=side_undo,
        ),
        ReloadChange(
            step="copy",
            target=t,
            action=f"{copy_command(facts.source, facts.source_db.database, target_env.database_user, side)} (from {s}, run on {t})",
            compensation=f"kill the copy, {side_undo}",
        ),
        ReloadChange(
            step="verify-copy",
            target=t,
            action=f"row counts of the {len(tables)} largest tables equal the copy's snapshot",
            compensation=side_undo,
        ),
    ]
    if settings.masking.statements or settings.masking.checks:
        changes.append(
            ReloadChange(
                step="mask",
                target=t,
                action=f"{len(settings.masking.statements)} masking statement(s) in one transaction, then {len(settings.masking.checks)} check(s)",
                compensation=side_undo,
            )
        )
    changes.append(
        ReloadChange(
            step="analyze",
            target=t,
            action=f"VACUUM (ANALYZE) {side} (statistics and visibility for the app's first queries)",
            compensation=side_undo,
        )
    )
    swap = ReloadChange(
        step="swap",
        target=t,
        action=f"refuse connections, terminate sessions; rename {live} → {live}__prev_<time>, {side} → {live} in one transaction",
        downtime=True,
        compensation="rename back (from the databases' markers) until the migrations are confirmed",
    )
    changes += [
        ReloadChange(
            step="upgrade-mode-on",
            target=target_env.label,
            action="suspend the web group's processes (recorded), 503 page and health-check override on every web server",
            downtime=True,
            compensation="pages off, resume exactly the recorded processes",
        ),
        ReloadChange(
            step="stop-app",
            target=app_hosts,
            action="supervisorctl stop the web and celery groups (marker first; pgbouncer stays up)",
            downtime=True,
            compensation="supervisorctl start",
        ),
        swap,
        ReloadChange(
            step="migrate",
            target=facts.workers[0].name,
            action=migrate,
            downtime=True,
            compensation="the swap's undo puts the previous database back until confirmed",
        ),
        ReloadChange(
            step="start-app",
            target=app_hosts,
            action="supervisorctl start web and celery (pgbouncer checked running)",
            downtime=True,
        ),
        ReloadChange(
            step="upgrade-mode-off",
            target=target_env.label,
            action="pages off, resume the recorded processes, check every web server answers 200",
        ),
    ]
    changes += [
        ReloadChange(
            step="verify",
            target=t,
            action=f"row counts of the {len(tables)} largest tables in the live database",
        ),
        ReloadChange(
            step="cleanup",
            target=t,
            action=(
                "drop the previous database (no compensation: after the run succeeded)"
                if settings.keep_previous == 0
                else f"keep the last {settings.keep_previous} previous databases, drop older ones"
            ),
        ),
    ]
    notes = []
    if recovery.needed:
        notes.append("a dead run's leftovers are repaired first: " + "; ".join(recovery.lines()))
    return ReloadPlan(
        title=f"reload-production-db on {target_env.label} from "
        f"{params.source_deployment}/{params.source_environment}",
        environment=target_env.label,
        changes=changes,
        destructive=True,
        downtime_seconds=15.0,
        notes=notes,
        target=target_env.label,
        source=f"{params.source_deployment}/{params.source_environment}",
        target_server=facts.target,
        source_server=facts.source,
        web=facts.web,
        workers=facts.workers,
        live=live,
        side=side,
        source_database=facts.source_db.database,
        source_bytes=source_bytes,
        free_bytes=free,
        needed_bytes=needed,
        tables=tables,
        masking_statements=len(settings.masking.statements),
        masking_checks=len(settings.masking.checks),
        code_root=code_root,
        migrate_command=migrate,
        keep_previous=settings.keep_previous,
        recovery=recovery,
    )


def previous_to_drop(names: list[str], live: str, keep: int, just_replaced: str) -> list[str]:
    """Pure: previous databases of ``live`` beyond the newest ``keep`` (``just_replaced`` counts)."""
    previous = sorted((n for n in names if previous_of(n, live)), reverse=True)
    if just_replaced and just_replaced not in previous:
        previous = sorted([*previous, just_replaced], reverse=True)
    return previous[keep:]
