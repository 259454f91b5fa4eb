"""reload-production-db: production data into staging or testing, with seconds of downtime.

The plan and its models live in fabflows/procedures/reload_plan.py, the steps (what each applies
and how it is undone) in fabflows/procedures/reload_steps.py, the repairs of a dead run's
leftovers in fabflows/procedures/reload_recovery.py (shared with recover-environment).
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import ConfigError, EnvironmentConfig
from config.models import ReloadProductionDbSettings
from fabflows.errors import BadInput
from fabflows.procedures.reload_plan import (
    FLOW_NAME,
    ReloadFacts,
    ReloadPlan,
    ReloadRequest,
    check_request,
    plan_reload_production_db,
)
from fabflows.procedures.reload_recovery import (
    RecoveryPlan,
    _db_server,
    gather_target_state,
    recovery_for,
)
from fabflows.procedures.reload_steps import (
    ReloadSteps,
    code_root_of,
    settings_of,
    source_context,
    source_password,
)
from fabflows.runbook import RunContext
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from fabflows.upgrade_mode import load_upgrade_pages
from tasks.aws.ec2 import describe_servers
from tasks.postgres.copy import SourceUnavailable, describe_source_database
from tasks.postgres.migrations import list_source_migrations
from tasks.ssh.app import list_code_migrations, showmigrations_command
from tasks.ssh.pgbouncer import get_pgbouncer_state, left_paused_by_fabflows


class ReloadProductionDbParams(BaseModel):
    """The flow's own options (the common ones are the engine's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_environment: str | None = Field(
        default=None, description="Environment to copy from (default: config's, production)."
    )
    source_deployment: str | None = Field(
        default=None, description="Deployment of the source (default: the target's)."
    )
    probe: bool = Field(default=False, description="Poll the site every 100 ms during the run.")
    config_file: str | None = Field(
        default=None, description="The config file (for static_html paths relative to it)."
    )


