"""reload-production-db end to end on a real stack (moto + test hosts + PostgreSQL + Django)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from psycopg import sql

from fabflows.errors import BadInput, Refused
from flows.reload_production_db import reload_production_db
from sandbox.seed_db import psql
from tasks.postgres.masking import MaskingFailed
from tasks.ssh.app import MigrationFailed
from tests.flows.reload_stack import (
    MIGRATE_PRODUCTION,
    PRE_SUSPENDED,
    UNMIGRATE_PRODUCTION,
    Stack,
    build_stack,
    destroy_stack,
)

pytestmark = [pytest.mark.hosts, pytest.mark.flow]


@pytest.fixture(scope="module")
def stack(moto_server, test_network, tmp_path_factory, prefect_server) -> Iterator[Stack]:
    moto_server.reset()
    s = build_stack(tmp_path_factory.mktemp("reload"), moto_server.endpoint, test_network)
    try:
        yield s
    finally:
        destroy_stack(s)


def _invariants(stack: Stack) -> None:
    assert stack.suspended() == PRE_SUSPENDED
    assert not [k for k in stack.asg_tags() if k.startswith("fabflows:")]
    r = stack.site()
    assert r.status_code == 200, r.text
    assert all(state == "RUNNING" for state in stack.programs().values()), stack.programs()
    dbs = stack.databases()
    assert stack.live in dbs and dbs[stack.live] == ""
    # no side database, nothing half-swapped; a previous database may be kept (a run that died after
    # its migrations keeps it until a run succeeds)
    leftovers = [n for n in dbs if n.startswith(stack.live + "__") and "__prev_" not in n]
    assert not leftovers, dbs
    assert all(dbs[n] == "" or '"state":"previous"' in dbs[n] for n in dbs if n != "postgres"), dbs


def test_dry_run_then_apply(stack: Stack) -> None:
    before = stack.count("db", stack.live)
    dry = reload_production_db(environment="staging", config=str(stack.config))
    assert dry.dry_run and dry.outcome.startswith("dry run") and "MB) -> " in dry.plan_text
    assert stack.count("db", stack.live) == before
    assert "reload" in stack.site().text or stack.site().status_code == 200
    # production lacks the code's shop.0002_sitenote (the home page reads its table): the page
    assert (
        "swap: behind the upgrade page: 1 migration(s) pending on the copy (shop.0002_sitenote)"
        in (dry.plan_text)
    ), dry.plan_text

    report = reload_production_db(
        environment="staging", config=str(stack.config), dry_run=False, probe=True
    )
    print(report.render_text())
    assert report.outcome.startswith("applied"), report.outcome
    assert stack.count("db", stack.live) == stack.count("proddb", stack.source)
    assert report.details["snapshot_counts"]["public.auth_user"] == stack.count(
        "proddb", stack.source
    )
    assert report.downtime_seconds is not None and report.downtime_seconds < 30
    assert report.details["probe_non_200"] > 0
    assert report.details["swap_path"] == "upgrade-page"
    assert [s.name for s in report.steps if s.site_down] == [
        "upgrade-mode-on",
        "stop-app",
        "swap",
        "migrate",
        "start-app",
    ]
    _invariants(stack)


# --------------------------------------------------------------------------- bad input


def _config_with(stack: Stack, tmp_path, **changes) -> str:
    import yaml

    data = yaml.safe_load(stack.config.read_text())
    for dotted, value in changes.items():
        node = data
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    path = tmp_path / "fabflows.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _generation(stack: Stack, value: int) -> None:
    """Mark the live staging database (a table production does not have)."""
    statement = sql.SQL(
        "SET ROLE dbuser; CREATE TABLE IF NOT EXISTS fabflows_generation (g int);"
        "DELETE FROM fabflows_generation; INSERT INTO fabflows_generation VALUES ({});"
    ).format(value)
    psql(stack.hosts["db"], statement.as_string(None), database=stack.live)


def _live_is(stack: Stack) -> str:
    """'old:<generation>' or 'new' (a complete copy of production), else fail."""
    has = psql(
        stack.hosts["db"],
        "SELECT count(*) FROM pg_tables WHERE tablename = 'fabflows_generation';",
        database=stack.live,
    ).strip()
    if has == "1":
        g = psql(stack.hosts["db"], "SELECT g FROM fabflows_generation;", database=stack.live)
        return f"old:{g.strip()}"
    for table in ("auth_user", "shop_order", "audit_event", "django_session"):
        assert stack.count("db", stack.live, table) == stack.count("proddb", stack.source, table)
    return "new"


@pytest.mark.parametrize(
    ("environment", "changes", "error", "match"),
    [
        ("production", {}, Refused, "production environment"),
        ("nosuchenv", {}, BadInput, "unknown environment 'nosuchenv'"),
        (
            "staging",
            {"fabflows.reload_production_db.source_environment": "staging"},
            BadInput,
            "source and target are both",
        ),
        (
            "staging",
            {"fabflows.environments.production.database_name": "myproject_gone"},
            BadInput,
            'database "myproject_gone" does not exist',
        ),
    ],
)
def test_bad_input_changes_nothing(
    stack: Stack, tmp_path, environment, changes, error, match
) -> None:
    _generation(stack, 7)
    config = _config_with(stack, tmp_path, **changes)
    with pytest.raises(error, match=match):
        reload_production_db(environment=environment, config=config, dry_run=False)
    assert _live_is(stack) == "old:7"
    _invariants(stack)


def test_failing_migration_puts_the_old_database_back(stack: Stack, tmp_path) -> None:
    _generation(stack, 11)
    config = _config_with(
        stack,
        tmp_path,
        **{
            "fabflows.reload_production_db.migrate_command": [
                "python3",
                "manage.py",
                "migrate",
                "shop",
                "0099",
            ]
        },
    )
    with pytest.raises(MigrationFailed, match="0099"):
        reload_production_db(environment="staging", config=config, dry_run=False)
    assert _live_is(stack) == "old:11"
    _invariants(stack)


def test_failing_masking_stops_before_the_window(stack: Stack, tmp_path) -> None:
    _generation(stack, 12)
    config = _config_with(
        stack,
        tmp_path,
        **{
            "fabflows.reload_production_db.masking": {
                "statements": ["UPDATE auth_user SET email = 'x'", "UPDATE nope SET x = 1"],
                "checks": [],
            }
        },
    )
    with pytest.raises(MaskingFailed, match='relation "nope" does not exist'):
        reload_production_db(environment="staging", config=config, dry_run=False)
    assert _live_is(stack) == "old:12"
    _invariants(stack)


def test_masking_applied_and_checked(stack: Stack, tmp_path) -> None:
    config = _config_with(
        stack,
        tmp_path,
        **{
            "fabflows.reload_production_db.masking": {
                "statements": [
                    "UPDATE auth_user SET email = 'user' || id || '@example.invalid'",
                    "DELETE FROM django_session",  # fewer rows than the snapshot: fine after the check
                ],
                "checks": [
                    "SELECT count(*) FROM auth_user WHERE email NOT LIKE '%@example.invalid'"
                ],
            },
            "fabflows.reload_production_db.keep_previous": 1,
        },
    )
    report = reload_production_db(environment="staging", config=config, dry_run=False)
    assert report.outcome.startswith("applied") and len(report.details["kept"]) == 1
    assert stack.count("db", stack.live, "django_session") == 0
    assert psql(
        stack.hosts["db"],
        "SELECT count(*) FROM auth_user WHERE email LIKE '%@example.invalid';",
        database=stack.live,
    ).strip() == str(stack.count("proddb", stack.source))
    # keep_previous=1 keeps exactly one previous database; drop it for the other tests
    kept = report.details["kept"][0]
    drop = sql.SQL("DROP DATABASE {} WITH (FORCE);").format(sql.Identifier(kept))
    psql(stack.hosts["db"], drop.as_string(None))
    _invariants(stack)


# --------------------------------------------------------------------------- the pgbouncer pause
# The stack's production lacks the app's migration shop.0002_sitenote (the home page reads its
# table), so test_dry_run_then_apply above takes the upgrade page. Here production gets it, so
# nothing is pending and the swap goes under pgbouncer PAUSE/RESUME.


@pytest.fixture
def production_migrated(stack: Stack) -> Iterator[None]:
    psql(stack.hosts["proddb"], MIGRATE_PRODUCTION, database=stack.source)
    try:
        yield
    finally:
        psql(stack.hosts["proddb"], UNMIGRATE_PRODUCTION, database=stack.source)


def _paused(stack: Stack) -> dict[str, bool]:
    """Each app server's pgbouncer: is the live database paused (read on its admin console)."""
    from tasks.ssh.pgbouncer import STATE_SCRIPT, parse_show_databases

    socket_dir = "/home/deploy/services/pgbouncer/socket"
    out = {}
    for name in ("web", "worker"):
        text = stack.hosts[name].exec(["sh", "-c", STATE_SCRIPT, "sh", socket_dir, "5432"]).stdout
        out[name] = parse_show_databases(text)[stack.live]
    return out


