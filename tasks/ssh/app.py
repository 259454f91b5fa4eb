"""The app's processes on web and worker servers (supervisor), and its migrations.

FabulAWS runs the app under supervisor: groups ``<env>-web`` (gunicorn) on web
servers, ``<env>-celery`` on workers, ``<env>-pgbouncer`` on both. A maintenance that needs the
app stopped:

- :func:`stop_app` writes a **marker first** (``<home>/services/fabflows-app-stopped.json``: the
  run and the groups it stops), then ``supervisorctl stop <group>:*`` in order (the app, then
  pgbouncer). A run killed after that leaves the marker, so recovery knows whom to start: the
  server itself says why its app is down.
- :func:`start_app` is the compensation: ``supervisorctl start`` pgbouncer, then the app, checks
  every program of those groups is RUNNING, then removes the marker. Already running is a no-op.
- :func:`get_app_state` reads the programs and the marker.
- :func:`run_migrations` runs the configured command (``python3 manage.py migrate --noinput``) on
  one worker, as the deploy user, in the code directory.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from tasks.ssh.connection import ConnectionPool
from tasks.ssh.fleet import FleetHost, FleetResult, HostResult, RateControl, run_fleet
from tasks.ssh.remote import CommandError, Remote, sh_argv

MARKER_NAME = "fabflows-app-stopped.json"
ALL_AT_ONCE = RateControl(max_concurrency="100%", max_errors="100%")
_STATUS_LINE = re.compile(r"^(?P<name>\S+)\s+(?P<state>[A-Z]+)\b")
_GROUP = re.compile(r"^[A-Za-z0-9_.-]+$")


def marker_path(home: str) -> str:
    return f"{home.rstrip('/')}/services/{MARKER_NAME}"


def groups_for_role(groups: dict[str, str], role: str) -> list[str]:
    """Supervisor groups of a role, in stop order (the app before pgbouncer)."""
    if role == "web":
        return [groups["web"], groups["pgbouncer"]]
    if role == "worker":
        return [groups["celery"], groups["pgbouncer"]]
    return []


class AppStopRecord(BaseModel):
    """The marker a server keeps while fabflows holds its app stopped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str = Field(description="Flow run that stopped the app.")
    flow: str
    groups: list[str] = Field(description="Supervisor groups stopped, in stop order.")
    since: str


class ProgramState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    state: str

    @property
    def group(self) -> str:
        return self.name.split(":", 1)[0]


class HostAppState(BaseModel):
    """One server's app programs and fabflows' stop marker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    address: str
    role: str
    programs: list[ProgramState] = Field(default_factory=list)
    marker: AppStopRecord | None = None
    error: str = ""

    def states(self, groups: Sequence[str]) -> dict[str, str]:
        return {p.name: p.state for p in self.programs if p.group in groups}


def parse_status(text: str) -> list[ProgramState]:
    """Pure: ``supervisorctl status`` output -> programs (``group:program`` or ``program``)."""
    out = []
    for line in text.splitlines():
        m = _STATUS_LINE.match(line.strip())
        if m:
            out.append(ProgramState(name=m.group("name"), state=m.group("state")))
    return out


def _status(remote: Remote) -> list[ProgramState]:
    # supervisorctl exits 3 when some program is not running: still a valid answer
    result = remote.read(["sudo", "-n", "supervisorctl", "status"], ok_codes=(0, 3))
    return parse_status(result.stdout)


def _read_marker(remote: Remote, home: str) -> AppStopRecord | None:
    result = remote.read(["cat", "--", marker_path(home)], ok_codes=(0, 1))
    if result.exit_code != 0 or not result.stdout.strip():
        return None
    try:
        return AppStopRecord.model_validate(json.loads(result.stdout))
    except ValueError:
        return AppStopRecord(run="unknown", flow="unknown", groups=[], since="")


def _check_groups(groups: Sequence[str]) -> None:
    for g in groups:
        if not _GROUP.match(g):
            raise ValueError(f"{g!r} is not a supervisor group name")


def _supervisorctl(remote: Remote, action: str, group: str, timeout: float) -> str:
    try:
        result = remote.write(
            ["sudo", "-n", "supervisorctl", action, f"{group}:*"], timeout=timeout
        )
    except CommandError as exc:
        text = (exc.stderr or "") + str(exc)
        if action == "start" and "already started" in text:
            return "already started"
        raise
    return result.stdout.strip() if result else ""


STOP_SCRIPT = r"""set -u
marker=$1; shift
if [ "$(id -u)" != 0 ]; then echo "needs root" >&2; exit 2; fi
tmp=$(mktemp "$marker.XXXXXX") && cat > "$tmp" && chmod 644 "$tmp" && mv -f "$tmp" "$marker" || exit 2
supervisorctl stop "$@" 2>&1
"""
"""As root: the marker (stdin) written atomically first, then one ``supervisorctl stop`` for all
the groups (in the order given). Prints supervisorctl's lines."""

