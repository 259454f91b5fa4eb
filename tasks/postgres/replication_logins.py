"""Alternating replication logins: ``replicator`` and ``replicator_alt`` on the db-primary.

Replicas stream from the db-primary as a replication login whose password each replica's
``postgres`` user reads from ``~/.pgpass`` (``primary_conninfo`` names the login and
``passfile=``, never the password). rotate-credentials changes that password without a replica
ever failing to connect, as it does for the app's logins: the new password goes on the login no
replica uses (created the first time, ``REPLICATION LOGIN``, allowed by ``pg_hba.conf`` from
every replica's address), each replica's ``.pgpass`` gets a line for it beside the old one, its
``primary_conninfo`` names it and PostgreSQL reloads (the WAL receiver reconnects as the new
login), and only once every replica streams as the new login is the old one given a throwaway
password.

Which login is current is named on the db servers by the file ``<home>/replication_user`` beside
``<home>/replication_password`` (missing: :data:`REPLICATION_ROLE`, as provisioning made it):
:func:`replication_login` reads it for add-replica, reset-replicas and promote-replica.

Administration runs as the ``postgres`` OS user over SSH (:mod:`tasks.postgres.server`), SQL on
psql's stdin; passwords only as SCRAM verifiers (:mod:`tasks.postgres.login_roles`) or on stdin.
"""

from __future__ import annotations

import re
import time

from psycopg import sql
from pydantic import SecretStr

from tasks.postgres.server import DbServer, read_sql, remote_for, write_sql
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.remote import Remote
from tasks.ssh.secrets import secret_path

REPLICATION_ROLE = "replicator"
PASSWORD_SECRET = "replication_password"
USER_SECRET = "replication_user"
PGPASS = "/var/lib/postgresql/.pgpass"

HBA_SCRIPT = """\
set -e
hba="$1"; shift
for line in "$@"; do grep -qxF -- "$line" "$hba" || printf '%s\\n' "$line" >> "$hba"; done
"""


# --------------------------------------------------------------------------- pure


def hba_line(address: str, role: str) -> str:
    """The primary's ``pg_hba.conf`` line letting ``address`` replicate as ``role`` (pure)."""
    if not re.fullmatch(r"[0-9.]+", address):
        raise ValueError(f"unusable replica address {address!r}")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", role):
        raise ValueError(f"unusable replication login {role!r}")
    return f"host    replication  {role}  {address}/32  scram-sha-256"


