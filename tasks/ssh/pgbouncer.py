"""pgbouncer on the app servers: its admin console, PAUSE and RESUME.

Every web and worker server reaches PostgreSQL through its own pgbouncer
(``<home>/services/pgbouncer/pgbouncer-<env>.ini``). ``PAUSE <db>`` on pgbouncer's admin console
waits until the database's server connections are released, closes them, and from then on *holds*
every new query of its clients (they wait, they are not refused) until ``RESUME <db>``. A swap of the
database underneath (rename) done while paused is invisible to the app apart from the wait.

The admin console is reached with no secret at all: pgbouncer lets the user ``pgbouncer`` into the
console without a password over its Unix socket when the connecting process has the same UID as
pgbouncer itself. So the ini needs ``unix_socket_dir`` set (a private directory) and the commands
run ``psql -h <socket dir> -U pgbouncer pgbouncer`` as the socket's owner (``runuser``, via sudo).

- :func:`get_pgbouncer_state` (read): each server's ini (port, socket directory, pool mode, the
  aliases of the live database), whether the console answers, which aliases are paused, and whether
  a fabflows auto-resume is pending.
- :func:`pause_pgbouncer` (write): **starts an auto-resume on the host first** (a detached
  ``sleep <hold>; RESUME``, its pid in ``<socket dir>/fabflows-resume-<alias>.pid``), then ``PAUSE``
  bounded by ``wait`` seconds; if the pause does not complete in time it RESUMEs at once and fails.
  So a pause never outlives ``hold`` seconds, even if the flow that asked for it is killed.
- :func:`resume_pgbouncer` (write, the compensation): ``RESUME`` and the auto-resume cancelled;
  not paused is a no-op.

In ``pool_mode = session`` a client keeps its server connection until it disconnects, so PAUSE waits
for every persistent app connection to close (never, with Django's ``CONN_MAX_AGE``): only
``transaction`` and ``statement`` pooling can be paused in a bounded time.
"""

from __future__ import annotations

import configparser
import re
import time
from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from tasks.ssh.connection import ConnectionPool
from tasks.ssh.fleet import FleetHost, FleetResult, HostResult, RateControl, run_fleet
from tasks.ssh.remote import CommandError, Remote, sh_argv

ALL_AT_ONCE = RateControl(max_concurrency="100%", max_errors="100%")
_ALIAS = re.compile(r"^[A-Za-z0-9_]+$")
PAUSABLE_POOL_MODES = ("transaction", "statement")


def ini_path(home: str, environment: str) -> str:
    return f"{home.rstrip('/')}/services/pgbouncer/pgbouncer-{environment}.ini"


class PgbouncerConfig(BaseModel):
    """What the ini says (pure parse)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = 6432
    socket_dir: str = Field(default="/tmp", description="Empty: no Unix socket, no admin console.")
    pool_mode: str = "session"
    databases: dict[str, str] = Field(
        default_factory=dict, description="Alias -> the server database it connects to."
    )

    def aliases_of(self, database: str) -> list[str]:
        return sorted(a for a, db in self.databases.items() if db == database and a != "*")


def parse_ini(text: str) -> PgbouncerConfig:
    """Pure: the parts of a pgbouncer ini fabflows needs."""
    parser = configparser.ConfigParser(
        strict=False, interpolation=None, inline_comment_prefixes=(";", "#")
    )
    parser.read_string(text)
    main = parser["pgbouncer"] if parser.has_section("pgbouncer") else {}
    databases: dict[str, str] = {}
    if parser.has_section("databases"):
        for alias, value in parser.items("databases"):
            m = re.search(r"(?:^|\s)dbname=(\S+)", value)
            databases[alias] = m.group(1).strip("'\"") if m else alias
    return PgbouncerConfig(
        port=int(main.get("listen_port", "6432") or 6432),
        socket_dir=(main.get("unix_socket_dir", "/tmp") or "").strip(),
        pool_mode=(main.get("pool_mode", "session") or "session").strip().lower(),
        databases=databases,
    )


class PgbouncerState(BaseModel):
    """One app server's pgbouncer, as read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    address: str = ""
    role: str = ""
    config: PgbouncerConfig | None = None
    aliases: list[str] = Field(default_factory=list, description="Aliases of the database.")
    console: bool = Field(default=False, description="The admin console answered.")
    paused: list[str] = Field(default_factory=list, description="Aliases paused now.")
    auto_resume: list[str] = Field(
        default_factory=list, description="Aliases with a fabflows auto-resume pending."
    )
    error: str = ""

    def pause_blockers(self) -> list[str]:
        """Why this server's pgbouncer cannot be paused for the swap (empty: it can)."""
        if self.error:
            return [f"{self.host}: {self.error}"]
        out = []
        if self.config is None:
            return [f"{self.host}: no pgbouncer config"]
        if not self.config.socket_dir:
            out.append(f"{self.host}: pgbouncer has no unix_socket_dir (no admin console)")
        elif not self.console:
            out.append(f"{self.host}: pgbouncer's admin console did not answer")
        if self.config.pool_mode not in PAUSABLE_POOL_MODES:
            out.append(
                f"{self.host}: pgbouncer pool_mode = {self.config.pool_mode} (PAUSE would wait "
                "for every client to disconnect)"
            )
        if not self.aliases:
            out.append(f"{self.host}: no pgbouncer database points at the live database")
        if self.paused:
            out.append(f"{self.host}: pgbouncer already paused ({', '.join(self.paused)})")
        return out