def test_swap_under_pgbouncer_pause_refuses_nothing(stack: Stack, production_migrated) -> None:
    """Nothing pending: the plan takes the pause, and a probe through the load balancer every
    100 ms sees only 200s while the copy goes live."""
    from fabflows.testing.elb_proxy import ElbProxy
    from tasks.http.probe import HttpProbe

    dry = reload_production_db(environment="staging", config=str(stack.config))
    assert "swap: under pgbouncer PAUSE/RESUME" in dry.plan_text, dry.plan_text
    proxy = ElbProxy(
        stack.endpoint, "myproject-staging-lb", timeout=60
    ).start()  # an ELB idles 60 s
    try:
        # held requests wait (the probe waits up to 10 s, as a browser would, instead of its
        # usual 2 s): a slow answer is a held request, a non-200 one a refused request
        probe = HttpProbe(proxy.url + "/", request_timeout=10).start()
        report = reload_production_db(
            environment="staging", config=str(stack.config), dry_run=False
        )
        summary = probe.stop()
    finally:
        proxy.stop()
    print(report.render_text(), summary.describe(), sep="\n")
    assert report.outcome.startswith("applied"), report.outcome
    assert report.details["swap_path"] == "pause"
    assert [s.name for s in report.steps if s.site_down] == [
        "pgbouncer-pause",
        "swap",
        "pgbouncer-resume",
    ]
    assert summary.samples > 20 and summary.non_200 == 0, summary.describe()
    assert _paused(stack) == {"web": False, "worker": False}
    assert stack.count("db", stack.live) == stack.count("proddb", stack.source)
    _invariants(stack)


def test_sigkill_while_paused_then_recover_resumes(
    stack: Stack, production_migrated, tmp_path
) -> None:
    """Killed with every pgbouncer paused (before the swap): recover-environment RESUMEs them from
    the dead run's journal (well before their own auto-resume), and the old database stays."""
    from fabflows.testing.faults import run_until_paused
    from flows.recover_environment import recover_environment

    _generation(stack, 21)
    config = _config_with(
        stack, tmp_path, **{"fabflows.reload_production_db.pause_hold_seconds": 300}
    )
    run_until_paused(
        "reload-production-db",
        "swap",
        ["-e", "staging", "-c", config, "--apply"],
        tmp_path / "paused",
        env={"FABFLOWS_PROGRESS_BAR": "0"},
    )
    assert _paused(stack) == {"web": True, "worker": True}
    report = recover_environment(environment="staging", config=config, dry_run=False)
    assert not report.left and not report.problems, report.render_text()
    undone = [s.name for s in report.steps if s.state == "done"]
    assert any(n.endswith("-pgbouncer-pause") for n in undone), undone
    assert _paused(stack) == {"web": False, "worker": False}
    assert _live_is(stack) == "old:21"
    _invariants(stack)