START_SCRIPT = r"""set -u
marker=$1; remove=$2; shift 2
out=$(supervisorctl start "$@" 2>&1); echo "$out"
# supervisorctl start waits until each program counts as RUNNING (or failed to start)
if echo "$out" | grep ERROR | grep -vq "already started"; then
  supervisorctl status 2>&1 | sed 's/^/status /'
elif [ "$remove" = yes ]; then
  rm -f -- "$marker"; echo "marker removed"
fi
"""
"""As root: one ``supervisorctl start`` (it returns once each program counts as RUNNING, or with an
ERROR line); on an error the status of every program, else (if asked) the marker removed."""


def _not_running(programs: Sequence[ProgramState], groups: Sequence[str]) -> list[str]:
    return [f"{p.name} {p.state}" for p in programs if p.group in groups and p.state != "RUNNING"]


def _stop_step(
    groups_by_role: dict[str, list[str]], home: str, record: AppStopRecord, timeout: float
):  # noqa: ANN202
    def step(remote: Remote, host: FleetHost) -> HostResult:
        groups = groups_by_role.get(host.role, [])
        _check_groups(groups)
        if not groups:
            return HostResult(status="unchanged", message="no app group on this role")
        mine = record.model_copy(update={"groups": groups})
        # the marker first: a run killed after this still says the app was stopped on purpose
        result = remote.write(
            ["sh", "-c", STOP_SCRIPT, "sh", marker_path(home), *[f"{g}:*" for g in groups]],
            sudo=True,
            stdin=mine.model_dump_json().encode(),
            timeout=timeout,
        )
        out = result.stdout if result else ""
        bad = [ln for ln in out.splitlines() if "ERROR" in ln and "not running" not in ln]
        if bad:
            return HostResult(status="failed", message="; ".join(bad))
        return HostResult(status="changed", message=f"stopped {', '.join(groups)}")

    return step


def _start_step(
    groups_by_role: dict[str, list[str]],
    home: str,
    timeout: float,
    wait: float,
    only: Sequence[str] | None = None,
):  # noqa: ANN202
    def step(remote: Remote, host: FleetHost) -> HostResult:
        marker = _read_marker(remote, home)
        groups = groups_by_role.get(host.role, [])
        if only is not None:
            groups = [g for g in groups if g in only]
        elif marker is not None and marker.groups:
            groups = list(dict.fromkeys([*groups, *marker.groups]))
        _check_groups(groups)
        if not groups:
            return HostResult(status="unchanged", message="no app group on this role")
        # pgbouncer (listed last in stop order) first, then the app
        order = [g for g in groups if g.endswith("pgbouncer")] + [
            g for g in groups if not g.endswith("pgbouncer")
        ]
        remove = "yes" if only is None else "no"
        argv = ["sh", "-c", START_SCRIPT, "sh", marker_path(home), remove]
        result = remote.write([*argv, *[f"{g}:*" for g in order]], sudo=True, timeout=timeout)
        if result is None:  # dry run
            return HostResult(status="changed", message=f"would start {', '.join(order)}")
        lines = result.stdout.splitlines()
        started = [ln for ln in lines if ln.endswith(": started")]
        errors = [
            ln
            for ln in lines
            if "ERROR" in ln and "already started" not in ln and not ln.startswith("status ")
        ]
        bad: list[str] = []
        if errors:
            programs = parse_status("\n".join(ln[7:] for ln in lines if ln.startswith("status ")))
            missing = [g for g in groups if not any(p.group == g for p in programs)]
            if missing:
                return HostResult(
                    status="failed", message=f"no supervisor group(s) {', '.join(missing)}"
                )
            bad = _not_running(programs, groups)
            deadline = time.monotonic() + wait
            while bad and time.monotonic() < deadline:  # STARTING / BACKOFF: give it the time asked
                time.sleep(0.5)
                bad = _not_running(_status(remote), groups)
            if not bad and only is None:
                remote.write(["rm", "-f", "--", marker_path(home)], sudo=True)
        if bad:
            return HostResult(status="failed", message="not running: " + ", ".join(bad))
        if not started and marker is None:
            return HostResult(status="unchanged", message=f"{', '.join(order)} already running")
        return HostResult(status="changed", message=f"started {', '.join(order)}")

    return step


