"""The pure parts of reload-production-db: request checks, the plan, recovery decisions."""

from __future__ import annotations

import pytest

from config import load_config, resolve_environment
from config.models import ReloadProductionDbSettings
from fabflows.errors import BadInput, Refused
from fabflows.procedures.reload_plan import (
    ReloadFacts,
    ReloadRequest,
    check_request,
    decide_swap,
    plan_reload_production_db,
    previous_to_drop,
)
from fabflows.procedures.reload_recovery import RecoveryPlan, plan_recovery
from fabflows.testing.configs import write_config
from fabflows.upgrade_mode import UpgradeStatus
from tasks.postgres.copy import SourceFacts
from tasks.postgres.databases import DatabaseInfo, DatabaseServerFacts
from tasks.postgres.names import Marker, now_text
from tasks.postgres.server import DbServer
from tasks.ssh.app import (
    AppStopRecord,
    HostAppState,
    parse_showmigrations,
    showmigrations_command,
)
from tasks.ssh.fleet import FleetHost
from tasks.ssh.pgbouncer import PgbouncerConfig, PgbouncerState, parse_ini, parse_show_databases

LIVE = "myproject_staging"


@pytest.fixture
def envs(tmp_path):
    cfg = load_config(
        write_config(tmp_path, fabflows={"environments": {"testing": {"database_name": "x" * 50}}})
    )
    return {e: resolve_environment(cfg, e) for e in ("staging", "production", "testing")}


def test_check_request(envs) -> None:
    check_request(envs["staging"], envs["production"])
    with pytest.raises(Refused, match="production environment"):
        check_request(envs["production"], envs["staging"])
    with pytest.raises(BadInput, match="both myproject/staging"):
        check_request(envs["staging"], envs["staging"])
    with pytest.raises(BadInput, match="63"):
        check_request(envs["testing"], envs["production"])


def _db(
    name: str, marker: Marker | None = None, allow: bool = True, size: int = 1000
) -> DatabaseInfo:
    return DatabaseInfo(
        name=name,
        size_bytes=size,
        allow_connections=allow,
        owner="dbuser",
        connections=0,
        comment=marker.to_comment() if marker else None,
    )


def _facts(*dbs: DatabaseInfo, free: int = 10**12) -> DatabaseServerFacts:
    return DatabaseServerFacts(
        server="db", version=150000, data_directory="/d", free_bytes=free, databases=list(dbs)
    )


def _marker(state: str, run: str = "dead", **kw) -> Marker:
    return Marker(run=run, live=LIVE, state=state, since=now_text(), **kw)


def _app(host: str, flow: str | None) -> HostAppState:
    marker = (
        AppStopRecord(run="dead", flow=flow, groups=["staging-web"], since="") if flow else None
    )
    return HostAppState(host=host, address="10.0.0.1", role="web", marker=marker)


PREV = f"{LIVE}__prev_20260101000000"
OLDER = f"{LIVE}__prev_20250101000000"


@pytest.mark.parametrize(
    ("dbs", "app", "holder", "expected"),
    [
        ([_db(LIVE)], [_app("web1", None)], None, RecoveryPlan()),
        ([_db(LIVE), _db(PREV, _marker("previous"))], [], None, RecoveryPlan()),
        (
            [_db(LIVE), _db(f"{LIVE}__reload", _marker("side"))],
            [],
            None,
            RecoveryPlan(stop_copies=[f"{LIVE}__reload"], drop=[f"{LIVE}__reload"]),
        ),
        (
            [_db(LIVE), _db(f"{LIVE}__reload")],
            [],
            None,  # killed between CREATE and COMMENT
            RecoveryPlan(stop_copies=[f"{LIVE}__reload"], drop=[f"{LIVE}__reload"]),
        ),
        (
            [_db(LIVE, _marker("swapped", previous=PREV)), _db(PREV)],
            [_app("web1", "reload-production-db")],
            ("dead", "reload-production-db"),
            RecoveryPlan(swap_back=PREV, start_app=["web1"], end_upgrade_mode="dead"),
        ),
        (
            [_db(LIVE, _marker("migrated", previous=PREV)), _db(PREV)],
            [],
            None,
            RecoveryPlan(clear_marker=True),
        ),
        ([_db(LIVE, allow=False)], [], None, RecoveryPlan(allow_connections=True)),
        (
            [_db(PREV), _db(OLDER)],
            [],
            None,
            RecoveryPlan(swap_back=PREV, notes=[f"the live database {LIVE} is missing"]),
        ),
        ([_db(LIVE)], [_app("web1", "upgrade-packages")], ("x", "begin-upgrade"), RecoveryPlan()),
        # this run's own marker is not a dead run's leftover
        (
            [_db(LIVE, _marker("swapped", run="me", previous=PREV)), _db(PREV)],
            [],
            ("me", "reload-production-db"),
            RecoveryPlan(),
        ),
    ],
)
def test_plan_recovery(dbs, app, holder, expected) -> None:
    plan = plan_recovery(LIVE, _facts(*dbs), app, holder, run="me")
    assert plan == expected
    assert plan.needed == (expected != RecoveryPlan())


