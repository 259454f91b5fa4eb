"""reload-production-db: production data into staging or testing, with seconds of downtime."""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from config import ConfigError, EnvironmentConfig
from config.models import ReloadProductionDbSettings
from fabflows import approval, audit, boundaries
from fabflows.errors import BadInput, Refused
from fabflows.lock import environment_lock
from fabflows.procedures.reload_recovery import (
    RecoveryPlan,
    _app_groups,
    _db_server,
    _groups,
    apply_recovery,
    gather_target_state,
    recovery_for,
    undo_swap,
)
from fabflows.report import artifact_key, markdown_table, publish_markdown, text_table
from fabflows.runbook import RunContext, load_context
from fabflows.upgrade_mode import (
    UpgradePages,
    UpgradeStatus,
    UpgradeWindowReport,
    current_run,
    load_upgrade_pages,
    server_url,
    ssh_options,
    upgrade_window,
)
from tasks.aws.ec2 import describe_servers
from tasks.http.probe import HttpProbe, ProbeSummary
from tasks.postgres.copy import (
    CopyResult,
    SourceFacts,
    SourceUnavailable,
    copy_command,
    describe_source_database,
    read_database_password,
    start_copy,
    stop_copy,
    wait_for_copy,
)
from tasks.postgres.databases import (
    DatabaseServerFacts,
    analyze_database,
    count_rows,
    create_database,
    describe_databases,
    drop_database,
    mark_database,
    swap_databases,
)
from tasks.postgres.masking import check_masking, mask_database
from tasks.postgres.names import (
    Marker,
    check_names,
    now_text,
    previous_name,
    previous_of,
    side_name,
)
from tasks.postgres.server import DbServer
from tasks.ssh.app import (
    AppStopRecord,
    HostAppState,
    MigrationFailed,
    MigrationResult,
    run_migrations,
    start_app,
    stop_app,
)
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.fleet import FleetHost

FLOW_NAME = "reload-production-db"

STEPS = (
    "preflight",
    "recover",
    "create-side",
    "copy",
    "copy-running",
    "verify-copy",
    "mask",
    "analyze",
    "upgrade-mode-on",
    "stop-app",
    "swap",
    "migrate",
    "start-app",
    "upgrade-mode-off",
    "verify",
    "cleanup",
)
"""The step boundaries, in order (reports, and step-boundary observers)."""


def step_boundary(step: str) -> None:
    """Log the step and tell the step-boundary observers (see fabflows.boundaries)."""
    get_run_logger().info("step: %s", step)
    boundaries.reached(FLOW_NAME, step, "before")


# --------------------------------------------------------------------------- models


class ReloadProductionDbParams(BaseModel):
    """What the operator asked for."""

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


class Change(BaseModel):
    """One step of the plan."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: str
    target: str
    action: str
    downtime: bool = Field(default=False, description="Runs while users get the 503 page.")
    compensation: str = Field(default="", description="How it is undone if a later step fails.")


class ReloadPlan(BaseModel):
    """What the reload will do (published before anything changes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str
    source: str
    live: str
    side: str
    source_database: str
    source_bytes: int
    free_bytes: int
    needed_bytes: int
    tables: list[str]
    masking_statements: int
    migrate_command: str
    keep_previous: int
    recovery: RecoveryPlan
    changes: list[Change]

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
            "",
        ]
        if self.recovery.needed:
            out += [
                "**A dead run's leftovers are repaired first:**",
                *[f"- {x}" for x in self.recovery.lines()],
                "",
            ]
        out.append(markdown_table([c.model_dump() for c in self.changes]))
        return "\n".join(out)