class Gathered(BaseModel):
    """Everything the pure plan needs (facts, the resolved request, settings, recovery)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    facts: ReloadFacts
    request: ReloadRequest
    settings: ReloadProductionDbSettings
    recovery: RecoveryPlan
    code_root: str


class ReloadProductionDb(Runbook[ReloadProductionDbParams, Gathered, ReloadPlan]):
    name = FLOW_NAME
    Params = ReloadProductionDbParams
    plan_type = ReloadPlan
    may_take_site_down = True

    def _source(self, rc: RunContext, params: ReloadProductionDbParams) -> RunContext:
        try:
            return source_context(
                rc, params.source_environment, params.source_deployment, params.config_file
            )
        except ConfigError as exc:
            raise BadInput(str(exc)) from None

    def validate(self, rc: RunContext, params: ReloadProductionDbParams) -> None:
        check_request(rc.env, self._source(rc, params).env)

    def gather(self, scope: Scope, params: ReloadProductionDbParams) -> Gathered:
        rc, pool = scope.rc, scope.pool
        env = rc.env
        src = self._source(rc, params)
        settings = settings_of(rc)
        target, target_db, web, workers, app, upgrade = gather_target_state(rc, pool)
        src_servers = describe_servers(
            src.creds, src.env.deployment, src.env.environment, roles=["db-primary"]
        )
        source = _db_server(src_servers, src.env)
        if (source.address, source.port) == (target.address, target.port):
            raise BadInput(
                f"{src.env.label} and {env.label} use the same database server {target.name}"
            )
        password = source_password(src, settings, pool, source)
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
        load_upgrade_pages(rc.config, params.config_file)  # a bad page fails now, not in the window
        code_root = code_root_of(rc)
        code_migrations = source_migrations = None
        pgbouncer = get_pgbouncer_state(
            web + workers, pool, env.home, env.environment, env.database_name
        )
        if settings.swap == "auto":  # what decides between the pgbouncer pause and the page
            show = showmigrations_command(settings.migrate_command)
            if show is not None and workers:
                code_migrations = list_code_migrations(workers[0], pool, show, code_root)
            source_migrations = list_source_migrations(
                pool, target, source, src.env.database_name, src.env.database_user, password
            )
        recovery = recovery_for(rc, target_db, app, upgrade, scope.run_id)
        left_paused = left_paused_by_fabflows(pgbouncer)
        if left_paused:  # a dead run's pause (its auto-resume still pending): RESUME first
            recovery = recovery.model_copy(update={"resume_pgbouncer": left_paused})
        facts = ReloadFacts(
            target=target,
            source=source,
            target_db=target_db,
            source_db=source_db,
            web=web,
            workers=workers,
            app=app,
            upgrade=upgrade,
            code_migrations=code_migrations,
            source_migrations=source_migrations,
            pgbouncer=pgbouncer,
        )
        request = ReloadRequest(
            environment=env.environment,
            deployment=env.deployment,
            source_environment=src.env.environment,
            source_deployment=src.env.deployment,
        )
        return Gathered(
            facts=facts,
            request=request,
            settings=settings,
            recovery=recovery,
            code_root=code_root,
        )

    def plan(
        self, facts: Gathered, params: ReloadProductionDbParams, env: EnvironmentConfig
    ) -> ReloadPlan:
        return plan_reload_production_db(
            facts.request, env, facts.facts, facts.settings, facts.recovery, facts.code_root
        )

    def steps(self, plan: ReloadPlan, params: ReloadProductionDbParams) -> list[Step]:
        return ReloadSteps(
            plan,
            source_environment=params.source_environment,
            source_deployment=params.source_deployment,
            config_file=params.config_file,
            probe=params.probe,
        ).steps()

    def verify(self, scope: Scope, plan: ReloadPlan, params: ReloadProductionDbParams) -> list[str]:
        probe = getattr(scope, "probe", None)
        if probe is not None:
            scope.probe = None  # type: ignore[attr-defined]
            summary = probe.stop()
            scope.details["Probe"] = summary.describe()
            scope.details["probe_non_200"] = summary.non_200
            scope.details["probe_downtime_seconds"] = summary.total_downtime_s
            scope.details["probe_longest_request_seconds"] = summary.latency_max_s
        scope.details["swap_path"] = plan.swap_path
        return []


RUNBOOK = ReloadProductionDb()


@flow(name=FLOW_NAME, log_prints=False)
def reload_production_db(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    source_environment: str | None = None,
    source_deployment: str | None = None,
    probe: bool = False,
    window_override_reason: str | None = None,
) -> RunbookReport:
    """Replace a staging (or testing) database with a copy of production, with seconds of downtime
    at most (none when pgbouncer can hold the app's requests during the swap).

    **What it does.** Copies the source database (production by default) into a *side* database
    on the target's db-primary while the target stays up: a plain `pg_dump | psql` stream
    (stopping at the first error) runs on the target server, reading the source over the network,
    so the data never passes through the machine running the flow (no password on any command
    line). Optional masking SQL from config runs on the copy and is checked. The row counts of the
    largest tables must equal the counts in the dump's own snapshot. Then a short window, one of two:

    - **pgbouncer pause** (no error page): every app server's pgbouncer PAUSEs the database (running
      transactions end, new queries wait, nothing is refused), the side database is swapped in by
      rename (one transaction), pgbouncer RESUMEs and the held requests go on, on the new database;
      then the migrations run (nothing is pending: they confirm the copy) with the site up.
    - **upgrade page**: upgrade mode (the web group's processes suspended and recorded, the 503
      page and health-check override on every web server), the app stopped, the swap, migrations
      on the first worker, the app started, upgrade mode off.

    **Which window, decided in the plan (and said there, with why):** the pause only when
    `fabflows.reload_production_db.swap` is `auto` (the default) and all of: the code's
    migrations are known (`manage.py showmigrations --plan` on the first worker, derived from
    `migrate_command`) and so are the source's (its `django_migrations`, read over the copy's
    path); the copy will have every migration the code has (none pending: the running code works on
    it as it is; migrations the copy has and the code does not know are reported, but the page
    would not undo them either, so they do not decide); every app server's
    pgbouncer has its admin console (`unix_socket_dir`, the `pgbouncer` user from pgbouncer's own
    UID, no password), transaction or statement pooling (in session pooling PAUSE waits for every
    client to disconnect), an alias for the live database, and is not paused already. Anything
    else, or anything unknown, takes the upgrade page. Just before pausing, the side database's
    migrations are checked to be the ones the plan decided on (else the run stops, nothing paused).
    A pause is bounded: PAUSE must complete within `pause_wait_seconds` (else RESUME at once and
    the run fails before the swap), and each pgbouncer RESUMEs by itself `pause_hold_seconds` after
    its PAUSE whatever happens to the run. The previous database is dropped only after all that
    succeeded (or the last N are kept: `fabflows.reload_production_db.keep_previous`).

    **Steps** (each journaled, named in the plan): recover (only when a dead run left something),
    create-side, copy, verify-copy, mask (when configured), analyze, then either pgbouncer-pause,
    swap, pgbouncer-resume, migrate, or upgrade-mode-on, stop-app, swap, migrate, start-app,
    upgrade-mode-off; then verify, cleanup.

    **When to run:** whenever staging/testing needs fresh production data (the original's
    `fab staging reload_production_db`). It takes the site down for seconds, so it runs only in
    the environment's maintenance windows (or with `window_override_reason`); every step must fit
    what is left of the window (step durations from history).

    **Preconditions, checked before anything changes:** the target is not listed in
    `production_environments`; source ≠ target; the source database exists and the target server
    can read it; the target has room for a second copy (`room_factor` × the source's size). The
    plan is made again under the environment's lock and the run refuses if it changed.

    **Blast radius:** the target environment only. Under the pause its requests wait for the swap
    (about a second); behind the page its site shows the 503 page for the swap and the migrations
    (seconds plus migration time, whatever the database size). The source is only read (one
    snapshot).

    **Approval:** an environment marked `protected` in config pauses for approval of the plan
    (bound to its digest) before anything changes (staging and testing are not protected by
    default).

    **Dry run** (the default) reads everything for real (servers, databases, free space, the
    source over the path the copy will take, leftovers of dead runs) and publishes the plan.

    **Rolls back:** a failure undoes, newest first, what holds maintenance state: the swap (the
    previous database back while the migrations are not confirmed), pgbouncer RESUMEd, the app
    started again, upgrade mode off with exactly the recorded processes resumed, the copy killed
    and the side database dropped. A failed migration therefore leaves the old database live. Migrations that
    succeeded and dropped previous databases are never undone. The target serves its old
    database or the complete new one, never none. A killed run leaves its journal (beside the
    lock) and markers on the databases and app servers: `fabflows recover -e ENV`
    (recover-environment) undoes it (a pgbouncer left paused is RESUMEd: the pause is journaled
    before it starts), and the next reload repairs it first.

    Args:
        environment: Target environment (staging, testing); never a production environment.
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only read and publish the plan (default). Set false (CLI --apply) to reload.
        source_environment: Environment to copy from (default: reload_production_db.source_environment, production).
        source_deployment: Deployment of the source (default: the target's).
        probe: Poll the site every 100 ms for the whole run and report non-200 answers (sandbox, benchmarks).
        window_override_reason: Run outside the maintenance window, for this recorded reason.
    """
    args = dict(locals())
    args["config_file"] = config
    return execute(RUNBOOK, args)
