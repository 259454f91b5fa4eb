"""Rebuilding a replica from its primary with ``pg_basebackup``, with progress.

- :func:`prepare_primary_for`: on the primary, the replica's ``pg_hba.conf`` replication line and
  its slot dropped when inactive (``pg_basebackup -C`` makes it again);
- :func:`rebuild_replica`: on the replica, PostgreSQL stopped, its data directory emptied, its slot
  dropped on the primary over a replication connection (``pg_receivewal --drop-slot``: only once
  the replica is stopped is the slot of a streaming replica inactive, and ``-C`` needs it gone), a
  base backup of the primary taken (``-R -X stream -C -S <slot> -c fast``), PostgreSQL started as
  a standby. The copy runs detached on the replica (its output in a log file under the data
  directory's parent), so a lost SSH session does not kill it; progress is the data directory's
  size against the primary's databases' size, polled every second.

The replication password is never handled here: the replica's ``postgres`` user reads it from its
``~/.pgpass`` (what provisioning wrote), as the WAL receiver does. No compensation: the replica's
old data directory is gone once the copy starts (it was broken, or the operator asked for it).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from tasks.plan import StepResult
from tasks.postgres.failover import REPLICATION_ROLE
from tasks.postgres.server import DbServer, read_sql, remote_for, write_sql
from tasks.ssh.connection import ConnectionPool

STATE_DIR = "/var/lib/postgresql/fabflows-rebuild"

START_SCRIPT = r"""
set -e
data="$1"; host="$2"; port="$3"; role="$4"; slot="$5"; state="$6"
mkdir -p "$state"; chown postgres: "$state"
rm -f "$state/rc" "$state/log"
if command -v supervisorctl >/dev/null 2>&1 && supervisorctl avail 2>/dev/null | grep -qE '^postgresql[: ]'; then
    supervisorctl stop postgresql >/dev/null
else
    service postgresql stop
fi
find "$data" -mindepth 1 -delete
cd "$state"
nohup runuser -u postgres -- sh -c '
    for i in $(seq 60); do
        out=$(pg_receivewal --no-password -h "$1" -p "$2" -U "$3" -S "$5" --drop-slot 2>&1) && break
        case "$out" in *"does not exist"*) break ;; esac
        sleep 0.5
    done
    pg_basebackup --no-password -h "$1" -p "$2" -U "$3" -D "$4" -R -X stream -C -S "$5" -c fast \
        > "$6/log" 2>&1
    echo $? > "$6/rc"' pgbb "$host" "$port" "$role" "$data" "$slot" "$state" \
    > /dev/null 2>&1 < /dev/null &
"""

POLL_SCRIPT = r"""
state="$1"; data="$2"
rc=$(cat "$state/rc" 2>/dev/null || true)
size=$(du -sb "$data" 2>/dev/null | cut -f1)
printf '%s %s\n' "${rc:--}" "${size:-0}"
"""

START_PG_SCRIPT = r"""
set -e
if command -v supervisorctl >/dev/null 2>&1 && supervisorctl avail 2>/dev/null | grep -qE '^postgresql[: ]'; then
    supervisorctl start postgresql >/dev/null
else
    service postgresql start
