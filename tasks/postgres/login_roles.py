"""Alternating login roles for one credential: ``<user>`` and ``<user>_alt`` on the db-primary.

Credential rotation without downtime (rotate-credentials) keeps two login roles per database
credential. The application's original role (config ``database_user``) owns the database and its
objects and is the group; the alternate is a member of it that takes the group's identity on login
(``ALTER ROLE <alt> SET role = <user>``), so whichever of the two the app logs in as, it has the
same privileges and what it creates (migrations) is owned by the group. A rotation sets a new
password on the role the app does not use, moves the app to it, then kills the old password.

Administration runs as the ``postgres`` OS user over SSH (:mod:`tasks.postgres.server`): the SQL
goes on psql's stdin, and the password only as a SCRAM-SHA-256 verifier computed here
(:func:`scram_verifier`), so the plain password never reaches the server, a command line or a log.
The check that a password works logs in through an SSH tunnel (:func:`tasks.postgres.roles.login_as`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as pysecrets

from psycopg import sql
from pydantic import SecretStr

from tasks.postgres.roles import MASK, login_as, tunnel
from tasks.postgres.server import psql_argv, read_sql, render, script
from tasks.ssh.connection import SshOptions
from tasks.ssh.remote import Remote
from tasks.ssh.secrets import run_with_secret

ALT_SUFFIX = "_alt"
SCRAM_ITERATIONS = 4096


def alternate_of(user: str, base: str) -> str:
    """The other login role of the pair whose group (original) role is ``base`` (pure)."""
    alt = base + ALT_SUFFIX
    if user == base:
        return alt
    if user == alt:
        return base
    raise ValueError(f"{user!r} is neither {base!r} nor {alt!r}")


def scram_verifier(password: SecretStr, *, salt: bytes | None = None) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of ``password`` (what ``pg_authid`` stores; pure)."""
    salt = salt or pysecrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.get_secret_value().encode(), salt, SCRAM_ITERATIONS
    )
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def password_statement(role: str, verifier: str) -> sql.Composed:
    return sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(verifier)
    )


def shown_password_statement(role: str) -> str:
    """How plans show the statement: the verifier masked."""
    return render(password_statement(role, MASK))


def member_statements(alt: str, group: str) -> list[sql.Composed]:
    """Make ``alt`` a login member of ``group`` that acts as ``group`` (pure; run after CREATE)."""
    return [
        sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(alt)),
        sql.SQL("ALTER ROLE {} SET role = {}").format(sql.Identifier(alt), sql.Literal(group)),
    ]


def role_exists(remote: Remote, role: str) -> bool:
    query = sql.SQL("SELECT 1 FROM pg_roles WHERE rolname = {}").format(sql.Literal(role))
    return read_sql(remote, [query]).strip() == "1"


def ensure_alternate_role(remote: Remote, alt: str, group: str) -> bool:
    """Create ``alt`` (LOGIN, no password yet: nobody can log in as it) as a member of ``group``
    acting as it; True if it was created. Idempotent (membership and setting are set again)."""
    created = False
    statements: list[sql.Composable] = []
    if not role_exists(remote, alt):
        statements.append(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(alt)))
        created = True
    statements += member_statements(alt, group)
    remote.write(psql_argv(), stdin=script(statements).encode())
    return created


def set_role_password(remote: Remote, role: str, password: SecretStr) -> str:
    """``ALTER ROLE <role> WITH LOGIN PASSWORD '<verifier>'`` on psql's stdin (never the plain
    password, and no digest of the stdin in the recorded command); returns the shown statement.
    No compensation: the previous verifier is not kept (rotate-credentials only sets passwords on
    the role the app does not use, or retires one the app no longer uses)."""
    text = script([password_statement(role, scram_verifier(password))])
    run_with_secret(remote, psql_argv(), SecretStr(text.rstrip("\n")), sudo=False, change=True)
    return shown_password_statement(role)


def throwaway_password() -> SecretStr:
    """A password nobody keeps: what a retired login gets, so its old secret stops working."""
    return SecretStr(pysecrets.token_urlsafe(32))


def accepts(
    opts: SshOptions, server: str, role: str, database: str, password: SecretStr, port: int = 5432
) -> bool:
    """Does PostgreSQL on ``server`` let ``role`` log in with ``password``? (through a tunnel)"""
    with tunnel(server, opts, port) as local:
        session = login_as(local, role, database, password)
        if session is None:
            return False
        session.close()
        return True
