"""A planned switchover: the primary stops cleanly, a replica takes over, the old one follows it.

Read task:

- :func:`describe_shutdown`: the cluster's state in ``pg_controldata`` (``shut down`` after a clean
  stop) and its latest checkpoint's LSN: after a clean (fast) shutdown that checkpoint is the last
  WAL record the primary wrote, so a replica that has replayed past it has every write.

Write tasks (keyword-only ``dry_run``, no default):

- :func:`stop_primary_cleanly`: fast shutdown (supervisor's ``stopsignal=INT`` or the service's
  stop), then the final LSN from ``pg_controldata``; fails when the cluster did not shut down
  cleanly. Compensation: :func:`start_postgres`.
- :func:`start_postgres`: start PostgreSQL and wait until it accepts connections (already
  running: no-op).
- :func:`checkpoint`: ``CHECKPOINT`` before a stop, so the shutdown checkpoint is short.
- :func:`promote_once_replayed`: wait until a standby has replayed past the old primary's final
  LSN, then promote it, in one psql session (one round trip while the app waits).
- :func:`rejoin_as_standby`: a cleanly stopped old primary becomes a streaming replica of the new
  one: ``standby.signal``, ``primary_conninfo`` (the replication role, its password from the
  ``postgres`` user's ``.pgpass``, never on a command line) and ``primary_slot_name`` in
  ``postgresql.auto.conf``, then started. No ``pg_rewind``: after a clean shutdown the new
  primary's timeline branched exactly at the old one's last record, which the old primary follows
  (``recovery_target_timeline = latest``). No compensation (after the promotion there is no way
  back but a rebuild).

The other writes a switchover needs are promote-replica's (``tasks.postgres.failover``:
``promote_standby``, ``allow_replication``, ``follow_primary``) and reset-replicas'
(``tasks.postgres.replica_setup.install_replication_password``).
"""

from __future__ import annotations

import re

from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field

from tasks.plan import StepResult
from tasks.postgres.failover import REPLICATION_ROLE, describe_standby
from tasks.postgres.rebuild import START_PG_SCRIPT
from tasks.postgres.replica_setup import PGPASS, STOP_SCRIPT
from tasks.postgres.server import DbServer, psql_argv, psql_error, remote_for
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.remote import CommandError

CONTROL_SCRIPT = r"""
set -e
for d in /var/lib/postgresql/*/main; do
    [ -f "$d/PG_VERSION" ] || continue
    v=$(cat "$d/PG_VERSION")
    running=0; pg_isready -q && running=1
    printf 'running %s\n' "$running"
    printf 'standby_signal %s\n' "$([ -f "$d/standby.signal" ] && echo 1 || echo 0)"
    LC_ALL=C "/usr/lib/postgresql/$v/bin/pg_controldata" "$d" \
        | sed -n -E 's/^Database cluster state: +(.*)$/state \1/p; s/^Latest checkpoint location: +(.*)$/checkpoint \1/p'
    exit 0
done
echo "no data directory under /var/lib/postgresql" >&2; exit 3
"""

REJOIN_SCRIPT = r"""
set -e
host="$1"; port="$2"; role="$3"; slot="$4"; app="$5"; passfile="$6"
for d in /var/lib/postgresql/*/main; do
    [ -f "$d/PG_VERSION" ] || continue
    auto="$d/postgresql.auto.conf"
    touch "$auto"
    grep -vE '^[[:space:]]*(primary_conninfo|primary_slot_name)[[:space:]]*=' "$auto" > "$auto.fabflows-new" || true
    printf "primary_conninfo = 'host=%s port=%s user=%s passfile=%s application_name=%s'\n" \
        "$host" "$port" "$role" "$passfile" "$app" >> "$auto.fabflows-new"
    printf "primary_slot_name = '%s'\n" "$slot" >> "$auto.fabflows-new"
    chown postgres: "$auto.fabflows-new"; chmod 600 "$auto.fabflows-new"
    mv -f "$auto.fabflows-new" "$auto"
    touch "$d/standby.signal"; chown postgres: "$d/standby.signal"
    exit 0
done
echo "no data directory under /var/lib/postgresql" >&2; exit 3
"""
"""As root, on a stopped cluster: ``primary_conninfo``/``primary_slot_name`` replaced in
``postgresql.auto.conf`` (the password stays in ``passfile``), ``standby.signal`` written."""