@task(name="stop-app", cache_policy=NO_CACHE, retries=0)
def stop_app(
    hosts: list[FleetHost],
    pool: ConnectionPool,
    groups_by_role: dict[str, list[str]],
    home: str,
    record: AppStopRecord,
    *,
    dry_run: bool,
    timeout: float = 60,
) -> FleetResult:
    """Stop the app's supervisor groups on every web and worker server (marker first).

    Compensation: :func:`start_app`. Returns the fleet result; the caller raises on failures.
    """
    result = run_fleet(
        hosts,
        _stop_step(groups_by_role, home, record, timeout),
        pool=pool,
        rate=ALL_AT_ONCE,
        dry_run=dry_run,
        name="stop-app",
        command_timeout=timeout,
    )
    get_run_logger().info("%s", result.summary())
    return result


@task(name="start-app", cache_policy=NO_CACHE, retries=0)
def start_app(
    hosts: list[FleetHost],
    pool: ConnectionPool,
    groups_by_role: dict[str, list[str]],
    home: str,
    *,
    dry_run: bool,
    timeout: float = 60,
    wait: float = 30,
    only: list[str] | None = None,
) -> FleetResult:
    """Start the app's groups (pgbouncer first) where they are not running, wait until every program
    is RUNNING, then remove the stop marker. Groups named in a host's marker are started too.

    With ``only``, start just those groups (e.g. pgbouncer before migrations) and keep the marker.
    """
    result = run_fleet(
        hosts,
        _start_step(groups_by_role, home, timeout, wait, only),
        pool=pool,
        rate=ALL_AT_ONCE,
        dry_run=dry_run,
        name="start-app",
        command_timeout=timeout,
    )
    get_run_logger().info("%s", result.summary())
    return result


def _state_step(home: str):  # noqa: ANN202
    def step(remote: Remote, host: FleetHost) -> HostResult:
        state = HostAppState(
            host=host.name,
            address=host.address,
            role=host.role,
            programs=_status(remote),
            marker=_read_marker(remote, home),
        )
        return HostResult(status="unchanged", output=state.model_dump(mode="json"))

    return step


