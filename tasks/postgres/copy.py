"""Copying a database between two servers without the data passing through the flow's machine.

The copy runs **on the target database server**: ``pg_dump`` there connects to the source server
over the network (as the source's app role, ``database_user``) and is piped straight into ``psql``
on the side database (as the ``postgres`` OS user over the local socket, after ``SET ROLE
<database_user>`` so every object belongs to the app's role)::

    { SET ROLE USER; pg_dump --format=plain --no-owner --no-acl --snapshot=S -h SOURCE -U USER
      SOURCE_DB; } | psql -v ON_ERROR_STOP=1 -d SIDE_DB

Plain format streamed, stopping at the first error: measured between two test hosts on 2 cores
(bench/reload_production_db.py, 1085 MB), it was far ahead on a busy machine (plain 15.2 s, directory
format with -j2 17.7 s, custom -Z0 through pg_restore 22.6 s) and within noise of the others on a
quiet one (8.8-11.9 s for all three); unlike the directory format it needs no room for a dump file.
An earlier measurement on 668 MB had custom -Z0 a little ahead (13.5 s against 14.3 s).

**The password** of the source role never touches a command line or a file: it is sent on the
launching command's **stdin**, read by the shell into ``PGPASSWORD`` and inherited by ``psql`` and
``pg_dump`` (a process's environment is readable only by its owner and root). Nothing is left on
disk when the copy ends or is killed. Chosen over a ``.pgpass`` written over SFTP because a flow
killed mid-copy would leave that file behind.

**Row counts in the copy's snapshot**: before the dump, a ``psql`` session on the source opens a
``REPEATABLE READ`` transaction and exports its snapshot; ``pg_dump --snapshot`` dumps exactly that
snapshot while the same session counts the rows of the largest tables in it. After the restore the
side database must hold exactly those counts, even though production kept changing.

**Detached**: the copy is started with ``setsid`` and survives the SSH session. Its job directory
(``/var/lib/postgresql/fabflows-reload-<side db>``) holds ``copy.pid`` (the process group),
``copy.log``, ``counts.json`` and ``copy.rc`` (the exit status, written last). The flow polls it
(and the side database's size, for progress); :func:`stop_copy` kills the process group, which a
recovery also does for a copy whose flow died.
"""

from __future__ import annotations

import json
import shlex
import time

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from fabflows.progress import Progress
from tasks.plan import StepResult
from tasks.postgres.databases import count_statement
from tasks.postgres.server import DbServer, psql_error, remote_for, render
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.remote import CommandError, Remote, sh_argv

JOB_ROOT = "/var/lib/postgresql"

RESTORE_OPTIONS = "-c maintenance_work_mem=256MB -c synchronous_commit=off"
"""PGOPTIONS of the loading session: faster index builds, no waiting for WAL flushes."""

