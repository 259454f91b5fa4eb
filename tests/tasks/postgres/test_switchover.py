"""The switchover's tasks against a real primary and a replica streaming from it: checkpoint,
clean stop with its final LSN, promotion once replayed (refused while not replayed, a no-op when
promoted already), and the old primary rejoining as a standby of the new one."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from fabflows.testing.pgreplica import DATABASE, ReplicatedPair, start_replicated_pair
from sandbox.seed_db import psql
from sandbox.testhosts import TestNetwork
from tasks.postgres.failover import allow_replication, describe_standby, slot_for
from tasks.postgres.replica_setup import install_replication_password
from tasks.postgres.switchover import (
    checkpoint,
    describe_shutdown,
    promote_once_replayed,
    rejoin_as_standby,
    stop_primary_cleanly,
)
from tasks.ssh.connection import ConnectionPool, SshOptions

pytestmark = pytest.mark.hosts


@pytest.fixture(scope="module")
def pair(test_network: TestNetwork) -> Iterator[ReplicatedPair]:
    made = start_replicated_pair(test_network, ("swpri", "swrep"))
    try:
        yield made
    finally:
        made.destroy(test_network)


@pytest.fixture(scope="module")
def pool(test_network: TestNetwork) -> Iterator[ConnectionPool]:
    opts = SshOptions(
        user="deploy",
        known_hosts_file=str(test_network.known_hosts),
        key_file=str(test_network.client_key),
        connect_timeout=5,
        command_timeout=60,
    )
    with ConnectionPool(opts) as p:
        yield p


def _count(host) -> int:  # noqa: ANN001
    return int(psql(host, "SELECT count(*) FROM sw_probe;", database=DATABASE))


def test_switchover_by_its_tasks(pool: ConnectionPool, pair: ReplicatedPair) -> None:
    old, new = pair.primary_server, pair.replica_server
    psql(
        pair.primary,
        "SET synchronous_commit = on; CREATE TABLE sw_probe (id int);"
        " INSERT INTO sw_probe SELECT generate_series(1, 500);",
        database=DATABASE,
    )
    assert checkpoint.fn(pool, old, dry_run=True).summary == "Would checkpoint swpri"
    assert checkpoint.fn(pool, old, dry_run=False).changed
    with pytest.raises(ValueError, match="unusable LSN"):
        promote_once_replayed.fn(pool, new, "0/1; DROP TABLE x", dry_run=False)
    dry = promote_once_replayed.fn(pool, new, "0/3000000", dry_run=True)
    assert dry.changed and dry.summary.startswith("Would promote swrep once replayed past")

    stop = stop_primary_cleanly.fn(pool, old, dry_run=False)
    assert stop.changed and stop.final_lsn
    assert describe_shutdown.fn(pool, old).clean
    # a final LSN the replica never reaches: refused after the wait, still a standby
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="swrep: ERROR:  not replayed past FF/0"):
        promote_once_replayed.fn(pool, new, "FF/0", dry_run=False, replay_seconds=0.5)
    assert time.monotonic() - started < 15
    assert describe_standby.fn(pool, new).in_recovery

    done = promote_once_replayed.fn(pool, new, stop.final_lsn, dry_run=False)
    assert done.changed and f"once replayed past {stop.final_lsn}" in done.summary
    assert not describe_standby.fn(pool, new).in_recovery
    assert _count(pair.replica) == 500  # every write of the old primary, now on the new one
    psql(pair.replica, "INSERT INTO sw_probe VALUES (501);", database=DATABASE)
    again = promote_once_replayed.fn(pool, new, stop.final_lsn, dry_run=False)
    assert not again.changed and again.summary == "swrep is already a primary"

    # the old primary follows the new one, from its clean stop, without a rebuild
    slot = slot_for(old.name)
    allow_replication.fn(pool, new, {slot: old.db_address}, dry_run=False)
    install_replication_password.fn(
        pool, new, old, home="/home/deploy", owner="deploy", dry_run=False
    )
    rejoined = rejoin_as_standby.fn(pool, old, new, slot, dry_run=False)
    assert rejoined.changed
    deadline = time.monotonic() + 30
    while _count(pair.primary) != 501:
        assert time.monotonic() < deadline, "the old primary does not replay the new one's writes"
        time.sleep(0.2)
    assert describe_standby.fn(pool, old).in_recovery
