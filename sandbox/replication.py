"""Physical streaming replication between the sandbox's database hosts (PostgreSQL 15).

FabulAWS builds a ``db-replica`` from its environment's ``db-primary``: a replication role, a
``pg_hba.conf`` entry for the replica, a base backup taken with ``pg_basebackup -R`` (which writes
``standby.signal`` and ``primary_conninfo``), then the replica streams. Here the same, on test hosts
(``sandbox/testhosts.py``, ``db`` image), for ``fabflows sandbox up`` and the test stacks:

- the **replication role** (``replicator``, ``REPLICATION LOGIN``) gets its password as a
  SCRAM-SHA-256 verifier computed on this side: the plain password never reaches the primary's SQL,
  its logs or any command line;
- the **password** lives where the project keeps server secrets: the secret file
  ``<home>/replication_password`` (mode 600, the deploy user's) on the db servers, and, on each
  replica, the ``postgres`` user's ``~/.pgpass`` (mode 600), which the base backup and the WAL
  receiver read (``primary_conninfo`` carries ``passfile=``, never the password). It travels on
  stdin only;
- one **replication slot** per replica (``replica_<host>``), made by ``pg_basebackup -C``, so the
  primary keeps the WAL a replica still needs; ``max_slot_wal_keep_size`` bounds what a replica
  that is gone for good can hold back.

Provisioning, not the code under test: commands run in the hosts as root through
``TestHost.exec``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable, Sequence

from psycopg import sql

from sandbox.provision import Host, write_secret_file

REPLICATION_ROLE = "replicator"
SECRET_NAME = "replication_password"
PG_VERSION = "15"
DATA_DIR = f"/var/lib/postgresql/{PG_VERSION}/main"
CONF_DIR = f"/etc/postgresql/{PG_VERSION}/main"
PGPASS = "/var/lib/postgresql/.pgpass"
SCRAM_ITERATIONS = 4096

REPLICATION_CONF = """\
# Written by sandbox/replication.py: streaming replication (primary and replicas alike, so a
# promoted replica needs no change).
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
hot_standby_feedback = on
# a replica gone for good cannot fill the primary's disk through its slot
max_slot_wal_keep_size = 2GB
"""


class ReplicationSetupError(RuntimeError):
    """A replica could not be built or did not start streaming (never shows a password)."""


def scram_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of ``password`` (what ``pg_authid`` stores; pure)."""
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def pgpass_line(role: str, password: str) -> str:
    """A ``.pgpass`` line for ``role`` to any host and database (``\\`` and ``:`` escaped; pure)."""
    if any(c in password for c in "\n\r\x00"):
        raise ValueError("the replication password contains a line break or a NUL character")

    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    return f"*:*:*:{esc(role)}:{esc(password)}\n"


def slot_name(host_name: str) -> str:
    """The replication slot of a replica: ``replica_<host>`` in slot-name characters (pure)."""
    return ("replica_" + re.sub(r"[^a-z0-9_]", "_", host_name.lower()))[:63]


def _psql(host: Host, script: str, database: str = "postgres", timeout: float = 120) -> str:
    """SQL as the postgres superuser in the host, on stdin."""
    return host.exec(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            "psql",
            "-qAtX",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            database,
        ],
        input=script,
        timeout=timeout,
    ).stdout


def _write(
    host: Host, path: str, content: str, owner: str = "postgres", mode: str = "0644"
) -> None:
    host.exec(
        [
            "sh",
            "-c",
            'umask 077; cat > "$1"; chown "$2": "$1"; chmod "$3" "$1"',
            "sh",
            path,
            owner,
            mode,
        ],
        input=content,
    )