COPY_SCRIPT = r"""#!/bin/bash
# fabflows reload-production-db: copy SOURCE_DB (on SRC_HOST) into SIDE_DB on this server.
# Started detached by tasks/postgres/copy.py; PGPASSWORD comes from the launcher's environment.
set -uo pipefail
job=$1 src_host=$2 src_port=$3 src_db=$4 src_user=$5 side=$6 role=$7
echo $$ > "$job/copy.pid"
finish() { echo "$1" > "$job/copy.rc.tmp"; mv -f "$job/copy.rc.tmp" "$job/copy.rc"; exit "$1"; }
export PGCONNECT_TIMEOUT=15
coproc SRC { exec psql -X -q -A -t -v ON_ERROR_STOP=1 -h "$src_host" -p "$src_port" -U "$src_user" -d "$src_db" 2>&1; }
# bash unsets SRC and SRC_PID when the coprocess ends: keep our own copies.
src_pid=$SRC_PID
exec {to_src}>&"${SRC[1]}" {from_src}<&"${SRC[0]}"
echo 'BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SELECT pg_export_snapshot();' >&"$to_src"
snap=""
IFS= read -r -t 60 snap <&"$from_src"
case "$snap" in
  [0-9A-F]*-[0-9A-F]*-[0-9]*) echo "snapshot $snap" ;;
  *) echo "exporting a snapshot on the source failed: $snap"; finish 90 ;;
esac
echo "dump started $(date -u +%FT%TZ)"
{ cat "$job/prelude.sql" &&
  pg_dump --format=plain --no-owner --no-acl --snapshot="$snap" \
    -h "$src_host" -p "$src_port" -U "$src_user" -d "$src_db"; } \
  | PGOPTIONS="$RESTORE_OPTIONS" psql -X -q -v ON_ERROR_STOP=1 -d "$side" >/dev/null &
pipeline=$!
# Count the largest tables in the same snapshot while the dump runs.
cat "$job/counts.sql" >&"$to_src"
counts=""
IFS= read -r counts <&"$from_src"
echo "$counts" > "$job/counts.json.tmp" && mv -f "$job/counts.json.tmp" "$job/counts.json"
wait "$pipeline"
rc=$?
echo 'COMMIT;' >&"$to_src"
exec {to_src}>&- {from_src}<&-
eval "exec ${SRC[1]:-9}>&-" 2>/dev/null
wait "$src_pid" 2>/dev/null
echo "dump and restore ended $(date -u +%FT%TZ) with status $rc"
finish "$rc"
"""

LAUNCH_SCRIPT = r"""set -eu
job=$1; shift
IFS= read -r PGPASSWORD
export PGPASSWORD RESTORE_OPTIONS="$RESTORE"
rm -f -- "$job/copy.rc" "$job/counts.json" "$job/copy.pid"
setsid bash "$job/copy.sh" "$job" "$@" </dev/null >"$job/copy.log" 2>&1 &
echo $!
"""
"""Started as the postgres user with the password alone on stdin; prints the copy's process id."""

CHECK_SCRIPT = r"""IFS= read -r PGPASSWORD
export PGPASSWORD PGCONNECT_TIMEOUT=10
exec psql -X -q -A -t -v ON_ERROR_STOP=1 -h "$1" -p "$2" -U "$3" -d "$4"
"""
"""Password on the first line of stdin, the SQL after it."""

POLL_SCRIPT = r"""job=$1; side=$2
# wait up to a second for the copy to end, so the flow notices within 0.1 s
for _ in 1 2 3 4 5 6 7 8 9 10; do [ -f "$job/copy.rc" ] && break; sleep 0.1; done
if [ -f "$job/copy.rc" ]; then echo "rc $(cat "$job/copy.rc")"; fi
if [ -f "$job/copy.pid" ] && kill -0 "$(cat "$job/copy.pid")" 2>/dev/null; then echo running; fi
psql -X -q -A -t -v side="$side" 2>/dev/null <<'SQL' | sed 's/^/size /'
SELECT pg_database_size(oid) FROM pg_database WHERE datname = :'side';
SQL
"""
"""Waits up to 1 s for the copy's exit status, then reports it, whether the copy runs, and the side
database's size."""

STOP_SCRIPT = r"""job=$1
if [ -f "$job/copy.pid" ]; then
  pid=$(cat "$job/copy.pid")
  if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "$job/copy.sh"; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo killed
  fi
fi
rm -rf -- "$job"
"""


def job_dir(side: str) -> str:
    """Where the copy into ``side`` keeps its files on the target server."""
    return f"{JOB_ROOT}/fabflows-reload-{side}"


class SourceTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_name: str = Field(alias="schema")
    name: str
    bytes: int
    estimated_rows: int

    @property
    def qualified(self) -> str:
        return f"{self.schema_name}.{self.name}"


