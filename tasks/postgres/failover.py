"""Failing over to a replica: is the primary really gone, fence it, promote, follow the new one.

Read tasks (no side effects):

- :func:`probe_from_here`: from the machine running the flow, does the old primary answer SSH (a
  real, host-key-checked login) and PostgreSQL (its protocol's SSLRequest, answered ``S`` or ``N``
  by any live server)?
- :func:`probe_from_replica`: the same two questions asked on a replica over SSH
  (``pg_isready`` and a TCP connect to the SSH port), so a flow cut off from the primary by its
  own network does not mistake a partition for a dead server;
- :func:`describe_standby`: a replica's recovery state and how far it has received and replayed.

Write tasks (keyword-only ``dry_run``, no default; each changes one thing on one server):

- :func:`fence_postgres`: stop PostgreSQL on the old primary and leave ``standby.signal`` in its
  data directory, so if the server or its PostgreSQL is started again it comes up read-only;
- :func:`promote_standby`: ``pg_promote(wait => true)``;
- :func:`allow_replication`: the new primary accepts the other replicas (``pg_hba.conf`` line per
  address, one physical slot each);
- :func:`follow_primary`: a replica's ``primary_conninfo`` names the new primary (reload; the WAL
  receiver restarts and follows the new timeline: ``recovery_target_timeline`` is ``latest``).

None of these writes has a compensation: a promoted server cannot become a replica again without
a rebuild (``reset-replicas``), and a fenced primary stays fenced. Plans say so.
"""

from __future__ import annotations

import re
import socket
import struct
from concurrent.futures import ThreadPoolExecutor

from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field

from tasks.plan import StepResult
from tasks.postgres.server import DbServer, read_json, read_sql, remote_for, write_sql
from tasks.ssh.connection import ConnectionPool, SshOptions, connect

REPLICATION_ROLE = "replicator"
PROBE_TIMEOUT = 3.0


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Reachability(_Model):
    """Whether a server answers SSH and PostgreSQL, seen from one place."""

    seen_from: str = Field(description="'flow' or the replica's name.")
    ssh: bool | None = Field(description="SSH answers (None: could not be asked).")
    postgres: bool | None = Field(description="PostgreSQL answers (None: could not be asked).")
    detail: str = ""

    @property
    def answers(self) -> bool:
        return bool(self.ssh) or bool(self.postgres)

    def text(self, with_detail: bool = False) -> str:
        def word(v: bool | None) -> str:
            return "unknown" if v is None else ("answers" if v else "no answer")

        out = f"from {self.seen_from}: ssh {word(self.ssh)}, postgres {word(self.postgres)}"
        return out + (f" ({self.detail})" if with_detail and self.detail else "")


class StandbyState(_Model):
    """A replica's recovery state (read on the replica)."""

    server: str
    in_recovery: bool
    receive_lsn: str | None = None
    replay_lsn: str | None = None
    sender_host: str | None = Field(default=None, description="Who its WAL receiver streams from.")
    receiver_status: str | None = None
    primary_conninfo: str = Field(default="", description="With any password removed.")
    slot_name: str = Field(default="", description="primary_slot_name.")


