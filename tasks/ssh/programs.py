"""Supervisor programs on a server: which exist, restarting them, and checking they run.

FabulAWS runs everything of the app under supervisor: groups ``<env>-web``
(gunicorn), ``<env>-celery``, ``<env>-pgbouncer``. A name given here may be a group (restarted as
``<group>:*``) or a program. Names that do not exist on a server are reported, not guessed at.

These are fleet steps' building blocks (they take a :class:`Remote`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from tasks.ssh.connection import ConnectionPool
from tasks.ssh.fleet import FleetHost, FleetResult, HostResult, RateControl, run_fleet
from tasks.ssh.remote import CommandError, Remote

_STATUS_LINE = re.compile(r"^(?P<name>\S+)\s+(?P<state>[A-Z]+)\b")
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")


class ProgramState(BaseModel):
    """One supervisor program (``group:program`` or ``program``) and its state."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    state: str = Field(description="RUNNING, STOPPED, STARTING, BACKOFF, FATAL, EXITED...")

    @property
    def group(self) -> str | None:
        return self.name.split(":", 1)[0] if ":" in self.name else None


def parse_status(text: str) -> list[ProgramState]:
    """Pure: ``supervisorctl status`` output -> programs."""
    out = []
    for line in text.splitlines():
        m = _STATUS_LINE.match(line.strip())
        if m:
            out.append(ProgramState(name=m.group("name"), state=m.group("state")))
    return out


