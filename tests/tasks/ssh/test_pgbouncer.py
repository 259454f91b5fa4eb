"""pgbouncer's admin console on a real app server (the sandbox's provisioning): PAUSE, RESUME and
the host-side auto-resume that bounds a pause."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prefect.logging import disable_run_logger

from sandbox.provision import provision_app
from sandbox.testhosts import HostSpec
from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import FleetHost
from tasks.ssh.pgbouncer import get_pgbouncer_state, pause_pgbouncer, resume_pgbouncer

pytestmark = pytest.mark.hosts

HOME = "/home/deploy"
DB = "myproject_staging"


@pytest.fixture(scope="module")
def worker(test_network) -> Iterator[tuple[list[FleetHost], ConnectionPool]]:
    """One worker provisioned as the sandbox does (no database behind its pgbouncer: PAUSE with no
    server connection completes at once; the console does not need one)."""
    taken = {h.ip for h in test_network.hosts.values()}
    ip = next(
        f"{test_network.subnet}.{n}"
        for n in range(120, 150)
        if f"{test_network.subnet}.{n}" not in taken
    )
    (host,) = test_network.start([HostSpec("pgbwk", ip, "app")])
    try:
        provision_app(
            host,
            role="worker",
            environment="staging",
            db_host="127.0.0.2",
            db_name=DB,
            db_user="dbuser",
            db_password="pw 'x\"",
            wait=0,
        )
        opts = SshOptions(
            user="deploy",
            known_hosts_file=str(test_network.known_hosts),
            key_file=str(test_network.client_key),
        )
        with ConnectionPool(opts) as pool:
            yield [FleetHost(name="pgbwk", address=host.ip, role="worker")], pool
    finally:
        test_network.destroy("pgbwk")


def _state(hosts, pool):  # noqa: ANN001, ANN202
    (state,) = get_pgbouncer_state.fn(hosts, pool, HOME, "staging", DB)
    return state


def test_pause_resume_rhythm(worker) -> None:
    hosts, pool = worker
    with disable_run_logger():
        state = _state(hosts, pool)
        assert state.console and state.aliases == [DB] and not state.pause_blockers(), state
        dry = pause_pgbouncer.fn(hosts, pool, HOME, "staging", DB, dry_run=True)
        assert dry.ok and "would pause" in dry.results[0].message
        assert _state(hosts, pool).paused == []
        paused = pause_pgbouncer.fn(hosts, pool, HOME, "staging", DB, dry_run=False, hold=60)
        assert paused.ok and "paused" in paused.results[0].message, paused.summary()
        state = _state(hosts, pool)
        assert state.paused == [DB] and state.auto_resume == [DB]
        assert state.pause_blockers() == [f"pgbwk: pgbouncer already paused ({DB})"]
        # a second pause is refused (it would take over someone's pause), nothing changes
        again = pause_pgbouncer.fn(hosts, pool, HOME, "staging", DB, dry_run=False)
        assert not again.ok and "already paused" in again.results[0].message
        dry = resume_pgbouncer.fn(hosts, pool, HOME, "staging", DB, dry_run=True)
        assert dry.results[0].status == "changed" and _state(hosts, pool).paused == [DB]
        resumed = resume_pgbouncer.fn(hosts, pool, HOME, "staging", DB, dry_run=False)
        assert resumed.results[0].status == "changed", resumed.summary()
        state = _state(hosts, pool)
        assert state.paused == [] and state.auto_resume == []  # the auto-resume cancelled
        for dry_run in (True, False):
            noop = resume_pgbouncer.fn(hosts, pool, HOME, "staging", DB, dry_run=dry_run)
            assert noop.results[0].status == "unchanged", noop.summary()


def test_a_pause_ends_by_itself_after_hold(worker) -> None:
    """The run that paused is gone (nothing resumes it): the server's auto-resume does."""
    hosts, pool = worker
    with disable_run_logger():
        paused = pause_pgbouncer.fn(hosts, pool, HOME, "staging", DB, dry_run=False, wait=1, hold=2)
        assert paused.ok and _state(hosts, pool).paused == [DB]
        deadline = time.monotonic() + 10
        while _state(hosts, pool).paused and time.monotonic() < deadline:
            time.sleep(0.2)
        state = _state(hosts, pool)
        assert state.paused == [] and state.auto_resume == [], state
