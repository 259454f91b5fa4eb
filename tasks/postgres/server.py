"""Reaching a PostgreSQL server the way FabulAWS does: over SSH, as the ``postgres`` OS user.

Every statement runs through ``psql`` on the database server itself (``sudo -n -u postgres psql``,
peer authentication on the local socket), so administration needs no database password and no
database port open to the machine running the flow. SQL travels on psql's **stdin**, never on a
command line; it is composed with :mod:`psycopg.sql` (``Identifier``/``Literal``) and rendered with
``as_string(None)``, never with f-strings or ``.format`` on values.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field

from tasks.ssh.connection import ConnectionPool
from tasks.ssh.remote import CommandResult, Remote

PSQL_TIMEOUT = 120.0


class DbServer(BaseModel):
    """A PostgreSQL server of an environment (its db-primary)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Display name (Name tag or address).")
    address: str = Field(description="Address fabflows connects to over SSH.")
    db_address: str = Field(
        description="Address other servers reach PostgreSQL at (the private IP)."
    )
    port: int = Field(default=5432, ge=1, le=65535, description="PostgreSQL's TCP port.")
    instance_id: str | None = None


def remote_for(pool: ConnectionPool, server: DbServer, *, dry_run: bool = False) -> Remote:
    """A command runner on ``server`` from the run's connection pool."""
    return Remote(
        conn=pool.get(server.address),
        host=server.name,
        dry_run=dry_run,
        command_timeout=pool.opts.command_timeout,
        channel_timeout=pool.opts.connect_timeout,
    )


def psql_argv(database: str = "postgres") -> list[str]:
    """``psql`` as the postgres OS user: no psqlrc, unaligned tuples only, stop on the first error."""
    return [
        "sudo",
        "-n",
        "-u",
        "postgres",
        "--",
        "psql",
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "--dbname",
        database,
    ]


def render(statement: sql.Composable | str) -> str:
    """SQL text of a composed statement (identifiers and literals quoted by psycopg)."""
    if isinstance(statement, str):
        return statement
    return statement.as_string(None)


def script(statements: Sequence[sql.Composable | str]) -> str:
    """One psql script: each statement on its own line, each ending with ``;``."""
    lines = []
    for s in statements:
        text = render(s).strip()
        lines.append(text if text.endswith(";") else text + ";")
    return "\n".join(lines) + "\n"


def read_sql(
    remote: Remote,
    statements: Sequence[sql.Composable | str],
    database: str = "postgres",
    timeout: float = PSQL_TIMEOUT,
) -> str:
    """Run read-only SQL (also in a dry run); returns psql's unaligned output."""
    result = remote.read(psql_argv(database), stdin=script(statements).encode(), timeout=timeout)
    return result.stdout


def write_sql(
    remote: Remote,
    statements: Sequence[sql.Composable | str],
    database: str = "postgres",
    timeout: float = PSQL_TIMEOUT,
) -> CommandResult | None:
    """Run changing SQL unless the remote is in dry-run mode (then only recorded)."""
    return remote.write(psql_argv(database), stdin=script(statements).encode(), timeout=timeout)


def read_json(
    remote: Remote, statement: sql.Composable | str, database: str = "postgres"
) -> object:
    """Run one query whose single row and column is JSON; return it parsed (None for no rows)."""
    out = read_sql(remote, [statement], database).strip()
    return json.loads(out) if out else None


def psql_error(stderr: str) -> str:
    """The line of psql's stderr that says what went wrong (ERROR/FATAL), else its last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for line in lines:
        if "ERROR:" in line or "FATAL:" in line or "error:" in line:
            return line
    return lines[-1] if lines else ""