ADMIN = r"""set -u
dir=$1; port=$2; shift 2
sock="$dir/.s.PGSQL.$port"
if [ ! -S "$sock" ]; then echo "no admin socket $sock" >&2; exit 3; fi
owner=$(stat -c %U -- "$sock")
admin() {
  runuser -u "$owner" -- psql -X -q -A -P footer=off -v ON_ERROR_STOP=1 \
    -h "$dir" -p "$port" -U pgbouncer -d pgbouncer -c "$1"
}
"""
"""As root: ``admin "<command>"`` runs one admin-console command as the socket's owner (the UID
pgbouncer runs as, which the console lets in as ``pgbouncer`` with no password)."""

STATE_SCRIPT = (
    ADMIN
    + r"""
admin "SHOW DATABASES" | sed 's/^/db /'
for f in "$dir"/fabflows-resume-*.pid; do [ -f "$f" ] && echo "watch $f"; done
exit 0
"""
)

PAUSE_SCRIPT = (
    ADMIN
    + r"""
hold=$1; wait=$2; alias=$3
watch="$dir/fabflows-resume-$alias.pid"
# the auto-resume first: whatever happens to the run from here, RESUME after $hold seconds
rm -f -- "$watch"
setsid -f sh -c '
  echo $$ > "$1"; sleep "$2"
  [ "$(cat "$1" 2>/dev/null)" = "$$" ] || exit 0
  rm -f -- "$1"
  runuser -u "$3" -- psql -X -q -h "$4" -p "$5" -U pgbouncer -d pgbouncer -c "RESUME $6"
' fabflows-auto-resume "$watch" "$hold" "$owner" "$dir" "$port" "$alias" </dev/null >/dev/null 2>&1
for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  [ -s "$watch" ] && break; sleep 0.05
done
if [ ! -s "$watch" ]; then echo "the auto-resume did not start" >&2; exit 5; fi
if out=$(timeout -k 1 "$wait" runuser -u "$owner" -- psql -X -q -v ON_ERROR_STOP=1 \
    -h "$dir" -p "$port" -U pgbouncer -d pgbouncer -c "PAUSE $alias" 2>&1); then
  echo "paused $alias"; exit 0
fi
# not paused in time (or refused): resume now and cancel the auto-resume
admin "RESUME $alias" >/dev/null 2>&1
pid=$(cat "$watch" 2>/dev/null); rm -f -- "$watch"
[ -n "$pid" ] && kill -- "-$pid" 2>/dev/null
echo "PAUSE $alias did not complete within $wait s: ${out:-timed out}" >&2
exit 4
"""
)
"""As root: auto-resume started (and seen running), then PAUSE bounded by ``wait`` seconds; on a
timeout or error RESUME at once, the auto-resume cancelled, exit 4."""

RESUME_SCRIPT = (
    ADMIN
    + r"""
for alias in "$@"; do
  watch="$dir/fabflows-resume-$alias.pid"
  out=$(admin "RESUME $alias" 2>&1); rc=$?
  pid=$(cat "$watch" 2>/dev/null); rm -f -- "$watch"
  [ -n "$pid" ] && kill -- "-$pid" 2>/dev/null
  if [ $rc = 0 ]; then echo "resumed $alias"
  elif echo "$out" | grep -q "not paused"; then echo "not paused $alias"
  else echo "$alias: $out" >&2; exit 4
  fi
done
"""
)
"""As root: RESUME each alias (not paused: noted, not an error), its auto-resume cancelled."""


def parse_show_databases(text: str) -> dict[str, bool]:
    """Pure: ``SHOW DATABASES`` (unaligned, header first, ``db `` prefixed) -> alias: paused."""
    rows = [ln[3:] for ln in text.splitlines() if ln.startswith("db ")]
    if not rows:
        return {}
    header = rows[0].split("|")
    if "name" not in header or "paused" not in header:
        return {}
    ni, pi = header.index("name"), header.index("paused")
    out = {}
    for row in rows[1:]:
        cells = row.split("|")
        if len(cells) == len(header):
            out[cells[ni]] = cells[pi].strip() in ("1", "t", "true")
    return out