@task(name="get-app-state", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def get_app_state(hosts: list[FleetHost], pool: ConnectionPool, home: str) -> list[HostAppState]:
    """Each server's supervisor programs and fabflows' stop marker (unreachable ones with an error)."""
    result = run_fleet(
        hosts, _state_step(home), pool=pool, rate=ALL_AT_ONCE, dry_run=True, name="get-app-state"
    )
    out = []
    for r in result.results:
        if r.status == "failed" or r.output is None:
            out.append(HostAppState(host=r.host, address=r.address, role=r.role, error=r.message))
        else:
            out.append(HostAppState.model_validate(r.output))
    return out


class MigrationResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    command: str
    exit_code: int | None
    seconds: float
    output: str = Field(description="The command's output (last 4000 characters).")
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class MigrationFailed(RuntimeError):
    """The migration command failed; ``result`` has its output."""

    def __init__(self, result: MigrationResult):
        self.result = result
        tail = result.output.strip().splitlines()[-1] if result.output.strip() else ""
        what = "timed out" if result.exit_code is None else f"exited {result.exit_code}"
        super().__init__(
            f"{result.host}: `{result.command}` {what}" + (f": {tail}" if tail else "")
        )


MIGRATE_SCRIPT = 'cd -- "$1" && shift && exec "$@"'


@task(
    name="run-migrations",
    task_run_name="run-migrations-{host.name}",
    cache_policy=NO_CACHE,
    retries=0,
    tags=["non-idempotent"],
)
def run_migrations(
    host: FleetHost,
    pool: ConnectionPool,
    command: list[str],
    directory: str,
    *,
    dry_run: bool,
    timeout: float = 1800,
) -> MigrationResult:
    """Run the migration ``command`` (argv) in ``directory`` on one worker as the deploy user.

    No compensation here: the caller puts the previous database back if this fails.

    Raises:
        MigrationFailed: non-zero exit or timeout (with the command's output).
    """
    if not command:
        raise ValueError("the migration command is empty")
    remote = Remote(
        conn=pool.get(host.address),
        host=host.name,
        dry_run=dry_run,
        command_timeout=timeout,
        channel_timeout=pool.opts.connect_timeout,
    )
    argv = sh_argv(MIGRATE_SCRIPT, directory, *command)
    shown = f"cd {shlex.quote(directory)} && {shlex.join(command)}"
    started = time.monotonic()
    if dry_run:
        remote.write(argv)
        return MigrationResult(
            host=host.name, command=shown, exit_code=0, seconds=0.0, output="", dry_run=True
        )
    try:
        result = remote.write(argv, timeout=timeout)
        code, output = 0, (result.stdout + result.stderr) if result else ""
    except CommandError as exc:
        code, output = exc.exit_code, exc.stderr
    migration = MigrationResult(
        host=host.name,
        command=shown,
        exit_code=code,
        seconds=round(time.monotonic() - started, 2),
        output=output[-4000:],
    )
    logger = get_run_logger()
    if not migration.ok:
        logger.error("migrations failed on %s:\n%s", host.name, migration.output)
        raise MigrationFailed(migration)
    logger.info(
        "migrations on %s done in %.1f s:\n%s", host.name, migration.seconds, output[-2000:]
    )
    return migration


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def showmigrations_command(migrate_command: Sequence[str]) -> list[str] | None:
    """Pure: the ``showmigrations --plan`` argv beside a ``manage.py migrate`` command (None: the
    migrate command is not Django's ``migrate``, so which migrations the code has is unknown)."""
    argv = list(migrate_command)
    if "migrate" not in argv:
        return None
    return [*argv[: argv.index("migrate")], "showmigrations", "--plan"]


_PLAN_LINE = re.compile(r"^\s*\[[ X]\]\s+(?P<name>[A-Za-z0-9_]+\.[A-Za-z0-9_]+)\s*$")


def parse_showmigrations(text: str) -> list[str]:
    """Pure: ``showmigrations --plan`` output -> every migration the code has (``app.name``)."""
    return sorted({m.group("name") for ln in text.splitlines() if (m := _PLAN_LINE.match(ln))})


@task(
    name="list-code-migrations",
    task_run_name="list-code-migrations-{host.name}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=2,
)
def list_code_migrations(
    host: FleetHost,
    pool: ConnectionPool,
    command: list[str],
    directory: str,
    timeout: float = 120,
) -> list[str] | None:
    """The migrations the deployed code has (``app.name``), from ``command`` (``showmigrations
    --plan``) run on one worker like the migrations. None when the command fails (unknown)."""
    remote = Remote(
        conn=pool.get(host.address),
        host=host.name,
        dry_run=True,
        command_timeout=timeout,
        channel_timeout=pool.opts.connect_timeout,
    )
    try:
        result = remote.read(sh_argv(MIGRATE_SCRIPT, directory, *command), timeout=timeout)
    except CommandError as exc:
        get_run_logger().warning("could not list the code's migrations on %s: %s", host.name, exc)
        return None
    names = parse_showmigrations(result.stdout)
    return names or None