def test_previous_to_drop() -> None:
    names = [LIVE, PREV, OLDER, "other__prev_20240101000000"]
    new = f"{LIVE}__prev_20270101000000"
    assert previous_to_drop([*names, new], LIVE, 0, new) == [new, PREV, OLDER]
    assert previous_to_drop([*names, new], LIVE, 1, new) == [PREV, OLDER]
    assert previous_to_drop(names, LIVE, 3, new) == []


def _reload_facts(workers: int = 1, free: int = 10**12, source_bytes: int = 10**9) -> ReloadFacts:
    server = DbServer(name="db", address="10.0.0.2", db_address="10.0.0.2")
    return ReloadFacts(
        target=server,
        source=server.model_copy(
            update={"name": "proddb", "address": "10.0.0.3", "db_address": "10.0.0.3"}
        ),
        target_db=_facts(_db(LIVE), free=free),
        source_db=SourceFacts.model_validate(
            {
                "database": "myproject_production",
                "size_bytes": source_bytes,
                "version": 150000,
                "tables": [
                    {"schema": "public", "name": f"t{i}", "bytes": 10 - i, "estimated_rows": 1}
                    for i in range(8)
                ],
            }
        ),
        web=[FleetHost(name="web1", address="10.0.0.4", role="web")],
        workers=[
            FleetHost(name=f"w{i}", address=f"10.0.1.{i}", role="worker") for i in range(workers)
        ],
        app=[],
        upgrade=UpgradeStatus(
            environment="myproject/staging",
            checked_at="2026-01-01T00:00:00Z",
            auto_scaling_group=None,
            suspended_processes=[],
            recorded=None,
            hosts=[],
        ),
    )


PARAMS = ReloadRequest(
    environment="staging",
    deployment="myproject",
    source_environment="production",
    source_deployment="myproject",
)


def test_plan(envs) -> None:
    settings = ReloadProductionDbSettings(
        masking={"statements": ["UPDATE auth_user SET email = ''"], "checks": []}
    )
    plan = plan_reload_production_db(
        PARAMS, envs["staging"], _reload_facts(), settings, RecoveryPlan(), "/code"
    )
    steps = [c.step for c in plan.changes]
    assert steps == [
        "create-side",
        "copy",
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
    ]
    assert [c.step for c in plan.changes if c.downtime] == [
        "upgrade-mode-on",
        "stop-app",
        "swap",
        "migrate",
        "start-app",
    ]
    assert plan.tables == ["public.t0", "public.t1", "public.t2", "public.t3", "public.t4"]
    assert plan.migrate_command == "cd /code && python3 manage.py migrate --noinput"
    assert (
        "pg_dump --format=plain" in plan.changes[1].action
        and "password" not in plan.render_markdown().lower()
    )


def test_plan_refusals(envs) -> None:
    settings = ReloadProductionDbSettings()
    with pytest.raises(BadInput, match="free"):
        plan_reload_production_db(
            PARAMS, envs["staging"], _reload_facts(free=10**9), settings, RecoveryPlan(), "/c"
        )
    # a dead run's side database counts as space that will be freed
    facts = _reload_facts(free=10**9)
    facts = facts.model_copy(
        update={"target_db": _facts(_db(LIVE), _db(f"{LIVE}__reload", size=10**9), free=10**9)}
    )
    plan_reload_production_db(
        PARAMS, envs["staging"], facts, settings, RecoveryPlan(drop=[f"{LIVE}__reload"]), "/c"
    )
    with pytest.raises(BadInput, match="no running worker"):
        plan_reload_production_db(
            PARAMS, envs["staging"], _reload_facts(workers=0), settings, RecoveryPlan(), "/c"
        )