def _check_alias(alias: str) -> None:
    if not _ALIAS.match(alias):
        raise ValueError(f"{alias!r} is not a pgbouncer database name fabflows can pause")


def _read_state(remote: Remote, host: FleetHost, home: str, environment: str, database: str):  # noqa: ANN202
    path = ini_path(home, environment)
    text = remote.read(["cat", "--", path], sudo=True, ok_codes=(0, 1))
    if text.exit_code != 0:
        return PgbouncerState(
            host=host.name, address=host.address, role=host.role, error=f"no {path}"
        )
    config = parse_ini(text.stdout)
    aliases = config.aliases_of(database)
    console, paused, watch, error = False, [], [], ""
    if config.socket_dir:
        try:
            out = remote.read(
                sh_argv(STATE_SCRIPT, config.socket_dir, str(config.port)), sudo=True, timeout=15
            ).stdout
            states = parse_show_databases(out)
            console = bool(states)
            paused = sorted(a for a in aliases if states.get(a))
            watch = sorted(
                ln.rsplit("fabflows-resume-", 1)[1].removesuffix(".pid")
                for ln in out.splitlines()
                if ln.startswith("watch ")
            )
        except CommandError as exc:
            error = "" if exc.exit_code == 3 else str(exc)
    return PgbouncerState(
        host=host.name,
        address=host.address,
        role=host.role,
        config=config,
        aliases=aliases,
        console=console,
        paused=paused,
        auto_resume=watch,
        error=error,
    )


@task(name="get-pgbouncer-state", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=1)
def get_pgbouncer_state(
    hosts: list[FleetHost], pool: ConnectionPool, home: str, environment: str, database: str
) -> list[PgbouncerState]:
    """Each app server's pgbouncer: config, console, paused aliases of ``database``, auto-resumes."""

    def step(remote: Remote, host: FleetHost) -> HostResult:
        state = _read_state(remote, host, home, environment, database)
        return HostResult(status="unchanged", output=state.model_dump(mode="json"))

    result = run_fleet(
        hosts, step, pool=pool, rate=ALL_AT_ONCE, dry_run=True, name="get-pgbouncer-state"
    )
    out = []
    for r in result.results:
        if r.status == "failed" or r.output is None:
            out.append(PgbouncerState(host=r.host, address=r.address, role=r.role, error=r.message))
        else:
            out.append(PgbouncerState.model_validate(r.output))
    return out


@task(name="pause-pgbouncer", cache_policy=NO_CACHE, retries=0, tags=["non-idempotent"])
def pause_pgbouncer(
    hosts: list[FleetHost],
    pool: ConnectionPool,
    home: str,
    environment: str,
    database: str,
    *,
    dry_run: bool,
    wait: float = 5.0,
    hold: float = 30.0,
) -> FleetResult:
    """PAUSE every alias of ``database`` on each server's pgbouncer (all servers at once).

    Each host first starts its own auto-resume (RESUME after ``hold`` seconds, whatever happens to
    this run), then PAUSEs, bounded by ``wait`` seconds (RESUME at once and fail if it takes longer).
    Compensation: :func:`resume_pgbouncer`. Returns the fleet result; the caller raises on failures.
    """
    if not 0 < wait < hold:
        raise ValueError(f"pause wait {wait} s must be positive and below the hold {hold} s")

    def step(remote: Remote, host: FleetHost) -> HostResult:
        state = _read_state(remote, host, home, environment, database)
        blockers = state.pause_blockers()
        if blockers:
            return HostResult(status="failed", message="; ".join(blockers))
        assert state.config is not None
        cfg = state.config
        for alias in state.aliases:
            _check_alias(alias)
        started = time.monotonic()
        for alias in state.aliases:
            remote.write(
                sh_argv(
                    PAUSE_SCRIPT, cfg.socket_dir, str(cfg.port), f"{hold:g}", f"{wait:g}", alias
                ),
                sudo=True,
                timeout=wait + 10,
            )
        seconds = time.monotonic() - started
        verb = "would pause" if dry_run else "paused"
        return HostResult(
            status="changed",
            message=f"{verb} {', '.join(state.aliases)} in {seconds:.2f} s "
            f"(auto-resume after {hold:g} s)",
        )

    result = run_fleet(
        hosts,
        step,
        pool=pool,
        rate=ALL_AT_ONCE,
        dry_run=dry_run,
        name="pause-pgbouncer",
        command_timeout=wait + 15,
    )
    get_run_logger().info("%s", result.summary())
    return result


