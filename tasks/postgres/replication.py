"""Streaming replication as the database servers see it (read tasks; no side effects).

- :func:`describe_primary_replication`: on a db-primary, its current WAL position, every WAL sender
  (``pg_stat_replication``: who streams, how far each replica has written, flushed and replayed)
  and every replication slot (``pg_replication_slots``: active or not, the WAL it holds back).
- :func:`describe_replica_replication`: on a db-replica, ``pg_is_in_recovery()``, its WAL receiver
  (``pg_stat_wal_receiver``), what it has received and replayed, and its **lag** behind the
  primary: in bytes, ``pg_wal_lsn_diff(<primary's current LSN>, pg_last_wal_replay_lsn())``, and in
  seconds, ``now() - pg_last_xact_replay_timestamp()`` (0 when it is caught up with no WAL pending).
  Read the primary first and pass its LSN: the replica's replay position is then read after it, so
  a replica that keeps up never shows a lag it does not have. The primary's LSN is
  ``pg_current_wal_lsn()``, the WAL written out: what can be sent to a replica (an asynchronous
  commit reaches it within ``wal_writer_delay``).

Each read is one ``psql`` on the server over SSH, as the ``postgres`` OS user (peer
authentication on the local socket, see :mod:`tasks.postgres.server`): no password is needed or
shown, and PostgreSQL needs no port open to the machine running the flow.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field

from tasks.postgres.server import DbServer, read_json, remote_for
from tasks.ssh.connection import ConnectionPool

ReplicaState = Literal["streaming", "not streaming", "not a replica"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WalSender(_Model):
    """One replica streaming from a primary (a row of ``pg_stat_replication``)."""

    pid: int
    application_name: str = ""
    client_addr: str | None = Field(default=None, description="The replica's address.")
    state: str = Field(description="startup, catchup, streaming, backup or stopping.")
    sync_state: str | None = None
    sent_lsn: str | None = None
    write_lsn: str | None = None
    flush_lsn: str | None = None
    replay_lsn: str | None = None
    replay_lag_seconds: float | None = Field(
        default=None, description="pg_stat_replication.replay_lag (None once caught up and idle)."
    )
    lag_bytes: int | None = Field(
        default=None, description="The primary's current LSN minus this replica's replay LSN."
    )
    slot_name: str | None = Field(default=None, description="The slot this sender uses, if any.")


class ReplicationSlot(_Model):
    """A replication slot on a primary (a row of ``pg_replication_slots``)."""

    slot_name: str
    slot_type: str
    active: bool
    restart_lsn: str | None = None
    wal_status: str | None = Field(
        default=None, description="reserved, extended, unreserved or lost."
    )
    retained_bytes: int | None = Field(
        default=None, description="WAL the slot holds back on the primary."
    )


class PrimaryReplication(_Model):
    """Replication seen from a db-primary."""

    server: str
    in_recovery: bool = Field(description="True if this server is itself a replica.")
    current_lsn: str | None = Field(
        default=None, description="pg_current_wal_lsn() (None when in recovery)."
    )
    senders: list[WalSender] = Field(default_factory=list)
    slots: list[ReplicationSlot] = Field(default_factory=list)

    @property
    def streaming(self) -> list[WalSender]:
        return [s for s in self.senders if s.state == "streaming"]


class WalReceiver(_Model):
    """A replica's WAL receiver (the row of ``pg_stat_wal_receiver``)."""

    status: str = Field(description="streaming, starting, waiting, restarting or stopping.")
    sender_host: str | None = None
    sender_port: int | None = None
    slot_name: str | None = None
    flushed_lsn: str | None = None
    latest_end_lsn: str | None = None
    last_msg_receipt_time: datetime | None = None


class ReplicaReplication(_Model):
    """Replication seen from a db-replica, with its lag behind the primary."""

    server: str
    in_recovery: bool = Field(description="pg_is_in_recovery().")
    state: ReplicaState
    receiver: WalReceiver | None = Field(
        default=None, description="None when no WAL receiver runs."
    )
    receive_lsn: str | None = Field(default=None, description="pg_last_wal_receive_lsn().")
    replay_lsn: str | None = Field(default=None, description="pg_last_wal_replay_lsn().")
    last_replay_time: datetime | None = Field(
        default=None, description="pg_last_xact_replay_timestamp()."
    )
    replay_paused: bool = False
    primary_lsn: str | None = Field(
        default=None, description="The primary's current LSN the lag is measured against."
    )
    lag_bytes: int | None = Field(
        default=None, description="Bytes of WAL not replayed yet (None: primary LSN unknown)."
    )
    lag_seconds: float | None = Field(
        default=None,
        description="now() - last replayed transaction's time; 0 when caught up with no WAL "
        "pending (None: unknown).",
    )


_PRIMARY = sql.SQL(
    """WITH cur AS (
    SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END AS lsn
)
SELECT json_build_object(
    'in_recovery', pg_is_in_recovery(),
    'current_lsn', (SELECT lsn FROM cur)::text,
    'senders', (
        SELECT coalesce(json_agg(json_build_object(
            'pid', r.pid,
            'application_name', r.application_name,
            'client_addr', host(r.client_addr),
            'state', r.state,
            'sync_state', r.sync_state,
            'sent_lsn', r.sent_lsn::text,
            'write_lsn', r.write_lsn::text,
            'flush_lsn', r.flush_lsn::text,
            'replay_lsn', r.replay_lsn::text,
            'replay_lag_seconds', extract(epoch FROM r.replay_lag),
            'lag_bytes', pg_wal_lsn_diff((SELECT lsn FROM cur), r.replay_lsn)::bigint,
            'slot_name', s.slot_name
        ) ORDER BY r.client_addr, r.pid), '[]'::json)
        FROM pg_stat_replication r LEFT JOIN pg_replication_slots s ON s.active_pid = r.pid
    ),
    'slots', (
        SELECT coalesce(json_agg(json_build_object(
            'slot_name', s.slot_name,
            'slot_type', s.slot_type,
            'active', s.active,
            'restart_lsn', s.restart_lsn::text,
            'wal_status', s.wal_status,
            'retained_bytes', pg_wal_lsn_diff((SELECT lsn FROM cur), s.restart_lsn)::bigint
        ) ORDER BY s.slot_name), '[]'::json)
        FROM pg_replication_slots s
    )
)"""
)


