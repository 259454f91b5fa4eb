"""A new app or cache server made ready, and the app servers pointed at another cache server.

FabulAWS's app servers name the cache server (RabbitMQ, Redis) by address in their settings
(``<home>/www/<env>/code_root/*/local_settings.py``: ``BROKER_HOST``, ``CELERY_BROKER_URL``,
``CACHES``...). Neither broker can move to another address, so a replacement cache means every app
server's settings rewritten and its programs restarted.

Read tasks: :func:`describe_cache_settings` (which settings files name an address),
:func:`describe_settings_files` (the settings a new server copies from a peer).
Write tasks: :func:`wait_for_server` (reads only, until the new server's image is up),
:func:`write_settings_files` (compensation: none needed, the server is new),
:func:`start_role_programs` (compensation: :func:`stop_role_programs`),
:func:`repoint_cache` (compensation: the same with the addresses swapped).
"""

from __future__ import annotations

import re
import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.plan import StepResult
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.programs import parse_status
from tasks.ssh.remote import Remote

_ADDRESS = re.compile(r"[0-9A-Za-z.:-]+")
_GROUP = re.compile(r"(HUP:)?[A-Za-z0-9_.-]+")


def app_settings_files(home: str, environment: str) -> list[str]:
    """The app's settings files, as globs (pure)."""
    home = home.rstrip("/")
    return [
        f"{home}/www/{environment}/code_root/*/local_settings.py",
        f"{home}/services/pgbouncer/pgbouncer-{environment}.ini",
    ]


def _remote(pool: ConnectionPool, server: str, address: str) -> Remote:
    return Remote(conn=pool.get(address), host=server, dry_run=False)


def _check(values: list[str], pattern: re.Pattern[str], what: str) -> None:
    for v in values:
        if not pattern.fullmatch(v):
            raise ValueError(f"unusable {what} {v!r}")


@task(name="wait-for-server", task_run_name="wait-for-server-{server}", cache_policy=NO_CACHE)
def wait_for_server(
    pool: ConnectionPool,
    server: str,
    address: str,
    *,
    groups: list[str],
    ports: list[int],
    timeout: float,
) -> float:
    """Wait until the new server answers SSH, supervisor knows ``groups`` (the image's programs)
    and something listens on each of ``ports`` (a cache's brokers); returns the seconds waited."""
    _check(groups, _GROUP, "supervisor group")
    # a group shows as "<group>:<program>", or as "<group>" when its one program has its name
    checks = [f"supervisorctl avail 2>/dev/null | grep -qE '^{g}[: ]'" for g in groups]
    checks += [f"bash -c 'exec 3<>/dev/tcp/127.0.0.1/{int(p)}' 2>/dev/null" for p in ports]
    script = " && ".join(checks) or "true"
    started = time.monotonic()
    last = "not tried"
    while True:
        try:
            _remote(pool, server, address).read(["sh", "-c", script], sudo=True, timeout=30)
            return round(time.monotonic() - started, 2)
        except Exception as exc:  # noqa: BLE001 - not up yet: retried until the timeout
            pool.discard(address)
            last = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{server} ({address}) not ready after {timeout:.0f} s: {last}")
        time.sleep(1.0)


@task(name="describe-settings-files", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def describe_settings_files(
    pool: ConnectionPool, server: str, address: str, home: str, environment: str
) -> dict[str, str]:
    """The app's settings files on ``server``: path -> content (what a new server copies)."""
    remote = _remote(pool, server, address)
    listed = remote.read(
        ["sh", "-c", "ls -1d " + " ".join(app_settings_files(home, environment)) + " 2>/dev/null"],
        sudo=True,
        ok_codes=(0, 1, 2),
    ).stdout.split()
    return {path: remote.read(["cat", path], sudo=True).stdout for path in listed}


@task(name="write-settings-files", cache_policy=NO_CACHE, retries=0)
def write_settings_files(
    pool: ConnectionPool,
    server: str,
    address: str,
    files: dict[str, str],
    *,
    owner: str,
    dry_run: bool,
) -> StepResult:
    """Write ``files`` (path -> content, on stdin) on the new server, as its peers have them;
    files already equal are left alone. Compensation: none (the server is new)."""
    remote = _remote(pool, server, address)
    differ = []
    for path, content in sorted(files.items()):
        now = remote.read(["sh", "-c", 'cat -- "$1" 2>/dev/null || true', "sh", path], sudo=True)
        if now.stdout != content:
            differ.append(path)
    if not differ:
        return StepResult(changed=False, dry_run=dry_run, summary=f"{server}: settings as peers")
    if dry_run:
        return StepResult(
            changed=True, dry_run=True, summary=f"Would write {', '.join(differ)} on {server}"
        )
    for path in differ:
        mode = "600" if path.endswith(".ini") else "644"
        script = (
            'set -e; mkdir -p -- "$(dirname -- "$1")"; cat > "$1.fabflows-new"; '
            'chown "$2": "$1.fabflows-new"; chmod "$3" "$1.fabflows-new"; '
            'mv -f -- "$1.fabflows-new" "$1"'
        )
        remote.write(
            ["sh", "-c", script, "sh", path, owner, mode], sudo=True, stdin=files[path].encode()
        )
    return StepResult(
        changed=True, dry_run=False, summary=f"{server}: wrote {', '.join(differ)} as its peers'"
    )


def _status(remote: Remote) -> dict[str, str]:
    out = remote.read(["supervisorctl", "status"], sudo=True, ok_codes=(0, 3)).stdout
    return {p.name: p.state for p in parse_status(out)}


def group_states(pool: ConnectionPool, server: str, address: str, groups: list[str]) -> dict:
    """``group:program`` -> state, for the programs of ``groups`` on ``server``."""
    states = _status(_remote(pool, server, address))
    return {k: v for k, v in states.items() if k.split(":", 1)[0] in groups}


@task(name="start-role-programs", cache_policy=NO_CACHE, retries=0)
def start_role_programs(
    pool: ConnectionPool,
    server: str,
    address: str,
    groups: list[str],
    *,
    dry_run: bool,
    timeout: float = 60,
) -> StepResult:
    """Load the supervisor config and (re)start ``groups`` so they read the server's settings,
    then wait until each of their programs is RUNNING. Compensation: :func:`stop_role_programs`."""
    _check(groups, _GROUP, "supervisor group")
    if dry_run:
        return StepResult(
            changed=True, dry_run=True, summary=f"Would start {', '.join(groups)} on {server}"
        )
    remote = _remote(pool, server, address)
    remote.write(["sh", "-c", "supervisorctl reread >/dev/null; supervisorctl update"], sudo=True)
    remote.write(["supervisorctl", "restart", *[f"{g}:*" for g in groups]], sudo=True)
    deadline = time.monotonic() + timeout
    while True:
        states = group_states(pool, server, address, groups)
        missing = [g for g in groups if not any(k.split(":", 1)[0] == g for k in states)]
        down = {k: v for k, v in states.items() if v != "RUNNING"}
        if not missing and not down:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{server}: not RUNNING after {timeout:.0f} s: "
                + ", ".join(
                    [f"{g} missing" for g in missing] + [f"{k} {v}" for k, v in down.items()]
                )
            )
        time.sleep(0.5)
    return StepResult(
        changed=True,
        dry_run=False,
        summary=f"{server}: {', '.join(sorted(states))} RUNNING",
    )


