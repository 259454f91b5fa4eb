"""Where an app server finds its database, and pointing it at another one.

A FabulAWS app server reaches PostgreSQL through its local pgbouncer: the app's settings
(``<home>/www/<env>/code_root/*/local_settings.py``) say ``DB_HOST = "127.0.0.1"`` and the
pgbouncer config (``<home>/services/pgbouncer/pgbouncer-<env>.ini``) names the primary's address
in its ``[databases]`` line (``<db> = host=<address> ...``). Either file may name the primary
(an app configured without pgbouncer has it in ``DB_HOST``), so both are rewritten wherever they
name the old address, and then pgbouncer and the role's programs restart so no process keeps a
connection to the old server.
"""

from __future__ import annotations

import re

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from tasks.plan import StepResult
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.remote import Remote


class DatabaseSettings(BaseModel):
    """The database addresses an app server's files name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: str
    addresses: dict[str, list[str]] = Field(
        default_factory=dict, description="File -> the database hosts it names."
    )


def settings_files(home: str, environment: str) -> list[str]:
    """The files that can name the database host, as globs (pure)."""
    home = home.rstrip("/")
    return [
        f"{home}/services/pgbouncer/pgbouncer-{environment}.ini",
        f"{home}/www/{environment}/code_root/*/local_settings.py",
    ]


READ_SCRIPT = r"""
for f in "$@"; do
    [ -f "$f" ] || continue
    printf '%s\t' "$f"
    sed -n -E "s/.*(host=|DB_HOST *= *['\"])([0-9A-Za-z.:-]+).*/\2/p" "$f" | tr '\n' ' '
    printf '\n'
done
"""


def parse_settings(server: str, text: str) -> DatabaseSettings:
    """The read script's output as a model (pure)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        path, _, hosts = line.partition("\t")
        if path:
            out[path] = hosts.split()
    return DatabaseSettings(server=server, addresses=out)


@task(
    cache_policy=NO_CACHE,
    name="describe-database-settings",
    task_run_name="describe-database-settings-{server}",
)
def describe_database_settings(
    pool: ConnectionPool, server: str, address: str, home: str, environment: str
) -> DatabaseSettings:
    """Which database hosts the app server's settings and pgbouncer config name.

    Args:
        pool: The run's SSH connections.
        server: Display name.
        address: Where to connect.
        home: The deploy user's home.
        environment: The environment (file names carry it).
    """
    remote = Remote(conn=pool.get(address), host=server, dry_run=False)
    files = settings_files(home, environment)
    # the globs expand in the remote shell (no quotes around them)
    script = READ_SCRIPT.replace('"$@"', " ".join(files))
    return parse_settings(server, remote.read(["sh", "-c", script], sudo=True).stdout)


REPOINT_SCRIPT = r"""
set -e
old_re="$1"; new="$2"; shift 2
n=0
for f in FILES; do
    [ -f "$f" ] || continue
    if grep -qE "(host=|DB_HOST *= *['\"])${old_re}([^0-9A-Za-z.:-]|$)" "$f"; then
        sed -i -E "s/(host=)${old_re}([^0-9A-Za-z.:-]|$)/\1${new}\2/g; s/(DB_HOST *= *['\"])${old_re}(['\"])/\1${new}\2/g" "$f"
        n=$((n+1))
    fi
done
avail=$(supervisorctl avail 2>/dev/null || true)
for g in "$@"; do
    name="${g#HUP:}"
    # a group shows as "<group>:<program>", or as "<group>" when its one program has its name
    printf '%s\n' "$avail" | grep -qE "^${name}[: ]" || continue
    if [ "$name" != "$g" ]; then
        supervisorctl signal HUP "$name:*" >/dev/null
    else
        supervisorctl restart "$name:*" >/dev/null
    fi
done
echo "$n"
"""


@task(
    cache_policy=NO_CACHE,
    name="repoint-database",
    task_run_name="repoint-database-{server}",
    retries=0,
)
def repoint_database(
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
    """Rewrite the app server's database host ``old`` -> ``new`` (pgbouncer config and app
    settings, wherever they name it), then restart the supervisor ``groups`` (pgbouncer first).
    Already pointing at ``new``: no rewrite, no restart. Compensation: the same with ``old`` and
    ``new`` swapped (only useful while ``old`` still takes writes).

    Args:
        pool: The run's SSH connections.
        server: Display name.
        address: Where to connect.
        home: The deploy user's home.
        environment: The environment.
        old: The old database address.
        new: The new database address.
        groups: Supervisor groups to restart after the rewrite, in order (``HUP:<group>``: signal).
        dry_run: Only say what would be done.
    """
    for value in (old, new):
        if not re.fullmatch(r"[0-9A-Za-z.:-]+", value):
            raise ValueError(f"unusable database address {value!r}")
    for g in groups:
        if not re.fullmatch(r"(HUP:)?[A-Za-z0-9_.-]+", g):
            raise ValueError(f"unusable supervisor group {g!r}")
    before = describe_database_settings.fn(pool, server, address, home, environment)
    naming = [f for f, hosts in before.addresses.items() if old in hosts]
    if not naming:
        now = sorted({h for hosts in before.addresses.values() for h in hosts})
        return StepResult(
            changed=False,
            dry_run=dry_run,
            summary=f"{server}: settings name {', '.join(now) or 'no database host'}",
        )
    if dry_run:
        return StepResult(
            changed=True,
            dry_run=True,
            summary=f"Would point {', '.join(naming)} on {server} at {new}",
        )
    remote = Remote(conn=pool.get(address), host=server, dry_run=False)
    script = REPOINT_SCRIPT.replace("FILES", " ".join(settings_files(home, environment)))
    remote.write(["sh", "-c", script, "repoint", re.escape(old), new, *groups], sudo=True)
    return StepResult(
        changed=True,
        dry_run=False,
        summary=f"{server}: {len(naming)} file(s) now name {new}; restarted {', '.join(groups)}",
    )