def _wait(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ReplicationSetupError(f"{what} after {timeout:.0f} s")
        time.sleep(interval)


def wait_for_postgres(host: Host, timeout: float = 60) -> None:
    _wait(
        f"PostgreSQL on {host.name} not ready",
        lambda: host.exec(["pg_isready", "-q"], check=False).returncode == 0,
        timeout,
    )


def configure_server(host: Host) -> None:
    """The replication settings on a db host (primary or replica), read at its next reload or
    start (PostgreSQL 15's defaults already allow replication; this pins them and adds feedback and
    the slot's WAL bound)."""
    _write(host, f"{CONF_DIR}/conf.d/91-replication.conf", REPLICATION_CONF)


def setup_primary(
    primary: Host, replica_addresses: Sequence[str], password: str, role: str = REPLICATION_ROLE
) -> None:
    """The replication role (password as a verifier) and one ``pg_hba.conf`` line per replica."""
    wait_for_postgres(primary)
    configure_server(primary)
    ident = sql.Identifier(role)
    verifier = sql.Literal(scram_verifier(password))
    create = sql.SQL(
        "DO $$ BEGIN CREATE ROLE {} REPLICATION LOGIN; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$;"
    ).format(ident)
    alter = sql.SQL("ALTER ROLE {} WITH REPLICATION LOGIN PASSWORD {};").format(ident, verifier)
    _psql(primary, create.as_string(None) + "\n" + alter.as_string(None) + "\n")
    hba = f"{CONF_DIR}/pg_hba.conf"
    for address in replica_addresses:
        if not re.fullmatch(r"[0-9.]+", address):
            raise ValueError(f"unusable replica address {address!r}")
        line = f"host    replication  {role}  {address}/32  scram-sha-256"
        primary.exec(
            ["sh", "-c", 'grep -qxF -- "$1" "$2" || printf "%s\\n" "$1" >> "$2"', "sh", line, hba]
        )
    _psql(primary, "SELECT pg_reload_conf();")


def build_replica(
    replica: Host,
    primary: Host,
    password: str,
    *,
    role: str = REPLICATION_ROLE,
    timeout: float = 600,
) -> str:
    """Make ``replica`` a streaming replica of ``primary``; returns its slot name.

    Its own cluster is discarded: PostgreSQL stops, the data directory is emptied, ``pg_basebackup
    -R -X stream -C -S <slot> -c fast`` copies the primary (a slot of that name left by an earlier
    build is dropped first, once the replica is stopped: the slot of a replica that was streaming
    is active until then), PostgreSQL starts as a standby, and this waits until it streams.
    ``timeout`` bounds the base backup (it grows with the database).
    """
    slot = slot_name(replica.name)
    configure_server(replica)
    _write(replica, PGPASS, pgpass_line(role, password), mode="0600")
    replica.exec(["supervisorctl", "stop", "postgresql"], timeout=60)
    # only now is the slot of a replica that was streaming inactive (its WAL sender ends once the
    # replica is stopped), and ``-C`` needs it gone
    drop_slot(primary, slot)
    replica.exec(["find", DATA_DIR, "-mindepth", "1", "-delete"])
    backup = replica.exec(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            "pg_basebackup",
            "--no-password",
            "-h",
            primary.ip,
            "-U",
            role,
            "-D",
            DATA_DIR,
            "-R",
            "-X",
            "stream",
            "-C",
            "-S",
            slot,
            "-c",
            "fast",
        ],
        check=False,
        timeout=timeout,
    )
    if backup.returncode != 0:
        raise ReplicationSetupError(
            f"pg_basebackup of {primary.name} on {replica.name} failed: {backup.stderr.strip()}"
        )
    replica.exec(["supervisorctl", "start", "postgresql"], timeout=60)
    wait_for_postgres(replica)
    wait_streaming(replica)
    return slot


def drop_slot(primary: Host, slot: str, timeout: float = 30) -> None:
    """Drop ``slot`` on ``primary`` (gone already: nothing to do), waiting until it is inactive:
    the WAL sender of a replica that was just stopped can take a moment to end."""
    exists = sql.SQL("SELECT count(*) FROM pg_replication_slots WHERE slot_name = {};").format(
        sql.Literal(slot)
    )
    drop = sql.SQL(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE slot_name = {} AND NOT active;"
    ).format(sql.Literal(slot))

    def dropped() -> bool:
        _psql(primary, drop.as_string(None))
        return _psql(primary, exists.as_string(None)).strip() == "0"

    _wait(f"the slot {slot} on {primary.name} is still active", dropped, timeout)


def receiver_status(replica: Host) -> str:
    """The WAL receiver's status on ``replica`` (``streaming``...), empty when there is none."""
    return _psql(replica, "SELECT status FROM pg_stat_wal_receiver;").strip()


def wait_streaming(replica: Host, timeout: float = 60) -> None:
    _wait(
        f"{replica.name} is not streaming from its primary",
        lambda: receiver_status(replica) == "streaming",
        timeout,
    )


def provision_replication(
    primary: Host,
    replicas: Sequence[Host],
    password: str,
    *,
    home: str = "/home/deploy",
    owner: str = "deploy",
    role: str = REPLICATION_ROLE,
    timeout: float = 600,
) -> dict[str, str]:
    """An environment's replication: the secret file on every db server, the role and pg_hba on
    ``primary``, then each replica built from it. Returns replica host name -> slot name."""
    for host in (primary, *replicas):
        write_secret_file(host, home, SECRET_NAME, password, owner=owner)
    setup_primary(primary, [r.ip for r in replicas], password, role=role)
    return {
        r.name: build_replica(r, primary, password, role=role, timeout=timeout) for r in replicas
    }


def basebackup_timeout(database_bytes: int) -> float:
    """How long a base backup of ``database_bytes`` may take here (at least 2 minutes, plus a
    minute per 250 MB: a loaded test machine copies well over 10 MB/s)."""
    return 120.0 + 60.0 * database_bytes / 250e6


# --------------------------------------------------------------------------- faults (lab only)


def stop_wal_receiver(replica: Host) -> str:
    """Stop the replica's WAL receiver (``primary_conninfo`` emptied, reloaded) and wait until it
    is gone; returns the setting to give back to :func:`start_wal_receiver`."""
    conninfo = _psql(replica, "SHOW primary_conninfo;").rstrip("\n")
    _psql(replica, "ALTER SYSTEM SET primary_conninfo = '';\nSELECT pg_reload_conf();")
    _wait(
        f"the WAL receiver of {replica.name} did not stop", lambda: not receiver_status(replica), 30
    )
    return conninfo


def start_wal_receiver(replica: Host, conninfo: str) -> None:
    """Undo :func:`stop_wal_receiver`: the saved ``primary_conninfo`` back, and streaming again."""
    statement = sql.SQL("ALTER SYSTEM SET primary_conninfo = {};").format(sql.Literal(conninfo))
    _psql(replica, statement.as_string(None) + "\nSELECT pg_reload_conf();")
    wait_streaming(replica)
