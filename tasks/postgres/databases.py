"""Databases on one PostgreSQL server: what is there, and the side-database swap of a reload.

Read tasks (no side effects, retried): :func:`describe_databases` (every database with size,
connections, ``ALLOW_CONNECTIONS`` and the reload marker; free disk space) and
:func:`count_rows` (exact row counts of named tables).

Write tasks (``dry_run`` keyword without default, never retried blindly):

- :func:`create_database` ↔ :func:`drop_database` (dropping has no compensation: it comes after
  the last point where the run can back out, or only removes what the run itself made);
- :func:`swap_databases` (live → previous, side → live, in one transaction, new connections
  refused and existing ones terminated first) ↔ :func:`swap_back_databases` (the previous database
  live again, the new one set aside and dropped);
- :func:`mark_database` (the durable reload marker, a database comment) and
  :func:`allow_connections`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field

from tasks.plan import StepResult
from tasks.postgres.names import Marker, failed_name, parse_marker
from tasks.postgres.server import DbServer, read_json, read_sql, remote_for, render, write_sql
from tasks.ssh.connection import ConnectionPool

TERMINATE_WAIT_MS = 5000
"""pg_terminate_backend waits this long for each backend to go (PostgreSQL 14+)."""


class DatabaseInfo(BaseModel):
    """One database on a server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    size_bytes: int
    allow_connections: bool
    owner: str
    connections: int = Field(description="Sessions connected right now.")
    comment: str | None = None

    @property
    def marker(self) -> Marker | None:
        return parse_marker(self.comment)