@task(name="stop-role-programs", cache_policy=NO_CACHE, retries=0)
def stop_role_programs(
    pool: ConnectionPool, server: str, address: str, groups: list[str], *, dry_run: bool
) -> StepResult:
    """Stop ``groups`` (the undo of :func:`start_role_programs`)."""
    _check(groups, _GROUP, "supervisor group")
    if dry_run:
        return StepResult(
            changed=True, dry_run=True, summary=f"Would stop {', '.join(groups)} on {server}"
        )
    targets = " ".join(f"{g}:*" for g in groups)
    _remote(pool, server, address).write(
        ["sh", "-c", f"supervisorctl stop {targets} >/dev/null || true"], sudo=True
    )
    return StepResult(changed=True, dry_run=False, summary=f"{server}: stopped {', '.join(groups)}")


def _address_re(address: str) -> str:
    """An ERE for ``address`` standing alone (not part of a longer address) (pure)."""
    return r"(^|[^0-9A-Za-z.-])" + re.escape(address).replace(r"\-", "-") + r"([^0-9A-Za-z.-]|$)"


@task(name="describe-cache-settings", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def describe_cache_settings(
    pool: ConnectionPool,
    server: str,
    address: str,
    home: str,
    environment: str,
    cache_address: str,
) -> list[str]:
    """The app settings files on ``server`` that name ``cache_address``."""
    _check([cache_address], _ADDRESS, "address")
    files = " ".join(app_settings_files(home, environment)[:1])
    script = f'grep -lE "$1" {files} 2>/dev/null || true'
    out = _remote(pool, server, address).read(
        ["sh", "-c", script, "sh", _address_re(cache_address)], sudo=True
    )
    return sorted(out.stdout.split())


@task(
    name="repoint-cache", task_run_name="repoint-cache-{server}", cache_policy=NO_CACHE, retries=0
)
def repoint_cache(
    pool: ConnectionPool,
    server: str,
    address: str,
    *,
    home: str,
    environment: str,
    old: str,
    new: str,
    groups: list[str],
    dry_run: bool,
) -> StepResult:
    """Rewrite the cache server's address ``old`` -> ``new`` in the app's settings, then restart
    ``groups`` (``HUP:<group>``: a graceful reload) so the processes connect to ``new``. Already
    naming ``new`` only: no change. Compensation: the same with ``old`` and ``new`` swapped."""
    _check([old, new], _ADDRESS, "address")
    _check(groups, _GROUP, "supervisor group")
    naming = describe_cache_settings.fn(pool, server, address, home, environment, old)
    if not naming:
        return StepResult(changed=False, dry_run=dry_run, summary=f"{server}: names no {old}")
    if dry_run:
        return StepResult(
            changed=True, dry_run=True, summary=f"Would point {', '.join(naming)} at {new}"
        )
    remote = _remote(pool, server, address)
    sed = f"s/{_address_re(old)}/\\1{new}\\2/g"
    remote.write(["sed", "-i", "-E", sed, *naming], sudo=True)
    for g in groups:
        name = g.removeprefix("HUP:")
        if name not in {k.split(":", 1)[0] for k in _status(remote)}:
            continue
        if name != g:
            remote.write(["supervisorctl", "signal", "HUP", f"{name}:*"], sudo=True)
        else:
            remote.write(["supervisorctl", "restart", f"{name}:*"], sudo=True)
    return StepResult(
        changed=True,
        dry_run=False,
        summary=f"{server}: {len(naming)} file(s) now name {new}; restarted {', '.join(groups)}",
    )