@task(name="resume-pgbouncer", cache_policy=NO_CACHE, retries=0)
def resume_pgbouncer(
    hosts: list[FleetHost],
    pool: ConnectionPool,
    home: str,
    environment: str,
    database: str,
    *,
    dry_run: bool,
) -> FleetResult:
    """RESUME every paused alias of ``database`` and cancel fabflows' auto-resumes (no-op when not
    paused). The compensation of :func:`pause_pgbouncer`, safe to run twice."""

    def step(remote: Remote, host: FleetHost) -> HostResult:
        # no state read first: this runs while requests are held, every round trip counts (the
        # script RESUMEs what is paused, notes what is not, and cancels the auto-resumes)
        if dry_run:  # nothing held: read what is paused, say exactly what would be resumed
            state = _read_state(remote, host, home, environment, database)
            todo = sorted((set(state.paused) | set(state.auto_resume)) & set(state.aliases))
            if state.error:
                return HostResult(status="failed", message=state.error)
            if not todo:
                return HostResult(status="unchanged", message="pgbouncer not paused")
            return HostResult(status="changed", message=f"would resume {', '.join(todo)}")
        path = ini_path(home, environment)
        text = remote.read(["cat", "--", path], sudo=True, ok_codes=(0, 1))
        if text.exit_code != 0:
            return HostResult(status="unchanged", message=f"no {path}: no pgbouncer to resume")
        cfg = parse_ini(text.stdout)
        aliases = cfg.aliases_of(database)
        if not cfg.socket_dir or not aliases:
            return HostResult(status="unchanged", message="no admin console or alias: not paused")
        for alias in aliases:
            _check_alias(alias)
        argv = sh_argv(RESUME_SCRIPT, cfg.socket_dir, str(cfg.port), *aliases)
        result = remote.write(argv, sudo=True, timeout=20)
        if result is None:
            return HostResult(status="changed", message=f"would resume {', '.join(aliases)}")
        resumed = [
            ln.split(" ", 1)[1] for ln in result.stdout.splitlines() if ln.startswith("resumed ")
        ]
        if not resumed:
            return HostResult(status="unchanged", message="pgbouncer not paused")
        return HostResult(status="changed", message=f"resumed {', '.join(resumed)}")

    result = run_fleet(
        hosts, step, pool=pool, rate=ALL_AT_ONCE, dry_run=dry_run, name="resume-pgbouncer"
    )
    get_run_logger().info("%s", result.summary())
    return result


def left_paused_by_fabflows(states: Sequence[PgbouncerState]) -> list[str]:
    """Pure: servers whose pgbouncer has the database paused with fabflows' auto-resume pending
    (a pause of fabflows' own; a pause without it is someone else's and is left alone)."""
    return sorted(s.host for s in states if set(s.paused) & set(s.auto_resume))


RELOAD_SCRIPT = (
    ADMIN
    + r"""
admin "RELOAD" >/dev/null
echo reloaded
"""
)
"""As root: ``RELOAD`` on the admin console (pgbouncer reads its ini again, as on SIGHUP; a paused
database stays paused, its next server connections go where the ini now says)."""


@task(name="reload-pgbouncer", cache_policy=NO_CACHE, retries=0)
def reload_pgbouncer(
    hosts: list[FleetHost], pool: ConnectionPool, home: str, environment: str, *, dry_run: bool
) -> FleetResult:
    """``RELOAD`` each server's pgbouncer through its admin console (all servers at once): a
    fraction of a ``supervisorctl signal HUP`` round trip, which counts while requests are held.
    No compensation needed (it applies whatever the ini says; reload again after changing it
    back)."""

    def step(remote: Remote, host: FleetHost) -> HostResult:
        text = remote.read(["cat", "--", ini_path(home, environment)], sudo=True, ok_codes=(0, 1))
        if text.exit_code != 0:
            return HostResult(status="failed", message="no pgbouncer ini")
        cfg = parse_ini(text.stdout)
        if not cfg.socket_dir:
            return HostResult(status="failed", message="pgbouncer has no unix_socket_dir")
        argv = sh_argv(RELOAD_SCRIPT, cfg.socket_dir, str(cfg.port))
        if remote.write(argv, sudo=True, timeout=20) is None:
            return HostResult(status="changed", message="would reload pgbouncer")
        return HostResult(status="changed", message="pgbouncer reloaded")

    result = run_fleet(
        hosts, step, pool=pool, rate=ALL_AT_ONCE, dry_run=dry_run, name="reload-pgbouncer"
    )
    get_run_logger().info("%s", result.summary())
    return result
