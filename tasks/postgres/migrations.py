"""Which Django migrations a database has applied (its ``django_migrations`` table).

- :func:`list_applied_migrations`: a database on the server itself (as the postgres OS user).
- :func:`list_source_migrations`: the source database, read from the target server over the path
  the copy takes (password on stdin, as the copy does).

Both return ``app.name`` strings, sorted, or None when the database has no ``django_migrations``
table (not a Django database, or never migrated: which migrations it has is unknown).
"""

from __future__ import annotations

import json

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from tasks.postgres.copy import CHECK_SCRIPT
from tasks.postgres.server import DbServer, psql_error, read_sql, remote_for
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.remote import CommandError, sh_argv

APPLIED = (
    "SELECT coalesce(json_agg(app || '.' || name ORDER BY app, name), '[]') FROM django_migrations"
)


def _parse(out: str) -> list[str]:
    return sorted(json.loads(out.strip() or "[]"))


def _missing_table(text: str) -> bool:
    return 'relation "django_migrations" does not exist' in text


@task(
    name="list-applied-migrations",
    task_run_name="list-applied-migrations-{database}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=2,
)
def list_applied_migrations(
    pool: ConnectionPool, server: DbServer, database: str
) -> list[str] | None:
    """The migrations ``database`` on ``server`` has applied (None: no django_migrations)."""
    try:
        return _parse(read_sql(remote_for(pool, server), [APPLIED], database))
    except CommandError as exc:
        if _missing_table(exc.stderr):
            return None
        raise


@task(
    name="list-source-migrations",
    task_run_name="list-source-migrations-{database}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=2,
)
def list_source_migrations(
    pool: ConnectionPool,
    target: DbServer,
    source: DbServer,
    database: str,
    user: str,
    password: SecretStr,
) -> list[str] | None:
    """The migrations the source database has applied, read from ``target`` as the copy reads it
    (None: no django_migrations table)."""
    remote = remote_for(pool, target)
    stdin = password.get_secret_value().encode() + b"\n" + (APPLIED + ";\n").encode()
    argv = sh_argv(CHECK_SCRIPT, source.db_address, str(source.port), user, database)
    try:
        result = remote.read(argv, stdin=stdin, timeout=60)
    except CommandError as exc:
        if _missing_table(exc.stderr):
            return None
        raise RuntimeError(
            f"cannot list {database}'s migrations: {psql_error(exc.stderr)}"
        ) from None
    return _parse(result.stdout)