def resolve_targets(
    programs: Sequence[ProgramState], names: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Pure: supervisorctl targets for ``names`` (groups as ``group:*``), and the names not found."""
    targets: list[str] = []
    missing: list[str] = []
    full = {p.name for p in programs}
    groups = {p.group for p in programs if p.group}
    for name in names:
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not a supervisor program or group name")
        if name in groups:
            target = f"{name}:*"
        elif name in full:
            target = name
        else:
            missing.append(name)
            continue
        if target not in targets:
            targets.append(target)
    return targets, missing


def covered(programs: Sequence[ProgramState], targets: Sequence[str]) -> list[ProgramState]:
    """Pure: the programs ``targets`` stand for."""
    out = []
    for p in programs:
        for t in targets:
            if (t.endswith(":*") and p.group == t[:-2]) or p.name == t:
                out.append(p)
                break
    return out


def read_programs(remote: Remote) -> list[ProgramState]:
    """Every supervisor program on the server and its state."""
    # exit 3: some program is not running; still a valid answer
    result = remote.read(["supervisorctl", "status"], sudo=True, ok_codes=(0, 3))
    return parse_status(result.stdout)


def restart_programs(remote: Remote, names: Sequence[str], timeout: float = 120) -> HostResult:
    """Restart ``names`` (groups or programs) and check that each of their programs is RUNNING.

    Names missing on this server are skipped and named in the message. In a dry run the command is
    recorded and nothing restarts.

    Raises:
        CommandError: supervisorctl failed, or a program is not RUNNING after the restart.
    """
    programs = read_programs(remote)
    targets, missing = resolve_targets(programs, names)
    note = f" (not on this server: {', '.join(missing)})" if missing else ""
    if not targets:
        return HostResult(status="unchanged", message=f"nothing to restart{note}")
    remote.write(["supervisorctl", "restart", *targets], sudo=True, timeout=timeout)
    if remote.dry_run:
        return HostResult(status="changed", message=f"would restart {', '.join(targets)}{note}")
    after = covered(read_programs(remote), targets)
    down = [p for p in after if p.state != "RUNNING"]
    if down:
        raise CommandError(
            remote.host,
            "supervisorctl status",
            3,
            "not RUNNING after the restart: " + ", ".join(f"{p.name} {p.state}" for p in down),
        )
    return HostResult(status="changed", message=f"restarted {', '.join(targets)}{note}")


def program_pids(remote: Remote, targets: Sequence[str]) -> list[int]:
    """The process ids supervisor has for ``targets`` (0 and non-numbers: not running)."""
    pids = []
    for program in covered(read_programs(remote), targets):  # `pid` takes one program a call
        out = remote.read(["supervisorctl", "pid", program.name], sudo=True, ok_codes=(0, 1, 2, 3))
        pids += [int(x) for x in out.stdout.split() if x.isdigit() and int(x) > 0]
    return pids


def kill_stuck(remote: Remote, targets: Sequence[str], wait: float = 30) -> list[int]:
    """SIGKILL the processes (and their children) of ``targets`` whose stop is stuck, then start
    them again: what FabulAWS's troubleshooting guide does by hand for a celery that will not stop.

    Returns the killed process ids. Raises CommandError if they are not RUNNING within ``wait``.
    """
    import time

    pids = program_pids(remote, targets)
    for pid in pids:
        # children first (celery's pool), then the main process; gone already is fine
        remote.write(
            ["sh", "-c", 'pkill -KILL -P "$1"; kill -KILL "$1" 2>/dev/null; true', "sh", str(pid)],
            sudo=True,
        )
    if remote.dry_run:
        return pids
    deadline = time.monotonic() + wait
    while True:
        states = covered(read_programs(remote), targets)
        if not any(p.state == "STOPPING" for p in states):
            break
        if time.monotonic() > deadline:
            raise CommandError(remote.host, "supervisorctl status", 3, "still STOPPING after kill")
        time.sleep(0.2)
    stopped = [p.name for p in states if p.state != "RUNNING"]
    if stopped:
        # a concurrent start of the interrupted restart may win the race: "already started" is fine
        remote.read(["supervisorctl", "start", *stopped], sudo=True, ok_codes=(0, 1, 7))
    while True:
        states = covered(read_programs(remote), targets)
        down = [p for p in states if p.state != "RUNNING"]
        if not down:
            return pids
        if time.monotonic() > deadline:
            raise CommandError(
                remote.host,
                "supervisorctl start",
                3,
                "not RUNNING after kill and start: "
                + ", ".join(f"{p.name} {p.state}" for p in down),
            )
        time.sleep(0.2)


def restart_or_kill(
    remote: Remote, names: Sequence[str], stop_timeout: float, timeout: float = 120
) -> HostResult:
    """Restart ``names``; a restart still waiting for a program to stop after ``stop_timeout``
    seconds is a stuck program: it is killed and started again (``kill_stuck``)."""
    programs = read_programs(remote)
    targets, missing = resolve_targets(programs, names)
    note = f" (not on this server: {', '.join(missing)})" if missing else ""
    if not targets:
        return HostResult(status="unchanged", message=f"nothing to restart{note}")
    try:
        remote.write(["supervisorctl", "restart", *targets], sudo=True, timeout=stop_timeout)
    except CommandError as exc:
        if not exc.timed_out:
            raise
        killed = kill_stuck(remote, targets, wait=timeout)
        return HostResult(
            status="changed",
            message=f"restarted {', '.join(targets)}: stuck stopping after {stop_timeout:.0f} s, "
            f"killed pid {', '.join(map(str, killed))} and started again{note}",
        )
    if remote.dry_run:
        return HostResult(status="changed", message=f"would restart {', '.join(targets)}{note}")
    down = [p for p in covered(read_programs(remote), targets) if p.state != "RUNNING"]
    if down:
        raise CommandError(
            remote.host,
            "supervisorctl status",
            3,
            "not RUNNING after the restart: " + ", ".join(f"{p.name} {p.state}" for p in down),
        )
    return HostResult(status="changed", message=f"restarted {', '.join(targets)}{note}")


def restart_step(names_by_address: dict[str, list[str]], timeout: float = 120):  # noqa: ANN201
    """A fleet step restarting, on each host, the names listed for its address."""

    def step(remote: Remote, host: FleetHost) -> HostResult:
        return restart_programs(remote, names_by_address.get(host.address, []), timeout)

    return step


@task(name="restart-programs", cache_policy=NO_CACHE, retries=0)
def restart_programs_on(
    pool: ConnectionPool,
    hosts: list[FleetHost],
    names_by_address: dict[str, list[str]],
    *,
    dry_run: bool,
    timeout: float = 120,
    rate: RateControl | None = None,
) -> FleetResult:
    """Restart, on each host, the supervisor groups/programs listed for its address.

    No compensation (a restart cannot be undone; restarting again after restoring files is the way
    back). Hosts run at once unless ``rate`` says otherwise; the first failure stops new hosts.
    """
    return run_fleet(
        hosts,
        restart_step(names_by_address, timeout),
        pool=pool,
        rate=rate or RateControl(max_concurrency="100%", max_errors=0),
        dry_run=dry_run,
        name="restart-programs",
        command_timeout=timeout,
    )


@task(name="describe-programs", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def describe_programs(
    pool: ConnectionPool, hosts: list[FleetHost]
) -> dict[str, list[ProgramState]]:
    """Read-only: every host's supervisor programs and states, by address."""

    def step(remote: Remote, host: FleetHost) -> HostResult:
        return HostResult(status="unchanged", output=read_programs(remote))

    result = run_fleet(
        hosts,
        step,
        pool=pool,
        rate=RateControl(max_concurrency="100%", max_errors="100%"),
        dry_run=True,
        name="describe-programs",
    )
    result.raise_for_errors()
    return {r.address: r.output for r in result.results}