class StepTime(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    step: str
    seconds: float


class ReloadReport(BaseModel):
    """The outcome of reload-production-db."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str
    source: str
    dry_run: bool
    outcome: str
    plan: ReloadPlan
    recovered: list[str] = Field(default_factory=list)
    copy_result: CopyResult | None = None
    live_counts: dict[str, int] = Field(default_factory=dict)
    migration: MigrationResult | None = None
    window: UpgradeWindowReport | None = None
    downtime_s: float | None = Field(
        default=None, description="Upgrade mode on → off (what users saw as the 503 page)."
    )
    probe: ProbeSummary | None = Field(
        default=None, description="The whole run, polled every 100 ms."
    )
    dropped: list[str] = Field(default_factory=list)
    kept: list[str] = Field(default_factory=list)
    steps: list[StepTime] = Field(default_factory=list)
    wall_s: float = 0.0

    def render_text(self) -> str:
        out = [f"reload-production-db {self.source} -> {self.target}: {self.outcome}"]
        if self.recovered:
            out.append("repaired first: " + "; ".join(self.recovered))
        if self.copy_result:
            c = self.copy_result
            out.append(
                f"copy: {_mb(c.source_bytes)} in {c.seconds:.1f} s ({c.mb_per_s:.1f} MB/s); "
                f"snapshot counts {c.snapshot_counts}"
            )
        if self.downtime_s is not None:
            out.append(f"downtime (upgrade mode on -> off): {self.downtime_s:.2f} s")
        if self.migration:
            out.append(f"migrations: {self.migration.seconds:.1f} s on {self.migration.host}")
        if self.probe:
            out.append(f"probe: {self.probe.describe()}")
        if self.dropped:
            out.append(f"dropped: {', '.join(self.dropped)}")
        if self.kept:
            out.append(f"kept: {', '.join(self.kept)}")
        if self.steps:
            out += ["", text_table([s.model_dump() for s in self.steps])]
        if self.dry_run:
            out += ["", self.plan.render_markdown()]
        out.append(f"wall time {self.wall_s:.1f} s")
        return "\n".join(out)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


# --------------------------------------------------------------------------- pure parts


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
    params: ReloadProductionDbParams,
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
    changes = [
        Change(
            step="create-side",
            target=t,
            action=f"create empty {side} (owner {target_env.database_user})",
            compensation=f"drop {side}",
        ),
        Change(
            step="copy",
            target=t,
            action=f"{copy_command(facts.source, facts.source_db.database, target_env.database_user, side)} (from {s}, run on {t})",
            compensation=f"kill the copy, drop {side}",
        ),
        Change(
            step="verify-copy",
            target=t,
            action=f"row counts of the {len(tables)} largest tables equal the copy's snapshot",
            compensation=f"drop {side}",
        ),
    ]
    if settings.masking.statements:
        changes.append(
            Change(
                step="mask",
                target=t,
                action=f"{len(settings.masking.statements)} masking statement(s) in one transaction, then {len(settings.masking.checks)} check(s)",
                compensation=f"drop {side}",
            )
        )
    changes += [
        Change(
            step="analyze",
            target=t,
            action=f"VACUUM (ANALYZE) {side} (statistics and visibility for the app's first queries)",
        ),
        Change(
            step="upgrade-mode-on",
            target=target_env.label,
            action="suspend the web group's processes (recorded), 503 page and health-check override on every web server",
            downtime=True,
            compensation="pages off, resume exactly the recorded processes",
        ),
        Change(
            step="stop-app",
            target=app_hosts,
            action="supervisorctl stop the web and celery groups (marker first; pgbouncer stays up)",
            downtime=True,
            compensation="supervisorctl start",
        ),
        Change(
            step="swap",
            target=t,
            action=f"refuse connections, terminate sessions; rename {live} → {live}__prev_<time>, {side} → {live} in one transaction",
            downtime=True,
            compensation="rename back, drop the new database",
        ),
        Change(
            step="migrate",
            target=facts.workers[0].name,
            action=migrate,
            downtime=True,
            compensation="put the previous database back",
        ),
        Change(
            step="start-app",
            target=app_hosts,
            action="supervisorctl start web and celery (pgbouncer checked running)",
            downtime=True,
        ),
        Change(
            step="upgrade-mode-off",
            target=target_env.label,
            action="pages off, resume the recorded processes, check every web server answers 200",
        ),
        Change(
            step="cleanup",
            target=t,
            action=(
                "drop the previous database (no compensation: after the run succeeded)"
                if settings.keep_previous == 0
                else f"keep the last {settings.keep_previous} previous databases, drop older ones"
            ),
        ),
    ]
    return ReloadPlan(
        target=target_env.label,
        source=f"{params.source_deployment}/{params.source_environment}",
        live=live,
        side=side,
        source_database=facts.source_db.database,
        source_bytes=source_bytes,
        free_bytes=free,
        needed_bytes=needed,
        tables=tables,
        masking_statements=len(settings.masking.statements),
        migrate_command=migrate,
        keep_previous=settings.keep_previous,
        recovery=recovery,
        changes=changes,
    )


def previous_to_drop(names: list[str], live: str, keep: int, just_replaced: str) -> list[str]:
    """Pure: previous databases of ``live`` beyond the newest ``keep`` (``just_replaced`` counts)."""
    previous = sorted((n for n in names if previous_of(n, live)), reverse=True)
    if just_replaced not in previous:
        previous = sorted([*previous, just_replaced], reverse=True)
    return previous[keep:]


# --------------------------------------------------------------------------- gather


def _source_password(
    ctx: RunContext,
    settings: ReloadProductionDbSettings,
    pool: ConnectionPool,
    source: DbServer,
    home: str,
) -> SecretStr:
    if settings.source_password_block:
        from prefect.blocks.system import Secret

        value = Secret.load(settings.source_password_block).get()
        return SecretStr(str(value))
    path = f"{home.rstrip('/')}/{settings.source_password_file}"
    return read_database_password(pool, source, path)


# --------------------------------------------------------------------------- recovery


# --------------------------------------------------------------------------- the flow


class _Clock:
    def __init__(self) -> None:
        self.steps: list[StepTime] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        step_boundary(name)
        started = time.monotonic()
        try:
            yield
        finally:
            self.steps.append(StepTime(step=name, seconds=round(time.monotonic() - started, 3)))


def _load(
    environment: str,
    deployment: str | None,
    config: str | None,
    source_environment: str | None,
    source_deployment: str | None,
) -> tuple[RunContext, RunContext, ReloadProductionDbSettings]:
    try:
        ctx = load_context(environment, deployment, config)
        settings = ctx.config.fabflows.reload_production_db
        src_env = source_environment or settings.source_environment
        src = load_context(src_env, source_deployment or ctx.env.deployment, config)
    except ConfigError as exc:
        raise BadInput(str(exc)) from None
    check_request(ctx.env, src.env)
    return ctx, src, settings


@flow(name=FLOW_NAME, log_prints=False)
def reload_production_db(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    source_environment: str | None = None,
    source_deployment: str | None = None,
    probe: bool = False,
) -> ReloadReport:
    """Replace a staging (or testing) database with a copy of production, with seconds of downtime.

    **What it does.** Copies the source database (production by default) into a *side* database on
    the target's db-primary while the target stays up: a plain `pg_dump | psql` stream (stopping at the first error) runs on the
    target server, reading the source over the network, so the data never passes through the
    machine running the flow (no password on any command line). Optional masking SQL from config
    runs on the copy and is checked. The row counts of the largest tables must equal the counts in
    the dump's own snapshot. Then a short window: upgrade mode (the web group's processes suspended
    and recorded, the 503 page and health-check override on every web server), the app stopped,
    the side database swapped in by rename (one transaction), migrations run on the first worker,
    the app started, upgrade mode off. The previous database is dropped only after all that
    succeeded (or the last N are kept: `fabflows.reload_production_db.keep_previous`).

    **When to run:** whenever staging/testing needs fresh production data (the original's
    `fab staging reload_production_db`).

    **Preconditions, checked before anything changes:** the target is not listed in
    `production_environments`; source ≠ target; the source database exists and the target server
    can read it; the target has room for a second copy (`room_factor` × the source's size).

    **Blast radius:** the target environment only. Its site shows the 503 page for the swap and
    the migrations (seconds plus migration time, whatever the database size). The source is only
    read (one snapshot).

    **Approval:** an environment marked `protected` in config pauses for approval of the plan
    before anything changes (staging and testing are not protected by default).

    **Dry run** (the default) reads everything for real (servers, databases, free space, the
    source over the path the copy will take, leftovers of dead runs) and publishes the plan.

    **Rolls back:** any failure, cancellation or crash leaves the autoscaling processes exactly as
    before, upgrade mode off, the app running, and the target serving its old database or the
    complete new one, never none. A failed migration puts the old database back. State for
    recovery lives outside the flow (the group's tags, markers on the servers and on the databases);
    the next run, or `recover-environment`, repairs what a killed run left.

    Args:
        environment: Target environment (staging, testing); never a production environment.
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only read and publish the plan (default). Set false (CLI --apply) to reload.
        source_environment: Environment to copy from (default: reload_production_db.source_environment, production).
        source_deployment: Deployment of the source (default: the target's).
        probe: Poll the site every 100 ms for the whole run and report non-200 answers (sandbox, benchmarks).
    """
    logger = get_run_logger()
    started = time.monotonic()
    clock = _Clock()
    with clock.step("preflight"):
        ctx, src, settings = _load(
            environment, deployment, config, source_environment, source_deployment
        )
    env = ctx.env
    params = ReloadProductionDbParams(
        environment=env.environment,
        deployment=env.deployment,
        source_environment=src.env.environment,
        source_deployment=src.env.deployment,
    )
    audit.record_start(env)
    run, _ = current_run()
    code_root = settings.code_root or f"{env.home.rstrip('/')}/www/{env.environment}/code_root"
    with environment_lock(env, ctx.config), ConnectionPool(ssh_options(ctx)) as pool:
        # ------------------------------------------------------------ gather
        target, target_db, web, workers, app, upgrade = gather_target_state(ctx, pool)
        src_servers = describe_servers(
            src.creds, src.env.deployment, src.env.environment, roles=["db-primary"]
        )
        source = _db_server(src_servers, src.env)
        if (source.address, source.port) == (target.address, target.port):
            raise BadInput(
                f"{src.env.label} and {env.label} use the same database server {target.name}"
            )
        password = _source_password(src, settings, pool, source, src.env.home)
        try:
            source_db = describe_source_database(
                pool,
                target,
                source,
                src.env.database_name,
                src.env.database_user,
                password,
                settings.verify_tables,
            )
        except SourceUnavailable as exc:
            raise BadInput(str(exc)) from None
        facts = ReloadFacts(
            target=target,
            source=source,
            target_db=target_db,
            source_db=source_db,
            web=web,
            workers=workers,
            app=app,
            upgrade=upgrade,
        )
        pages = load_upgrade_pages(ctx.config, config)  # a bad page fails now, not in the window
        recovery = recovery_for(ctx, target_db, app, upgrade, run)
        plan = plan_reload_production_db(params, env, facts, settings, recovery, code_root)
        key = artifact_key("reload-production-db", env.deployment, env.environment)
        publish_markdown(
            key + "-plan", plan.render_markdown(), f"Plan: reload {env.label} from {src.env.label}"
        )
        logger.info("plan:\n%s", plan.render_markdown())
        if dry_run:
            return ReloadReport(
                target=env.label,
                source=plan.source,
                dry_run=True,
                outcome="dry run: nothing changed",
                plan=plan,
                steps=clock.steps,
                wall_s=round(time.monotonic() - started, 2),
            )
        if approval.approval_required(env, destructive=True):
            try:  # a protected (non-production) environment: someone approves the plan first
                approval.request_approval(
                    env,
                    ctx.config,
                    plan_markdown=plan.render_markdown(),
                    expected_downtime=timedelta(seconds=15),
                    flow_name=FLOW_NAME,
                )
            except approval.ApprovalRejected as exc:
                return exc.as_state()
        report = _apply(
            pages,
            ctx,
            pool,
            settings,
            plan,
            facts,
            recovery,
            run,
            clock,
            probe,
            code_root,
            src,
            password,
        )
        report = report.model_copy(
            update={"wall_s": round(time.monotonic() - started, 2), "steps": clock.steps}
        )
        publish_markdown(key, "```\n" + report.render_text() + "\n```", f"Reload of {env.label}")
        logger.info("%s", report.render_text())
        return report


def _apply(
    pages: UpgradePages,
    ctx: RunContext,
    pool: ConnectionPool,
    settings: ReloadProductionDbSettings,
    plan: ReloadPlan,
    facts: ReloadFacts,
    recovery: RecoveryPlan,
    run: str,
    clock: _Clock,
    probe: bool,
    code_root: str,
    src: RunContext,
    password: SecretStr,
) -> ReloadReport:
    env = ctx.env
    logger = get_run_logger()
    target, live, side = facts.target, plan.live, plan.side
    app_hosts = facts.web + facts.workers
    recovered: list[str] = []
    with clock.step("recover"):
        if recovery.needed:
            logger.warning("repairing a dead run's leftovers: %s", "; ".join(recovery.lines()))
            recovered = apply_recovery(ctx, pool, target, live, recovery, app_hosts, dry_run=False)
    # what users get through one web server (the load balancer's view of the site)
    probe_url = server_url(ctx.config.fabflows.upgrade, facts.web[0]) if facts.web else None
    http_probe = HttpProbe(probe_url).start() if probe and probe_url else None
    marker = Marker(run=run, live=live, state="side", source=plan.source, since=now_text())
    side_created = False
    swapped_previous: str | None = None
    migrated = False
    copy_result: CopyResult | None = None
    migration: MigrationResult | None = None
    window_report: UpgradeWindowReport | None = None
    live_counts: dict[str, int] = {}
    dropped: list[str] = []
    kept: list[str] = []
    try:
        # -------------------------------------------------------- while the site stays up
        with clock.step("create-side"):
            create_database(pool, target, side, env.database_user, marker, dry_run=False)
            side_created = True
        with clock.step("copy"):
            copy_started = time.monotonic()
            job = start_copy(
                pool,
                target,
                facts.source,
                plan.source_database,
                src.env.database_user,
                password,
                side,
                plan.tables,
                dry_run=False,
            )
            step_boundary("copy-running")
            copy_result = wait_for_copy(
                pool,
                target,
                job,
                plan.source_bytes,
                timeout=settings.copy_timeout_minutes * 60,
                progress_key=artifact_key("reload-copy", env.deployment, env.environment),
                started_at=copy_started,
            )
        with clock.step("verify-copy"):  # complete: every row of the dump's snapshot is there
            counts = count_rows(pool, target, side, plan.tables)
            if counts != copy_result.snapshot_counts:
                raise RuntimeError(
                    f"the copy's row counts differ from the source's snapshot: copy {counts}, "
                    f"source {copy_result.snapshot_counts}"
                )
        with clock.step("mask"):
            if settings.masking.statements:
                mask_database(
                    pool,
                    target,
                    side,
                    list(settings.masking.statements),
                    env.database_user,
                    dry_run=False,
                )
            if settings.masking.checks:
                check_masking(pool, target, side, list(settings.masking.checks))
        with clock.step("analyze"):
            analyze_database(pool, target, side, dry_run=False)
        # -------------------------------------------------------- the short window
        step_boundary("upgrade-mode-on")
        with upgrade_window(ctx, pool=pool, pages=pages, probe_url=False) as window:
            app_stopped = False
            try:
                with clock.step("stop-app"):
                    app_stopped = True  # marker-first: even a partial stop is started again
                    stopped = stop_app(
                        app_hosts,
                        pool,
                        _app_groups(env),
                        env.home,
                        AppStopRecord(run=run, flow=FLOW_NAME, groups=[], since=now_text()),
                        dry_run=False,
                    )
                    stopped.raise_for_errors()
                with clock.step("swap"):
                    previous = previous_name(live, datetime.now(UTC))
                    swap = swap_databases(
                        pool,
                        target,
                        live,
                        side,
                        previous,
                        marker.moved("swapped", previous=previous),
                        marker.moved("previous"),
                        dry_run=False,
                    )
                    if swap.swapped:
                        swapped_previous, side_created = previous, False
                with clock.step("migrate"):
                    try:
                        migration = run_migrations(
                            facts.workers[0],
                            pool,
                            list(settings.migrate_command),
                            code_root,
                            dry_run=False,
                            timeout=settings.migrate_timeout_minutes * 60,
                        )
                    except MigrationFailed:
                        logger.error(
                            "migrations failed: putting %s back as %s", swapped_previous, live
                        )
                        raise
                    mark_database(
                        pool,
                        target,
                        live,
                        marker.moved("migrated", previous=swapped_previous),
                        dry_run=False,
                    )
                    migrated = True
            finally:
                try:
                    if not migrated:
                        # whatever the swap reported, the databases say whether it happened
                        undone = undo_swap(pool, target, live, run)
                        swapped_previous = None if undone else swapped_previous
                finally:
                    if app_stopped:
                        with clock.step("start-app"):
                            started = start_app(
                                app_hosts, pool, _groups(env), env.home, dry_run=False
                            )
                            started.raise_for_errors()
            step_boundary("upgrade-mode-off")
        window_report = window.report
        # -------------------------------------------------------- verify and clean up
        with clock.step("verify"):
            # (leaving upgrade mode already checked that every web server, and the site, answer 200)
            live_counts = count_rows(pool, target, live, plan.tables)
        with clock.step("cleanup"):
            names = describe_databases(pool, target).names
            for name in previous_to_drop(
                names, live, settings.keep_previous, swapped_previous or ""
            ):
                if name:
                    drop_database(pool, target, name, dry_run=False)
                    dropped.append(name)
            kept = [n for n in names if previous_of(n, live) and n not in dropped]
            mark_database(pool, target, live, None, dry_run=False)
        outcome = "reloaded"
    finally:
        if side_created:
            # the copy never went live: kill it if it still runs, drop the side database
            for fn in (
                lambda: stop_copy(pool, target, side, dry_run=False),
                lambda: drop_database(pool, target, side, dry_run=False),
            ):
                try:
                    fn()
                except Exception as exc:  # the next run's recovery finds the side database
                    logger.error("could not clean up %s: %s", side, exc)
        summary = http_probe.stop() if http_probe else None
        if summary:
            logger.info("probe: %s", summary.describe())
    return ReloadReport(
        target=env.label,
        source=plan.source,
        dry_run=False,
        outcome=outcome,
        plan=plan,
        recovered=recovered,
        copy_result=copy_result,
        live_counts=live_counts,
        migration=migration,
        window=window_report,
        downtime_s=window_report.seconds_in_upgrade_mode if window_report else None,
        probe=summary,
        dropped=dropped,
        kept=kept,
    )
