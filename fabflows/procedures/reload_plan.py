"""reload-production-db's pure parts: the request checks, the facts, the plan and its changes.

Nothing here reads or writes a system: facts in, a plan (or a refusal) out, so the plan is tested
table-driven without any peer, and the journal can rebuild the run's steps from the plan alone.
"""

from __future__ import annotations

import shlex
from typing import ClassVar, Literal

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
from tasks.ssh.pgbouncer import PgbouncerState

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
    code_migrations: list[str] | None = Field(
        default=None, description="Migrations the deployed code has (None: unknown)."
    )
    source_migrations: list[str] | None = Field(
        default=None, description="Migrations the source database has applied (None: unknown)."
    )
    pgbouncer: list[PgbouncerState] = Field(
        default_factory=list, description="Each app server's pgbouncer (empty: not read)."
    )


SwapPath = Literal["pause", "upgrade-page"]


class SwapDecision(BaseModel):
    """How the copy goes live, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: SwapPath
    reasons: list[str]


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def decide_swap(facts: ReloadFacts, settings: ReloadProductionDbSettings) -> SwapDecision:
    """Pure: swap under pgbouncer PAUSE/RESUME (requests held) or behind the upgrade page.

    The copy's migrations are the source's (the copy is the source's snapshot). Pause only when
    all of these hold, else the upgrade page (the reasons say which did not):

    - ``swap`` is ``auto`` in config;
    - the code's migrations are known (``manage.py showmigrations --plan`` on the first worker)
      and so are the source's (its ``django_migrations``);
    - no migration is pending: the copy has every migration the code has, so the running code
      works on it as it is and ``migrate`` has nothing to do;
    - every app server's pgbouncer can be paused: admin console reachable, transaction or
      statement pooling, an alias for the live database, not paused already.

    Migrations the copy has and the code does not know (the source's schema ahead of the code) are
    reported but do not decide: ``migrate`` never unapplies them, so the page would not help.
    """
    if settings.swap == "upgrade-page":
        return SwapDecision(path="upgrade-page", reasons=["config says swap: upgrade-page"])
    unsafe: list[str] = []
    notes: list[str] = []
    code, source = facts.code_migrations, facts.source_migrations
    if code is None:
        unsafe.append("the code's migrations are unknown (showmigrations failed or no Django)")
    if source is None:
        unsafe.append(f"{facts.source_db.database} has no django_migrations table")
    if code is not None and source is not None:
        pending = sorted(set(code) - set(source))
        ahead = sorted(set(source) - set(code))
        if pending:
            unsafe.append(
                f"{len(pending)} migration(s) pending on the copy ({_names(pending)}): the running "
                "code needs them, so the app waits behind the page until they ran"
            )
        if ahead:  # the page would not help: migrate never unapplies them
            notes.append(
                f"the copy also has {len(ahead)} migration(s) the code does not know "
                f"({_names(ahead)}); no swap undoes them, the page no more than the pause"
            )
    if not facts.pgbouncer:
        unsafe.append("no app server's pgbouncer was read")
    for state in facts.pgbouncer:
        unsafe += state.pause_blockers()
    if unsafe:
        return SwapDecision(path="upgrade-page", reasons=unsafe + notes)
    return SwapDecision(
        path="pause",
        reasons=[
            f"no migration pending: the copy has all {len(code or [])} of the code's migrations",
            f"every app server's pgbouncer can be paused ({len(facts.pgbouncer)} server(s), "
            "transaction pooling, admin console)",
            *notes,
        ],
    )


class ReloadChange(Change):
    """One step of the reload: where, what, whether users are kept out, how it is undone."""

    downtime: bool = Field(default=False, description="Runs while users are kept out.")
    held: bool = Field(
        default=False, description="Runs while users' requests are held (pgbouncer paused)."
    )
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
    swap_path: SwapPath = "upgrade-page"
    swap_reasons: list[str] = Field(default_factory=list)
    source_migrations: list[str] | None = None
    pause_wait_seconds: float = 5.0
    pause_hold_seconds: float = 30.0

    @property
    def step_names(self) -> list[str]:
        return [c.step for c in self.changes]

    def rows(self) -> list[dict[str, str]]:
        return [
            {
                "step": c.step,
                "target": c.target,
                "action": c.action,
                "users": "held" if c.held else "kept out" if c.downtime else "",
                "undo": c.compensation,
            }
            for c in self.changes
        ]

    def render_text(self) -> str:
        head = (
            f"copy: {self.source_database} ({_mb(self.source_bytes)}) -> {self.side}, then swapped "
            f"in as {self.live}; room: {_mb(self.free_bytes)} free, {_mb(self.needed_bytes)} needed"
            f"\nswap: {self.swap_label()}"
        )
        return head + "\n" + super().render_text()

    def swap_label(self) -> str:
        how = (
            "under pgbouncer PAUSE/RESUME (requests held, not refused)"
            if self.swap_path == "pause"
            else "behind the upgrade page"
        )
        return f"{how}: " + "; ".join(self.swap_reasons)

    def render_markdown(self) -> str:
        out = [
            f"# reload-production-db: {self.source} → {self.target}",
            "",
            f"- **copy:** `{self.source_database}` ({_mb(self.source_bytes)}) into the side database "
            f"`{self.side}` while {self.target} stays up; then a short window swaps it in as `{self.live}`",
            f"- **room:** {_mb(self.free_bytes)} free on the target, {_mb(self.needed_bytes)} needed",
            f"- **verified tables:** {', '.join(self.tables) or 'none'}",
            f"- **masking:** {self.masking_statements} statement(s)",
            f"- **swap:** {self.swap_label()}",
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

    The window is either the upgrade page (upgrade-mode-on, stop-app, swap, migrate, start-app,
    upgrade-mode-off) or, when :func:`decide_swap` allows it, a pgbouncer pause (pgbouncer-pause,
    swap, pgbouncer-resume, then migrate with the site up: nothing is pending).

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
    decision = decide_swap(facts, settings)
    pause = decision.path == "pause"
    swap = ReloadChange(
        step="swap",
        target=t,
        action=f"refuse connections, terminate sessions; rename {live} → {live}__prev_<time>, {side} → {live} in one transaction",
        downtime=not pause,
        held=pause,
        compensation="rename back (from the databases' markers) until the migrations are confirmed",
    )
    if pause:
        changes += [
            ReloadChange(
                step="pgbouncer-pause",
                target=app_hosts,
                action=f"the copy's migrations checked unchanged; PAUSE {live} on every app "
                f"server's pgbouncer (completes within {settings.pause_wait_seconds:g} s or "
                f"RESUMEs and fails; each pgbouncer RESUMEs by itself after "
                f"{settings.pause_hold_seconds:g} s whatever happens)",
                held=True,
                compensation="RESUME (and the auto-resume cancelled)",
            ),
            swap,
            ReloadChange(
                step="pgbouncer-resume",
                target=app_hosts,
                action=f"RESUME {live} on every app server's pgbouncer (held requests go on, on "
                "the new database)",
                held=True,
            ),
            ReloadChange(
                step="migrate",
                target=facts.workers[0].name,
                action=f"{migrate} (nothing pending: confirms the copy; the site is up)",
                compensation="the swap's undo puts the previous database back until confirmed",
            ),
        ]
    changes += (
        []
        if pause
        else [
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
    )
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
    notes = [f"swap {decision.path}: " + "; ".join(decision.reasons)]
    if recovery.needed:
        notes.append("a dead run's leftovers are repaired first: " + "; ".join(recovery.lines()))
    return ReloadPlan(
        title=f"reload-production-db on {target_env.label} from "
        f"{params.source_deployment}/{params.source_environment}",
        environment=target_env.label,
        changes=changes,
        destructive=True,
        downtime_seconds=2.0 if pause else 15.0,
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
        swap_path=decision.path,
        swap_reasons=decision.reasons,
        source_migrations=facts.source_migrations,
        pause_wait_seconds=settings.pause_wait_seconds,
        pause_hold_seconds=settings.pause_hold_seconds,
    )


def previous_to_drop(names: list[str], live: str, keep: int, just_replaced: str) -> list[str]:
    """Pure: previous databases of ``live`` beyond the newest ``keep`` (``just_replaced`` counts)."""
    previous = sorted((n for n in names if previous_of(n, live)), reverse=True)
    if just_replaced and just_replaced not in previous:
        previous = sorted([*previous, just_replaced], reverse=True)
    return previous[keep:]
