"""Replication read tasks against a real primary and a replica streaming from it (one pair for the
module), plus the pure lag rules."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from psycopg import sql

from fabflows.testing.pgreplica import DATABASE, ReplicatedPair, start_replicated_pair
from sandbox.replication import start_wal_receiver, stop_wal_receiver
from sandbox.seed_db import psql
from sandbox.testhosts import TestNetwork
from tasks.postgres.replication import (
    ReplicaReplication,
    describe_primary_replication,
    describe_replica_replication,
    replica_lag,
    replica_state,
)
from tasks.ssh.connection import ConnectionPool, SshOptions

pytestmark = pytest.mark.hosts


@pytest.mark.parametrize(
    ("in_recovery", "lag", "pending", "age", "expected"),
    [
        (False, None, None, None, (None, None)),
        (True, 0, 0, 120.0, (0, 0.0)),  # caught up: an old last transaction is not lag
        (True, -40, 0, 5.0, (0, 0.0)),  # the primary moved on after it was read
        (True, 8192, 8192, 2.5, (8192, 2.5)),
        (True, 8192, 0, None, (8192, None)),  # nothing replayed since start
        (True, None, 0, 99.0, (None, 0.0)),  # primary unknown, nothing pending
        (True, None, 100, 3.0, (None, 3.0)),
    ],
)
def test_replica_lag(in_recovery, lag, pending, age, expected) -> None:
    got = replica_lag(
        in_recovery=in_recovery, lag_bytes=lag, pending_bytes=pending, replay_age_seconds=age
    )
    assert got == expected


def test_replica_state() -> None:
    assert replica_state(False, None) == "not a replica"
    assert replica_state(True, "streaming") == "streaming"
    assert replica_state(True, "waiting") == "not streaming"
    assert replica_state(True, None) == "not streaming"


@pytest.fixture(scope="module")
def pair(test_network: TestNetwork) -> Iterator[ReplicatedPair]:
    made = start_replicated_pair(test_network, ("rtpri", "rtrep"))
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


def _write(pair: ReplicatedPair, value: int) -> None:
    psql(
        pair.primary,
        sql.SQL(
            # the test hosts commit asynchronously: flushed at commit, the write is in the
            # primary's current LSN (and sendable) as soon as psql returns
            "SET synchronous_commit = on;\n"
            "CREATE TABLE IF NOT EXISTS repl_probe (id int PRIMARY KEY);\n"
            "INSERT INTO repl_probe VALUES ({});\n"
        )
        .format(value)
        .as_string(None),
        database=DATABASE,
    )


def _on_replica(pair: ReplicatedPair, value: int) -> bool:
    out = psql(
        pair.replica,
        "SELECT count(*) FROM pg_class WHERE relname = 'repl_probe';",
        database=DATABASE,
    ).strip()
    if out != "1":
        return False
    found = psql(
        pair.replica,
        sql.SQL("SELECT count(*) FROM repl_probe WHERE id = {};").format(value).as_string(None),
        database=DATABASE,
    )
    return found.strip() == "1"


def _replica(pool: ConnectionPool, pair: ReplicatedPair) -> ReplicaReplication:
    primary = describe_primary_replication.fn(pool, pair.primary_server)
    return describe_replica_replication.fn(pool, pair.replica_server, primary.current_lsn)


def _until(pred, timeout: float = 20.0, what: str = ""):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_primary_sees_its_replica_streaming_through_its_slot(pool, pair) -> None:
    facts = describe_primary_replication.fn(pool, pair.primary_server)
    assert not facts.in_recovery and facts.current_lsn
    (sender,) = facts.senders
    assert sender.client_addr == pair.replica.ip
    assert sender.state == "streaming"
    assert sender.slot_name == pair.slot
    (slot,) = facts.slots
    assert slot.slot_name == pair.slot and slot.active and slot.wal_status == "reserved"
    assert slot.retained_bytes is not None and slot.retained_bytes >= 0


def test_write_on_primary_is_seen_on_replica_and_lag_goes_to_zero(pool, pair) -> None:
    # replay paused: the write is received but not applied, and the lag shows it
    psql(pair.replica, "SELECT pg_wal_replay_pause();")
    try:
        _write(pair, 1)
        behind = _until(lambda: (r := _replica(pool, pair)).lag_bytes and r, what="a lag in bytes")
        assert behind.state == "streaming" and behind.replay_paused
        assert behind.lag_bytes > 0
        assert not _on_replica(pair, 1)
    finally:
        psql(pair.replica, "SELECT pg_wal_replay_resume();")
    _until(lambda: _on_replica(pair, 1), what="the row on the replica")
    caught_up = _until(
        lambda: (r := _replica(pool, pair)).lag_bytes == 0 and r, what="lag to reach 0"
    )
    assert caught_up.state == "streaming"
    assert caught_up.lag_seconds == 0.0
    assert caught_up.in_recovery and not caught_up.replay_paused
    assert caught_up.receiver is not None
    assert caught_up.receiver.sender_host == pair.primary.ip
    assert caught_up.receiver.slot_name == pair.slot
    assert caught_up.last_replay_time is not None


def test_stopped_wal_receiver_reports_not_streaming(pool, pair) -> None:
    saved = stop_wal_receiver(pair.replica)
    try:
        _write(pair, 2)
        r = _replica(pool, pair)
        assert r.state == "not streaming" and r.receiver is None
        assert r.lag_bytes and r.lag_bytes > 0
        assert r.lag_seconds is not None and r.lag_seconds > 0
        primary = describe_primary_replication.fn(pool, pair.primary_server)
        assert primary.streaming == []
        (slot,) = primary.slots
        assert not slot.active  # the slot keeps the WAL the replica needs
    finally:
        start_wal_receiver(pair.replica, saved)
    _until(lambda: _on_replica(pair, 2), what="the row written while stopped")
    again = _until(lambda: (r := _replica(pool, pair)).lag_bytes == 0 and r, what="lag 0 again")
    assert again.state == "streaming"


def test_primary_is_not_a_replica(pool, pair) -> None:
    primary = describe_primary_replication.fn(pool, pair.primary_server)
    r = describe_replica_replication.fn(pool, pair.primary_server, primary.current_lsn)
    assert r.state == "not a replica" and not r.in_recovery
    assert r.lag_bytes is None and r.lag_seconds is None
    # and a replica described as a primary says it is in recovery
    assert describe_primary_replication.fn(pool, pair.replica_server).in_recovery
