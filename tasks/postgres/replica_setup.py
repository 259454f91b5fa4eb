"""Making a new server a replica, and taking that back (write tasks; the copy itself is
:func:`tasks.postgres.rebuild.rebuild_replica`).

- :func:`install_replication_password`: the replication role's password copied from the
  primary's secret file ``<home>/replication_password`` to the new server's (mode 600, the deploy
  user's) and to its ``postgres`` user's ``~/.pgpass`` (mode 600), which ``pg_basebackup`` and the
  WAL receiver read. The password travels on the commands' stdin only, never on a command line,
  in a log, a plan or a result. Compensation: none needed (the server it was written to is
  terminated when the replica is taken back).
- :func:`stop_postgres`: stop PostgreSQL on a server (supervisor's program or the service).
  Compensation: start it (not needed here: the server is being taken away).
- :func:`remove_replica_slot`: on the primary, the replica's WAL sender ended, its slot dropped
  and its ``pg_hba.conf`` replication line removed: the compensation of
  :func:`tasks.postgres.rebuild.prepare_primary_for` plus the base backup's ``-C``. A slot left for
  a server that is gone would hold WAL on the primary until ``max_slot_wal_keep_size``.
"""

from __future__ import annotations

import re
import time

from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from pydantic import SecretStr

from tasks.plan import StepResult
from tasks.postgres.server import DbServer, read_sql, remote_for, write_sql
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.secrets import run_with_secret, secret_path

SECRET_NAME = "replication_password"
PGPASS = "/var/lib/postgresql/.pgpass"
REPLICATION_ROLE = "replicator"

WRITE_SECRET_SCRIPT = r"""
set -eu
umask 077
v=$(cat)
t="$1.fabflows-new"
printf "$4" "$v" > "$t"
chown "$2:$3" "$t"; chmod 600 "$t"; mv -f "$t" "$1"
"""
"""sh script: stdin (minus its final newline) into ``$1`` through ``printf "$4"``, owned
``$2:$3``, mode 600, renamed into place (``printf`` is a shell builtin: the value is never an
argument of a process)."""

STOP_SCRIPT = r"""
if command -v supervisorctl >/dev/null 2>&1; then
    sv_out=$(supervisorctl stop postgresql 2>&1) || true
else
    sv_out="no such process"
fi
case "$sv_out" in
    *"postgresql: stopped"*|*"not running"*) ;;
    *"no such process"*|*"no such file"*|*"refused"*) service postgresql stop ;;
    *) echo "supervisorctl stop postgresql: $sv_out" >&2 ;;
esac
"""
"""Stop PostgreSQL the way it was started: supervisor's program when there is one (a single
``supervisorctl`` call: a switchover's app waits through it), else the service."""

REMOVE_HBA_SCRIPT = r"""
set -e
hba="$1"; line="$2"
if grep -qxF -- "$line" "$hba"; then
    grep -vxF -- "$line" "$hba" > "$hba.fabflows-new" || true
    chown --reference="$hba" "$hba.fabflows-new"; chmod --reference="$hba" "$hba.fabflows-new"
    mv -f "$hba.fabflows-new" "$hba"
fi
"""


def pgpass_line(role: str, password: str) -> str:
    """A ``.pgpass`` line for ``role`` to any host and database (``\\`` and ``:`` escaped, no
    newline; pure)."""
    if any(c in password for c in "\n\r\x00"):
        raise ValueError("the replication password contains a line break or a NUL character")

    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    return f"*:*:*:{esc(role)}:{esc(password)}"


def hba_line(address: str, role: str = REPLICATION_ROLE) -> str:
    """The primary's ``pg_hba.conf`` line letting ``address`` replicate (pure)."""
    if not re.fullmatch(r"[0-9.]+", address):
        raise ValueError(f"unusable replica address {address!r}")
    return f"host    replication  {role}  {address}/32  scram-sha-256"


@task(
    name="install-replication-password",
    task_run_name="install-replication-password-{replica.name}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=0,
)
def install_replication_password(
    pool: ConnectionPool,
    primary: DbServer,
    replica: DbServer,
    *,
    home: str,
    owner: str,
    dry_run: bool,
    role: str = REPLICATION_ROLE,
) -> StepResult:
    """Copy the replication password from ``primary``'s secret file to ``replica``'s secret file
    and its ``postgres`` user's ``.pgpass`` (on stdin only).

    Args:
        pool: The run's SSH connections.
        primary: The db-primary (its ``<home>/replication_password`` is read).
        replica: The new server.
        home: The deploy user's home (where secret files live).
        owner: The deploy user (owns the secret file).
        dry_run: Only say what would be done.
        role: The replication role.
    """
    path = secret_path(home, SECRET_NAME)
    source = remote_for(pool, primary)
    read = source.read(["sh", "-c", 'cat -- "$1"', "read", path], sudo=True)
    password = read.stdout.rstrip("\n")
    if not password:
        raise RuntimeError(f"{primary.name} has no replication password in {path}")
    line = SecretStr(pgpass_line(role, password))
    target = remote_for(pool, replica, dry_run=dry_run)
    for dest, user, text, fmt in (
        (path, owner, SecretStr(password), "%s"),
        # which login it is (rotate-credentials alternates two): read back by promote-replica
        (secret_path(home, "replication_user"), owner, SecretStr(role), "%s"),
        (PGPASS, "postgres", line, "%s\\n"),
    ):
        run_with_secret(
            target,
            ["sh", "-c", WRITE_SECRET_SCRIPT, "write", dest, user, user, fmt],
            text,
            sudo=True,
            change=True,
        )
    verb = "Would copy" if dry_run else "Copied"
    return StepResult(
        changed=True,
        dry_run=dry_run,
        summary=f"{verb} the replication password from {primary.name} to {replica.name} "
        f"({path}, {PGPASS}; login {role})",
    )