_USER = re.compile(r"(^|\s)user\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def conninfo_user(conninfo: str) -> str | None:
    """The ``user=`` of a libpq conninfo string (None when it names none; pure)."""
    m = _USER.search(conninfo)
    if m is None:
        return None
    value = m.group(2)
    if value.startswith("'"):
        value = re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def with_user(conninfo: str, user: str) -> str:
    """``conninfo`` with ``user=`` set to ``user`` (added if missing; pure)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", user):
        raise ValueError(f"unusable replication login {user!r}")
    if _USER.search(conninfo):
        return _USER.sub(lambda m: f"{m.group(1)}user={user}", conninfo, count=1)
    return f"user={user} {conninfo}".strip()


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _pgpass_user(line: str) -> str | None:
    fields = re.split(r"(?<!\\):", line, maxsplit=4)
    return fields[3].replace("\\:", ":").replace("\\\\", "\\") if len(fields) == 5 else None


def pgpass_with(current: str, role: str, password: SecretStr) -> SecretStr:
    """``.pgpass`` text with one line for ``role`` (any host and database) holding ``password``,
    first, and the other logins' lines kept (pure; in and out of memory only)."""
    plain = password.get_secret_value()
    if any(c in plain for c in "\n\r\x00"):
        raise ValueError("the replication password contains a line break or a NUL character")
    kept = [ln for ln in current.splitlines() if ln.strip() and _pgpass_user(ln) != role]
    line = f"*:*:*:{_pgpass_escape(role)}:{_pgpass_escape(plain)}"
    return SecretStr("\n".join([line, *kept]) + "\n")


# --------------------------------------------------------------------------- read


def replication_login(remote: Remote, home: str) -> str:
    """The replication login the environment uses now: ``<home>/replication_user`` on this db
    server (written by rotate-credentials), else :data:`REPLICATION_ROLE`. Read only."""
    path = secret_path(home, USER_SECRET)
    out = remote.read(
        ["sh", "-c", 'cat -- "$1" 2>/dev/null || true', "read", path], sudo=True
    ).stdout.strip()
    if out and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", out):
        raise RuntimeError(f"{remote.host}: {path} does not name a login")
    return out or REPLICATION_ROLE


def read_pgpass(remote: Remote) -> SecretStr:
    """The replica's ``postgres`` user's ``.pgpass`` (empty when missing; memory only)."""
    out = remote.read(["sh", "-c", 'cat -- "$1" 2>/dev/null || true', "read", PGPASS], sudo=True)
    return SecretStr(out.stdout)


def primary_conninfo(remote: Remote) -> str:
    """The replica's ``primary_conninfo`` (never a password: it names ``passfile=``)."""
    return read_sql(remote, ["SHOW primary_conninfo"]).rstrip("\n")


def streaming_logins(remote: Remote) -> dict[str, str]:
    """On the primary: replica address -> the login its WAL sender serves, for those streaming."""
    out = read_sql(
        remote,
        [
            "SELECT host(client_addr), usename FROM pg_stat_replication "
            "WHERE state = 'streaming' AND client_addr IS NOT NULL"
        ],
    )
    pairs = (ln.split("|", 1) for ln in out.splitlines() if "|" in ln)
    return {a: u for a, u in pairs}


def receiver_status(remote: Remote) -> str:
    """On a replica: its WAL receiver's status (``streaming``...), empty when there is none."""
    return read_sql(remote, ["SELECT status FROM pg_stat_wal_receiver"]).strip()


def wait_streaming_as(
    primary: Remote, address: str, login: str, *, timeout: float = 60, poll: float = 0.2
) -> float:
    """Wait until the replica at ``address`` streams from ``primary`` as ``login``; returns the
    seconds waited. Raises TimeoutError naming what it streams as instead."""
    started = time.monotonic()
    seen: str | None = None
    while True:
        seen = streaming_logins(primary).get(address)
        if seen == login:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            what = f"streams as {seen}" if seen else "is not streaming"
            raise TimeoutError(
                f"the replica {address} {what}, not as {login}, after {timeout:.0f} s"
            )
        time.sleep(poll)


# --------------------------------------------------------------------------- write


def ensure_replication_login(remote: Remote, role: str) -> bool:
    """``CREATE ROLE <role> REPLICATION LOGIN`` (no password yet: nobody can log in as it) if it
    is missing; True if created. Compensation: none needed (a login without a known password)."""
    exists = sql.SQL("SELECT 1 FROM pg_roles WHERE rolname = {}").format(sql.Literal(role))
    if read_sql(remote, [exists]).strip() == "1":
        write_sql(remote, [sql.SQL("ALTER ROLE {} REPLICATION LOGIN").format(sql.Identifier(role))])
        return False
    write_sql(remote, [sql.SQL("CREATE ROLE {} REPLICATION LOGIN").format(sql.Identifier(role))])
    return True


def allow_replication_login(remote: Remote, role: str, addresses: list[str]) -> list[str]:
    """On the primary: a ``pg_hba.conf`` line per replica address for ``role`` (kept if there),
    reloaded; returns the lines. Compensation: none needed (the line names a login; a login with
    no known password lets nobody in)."""
    lines = [hba_line(a, role) for a in addresses]
    if not lines:
        return []
    hba = read_sql(remote, ["SHOW hba_file"]).strip()
    remote.write(["sh", "-c", HBA_SCRIPT, "hba", hba, *lines], sudo=True)
    write_sql(remote, ["SELECT pg_reload_conf()"])
    return lines


def set_conninfo_user(remote: Remote, login: str) -> bool:
    """On a replica: ``primary_conninfo`` names ``login`` (ALTER SYSTEM, reload: PostgreSQL 15's
    WAL receiver reconnects with it). Already so: no-op (False). Compensation: the same with the
    previous login."""
    current = primary_conninfo(remote)
    wanted = with_user(current, login)
    if wanted == current:
        return False
    statement = sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(sql.Literal(wanted))
    write_sql(remote, [statement, "SELECT pg_reload_conf()"])
    return True


def current_login(pool: ConnectionPool, server: DbServer, home: str) -> str:
    """:func:`replication_login` on a db server of the run's pool (the primary, or a replica
    about to be promoted). Read only."""
    return replication_login(remote_for(pool, server), home)