class ShutdownState(BaseModel):
    """What ``pg_controldata`` says about a server's cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: str
    running: bool = Field(description="pg_isready answered.")
    state: str = Field(description="'shut down', 'in production', 'in archive recovery'...")
    checkpoint_lsn: str = Field(description="Latest checkpoint location.")
    standby_signal: bool = False

    @property
    def clean(self) -> bool:
        """Stopped by a clean shutdown (its last record is that shutdown's checkpoint)."""
        return not self.running and self.state == "shut down"


def parse_control(server: str, text: str) -> ShutdownState:
    """The control script's output as a model (pure)."""
    values = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    return ShutdownState(
        server=server,
        running=values.get("running") == "1",
        state=values.get("state", "").strip(),
        checkpoint_lsn=values.get("checkpoint", "").strip(),
        standby_signal=values.get("standby_signal") == "1",
    )


@task(
    name="describe-shutdown",
    task_run_name="describe-shutdown-{server.name}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=1,
)
def describe_shutdown(pool: ConnectionPool, server: DbServer) -> ShutdownState:
    """Whether PostgreSQL runs, its cluster state and latest checkpoint (``pg_controldata``).

    Args:
        pool: The run's SSH connections.
        server: The database server.
    """
    out = remote_for(pool, server).read(["sh", "-c", CONTROL_SCRIPT], sudo=True, timeout=30)
    return parse_control(server.name, out.stdout)


class CleanStop(StepResult):
    final_lsn: str = Field(default="", description="The shutdown checkpoint's LSN.")


@task(
    name="stop-primary-cleanly",
    task_run_name="stop-primary-cleanly-{server.name}",
    cache_policy=NO_CACHE,
    retries=0,
)
def stop_primary_cleanly(pool: ConnectionPool, server: DbServer, *, dry_run: bool) -> CleanStop:
    """Fast shutdown of the primary (sessions ended, a shutdown checkpoint written and sent to the
    connected replicas before the WAL senders exit), then its final LSN. Already cleanly stopped:
    no-op with the same LSN. Compensation: :func:`start_postgres`.

    Args:
        pool: The run's SSH connections.
        server: The primary.
        dry_run: Only say what would be done.
    """
    if dry_run:
        before = describe_shutdown.fn(pool, server)
        if before.clean:
            return CleanStop(
                changed=False,
                dry_run=True,
                summary=f"{server.name} is stopped already (final LSN {before.checkpoint_lsn})",
                final_lsn=before.checkpoint_lsn,
            )
        return CleanStop(changed=True, dry_run=True, summary=f"Would stop {server.name} (fast)")
    # one round trip (it counts while the app waits): stop if it runs, then pg_controldata
    script = (
        "if pg_isready -q; then\necho was_running 1\n" + STOP_SCRIPT + "\nfi\n" + CONTROL_SCRIPT
    )
    out = remote_for(pool, server).write(["sh", "-c", script], sudo=True, timeout=120)
    assert out is not None
    after = parse_control(server.name, out.stdout)
    if not after.clean:
        raise RuntimeError(
            f"{server.name} did not shut down cleanly (running: {after.running}, "
            f"state: {after.state!r}): no switchover on it"
        )
    ran = "was_running 1" in out.stdout
    return CleanStop(
        changed=ran,
        dry_run=False,
        summary=f"{server.name} "
        + ("stopped (fast shutdown, " if ran else "was stopped already (")
        + f"final LSN {after.checkpoint_lsn})",
        final_lsn=after.checkpoint_lsn,
    )


@task(
    name="start-postgres",
    task_run_name="start-postgres-{server.name}",
    cache_policy=NO_CACHE,
    retries=0,
)
def start_postgres(pool: ConnectionPool, server: DbServer, *, dry_run: bool) -> StepResult:
    """Start PostgreSQL and wait until it accepts connections (running already: no-op). The
    compensation of :func:`stop_primary_cleanly`.

    Args:
        pool: The run's SSH connections.
        server: The database server.
        dry_run: Only say what would be done.
    """
    if describe_shutdown.fn(pool, server).running:
        return StepResult(changed=False, dry_run=dry_run, summary=f"{server.name} runs already")
    if dry_run:
        return StepResult(changed=True, dry_run=True, summary=f"Would start {server.name}")
    remote_for(pool, server).write(["sh", "-c", START_PG_SCRIPT], sudo=True, timeout=90)
    return StepResult(changed=True, dry_run=False, summary=f"{server.name} started")


def _checked(value: str, pattern: str, what: str) -> str:
    if not re.fullmatch(pattern, value):
        raise ValueError(f"unusable {what} {value!r}")
    return value


@task(
    name="rejoin-as-standby",
    task_run_name="rejoin-as-standby-{server.name}",
    cache_policy=NO_CACHE,
    retries=0,
    tags=["non-idempotent"],
)
def rejoin_as_standby(
    pool: ConnectionPool,
    server: DbServer,
    new_primary: DbServer,
    slot: str,
    *,
    dry_run: bool,
    role: str = REPLICATION_ROLE,
) -> StepResult:
    """Make the cleanly stopped old primary a streaming replica of ``new_primary`` and start it.
    Already a standby of ``new_primary``: no-op. Refused (``RuntimeError``) when it runs as a
    primary or did not shut down cleanly (it may then hold writes the new primary lacks: rebuild
    it with reset-replicas instead). The replication password must be in the ``postgres`` user's
    ``.pgpass`` already (``install_replication_password``). No compensation.

    Args:
        pool: The run's SSH connections.
        server: The old primary.
        new_primary: The primary it streams from from now on.
        slot: Its physical slot on ``new_primary`` (``allow_replication`` makes it).
        dry_run: Only say what would be done.
        role: The replication role.
    """
    host = _checked(new_primary.db_address, r"[0-9A-Za-z.:-]+", "address")
    _checked(slot, r"[a-z0-9_]{1,63}", "slot name")
    _checked(role, r"[A-Za-z0-9_]+", "role")
    app = re.sub(r"[^A-Za-z0-9_.-]", "_", server.name)[:60]
    control = describe_shutdown.fn(pool, server)
    if control.running:
        state = describe_standby.fn(pool, server)
        if state.in_recovery and f"host={host} " in state.primary_conninfo + " ":
            return StepResult(
                changed=False,
                dry_run=dry_run,
                summary=f"{server.name} is a standby of {new_primary.name} already",
            )
        raise RuntimeError(
            f"{server.name} runs "
            + ("as a standby of another server" if state.in_recovery else "as a primary")
            + f": stop it first (it is not made a replica of {new_primary.name} while it runs)"
        )
    if not control.clean and not control.standby_signal:
        raise RuntimeError(
            f"{server.name} did not shut down cleanly (state {control.state!r}): rebuild it "
            "as a replica (reset-replicas), it may hold writes the new primary lacks"
        )
    if dry_run:
        return StepResult(
            changed=True,
            dry_run=True,
            summary=f"Would make {server.name} a standby of {new_primary.name} (slot {slot})",
        )
    remote = remote_for(pool, server)
    argv = ["sh", "-c", REJOIN_SCRIPT, "rejoin", host, str(new_primary.port), role, slot, app]
    remote.write([*argv, PGPASS], sudo=True, timeout=30)
    remote.write(["sh", "-c", START_PG_SCRIPT], sudo=True, timeout=90)
    return StepResult(
        changed=True,
        dry_run=False,
        summary=f"{server.name} started as a standby of {new_primary.name} (slot {slot})",
    )


PROMOTE_SQL = """\
SELECT CASE WHEN pg_is_in_recovery() THEN 'standby ' || coalesce(pg_last_wal_replay_lsn()::text, '')
       ELSE 'primary' END;
DO $fabflows$
DECLARE
    final pg_lsn := {final};
    deadline timestamptz := clock_timestamp() + make_interval(secs => {replay_seconds});
BEGIN
    IF NOT pg_is_in_recovery() THEN
        RETURN;
    END IF;
    WHILE coalesce(pg_last_wal_replay_lsn() <= final, true) LOOP
        IF clock_timestamp() > deadline THEN
            RAISE EXCEPTION 'not replayed past % after % s (replayed up to %): not promoting',
                final, {replay_seconds}, pg_last_wal_replay_lsn();
        END IF;
        PERFORM pg_sleep(0.01);
    END LOOP;
    IF NOT pg_promote(true, {promote_seconds}) THEN
        RAISE EXCEPTION 'pg_promote did not finish in % s', {promote_seconds};
    END IF;
END
$fabflows$;
SELECT pg_is_in_recovery();
"""
"""One psql round trip: wait (on the server, every 10 ms) until the standby has replayed past the
old primary's final record, then promote; the states before and after."""


@task(
    name="promote-once-replayed",
    task_run_name="promote-once-replayed-{server.name}",
    cache_policy=NO_CACHE,
    retries=0,
)
def promote_once_replayed(
    pool: ConnectionPool,
    server: DbServer,
    final_lsn: str,
    *,
    dry_run: bool,
    replay_seconds: float = 30,
    promote_seconds: int = 60,
) -> StepResult:
    """Promote the standby as soon as it has replayed past ``final_lsn`` (the stopped primary's
    shutdown checkpoint: then it holds every write). The wait and the promotion run in one psql
    session on the server, one SSH round trip, as the app waits meanwhile. Already a primary:
    no-op. Not replayed past ``final_lsn`` within ``replay_seconds``: ``RuntimeError``, nothing
    changed. No compensation (a promotion only goes forward).

    Args:
        pool: The run's SSH connections.
        server: The standby to promote.
        final_lsn: The old primary's final LSN (``pg_controldata`` after its clean stop).
        dry_run: Only say what would be done.
        replay_seconds: How long to wait for the replay.
        promote_seconds: How long PostgreSQL waits for the promotion to finish.
    """
    final = _checked(final_lsn, r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", "LSN")
    if dry_run:
        state = describe_standby.fn(pool, server)
        if not state.in_recovery:
            return StepResult(
                changed=False, dry_run=True, summary=f"{server.name} is already a primary"
            )
        return StepResult(
            changed=True,
            dry_run=True,
            summary=f"Would promote {server.name} once replayed past {final}",
        )
    text = PROMOTE_SQL.format(
        final=sql.Literal(final).as_string(None),
        replay_seconds=float(replay_seconds),
        promote_seconds=int(promote_seconds),
    )
    try:
        out = remote_for(pool, server).write(
            psql_argv(), stdin=text.encode(), timeout=replay_seconds + promote_seconds + 30
        )
    except CommandError as exc:  # PostgreSQL's own reason, not psql's last CONTEXT line
        raise RuntimeError(f"{server.name}: {psql_error(exc.stderr) or exc}") from exc
    assert out is not None
    before, _, after = out.stdout.strip().partition("\n")
    if after.strip() != "f":
        raise RuntimeError(f"{server.name} is still in recovery after pg_promote: {out.stdout!r}")
    if before == "primary":
        return StepResult(
            changed=False, dry_run=False, summary=f"{server.name} is already a primary"
        )
    return StepResult(
        changed=True,
        dry_run=False,
        summary=f"{server.name} promoted once replayed past {final} "
        f"(was at {before.removeprefix('standby ')})",
    )


@task(
    name="checkpoint",
    task_run_name="checkpoint-{server.name}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=1,
)
def checkpoint(pool: ConnectionPool, server: DbServer, *, dry_run: bool) -> StepResult:
    """``CHECKPOINT`` on the primary: the dirty buffers written now, while the app still runs, so
    the shutdown checkpoint of a stop that follows has little left to write. Harmless to repeat.

    Args:
        pool: The run's SSH connections.
        server: The primary.
        dry_run: Only say what would be done.
    """
    if dry_run:
        return StepResult(changed=True, dry_run=True, summary=f"Would checkpoint {server.name}")
    remote_for(pool, server).write(psql_argv(), stdin=b"CHECKPOINT;\n", timeout=600)
    return StepResult(changed=True, dry_run=False, summary=f"{server.name} checkpointed")