def replica_statement(primary_lsn: str | None) -> sql.Composed:
    """The replica's query, its lag measured against ``primary_lsn`` (pure)."""
    return sql.SQL(
        """SELECT json_build_object(
    'in_recovery', pg_is_in_recovery(),
    'receiver', (SELECT row_to_json(w) FROM (
        SELECT status, sender_host, sender_port, slot_name, flushed_lsn::text AS flushed_lsn,
               latest_end_lsn::text AS latest_end_lsn, last_msg_receipt_time
        FROM pg_stat_wal_receiver) w),
    'receive_lsn', pg_last_wal_receive_lsn()::text,
    'replay_lsn', pg_last_wal_replay_lsn()::text,
    'last_replay_time', pg_last_xact_replay_timestamp(),
    'replay_paused', CASE WHEN pg_is_in_recovery()
        THEN pg_get_wal_replay_pause_state() <> 'not paused' ELSE false END,
    'pending_bytes', pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint,
    'lag_bytes', pg_wal_lsn_diff({primary}::pg_lsn, pg_last_wal_replay_lsn())::bigint,
    'replay_age_seconds', extract(epoch FROM now() - pg_last_xact_replay_timestamp())
)"""
    ).format(primary=sql.Literal(primary_lsn))


def replica_state(in_recovery: bool, receiver_status: str | None) -> ReplicaState:
    """Pure: streaming when in recovery with a streaming WAL receiver."""
    if not in_recovery:
        return "not a replica"
    return "streaming" if receiver_status == "streaming" else "not streaming"


def replica_lag(
    *,
    in_recovery: bool,
    lag_bytes: int | None,
    pending_bytes: int | None,
    replay_age_seconds: float | None,
) -> tuple[int | None, float | None]:
    """Pure: (lag in bytes, lag in seconds) from what the replica reported.

    Bytes: behind the primary's LSN (never below 0: the primary may have moved on after it was
    read). Seconds: 0 when nothing is left to replay (caught up with the primary, or, if the
    primary's LSN is unknown, nothing received is left unreplayed), else the age of the last
    replayed transaction (None if none was replayed since start).
    """
    if not in_recovery:
        return None, None
    bytes_ = None if lag_bytes is None else max(0, int(lag_bytes))
    caught_up = bytes_ == 0 if bytes_ is not None else (pending_bytes or 0) <= 0
    if caught_up:
        return bytes_, 0.0
    if replay_age_seconds is None:
        return bytes_, None
    return bytes_, max(0.0, round(float(replay_age_seconds), 3))


@task(
    name="describe-primary-replication",
    task_run_name="describe-primary-replication-{server.name}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=1,
)
def describe_primary_replication(pool: ConnectionPool, server: DbServer) -> PrimaryReplication:
    """The primary's current WAL position, its WAL senders and its replication slots.

    Args:
        pool: The run's SSH connections.
        server: The db-primary.
    """
    data = read_json(remote_for(pool, server), _PRIMARY)
    if not isinstance(data, dict):
        raise RuntimeError(f"{server.name}: unexpected answer describing replication: {data!r}")
    return PrimaryReplication(server=server.name, **data)


@task(
    name="describe-replica-replication",
    task_run_name="describe-replica-replication-{server.name}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=1,
)
def describe_replica_replication(
    pool: ConnectionPool, server: DbServer, primary_lsn: str | None = None
) -> ReplicaReplication:
    """Whether ``server`` is a replica, whether it streams, and how far it is behind.

    Args:
        pool: The run's SSH connections.
        server: The db-replica.
        primary_lsn: The primary's current LSN (``PrimaryReplication.current_lsn``), read just
            before; without it the lag in bytes is unknown.
    """
    data = read_json(remote_for(pool, server), replica_statement(primary_lsn))
    if not isinstance(data, dict):
        raise RuntimeError(f"{server.name}: unexpected answer describing replication: {data!r}")
    receiver = WalReceiver(**data["receiver"]) if data.get("receiver") else None
    lag_bytes, lag_seconds = replica_lag(
        in_recovery=data["in_recovery"],
        lag_bytes=data.get("lag_bytes"),
        pending_bytes=data.get("pending_bytes"),
        replay_age_seconds=data.get("replay_age_seconds"),
    )
    return ReplicaReplication(
        server=server.name,
        in_recovery=data["in_recovery"],
        state=replica_state(data["in_recovery"], receiver.status if receiver else None),
        receiver=receiver,
        receive_lsn=data.get("receive_lsn"),
        replay_lsn=data.get("replay_lsn"),
        last_replay_time=data.get("last_replay_time"),
        replay_paused=bool(data.get("replay_paused")),
        primary_lsn=primary_lsn,
        lag_bytes=lag_bytes,
        lag_seconds=lag_seconds,
    )
