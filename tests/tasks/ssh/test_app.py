"""The app's supervisor groups and migrations on real web/worker hosts (the Django app)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prefect.logging import disable_run_logger

from sandbox.provision import provision_environment_app
from sandbox.seed_db import seed_database
from sandbox.testhosts import HostSpec
from tasks.ssh.app import (
    AppStopRecord,
    MigrationFailed,
    get_app_state,
    marker_path,
    run_migrations,
    start_app,
    stop_app,
)
from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import FleetHost

pytestmark = pytest.mark.hosts

HOME = "/home/deploy"
STOP = {"web": ["staging-web"], "worker": ["staging-celery"]}
RUN = {
    "web": ["staging-web", "staging-pgbouncer"],
    "worker": ["staging-celery", "staging-pgbouncer"],
}
RECORD = AppStopRecord(run="r1", flow="reload-production-db", groups=[], since="now")


@pytest.fixture(scope="module")
def app(test_network) -> Iterator[tuple[list[FleetHost], dict, ConnectionPool]]:
    taken = {h.ip for h in test_network.hosts.values()}
    free = [
        f"{test_network.subnet}.{n}"
        for n in range(60, 120)
        if f"{test_network.subnet}.{n}" not in taken
    ]
    names = ("appdb", "appweb", "appwk")
    db, web, wk = test_network.start(
        [
            HostSpec(names[0], free[0], "db"),
            HostSpec(names[1], free[1], "app"),
            HostSpec(names[2], free[2], "app"),
        ]
    )
    try:
        seed_database(db, "myproject_staging", "dbuser", "pw", scale=50)
        provision_environment_app(
            db,
            [web],
            [wk],
            environment="staging",
            db_name="myproject_staging",
            db_user="dbuser",
            db_password="pw",
        )
        opts = SshOptions(
            user="deploy",
            known_hosts_file=str(test_network.known_hosts),
            key_file=str(test_network.client_key),
        )
        hosts = [
            FleetHost(name="appweb", address=web.ip, role="web"),
            FleetHost(name="appwk", address=wk.ip, role="worker"),
        ]
        with ConnectionPool(opts) as pool:
            yield hosts, {"web": web, "worker": wk}, pool
    finally:
        for n in names:
            if n in test_network.hosts:
                test_network.destroy(n)


def _states(hosts, pool) -> dict[str, str]:
    return {
        p.name: p.state
        for h in get_app_state.fn(hosts, pool, HOME)
        for p in h.programs
        if p.name != "nginx"
    }


def test_stop_then_start_with_marker(app) -> None:
    hosts, by_role, pool = app
    with disable_run_logger():
        deadline = time.monotonic() + 20  # supervisor's startsecs after provisioning
        while set(_states(hosts, pool).values()) != {"RUNNING"} and time.monotonic() < deadline:
            time.sleep(0.3)
        assert set(_states(hosts, pool).values()) == {"RUNNING"}
        dry = stop_app.fn(hosts, pool, STOP, HOME, RECORD, dry_run=True)
        assert [r.label for r in dry.results] == ["would change", "would change"]
        assert set(_states(hosts, pool).values()) == {"RUNNING"}
        stopped = stop_app.fn(hosts, pool, STOP, HOME, RECORD, dry_run=False)
        stopped.raise_for_errors()
        states = _states(hosts, pool)
        assert states["staging-web:staging-server"] == "STOPPED"
        assert states["staging-celery:staging-celery-main"] == "STOPPED"
        assert states["staging-pgbouncer"] == "RUNNING"  # pgbouncer stays up
        markers = {h.host: h.marker for h in get_app_state.fn(hosts, pool, HOME)}
        assert markers["appweb"].groups == ["staging-web"] and markers["appweb"].run == "r1"
        # the compensation: started again, marker gone; a second start changes nothing
        started = start_app.fn(hosts, pool, RUN, HOME, dry_run=False)
        started.raise_for_errors()
        assert set(_states(hosts, pool).values()) == {"RUNNING"}
        assert all(h.marker is None for h in get_app_state.fn(hosts, pool, HOME))
        again = start_app.fn(hosts, pool, RUN, HOME, dry_run=False)
        assert [r.status for r in again.results] == ["unchanged", "unchanged"]


def test_start_fails_on_a_missing_group(app) -> None:
    hosts, _, pool = app
    with disable_run_logger():
        result = start_app.fn(hosts[:1], pool, {"web": ["staging-nope"]}, HOME, dry_run=False)
    assert result.results[0].status == "failed" and "staging-nope" in result.results[0].message


def test_run_migrations(app) -> None:
    hosts, by_role, pool = app
    worker = hosts[1]
    code = f"{HOME}/www/staging/code_root"
    with disable_run_logger():
        ok = run_migrations.fn(
            worker, pool, ["python3", "manage.py", "migrate", "--noinput"], code, dry_run=False
        )
        assert ok.ok and "No migrations to apply" in ok.output
        with pytest.raises(MigrationFailed, match="0099"):
            run_migrations.fn(
                worker,
                pool,
                ["python3", "manage.py", "migrate", "shop", "0099"],
                code,
                dry_run=False,
            )
        dry = run_migrations.fn(worker, pool, ["false"], code, dry_run=True)
        assert dry.dry_run and dry.ok
    assert by_role["worker"].exec(["test", "-e", marker_path(HOME)], check=False).returncode == 1