class SourceFacts(BaseModel):
    """The source database as the target server sees it over the network."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    database: str
    size_bytes: int
    version: int
    tables: list[SourceTable] = Field(description="Largest tables first.")


_SOURCE_FACTS = sql.SQL(
    """SELECT json_build_object(
    'database', current_database(),
    'size_bytes', pg_database_size(current_database()),
    'version', current_setting('server_version_num')::int,
    'tables', (SELECT coalesce(json_agg(t ORDER BY t.bytes DESC), '[]'::json) FROM (
        SELECT n.nspname AS schema, c.relname AS name, pg_total_relation_size(c.oid) AS bytes,
               greatest(c.reltuples, 0)::bigint AS estimated_rows
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg\\_toast%'
        ORDER BY pg_total_relation_size(c.oid) DESC LIMIT {}) t)
)"""
)


class SourceUnavailable(RuntimeError):
    """The target server cannot read the source database (absent, unreachable, refused)."""


def _source_argv(source: DbServer, database: str, user: str) -> list[str]:
    return sh_argv(CHECK_SCRIPT, source.db_address, str(source.port), user, database)


@task(
    name="describe-source-database",
    task_run_name="describe-source-database-{database}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=2,
)
def describe_source_database(
    pool: ConnectionPool,
    target: DbServer,
    source: DbServer,
    database: str,
    user: str,
    password: SecretStr,
    tables: int = 5,
) -> SourceFacts:
    """From the target server, over the path the copy will take: the source database's size and
    its largest tables. Proves the source exists, is reachable and accepts the credentials.

    Raises:
        SourceUnavailable: with psql's reason (no such database, connection refused, auth failed).
    """
    remote = remote_for(pool, target)
    query = render(_SOURCE_FACTS.format(sql.Literal(tables))) + ";\n"
    stdin = password.get_secret_value().encode() + b"\n" + query.encode()
    try:
        result = remote.read(_source_argv(source, database, user), stdin=stdin, timeout=60)
    except CommandError as exc:
        reason = psql_error(exc.stderr) or str(exc)
        raise SourceUnavailable(
            f"{target.name} cannot read database {database} on {source.name} "
            f"({source.db_address}:{source.port}) as {user}: {reason}"
        ) from None
    data = json.loads(result.stdout.strip())
    return SourceFacts.model_validate(data)


class CopyJob(StepResult):
    """A copy started on the target server."""

    server: str
    side: str
    job_dir: str
    pid: int | None = None
    command: str = Field(description="The copy as it runs on the target (no secrets).")
    tables: list[str] = Field(default_factory=list, description="Tables counted in the snapshot.")


def copy_command(source: DbServer, database: str, user: str, side: str) -> str:
    """How the copy reads in plans and logs."""
    return (
        f"{{ SET ROLE {user}; pg_dump --format=plain --no-owner --no-acl --snapshot=<exported> "
        f"-h {source.db_address} -p {source.port} -U {shlex.quote(user)} -d {shlex.quote(database)}; }}"
        f" | psql -v ON_ERROR_STOP=1 -d {shlex.quote(side)}"
    )


@task(
    name="start-copy",
    task_run_name="start-copy-{side}",
    cache_policy=NO_CACHE,
    retries=0,
    tags=["non-idempotent"],
)
def start_copy(
    pool: ConnectionPool,
    target: DbServer,
    source: DbServer,
    database: str,
    user: str,
    password: SecretStr,
    side: str,
    tables: list[str],
    *,
    dry_run: bool,
) -> CopyJob:
    """Start copying ``database`` from ``source`` into the (empty) ``side`` database on ``target``.

    Returns at once; :func:`wait_for_copy` follows it. Compensation: :func:`stop_copy` (then drop
    the side database).
    """
    job = job_dir(side)
    command = copy_command(source, database, user, side)
    if dry_run:
        return CopyJob(
            changed=True,
            dry_run=True,
            summary=f"Would copy {database} from {source.name} into {side} on {target.name}",
            server=target.name,
            side=side,
            job_dir=job,
            command=command,
            tables=tables,
        )
    remote = remote_for(pool, target)
    remote.write(
        [
            "sudo",
            "-n",
            "-u",
            "postgres",
            "--",
            "sh",
            "-c",
            'umask 077; rm -rf -- "$1"; mkdir -p -- "$1"',
            "sh",
            job,
        ]
    )
    remote.write_file(
        f"{job}/copy.sh", COPY_SCRIPT.encode(), owner="postgres", group="postgres", mode=0o700
    )
    remote.write_file(
        f"{job}/prelude.sql",
        (render(sql.SQL("SET ROLE {}").format(sql.Identifier(user))) + ";\n").encode(),
        owner="postgres",
        group="postgres",
        mode=0o600,
    )
    remote.write_file(
        f"{job}/counts.sql",
        (render(count_statement(tables)) + ";\n").encode(),
        owner="postgres",
        group="postgres",
        mode=0o600,
    )
    argv = ["sudo", "-n", "-u", "postgres", "--", "env", f"RESTORE={RESTORE_OPTIONS}"]
    argv += sh_argv(
        LAUNCH_SCRIPT, job, source.db_address, str(source.port), database, user, side, user
    )
    result = remote.write(argv, stdin=password.get_secret_value().encode() + b"\n")
    pid = int(result.stdout.strip()) if result and result.stdout.strip().isdigit() else None
    summary = (
        f"Started copying {database} from {source.name} into {side} on {target.name} (pid {pid})"
    )
    get_run_logger().info("%s: %s", summary, command)
    return CopyJob(
        changed=True,
        dry_run=False,
        summary=summary,
        server=target.name,
        side=side,
        job_dir=job,
        pid=pid,
        command=command,
        tables=tables,
    )


class CopyFailed(RuntimeError):
    """pg_dump or psql failed (the message has the first error line of the copy's log)."""


class CopyResult(BaseModel):
    """A finished copy: how long, how big, and the row counts in the copy's snapshot."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    side: str
    seconds: float
    side_bytes: int
    source_bytes: int
    snapshot_counts: dict[str, int]

    @property
    def mb_per_s(self) -> float:
        return self.source_bytes / 1e6 / self.seconds if self.seconds else 0.0


def _poll(remote: Remote, job: str, side: str) -> tuple[int | None, bool, int]:
    out = remote.read(
        ["sudo", "-n", "-u", "postgres", "--", *sh_argv(POLL_SCRIPT, job, side)]
    ).stdout
    rc: int | None = None
    running = False
    size = 0
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        if word == "rc" and rest.strip().lstrip("-").isdigit():
            rc = int(rest.strip())
        elif word == "running":
            running = True
        elif word == "size" and rest.strip().isdigit():
            size = int(rest.strip())
    return rc, running, size


def _read(remote: Remote, path: str) -> str:
    return remote.read(
        ["sudo", "-n", "-u", "postgres", "--", "cat", "--", path], ok_codes=(0, 1)
    ).stdout


@task(
    name="wait-for-copy",
    task_run_name="wait-for-copy-{job.side}",
    cache_policy=NO_CACHE,
    retries=0,
)
def wait_for_copy(
    pool: ConnectionPool,
    target: DbServer,
    job: CopyJob,
    source_bytes: int,
    *,
    timeout: float,
    interval: float = 0.0,
    progress_key: str = "copy-database",
    started_at: float | None = None,
) -> CopyResult:
    """Follow the copy until it ends; show progress (side database size against the source's size,
    with the time left) as a Prefect progress artifact and a CLI bar.

    Raises:
        CopyFailed: the copy exited non-zero, or its process vanished without a status.
        TimeoutError: still running after ``timeout`` seconds (the caller stops it).
    """
    started = started_at if started_at is not None else time.monotonic()
    progress = Progress(
        progress_key, total=source_bytes, unit="B", description=f"Copying into {job.side}"
    )
    missing_polls = 0
    while True:
        remote = remote_for(pool, target)
        rc, running, size = _poll(remote, job.job_dir, job.side)
        progress.update(min(size, source_bytes))
        if rc is not None:
            break
        if not running:
            missing_polls += 1
            if missing_polls >= 3:
                raise CopyFailed(
                    f"the copy into {job.side} on {target.name} stopped without an exit status; "
                    f"log: {_read(remote, job.job_dir + '/copy.log').strip()[-500:]}"
                )
        else:
            missing_polls = 0
        if time.monotonic() - started > timeout:
            raise TimeoutError(
                f"the copy into {job.side} on {target.name} still runs after {timeout:.0f} s"
            )
        time.sleep(interval)
    seconds = time.monotonic() - started
    log = _read(remote, job.job_dir + "/copy.log")
    if rc != 0:
        errors = [ln for ln in log.splitlines() if "error" in ln.lower() or "fatal" in ln.lower()]
        detail = (errors[:1] or log.strip().splitlines()[-1:] or ["(no output)"])[0]
        raise CopyFailed(
            f"copying into {job.side} on {target.name} failed (exit {rc}) after {seconds:.1f} s: {detail}"
        )
    progress.finish()
    counts_text = _read(remote, job.job_dir + "/counts.json").strip()
    try:
        counts = {k: int(v) for k, v in json.loads(counts_text).items()} if counts_text else {}
    except ValueError:
        raise CopyFailed(
            f"the snapshot row counts could not be read: {counts_text[:200]!r}"
        ) from None
    _, _, size = _poll(remote, job.job_dir, job.side)
    get_run_logger().info(
        "copy into %s done in %.1f s (%.1f MB/s, %d bytes)",
        job.side,
        seconds,
        source_bytes / 1e6 / seconds if seconds else 0.0,
        size,
    )
    return CopyResult(
        side=job.side,
        seconds=round(seconds, 2),
        side_bytes=size,
        source_bytes=source_bytes,
        snapshot_counts=counts,
    )


@task(
    name="stop-copy",
    task_run_name="stop-copy-{side}",
    cache_policy=NO_CACHE,
    retries=0,
)
def stop_copy(pool: ConnectionPool, target: DbServer, side: str, *, dry_run: bool) -> StepResult:
    """Kill a copy into ``side`` that is still running (its process group) and remove its job
    directory. The compensation of :func:`start_copy`; nothing running is ``changed=False``."""
    job = job_dir(side)
    remote = remote_for(pool, target, dry_run=dry_run)
    exists = remote.read(["sudo", "-n", "-u", "postgres", "--", "test", "-d", job], ok_codes=(0, 1))
    if exists.exit_code != 0:
        return StepResult(changed=False, dry_run=dry_run, summary=f"no copy job for {side}")
    result = remote.write(["sudo", "-n", "-u", "postgres", "--", *sh_argv(STOP_SCRIPT, job)])
    killed = bool(result and "killed" in result.stdout)
    verb = "Would stop" if dry_run else ("Killed" if killed else "Cleaned up")
    summary = f"{verb} the copy job for {side} on {target.name}"
    get_run_logger().info("%s", summary)
    return StepResult(changed=True, dry_run=dry_run, summary=summary)


@task(
    name="read-database-password",
    task_run_name="read-database-password-{server.name}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=2,
)
def read_database_password(pool: ConnectionPool, server: DbServer, path: str) -> SecretStr:
    """FabulAWS keeps each secret in a file on the servers (``<home>/database_password``, mode 600,
    owned by the deploy user): read it. The value is returned as a SecretStr and never logged."""
    remote = remote_for(pool, server)
    try:
        result = remote.read(["cat", "--", path])
    except CommandError as exc:
        raise SourceUnavailable(
            f"cannot read the database password file {path} on {server.name}: {exc.stderr.strip()[-200:]}"
        ) from None
    value = result.stdout.strip()
    if not value:
        raise SourceUnavailable(f"the database password file {path} on {server.name} is empty")
    return SecretStr(value)