@task(
    cache_policy=NO_CACHE,
    name="stop-postgres",
    task_run_name="stop-postgres-{server.name}",
    retries=0,
)
def stop_postgres(pool: ConnectionPool, server: DbServer, *, dry_run: bool) -> StepResult:
    """Stop PostgreSQL on ``server`` (already stopped: the stop is a no-op there too).

    Args:
        pool: The run's SSH connections.
        server: The server.
        dry_run: Only say what would be done.
    """
    remote = remote_for(pool, server, dry_run=dry_run)
    remote.write(["sh", "-c", STOP_SCRIPT], sudo=True, timeout=120)
    verb = "Would stop" if dry_run else "Stopped"
    return StepResult(changed=True, dry_run=dry_run, summary=f"{verb} PostgreSQL on {server.name}")


@task(
    name="remove-replica-slot",
    task_run_name="remove-replica-slot-{slot}",
    cache_policy=NO_CACHE,
    retries=0,
)
def remove_replica_slot(
    pool: ConnectionPool,
    primary: DbServer,
    slot: str,
    address: str | None,
    *,
    dry_run: bool,
    timeout: float = 60,
    role: str = REPLICATION_ROLE,
) -> StepResult:
    """On ``primary``: the WAL sender using ``slot`` ended, ``slot`` dropped, and ``address``'s
    replication line removed from ``pg_hba.conf`` (reloaded). Safe to repeat; a slot that is
    already gone and a missing line are no-ops.

    Args:
        pool: The run's SSH connections.
        primary: The db-primary.
        slot: The replica's slot.
        address: The replica's address (None: leave pg_hba.conf alone).
        dry_run: Only say what would be done.
        timeout: How long to keep ending the slot's WAL sender (a replica that is still up
            reconnects every few seconds) before giving up.
        role: The replication role.
    """
    if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
        raise ValueError(f"unusable slot name {slot!r}")
    remote = remote_for(pool, primary, dry_run=dry_run)
    literal = sql.Literal(slot)
    exists = sql.SQL("SELECT count(*) FROM pg_replication_slots WHERE slot_name = {}").format(
        literal
    )
    done = []
    if read_sql(remote, [exists]).strip() != "0":
        end = sql.SQL(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE slot_name = {} AND active"
        ).format(literal)
        drop = sql.SQL(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = {} AND NOT active"
        ).format(literal)
        deadline = time.monotonic() + timeout
        while True:
            write_sql(remote, [end, "SELECT pg_sleep(0.2)", drop])
            if dry_run or read_sql(remote, [exists]).strip() == "0":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the slot {slot} on {primary.name} is still in use")
            time.sleep(0.5)
        done.append(f"slot {slot} dropped")
    if address is not None:
        hba = read_sql(remote, ["SHOW hba_file"]).strip()
        remote.write(
            ["sh", "-c", REMOVE_HBA_SCRIPT, "hba", hba, hba_line(address, role)], sudo=True
        )
        write_sql(remote, ["SELECT pg_reload_conf()"])
        done.append(f"replication from {address} no longer allowed")
    if not done:
        return StepResult(changed=False, dry_run=dry_run, summary=f"no slot {slot}")
    verb = "Would remove" if dry_run else "Removed"
    return StepResult(
        changed=True, dry_run=dry_run, summary=f"{verb} on {primary.name}: {'; '.join(done)}"
    )


DATA_DIRECTORY_SCRIPT = "ls -d /var/lib/postgresql/*/main 2>/dev/null | tail -n 1"


@task(
    cache_policy=NO_CACHE,
    name="wait-for-db-server",
    task_run_name="wait-for-db-server-{server.name}",
    retries=0,
)
def wait_for_db_server(pool: ConnectionPool, server: DbServer, *, timeout: float) -> str:
    """Wait until ``server`` (just launched) answers SSH (a checked login) and has a PostgreSQL
    data directory; returns it. Read only.

    Raises:
        TimeoutError: no SSH login after ``timeout`` seconds.
        RuntimeError: it answers but has no PostgreSQL (the image is not a database server's).
    """
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            out = remote_for(pool, server).read(["sh", "-c", DATA_DIRECTORY_SCRIPT], sudo=True)
        except Exception as exc:  # noqa: BLE001 - booting: not reachable yet
            pool.discard(server.address)
            last = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        else:
            data_directory = out.stdout.strip()
            if data_directory:
                return data_directory
            raise RuntimeError(
                f"{server.name} has no PostgreSQL data directory under /var/lib/postgresql: "
                "its image is not a database server's"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.name} did not answer SSH in {timeout:.0f} s ({last})")
        time.sleep(1.0)