def lsn_value(lsn: str | None) -> int:
    """A ``pg_lsn`` text (``16/B374D848``) as a number (-1 for None; pure)."""
    if not lsn:
        return -1
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def _postgres_answers(address: str, port: int, timeout: float) -> tuple[bool, str]:
    """Send PostgreSQL's SSLRequest: any live server answers one byte, ``S`` or ``N``."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("!ii", 8, 80877103))
            reply = sock.recv(1)
    except OSError as exc:
        return False, f"postgres: {type(exc).__name__}"
    return reply in (b"S", b"N"), "" if reply in (b"S", b"N") else f"postgres said {reply!r}"


def _ssh_answers(opts: SshOptions, address: str) -> tuple[bool, str]:
    try:
        conn = connect(address, opts)
    except Exception as exc:  # noqa: BLE001 - any failure to log in means "does not answer"
        return False, f"ssh: {type(exc).__name__}"
    conn.close()
    return True, ""


@task(name="probe-from-here", task_run_name="probe-from-here-{server.name}", cache_policy=NO_CACHE)
def probe_from_here(
    opts: SshOptions, server: DbServer, timeout: float = PROBE_TIMEOUT
) -> Reachability:
    """Does ``server`` answer SSH (a checked login) and PostgreSQL, from the flow's machine?

    Args:
        opts: SSH options of the run (its connect timeout bounds the SSH attempt).
        server: The server to probe (SSH at its address, PostgreSQL at its database address).
        timeout: Seconds for the PostgreSQL probe.
    """
    with ThreadPoolExecutor(2) as ex:
        ssh = ex.submit(_ssh_answers, opts, server.address)
        pg = ex.submit(_postgres_answers, server.db_address, server.port, timeout)
        (ssh_ok, ssh_why), (pg_ok, pg_why) = ssh.result(), pg.result()
    detail = ", ".join(x for x in (ssh_why, pg_why) if x)
    return Reachability(seen_from="flow", ssh=ssh_ok, postgres=pg_ok, detail=detail)


PROBE_SCRIPT = """\
addr="$1"; pg_port="$2"; ssh_port="$3"; t="$4"
if pg_isready -q -h "$addr" -p "$pg_port" -t "$t"; then pg=1; else rc=$?; [ "$rc" = 1 ] && pg=1 || pg=0; fi
if timeout "$t" bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$addr" "$ssh_port" 2>/dev/null; then ssh=1; else ssh=0; fi
echo "$ssh $pg"
"""


@task(
    name="probe-from-replica",
    task_run_name="probe-from-replica-{replica.name}",
    cache_policy=NO_CACHE,
)
def probe_from_replica(
    pool: ConnectionPool,
    replica: DbServer,
    target: DbServer,
    ssh_port: int = 22,
    timeout: float = PROBE_TIMEOUT,
) -> Reachability:
    """Does ``target`` answer SSH (TCP) and PostgreSQL (``pg_isready``: accepting or rejecting
    connections both mean alive), seen from ``replica``? A replica we cannot reach is ``None``.

    Args:
        pool: The run's SSH connections.
        replica: Where to ask from.
        target: The server to probe (its database address).
        ssh_port: The target's SSH port.
        timeout: Seconds for each probe.
    """
    try:
        remote = remote_for(pool, replica)
        argv = ["sh", "-c", PROBE_SCRIPT, "probe", target.db_address, str(target.port)]
        argv += [str(ssh_port), str(int(max(1, timeout)))]
        out = remote.read(argv, timeout=timeout * 3 + 10).stdout.split()
    except Exception as exc:  # noqa: BLE001 - "could not ask" is a fact the plan weighs
        pool.discard(replica.address)
        return Reachability(
            seen_from=replica.name, ssh=None, postgres=None, detail=f"{type(exc).__name__}"
        )
    if len(out) != 2:
        return Reachability(seen_from=replica.name, ssh=None, postgres=None, detail="no answer")
    return Reachability(seen_from=replica.name, ssh=out[0] == "1", postgres=out[1] == "1")


_STANDBY = sql.SQL(
    """SELECT json_build_object(
    'in_recovery', pg_is_in_recovery(),
    'receive_lsn', pg_last_wal_receive_lsn()::text,
    'replay_lsn', pg_last_wal_replay_lsn()::text,
    'sender_host', (SELECT sender_host FROM pg_stat_wal_receiver),
    'receiver_status', (SELECT status FROM pg_stat_wal_receiver),
    'primary_conninfo', current_setting('primary_conninfo'),
    'slot_name', current_setting('primary_slot_name')
)"""
)


def scrub_conninfo(conninfo: str) -> str:
    """``primary_conninfo`` without any ``password=`` (pure)."""
    return re.sub(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", "password=***", conninfo)


@task(
    name="describe-standby",
    task_run_name="describe-standby-{server.name}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=1,
)
def describe_standby(pool: ConnectionPool, server: DbServer) -> StandbyState:
    """Recovery state, received and replayed LSN, WAL receiver and ``primary_conninfo``.

    Args:
        pool: The run's SSH connections.
        server: The replica.
    """
    data = read_json(remote_for(pool, server), _STANDBY)
    if not isinstance(data, dict):
        raise RuntimeError(f"{server.name}: unexpected answer: {data!r}")
    data["primary_conninfo"] = scrub_conninfo(data.get("primary_conninfo") or "")
    data["slot_name"] = data.get("slot_name") or ""
    return StandbyState(server=server.name, **data)


FENCE_SCRIPT = """\
set -e
for d in /var/lib/postgresql/*/main; do
    [ -f "$d/PG_VERSION" ] || continue
    touch "$d/standby.signal"; chown postgres: "$d/standby.signal"
done
if command -v supervisorctl >/dev/null 2>&1 && supervisorctl avail 2>/dev/null | grep -q '^postgresql '; then
    supervisorctl stop postgresql >/dev/null
else
    service postgresql stop
fi
"""


@task(
    cache_policy=NO_CACHE,
    name="fence-postgres",
    task_run_name="fence-postgres-{server.name}",
    retries=0,
)
def fence_postgres(pool: ConnectionPool, server: DbServer, *, dry_run: bool) -> StepResult:
    """Stop PostgreSQL on a lost primary and leave ``standby.signal`` in its data directory, so
    a later start (of PostgreSQL or of the whole server) comes up read-only: it can never take a
    write again. No compensation: a lost primary stays fenced (rebuild it as a replica).

    Args:
        pool: The run's SSH connections.
        server: The old primary (reachable over SSH).
        dry_run: Only say what would be done.
    """
    remote = remote_for(pool, server, dry_run=dry_run)
    if dry_run:
        return StepResult(changed=True, dry_run=True, summary=f"Would fence {server.name}")
    remote.write(["sh", "-c", FENCE_SCRIPT], sudo=True, timeout=120)
    return StepResult(
        changed=True,
        dry_run=False,
        summary=f"{server.name}: PostgreSQL stopped, standby.signal left (starts read-only)",
    )


@task(
    cache_policy=NO_CACHE,
    name="promote-standby",
    task_run_name="promote-standby-{server.name}",
    retries=0,
)
def promote_standby(
    pool: ConnectionPool, server: DbServer, *, dry_run: bool, wait_seconds: int = 60
) -> StepResult:
    """``pg_promote(true, wait_seconds)``: the replica ends recovery and takes writes. Already
    promoted: no-op. No compensation (a promoted server is rebuilt to be a replica again).

    Args:
        pool: The run's SSH connections.
        server: The replica to promote.
        dry_run: Only say what would be done.
        wait_seconds: How long PostgreSQL waits for the promotion to finish.
    """
    state = describe_standby.fn(pool, server)
    if not state.in_recovery:
        return StepResult(
            changed=False, dry_run=dry_run, summary=f"{server.name} is already a primary"
        )
    if dry_run:
        return StepResult(changed=True, dry_run=True, summary=f"Would promote {server.name}")
    remote = remote_for(pool, server)
    out = read_sql(
        remote, [sql.SQL("SELECT pg_promote(true, {})").format(sql.Literal(int(wait_seconds)))]
    )
    if out.strip() != "t":
        raise RuntimeError(f"{server.name}: pg_promote did not finish in {wait_seconds} s")
    return StepResult(
        changed=True,
        dry_run=False,
        summary=f"{server.name} promoted (was replayed up to {state.replay_lsn})",
    )


def slot_for(host_name: str) -> str:
    """A replica's slot name: ``replica_<host>`` in slot-name characters (pure)."""
    return ("replica_" + re.sub(r"[^a-z0-9_]", "_", host_name.lower()))[:63]


HBA_SCRIPT = """\
set -e
hba="$1"; shift
for line in "$@"; do grep -qxF -- "$line" "$hba" || printf '%s\\n' "$line" >> "$hba"; done
"""


@task(
    cache_policy=NO_CACHE,
    name="allow-replication",
    task_run_name="allow-replication-{server.name}",
    retries=0,
)
def allow_replication(
    pool: ConnectionPool,
    server: DbServer,
    replicas: dict[str, str],
    *,
    dry_run: bool,
    role: str = REPLICATION_ROLE,
) -> StepResult:
    """On the new primary: a ``pg_hba.conf`` replication line per replica address, a physical
    slot per replica (``replicas``: slot name -> address), then reload.

    Args:
        pool: The run's SSH connections.
        server: The new primary.
        replicas: Slot name -> the replica's address.
        dry_run: Only say what would be done.
        role: The replication role (it came with the base backup).
    """
    for address in replicas.values():
        if not re.fullmatch(r"[0-9.]+", address):
            raise ValueError(f"unusable replica address {address!r}")
    if not replicas:
        return StepResult(changed=False, dry_run=dry_run, summary="no other replica")
    remote = remote_for(pool, server, dry_run=dry_run)
    hba = read_sql(remote, ["SHOW hba_file"]).strip()
    lines = [f"host    replication  {role}  {a}/32  scram-sha-256" for a in replicas.values()]
    remote.write(["sh", "-c", HBA_SCRIPT, "hba", hba, *lines], sudo=True)
    statements = [
        sql.SQL(
            "SELECT pg_create_physical_replication_slot({name}) WHERE NOT EXISTS "
            "(SELECT 1 FROM pg_replication_slots WHERE slot_name = {name})"
        ).format(name=sql.Literal(slot))
        for slot in replicas
    ]
    write_sql(remote, [*statements, "SELECT pg_reload_conf()"])
    verb = "Would allow" if dry_run else "Allowed"
    return StepResult(
        changed=True,
        dry_run=dry_run,
        summary=f"{verb} replication from {', '.join(replicas.values())} on {server.name}",
    )


def follow_conninfo(conninfo: str, new_host: str) -> str:
    """``primary_conninfo`` with ``host=`` set to ``new_host`` (added if missing; pure)."""
    if not re.fullmatch(r"[0-9A-Za-z.:-]+", new_host):
        raise ValueError(f"unusable host {new_host!r}")
    if re.search(r"(^|\s)host\s*=", conninfo):
        return re.sub(r"(^|\s)host\s*=\s*('[^']*'|\S+)", rf"\g<1>host={new_host}", conninfo)
    return f"{conninfo} host={new_host}".strip()


@task(
    cache_policy=NO_CACHE,
    name="follow-primary",
    task_run_name="follow-primary-{server.name}",
    retries=0,
)
def follow_primary(
    pool: ConnectionPool, server: DbServer, new_primary: DbServer, *, dry_run: bool
) -> StepResult:
    """Point a replica's ``primary_conninfo`` at ``new_primary`` and reload. Already pointing
    there: no-op. The WAL receiver restarts and follows the new timeline.

    Args:
        pool: The run's SSH connections.
        server: The replica.
        new_primary: The primary it streams from from now on.
        dry_run: Only say what would be done.
    """
    remote = remote_for(pool, server, dry_run=dry_run)
    current = read_sql(remote, ["SHOW primary_conninfo"]).rstrip("\n")
    wanted = follow_conninfo(current, new_primary.db_address)
    if current == wanted:
        return StepResult(
            changed=False, dry_run=dry_run, summary=f"{server.name} follows {new_primary.name}"
        )
    statement = sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(sql.Literal(wanted))
    write_sql(remote, [statement, "SELECT pg_reload_conf()"])
    verb = "Would point" if dry_run else "Pointed"
    return StepResult(
        changed=True,
        dry_run=dry_run,
        summary=f"{verb} {server.name} at {new_primary.name} ({new_primary.db_address})",
    )