def test_plan_refuses_unreachable_app_servers(envs) -> None:
    facts = _reload_facts().model_copy(
        update={
            "app": [
                HostAppState(
                    host="web1", address="10.0.0.4", role="web", error="unreachable: timed out"
                )
            ]
        }
    )
    with pytest.raises(BadInput, match="web1 .unreachable: timed out"):
        plan_reload_production_db(
            PARAMS, envs["staging"], facts, ReloadProductionDbSettings(), RecoveryPlan(), "/c"
        )


def test_plan_round_trips_through_the_journal(envs) -> None:
    """recover/resume rebuild the steps from the journaled plan: same plan, same steps."""
    from fabflows.procedures.reload_plan import ReloadPlan
    from flows.reload_production_db import RUNBOOK, ReloadProductionDbParams

    recovery = RecoveryPlan(drop=[f"{LIVE}__reload"], stop_copies=[f"{LIVE}__reload"])
    plan = plan_reload_production_db(
        PARAMS, envs["staging"], _reload_facts(), ReloadProductionDbSettings(), recovery, "/c"
    )
    again = ReloadPlan.model_validate(plan.model_dump(mode="json"))
    assert again == plan and again.digest() == plan.digest()
    params = ReloadProductionDbParams()
    names = [s.name for s in RUNBOOK.steps(again, params)]
    assert names == plan.step_names and names[0] == "recover" and "mask" not in names
    # data-changing steps are never undone automatically; the window's steps are
    steps = {s.name: s for s in RUNBOOK.steps(again, params)}
    assert not steps["migrate"].auto_undo and not steps["cleanup"].auto_undo
    assert all(
        steps[n].undo for n in ("create-side", "copy", "upgrade-mode-on", "stop-app", "swap")
    )
    # sizes that move between the plan and the apply do not make another plan
    bigger = _reload_facts(source_bytes=10**9 + 4096)
    moved = plan_reload_production_db(
        PARAMS, envs["staging"], bigger, ReloadProductionDbSettings(), recovery, "/c"
    )
    assert moved.digest() == plan.digest()


# --------------------------------------------------------------------------- pause or page

CODE = ["shop.0001_initial", "shop.0002_sitenote"]


def _pgbouncer(host: str = "web1", **changes) -> PgbouncerState:
    state = PgbouncerState(
        host=host,
        config=PgbouncerConfig(
            port=5432,
            socket_dir="/home/deploy/services/pgbouncer/socket",
            pool_mode="transaction",
            databases={LIVE: LIVE},
        ),
        aliases=[LIVE],
        console=True,
    )
    return state.model_copy(update=changes)


def _swap_facts(code=CODE, source=CODE, pgbouncer=None) -> ReloadFacts:  # noqa: ANN001
    pgbouncer = [_pgbouncer()] if pgbouncer is None else pgbouncer
    return _reload_facts().model_copy(
        update={"code_migrations": code, "source_migrations": source, "pgbouncer": pgbouncer}
    )


@pytest.mark.parametrize(
    ("facts", "settings", "path", "reason"),
    [
        (_swap_facts(), {}, "pause", "no migration pending: the copy has all 2"),
        (
            _swap_facts(source=[*CODE, "auth.0001_initial"]),
            {},
            "pause",
            "1 migration(s) the code does not know (auth.0001_initial)",
        ),
        (_swap_facts(), {"swap": "upgrade-page"}, "upgrade-page", "config says"),
        (
            _swap_facts(source=CODE[:1]),
            {},
            "upgrade-page",
            "1 migration(s) pending on the copy (shop.0002_sitenote)",
        ),
        (_swap_facts(code=None), {}, "upgrade-page", "the code's migrations are unknown"),
        (_swap_facts(source=None), {}, "upgrade-page", "has no django_migrations table"),
        (_swap_facts(pgbouncer=[]), {}, "upgrade-page", "no app server's pgbouncer was read"),
        (
            _swap_facts(pgbouncer=[_pgbouncer(), _pgbouncer("w0", console=False)]),
            {},
            "upgrade-page",
            "w0: pgbouncer's admin console did not answer",
        ),
        (
            _swap_facts(
                pgbouncer=[
                    _pgbouncer(
                        config=PgbouncerConfig(socket_dir="", databases={LIVE: LIVE}),
                        console=False,
                    )
                ]
            ),
            {},
            "upgrade-page",
            "pool_mode = session",
        ),
        (
            _swap_facts(pgbouncer=[_pgbouncer(paused=[LIVE])]),
            {},
            "upgrade-page",
            "already paused",
        ),
        (
            _swap_facts(pgbouncer=[_pgbouncer(aliases=[])]),
            {},
            "upgrade-page",
            "no pgbouncer database points at the live database",
        ),
        (
            _swap_facts(pgbouncer=[_pgbouncer(error="unreachable")]),
            {},
            "upgrade-page",
            "web1: unreachable",
        ),
    ],
)
def test_decide_swap(facts, settings, path, reason) -> None:  # noqa: ANN001
    decision = decide_swap(facts, ReloadProductionDbSettings(**settings))
    assert decision.path == path
    assert any(reason in r for r in decision.reasons), decision.reasons


