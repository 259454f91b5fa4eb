"""Secret-file rollout leftovers that no journal accounts for (the watchdog finds them,
recover-environment removes them).

push-server-secrets and update-newrelic-keys journal the paths they stage before staging them, so
a dead run's leftovers are undone from its journal (recover-environment's journaled undo). What is
left beyond that (a journal lost or closed, a run killed mid-upload, files staged by hand) is found
here on the servers themselves: ``.fabflows-next`` / ``.fabflows-prev`` / ``.fabflows-absent``
beside the environment's secret files, and upload directories in the SSH user's home. Removing them
is safe: none is live.
"""

from __future__ import annotations

from collections.abc import Iterable

from fabflows.runbook import RunContext
from fabflows.runtime.journal import JournalEntry
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.secrets import BACKUP_SUFFIXES, secret_path
from tasks.ssh.staged_secrets import StagedLeftovers

STAGE_STEP = "stage"
"""The rollout step that journals the paths it stages (``data["paths"]``: address -> paths)."""


def secret_file_paths(rc: RunContext) -> list[str]:
    """Every file a rollout may write in this environment: ``<home>/<name>`` per secret name and
    each secret-bearing config file.

    Raises:
        BadInput: the config's secret names or files are unusable.
    """
    from fabflows.procedures.secret_files import resolve_specs, secret_names

    names = secret_names(list(rc.config.password_names))
    specs = resolve_specs(rc, ("app", "newrelic"))
    return sorted({secret_path(rc.env.home, n) for n in names} | {s.path for s in specs})


def journal_claims(entries: Iterable[JournalEntry]) -> dict[str, set[str]]:
    """address -> the secret-file paths open journals staged (their undo takes care of them)."""
    claims: dict[str, set[str]] = {}
    for entry in entries:
        rec = entry.step(STAGE_STEP)
        paths = rec.data.get("paths") if rec is not None and rec.applied else None
        if not isinstance(paths, dict):
            continue
        for address, listed in paths.items():
            claims.setdefault(str(address), set()).update(str(p) for p in listed or [])
    return claims


def _base(path: str) -> str:
    for suffix in BACKUP_SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def orphans(found: list[StagedLeftovers], claims: dict[str, set[str]]) -> list[StagedLeftovers]:
    """Pure: the leftovers no open journal claims (upload directories never are: no undo removes
    them)."""
    out = []
    for server in found:
        claimed = claims.get(server.address, set())
        left = server.model_copy(
            update={
                "staged": [p for p in server.staged if _base(p) not in claimed],
                "backups": [p for p in server.backups if _base(p) not in claimed],
            }
        )
        if left.paths:
            out.append(left)
    return out


def gather_staged_leftovers(
    rc: RunContext, pool: ConnectionPool, entries: Iterable[JournalEntry]
) -> tuple[list[StagedLeftovers], list[str]]:
    """(servers with leftovers no open journal claims, servers that could not be read).

    Raises:
        BadInput: the config's secret names or files are unusable.
    """
    from tasks.aws.ec2 import describe_servers
    from tasks.ssh.fleet import hosts_from_servers
    from tasks.ssh.staged_secrets import list_staged_secret_files

    paths = secret_file_paths(rc)
    env = rc.env
    servers = describe_servers(rc.creds, env.deployment, env.environment, states=("running",))
    hosts = hosts_from_servers(servers, env.address_attribute)
    if not hosts:
        return [], []
    found, unread = list_staged_secret_files(pool, hosts, paths)
    return orphans(found, journal_claims(entries)), unread


def leftovers_by_address(found: list[StagedLeftovers]) -> dict[str, list[str]]:
    return {s.address: s.paths for s in found}