fi
for i in $(seq 600); do pg_isready -q && exit 0; sleep 0.1; done
echo "PostgreSQL did not accept connections in 60 s" >&2; exit 1
"""


def _checked_address(address: str) -> str:
    if not re.fullmatch(r"[0-9.]+", address):
        raise ValueError(f"unusable replica address {address!r}")
    return address


@task(
    cache_policy=NO_CACHE,
    name="prepare-primary-for",
    task_run_name="prepare-primary-for-{slot}",
    retries=0,
)
def prepare_primary_for(
    pool: ConnectionPool,
    primary: DbServer,
    address: str,
    slot: str,
    *,
    dry_run: bool,
    role: str = REPLICATION_ROLE,
) -> StepResult:
    """The primary accepts replication from ``address`` (a ``pg_hba.conf`` line, reloaded) and
    holds no inactive slot named ``slot`` (the base backup makes it afresh).

    Args:
        pool: The run's SSH connections.
        primary: The primary.
        address: The replica's address.
        slot: The replica's slot name.
        dry_run: Only say what would be done.
        role: The replication role.
    """
    from tasks.postgres.failover import HBA_SCRIPT

    _checked_address(address)
    remote = remote_for(pool, primary, dry_run=dry_run)
    hba = read_sql(remote, ["SHOW hba_file"]).strip()
    line = f"host    replication  {role}  {address}/32  scram-sha-256"
    remote.write(["sh", "-c", HBA_SCRIPT, "hba", hba, line], sudo=True)
    drop = sql.SQL(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE slot_name = {} AND NOT active"
    ).format(sql.Literal(slot))
    write_sql(remote, [drop, "SELECT pg_reload_conf()"])
    verb = "Would allow" if dry_run else "Allowed"
    return StepResult(
        changed=True, dry_run=dry_run, summary=f"{verb} {address} on {primary.name} (slot {slot})"
    )


def database_bytes(pool: ConnectionPool, primary: DbServer) -> int:
    """The primary's databases' total size (what a base backup copies, give or take WAL)."""
    out = read_sql(
        remote_for(pool, primary), ["SELECT sum(pg_database_size(datname)) FROM pg_database"]
    )
    return int(out.strip() or 0)


@task(
    cache_policy=NO_CACHE,
    name="rebuild-replica",
    task_run_name="rebuild-replica-{replica.name}",
    retries=0,
)
def rebuild_replica(
    pool: ConnectionPool,
    replica: DbServer,
    primary: DbServer,
    slot: str,
    *,
    dry_run: bool,
    data_directory: str,
    on_progress: Callable[[int], None] | None = None,
    timeout: float = 3600,
    role: str = REPLICATION_ROLE,
) -> StepResult:
    """Stop PostgreSQL on ``replica``, empty ``data_directory``, copy ``primary`` into it with
    ``pg_basebackup`` (slot ``slot``), start it as a standby. ``on_progress(bytes copied)`` is
    called about once a second. No compensation (the old data directory is gone).

    Args:
        pool: The run's SSH connections.
        replica: The replica to rebuild.
        primary: The primary to copy.
        slot: The replica's replication slot.
        dry_run: Only say what would be done.
        data_directory: The replica's data directory.
        on_progress: Called with the bytes copied so far.
        timeout: Seconds the copy may take.
        role: The replication role.
    """
    if not re.fullmatch(r"/[A-Za-z0-9_./-]+", data_directory) or data_directory.count("/") < 3:
        raise ValueError(f"unusable data directory {data_directory!r}")
    if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
        raise ValueError(f"unusable slot name {slot!r}")
    if dry_run:
        return StepResult(
            changed=True,
            dry_run=True,
            summary=f"Would rebuild {replica.name} from {primary.name} (slot {slot})",
        )
    remote = remote_for(pool, replica)
    args = [data_directory, _checked_address(primary.db_address), str(primary.port), role, slot]
    remote.write(["sh", "-c", START_SCRIPT, "rebuild", *args, STATE_DIR], sudo=True, timeout=120)
    started = time.monotonic()
    while True:
        rc, size = remote.read(
            ["sh", "-c", POLL_SCRIPT, "poll", STATE_DIR, data_directory], sudo=True
        ).stdout.split()
        if on_progress is not None:
            on_progress(int(size))
        if rc != "-":
            break
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the base backup of {replica.name} took over {timeout:.0f} s")
        time.sleep(1.0)
    if rc != "0":
        log = remote.read(["tail", "-n", "5", f"{STATE_DIR}/log"], sudo=True).stdout.strip()
        raise RuntimeError(f"pg_basebackup on {replica.name} failed (exit {rc}): {log}")
    remote.write(["sh", "-c", START_PG_SCRIPT], sudo=True, timeout=120)
    seconds = time.monotonic() - started
    return StepResult(
        changed=True,
        dry_run=False,
        summary=f"{replica.name} rebuilt from {primary.name} in {seconds:.1f} s "
        f"({int(size) / 1e6:.0f} MB)",
    )