class DatabaseServerFacts(BaseModel):
    """What a server holds, and the room left for another copy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: str
    version: int = Field(description="server_version_num, e.g. 150008.")
    data_directory: str
    free_bytes: int = Field(description="Free space on the data directory's filesystem.")
    databases: list[DatabaseInfo]

    def get(self, name: str) -> DatabaseInfo | None:
        return next((d for d in self.databases if d.name == name), None)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.databases]


_DESCRIBE = sql.SQL(
    """SELECT json_build_object(
    'version', current_setting('server_version_num')::int,
    'data_directory', current_setting('data_directory'),
    'databases', (
        SELECT coalesce(json_agg(json_build_object(
            'name', d.datname,
            'size_bytes', pg_database_size(d.oid),
            'allow_connections', d.datallowconn,
            'owner', pg_get_userbyid(d.datdba),
            'connections', (SELECT count(*) FROM pg_stat_activity a WHERE a.datid = d.oid),
            'comment', shobj_description(d.oid, 'pg_database')
        ) ORDER BY d.datname), '[]'::json)
        FROM pg_database d WHERE NOT d.datistemplate
    )
)"""
)


@task(
    name="describe-databases",
    task_run_name="describe-databases-{server.name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=2,
)
def describe_databases(pool: ConnectionPool, server: DbServer) -> DatabaseServerFacts:
    """Every database on ``server`` (size, owner, connections, ALLOW_CONNECTIONS, comment) and the
    free space on the filesystem of its data directory."""
    remote = remote_for(pool, server)
    data = read_json(remote, _DESCRIBE)
    if not isinstance(data, dict):
        raise RuntimeError(f"{server.name}: unexpected answer describing databases: {data!r}")
    df = remote.read(
        ["sudo", "-n", "-u", "postgres", "--", "df", "-P", "-B1", data["data_directory"]]
    )
    lines = df.stdout.strip().splitlines()
    free = int(lines[-1].split()[3])
    return DatabaseServerFacts(
        server=server.name,
        version=data["version"],
        data_directory=data["data_directory"],
        free_bytes=free,
        databases=[DatabaseInfo.model_validate(d) for d in data["databases"]],
    )


def count_statement(tables: list[str]) -> sql.Composed:
    """One query returning ``{"schema.table": exact row count, ...}`` as a JSON object."""
    if not tables:
        return sql.SQL("SELECT '{{}}'::json").format()
    parts = []
    for qualified in tables:
        schema, _, table = qualified.rpartition(".")
        ident = sql.Identifier(schema, table) if schema else sql.Identifier(table)
        parts.append(sql.SQL("{}, (SELECT count(*) FROM {})").format(sql.Literal(qualified), ident))
    return sql.SQL("SELECT json_build_object({})").format(sql.SQL(", ").join(parts))


@task(
    name="count-rows",
    task_run_name="count-rows-{database}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=2,
)
def count_rows(
    pool: ConnectionPool, server: DbServer, database: str, tables: list[str]
) -> dict[str, int]:
    """Exact row counts of ``tables`` (``schema.table``) in ``database`` on ``server``."""
    remote = remote_for(pool, server)
    data = read_json(remote, count_statement(tables), database=database)
    return {k: int(v) for k, v in (data or {}).items()}


# --------------------------------------------------------------------------- write tasks


class DatabaseChange(StepResult):
    """What a database write did, with the statements it ran (or would run)."""

    server: str
    statements: list[str] = Field(default_factory=list)


def _result(
    server: DbServer, changed: bool, dry_run: bool, summary: str, statements: list[str]
) -> DatabaseChange:
    get_run_logger().info("%s", summary)
    return DatabaseChange(
        changed=changed, dry_run=dry_run, summary=summary, server=server.name, statements=statements
    )


def _names(pool: ConnectionPool, server: DbServer) -> dict[str, bool]:
    """{database name: allow_connections} on the server right now."""
    out = read_sql(
        remote_for(pool, server),
        ["SELECT datname || '|' || datallowconn::text FROM pg_database WHERE NOT datistemplate"],
    )
    names = {}
    for line in out.splitlines():
        if "|" in line:
            name, _, allow = line.rpartition("|")
            names[name] = allow == "true"
    return names


def create_statements(name: str, owner: str, marker: Marker | None) -> list[sql.Composable]:
    stmts: list[sql.Composable] = [
        sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0 ENCODING 'UTF8'").format(
            sql.Identifier(name), sql.Identifier(owner)
        )
    ]
    if marker is not None:
        stmts.append(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(name), sql.Literal(marker.to_comment())
            )
        )
    return stmts


@task(
    name="create-database",
    task_run_name="create-database-{name}",
    cache_policy=NO_CACHE,
    retries=0,
    tags=["non-idempotent"],
)
def create_database(
    pool: ConnectionPool,
    server: DbServer,
    name: str,
    owner: str,
    marker: Marker | None = None,
    *,
    dry_run: bool,
) -> DatabaseChange:
    """Create an empty database ``name`` owned by ``owner``, with ``marker`` as its comment.

    Compensation: :func:`drop_database`. Refuses if ``name`` already exists.
    """
    stmts = [render(s) for s in create_statements(name, owner, marker)]
    if name in _names(pool, server):
        raise RuntimeError(f"{server.name}: database {name} already exists; not overwriting it")
    remote = remote_for(pool, server, dry_run=dry_run)
    write_sql(remote, stmts)
    verb = "Would create" if dry_run else "Created"
    return _result(
        server, True, dry_run, f"{verb} database {name} (owner {owner}) on {server.name}", stmts
    )


@task(
    name="drop-database",
    task_run_name="drop-database-{name}",
    cache_policy=NO_CACHE,
    retries=0,
    tags=["non-idempotent"],
)
def drop_database(
    pool: ConnectionPool, server: DbServer, name: str, *, dry_run: bool
) -> DatabaseChange:
    """Drop ``name`` (its sessions are terminated). No compensation: the data is gone.

    Already absent is ``changed=False``.
    """
    stmt = render(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    if name not in _names(pool, server):
        return _result(server, False, dry_run, f"{server.name}: database {name} already absent", [])
    write_sql(remote_for(pool, server, dry_run=dry_run), [stmt], timeout=600)
    verb = "Would drop" if dry_run else "Dropped"
    return _result(server, True, dry_run, f"{verb} database {name} on {server.name}", [stmt])


def mark_statement(name: str, marker: Marker | None) -> sql.Composed:
    value = sql.Literal(marker.to_comment()) if marker is not None else sql.SQL("NULL")
    return sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), value)


@task(
    name="mark-database",
    task_run_name="mark-database-{name}",
    cache_policy=NO_CACHE,
    retries=0,
)
def mark_database(
    pool: ConnectionPool, server: DbServer, name: str, marker: Marker | None, *, dry_run: bool
) -> DatabaseChange:
    """Set (or, with None, remove) the reload marker on ``name``. Idempotent."""
    stmt = render(mark_statement(name, marker))
    write_sql(remote_for(pool, server, dry_run=dry_run), [stmt])
    what = f"state {marker.state}" if marker else "no marker"
    verb = "Would mark" if dry_run else "Marked"
    return _result(server, True, dry_run, f"{verb} {name} on {server.name}: {what}", [stmt])


def allow_statement(name: str, allow: bool) -> sql.Composed:
    return sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
        sql.Identifier(name), sql.SQL("true" if allow else "false")
    )


@task(
    name="allow-connections",
    task_run_name="allow-connections-{name}",
    cache_policy=NO_CACHE,
    retries=0,
)
def allow_connections(
    pool: ConnectionPool, server: DbServer, name: str, allow: bool = True, *, dry_run: bool
) -> DatabaseChange:
    """Set ``ALLOW_CONNECTIONS`` on ``name``; already so is ``changed=False``."""
    current = _names(pool, server)
    if name not in current:
        return _result(server, False, dry_run, f"{server.name}: database {name} does not exist", [])
    if current[name] == allow:
        state = "allows" if allow else "refuses"
        return _result(server, False, dry_run, f"{name} already {state} connections", [])
    stmt = render(allow_statement(name, allow))
    write_sql(remote_for(pool, server, dry_run=dry_run), [stmt])
    verb = "Would set" if dry_run else "Set"
    return _result(
        server, True, dry_run, f"{verb} ALLOW_CONNECTIONS {str(allow).lower()} on {name}", [stmt]
    )


def terminate_statement(names: list[str]) -> sql.Composed:
    return sql.SQL(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, {})) FROM pg_stat_activity "
        "WHERE datname IN ({}) AND pid <> pg_backend_pid()"
    ).format(sql.Literal(TERMINATE_WAIT_MS), sql.SQL(", ").join(sql.Literal(n) for n in names))


def swap_statements(
    live: str, side: str, previous: str, live_marker: Marker, previous_marker: Marker
) -> list[sql.Composable]:
    """Refuse new connections, end the existing ones, then both renames (and markers) in one
    transaction; both databases accept connections again at the end (the previous one can be
    inspected, and nothing connects to it by the live name any more)."""
    return [
        allow_statement(live, False),
        allow_statement(side, False),
        terminate_statement([live, side]),
        sql.SQL("BEGIN"),
        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
            sql.Identifier(live), sql.Identifier(previous)
        ),
        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
            sql.Identifier(side), sql.Identifier(live)
        ),
        mark_statement(live, live_marker),
        mark_statement(previous, previous_marker),
        sql.SQL("COMMIT"),
        allow_statement(live, True),
        allow_statement(previous, True),
    ]


class SwapResult(DatabaseChange):
    """What a swap did, and the state it left (read back, not assumed)."""

    live: str
    previous: str
    swapped: bool = Field(description="The new database is live (read back after the swap).")
    seconds: float = Field(description="Wall time of the swap statements.")


@task(
    name="swap-databases",
    task_run_name="swap-databases-{live}",
    cache_policy=NO_CACHE,
    retries=0,
    tags=["non-idempotent"],
)
def swap_databases(
    pool: ConnectionPool,
    server: DbServer,
    live: str,
    side: str,
    previous: str,
    live_marker: Marker,
    previous_marker: Marker,
    *,
    dry_run: bool,
) -> SwapResult:
    """Make ``side`` the live database and keep the old one as ``previous``.

    Both renames run in one transaction, after new connections to both databases are refused and
    existing ones terminated (each given 5 s to go). The outcome is read back: on any error, the
    databases are either both renamed or neither, and ``ALLOW_CONNECTIONS`` is set true again on
    whichever database is live. Compensation: :func:`swap_back_databases`.
    """
    stmts = [render(s) for s in swap_statements(live, side, previous, live_marker, previous_marker)]
    current = _names(pool, server)
    if side not in current or live not in current:
        raise RuntimeError(
            f"{server.name}: cannot swap: {'side database ' + side if side not in current else 'live database ' + live} does not exist"
        )
    if previous in current:
        raise RuntimeError(f"{server.name}: cannot swap: {previous} already exists")
    if dry_run:
        return SwapResult(
            changed=True,
            dry_run=True,
            summary=f"Would swap {side} in as {live} (old one kept as {previous})",
            server=server.name,
            statements=stmts,
            live=live,
            previous=previous,
            swapped=False,
            seconds=0.0,
        )
    started = datetime.now(UTC)
    error: Exception | None = None
    try:
        write_sql(remote_for(pool, server), stmts, timeout=60)
    except Exception as exc:  # read back what happened, make the live one usable, re-raise
        error = exc
    seconds = (datetime.now(UTC) - started).total_seconds()
    if error is None:  # every statement ran, COMMIT included
        swapped = True
    else:  # read back what happened; make whichever database is live accept connections
        after = _names(pool, server)
        swapped = previous in after and live in after and side not in after
        if live in after and not after[live]:
            write_sql(remote_for(pool, server), [render(allow_statement(live, True))])
    if error is not None:
        get_run_logger().error(
            "swap failed (%s); %s is %s",
            error,
            live,
            "the new database" if swapped else "unchanged",
        )
        raise error
    summary = f"Swapped {side} in as {live} in {seconds:.2f} s (old one kept as {previous})"
    get_run_logger().info("%s", summary)
    return SwapResult(
        changed=True,
        dry_run=False,
        summary=summary,
        server=server.name,
        statements=stmts,
        live=live,
        previous=previous,
        swapped=swapped,
        seconds=seconds,
    )


def swap_back_statements(live: str, previous: str, failed: str) -> list[sql.Composable]:
    return [
        allow_statement(live, False),
        allow_statement(previous, False),
        terminate_statement([live, previous]),
        sql.SQL("BEGIN"),
        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
            sql.Identifier(live), sql.Identifier(failed)
        ),
        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
            sql.Identifier(previous), sql.Identifier(live)
        ),
        mark_statement(live, None),
        sql.SQL("COMMIT"),
        allow_statement(live, True),
        sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(failed)),
    ]


@task(
    name="swap-back-databases",
    task_run_name="swap-back-databases-{live}",
    cache_policy=NO_CACHE,
    retries=0,
    tags=["non-idempotent"],
)
def swap_back_databases(
    pool: ConnectionPool, server: DbServer, live: str, previous: str, *, dry_run: bool
) -> DatabaseChange:
    """Put ``previous`` back as the live database; the new one is renamed aside and dropped.

    The compensation of :func:`swap_databases`. Without ``previous`` on the server it changes
    nothing (there is nothing to go back to).
    """
    current = _names(pool, server)
    if previous not in current:
        return _result(
            server,
            False,
            dry_run,
            f"{server.name}: {previous} does not exist; nothing to put back",
            [],
        )
    failed = failed_name(live, datetime.now(UTC))
    if live not in current:  # the live name is free: only rename previous back
        stmts = [
            render(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(previous), sql.Identifier(live)
                )
            ),
            render(mark_statement(live, None)),
            render(allow_statement(live, True)),
        ]
    else:
        stmts = [render(s) for s in swap_back_statements(live, previous, failed)]
    write_sql(remote_for(pool, server, dry_run=dry_run), stmts, timeout=600)
    verb = "Would put" if dry_run else "Put"
    return _result(
        server, True, dry_run, f"{verb} {previous} back as {live} (the new database dropped)", stmts
    )


@task(
    name="analyze-database",
    task_run_name="analyze-database-{database}",
    cache_policy=NO_CACHE,
    retries=0,
)
def analyze_database(
    pool: ConnectionPool, server: DbServer, database: str, *, dry_run: bool, timeout: float = 3600
) -> DatabaseChange:
    """``VACUUM (ANALYZE)`` every table of ``database`` (a freshly loaded copy has no statistics,
    no visibility map and no hint bits).

    Before a copy goes live: the app gets sensible query plans and index-only scans from its first
    request, and autovacuum has nothing to start on the new tables (analyze, or the vacuum that
    inserts trigger) while the swap ends every session. Idempotent; nothing to compensate.
    """
    stmt = "VACUUM (ANALYZE)"
    write_sql(remote_for(pool, server, dry_run=dry_run), [stmt], database=database, timeout=timeout)
    verb = "Would vacuum and analyze" if dry_run else "Vacuumed and analyzed"
    return _result(server, True, dry_run, f"{verb} {database} on {server.name}", [stmt])