def test_plan_under_pause(envs) -> None:
    plan = plan_reload_production_db(
        PARAMS, envs["staging"], _swap_facts(), ReloadProductionDbSettings(), RecoveryPlan(), "/c"
    )
    assert plan.swap_path == "pause" and plan.source_migrations == CODE
    assert plan.step_names == [
        "create-side",
        "copy",
        "verify-copy",
        "analyze",
        "pgbouncer-pause",
        "swap",
        "pgbouncer-resume",
        "migrate",
        "verify",
        "cleanup",
    ]
    assert not [c.step for c in plan.changes if c.downtime]
    assert [c.step for c in plan.changes if c.held] == [
        "pgbouncer-pause",
        "swap",
        "pgbouncer-resume",
    ]
    assert "swap: under pgbouncer PAUSE/RESUME" in plan.render_text()
    assert "under pgbouncer PAUSE/RESUME" in plan.render_markdown()
    from flows.reload_production_db import RUNBOOK, ReloadProductionDbParams

    steps = {s.name: s for s in RUNBOOK.steps(plan, ReloadProductionDbParams())}
    assert steps["pgbouncer-pause"].undo is not None and steps["pgbouncer-pause"].auto_undo
    assert [n for n, s in steps.items() if s.site_down] == [
        "pgbouncer-pause",
        "swap",
        "pgbouncer-resume",
    ]


def test_parse_pgbouncer_outputs() -> None:
    from sandbox.provision import PGBOUNCER_INI

    ini = PGBOUNCER_INI.format(
        db_name=LIVE,
        db_host="10.0.0.2",
        pgbouncer_port=6432,
        services="/home/deploy/services",
        env="staging",
    )
    config = parse_ini(ini)
    assert config == PgbouncerConfig(
        port=6432,
        socket_dir="/home/deploy/services/pgbouncer/socket",
        pool_mode="transaction",
        databases={LIVE: LIVE},
    )
    assert parse_ini("[databases]\nalias = host=x dbname=other\n").aliases_of("other") == ["alias"]
    shown = (
        "db name|host|port|database|force_user|pool_size|paused|disabled\n"
        f"db {LIVE}|10.0.0.2|5432|{LIVE}||20|1|0\n"
        "db pgbouncer||6432|pgbouncer|pgbouncer|2|0|0\n"
    )
    assert parse_show_databases(shown) == {LIVE: True, "pgbouncer": False}
    assert showmigrations_command(["python3", "manage.py", "migrate", "--noinput"]) == [
        "python3",
        "manage.py",
        "showmigrations",
        "--plan",
    ]
    assert showmigrations_command(["./deploy-migrate.sh"]) is None
    assert parse_showmigrations("[X]  shop.0001_initial\n[ ]  shop.0002_sitenote\nnoise\n") == CODE


def test_a_pause_left_by_a_dead_run_is_resumed_first(envs) -> None:
    from tasks.ssh.pgbouncer import left_paused_by_fabflows

    states = [
        _pgbouncer("web1", paused=[LIVE], auto_resume=[LIVE]),  # fabflows' own pause
        _pgbouncer("w0", paused=[LIVE]),  # someone else's: left alone
        _pgbouncer("w1", auto_resume=[LIVE]),  # auto-resume pending, not paused: nothing to do
    ]
    assert left_paused_by_fabflows(states) == ["web1"]
    recovery = RecoveryPlan(resume_pgbouncer=["web1"])
    assert recovery.needed and recovery.lines() == ["RESUME pgbouncer on web1 (left paused)"]
    plan = plan_reload_production_db(
        PARAMS, envs["staging"], _reload_facts(), ReloadProductionDbSettings(), recovery, "/c"
    )
    assert plan.step_names[0] == "recover" and "RESUME pgbouncer on web1" in plan.changes[0].action
