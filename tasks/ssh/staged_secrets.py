"""What a secret-file rollout leaves on a server when it dies: find it, remove it.

A rollout (:mod:`tasks.ssh.secrets`) stages each new file as ``<path>.fabflows-next``, keeps the
live one as ``<path>.fabflows-prev`` (or marks ``<path>.fabflows-absent``) when it swaps, and
uploads the contents first into a private ``~/.fabflows-stage-<token>`` directory of the SSH user.
A run killed between those steps (and whose journal does not say so) leaves them behind:

- ``staged``: ``.fabflows-next`` files, never live;
- ``backups``: ``.fabflows-prev`` / ``.fabflows-absent``, a swap never committed (the live file is
  the new one);
- ``uploads``: upload directories whose install never ran (they hold the new contents).

Only names and paths travel: nothing here reads a file's content.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from tasks.ssh.connection import ConnectionPool
from tasks.ssh.fleet import FleetHost, FleetResult, HostResult, RateControl, run_fleet
from tasks.ssh.remote import Remote, sh_argv
from tasks.ssh.secrets import (
    ABSENT_SUFFIX,
    NEXT_SUFFIX,
    PREV_SUFFIX,
    STAGE_DIR_PREFIX,
    stat_files,
)


class StagedLeftovers(BaseModel):
    """One server's leftovers of secret-file rollouts (paths only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    address: str
    staged: list[str] = Field(default_factory=list, description="<path>.fabflows-next files.")
    backups: list[str] = Field(
        default_factory=list, description="<path>.fabflows-prev / -absent of an uncommitted swap."
    )
    uploads: list[str] = Field(
        default_factory=list, description="~/.fabflows-stage-* upload directories."
    )

    @property
    def paths(self) -> list[str]:
        return [*self.staged, *self.backups, *self.uploads]

    def describe(self) -> str:
        parts = []
        if self.staged:
            parts.append(f"{len(self.staged)} staged")
        if self.backups:
            parts.append(f"{len(self.backups)} backup(s) of an uncommitted swap")
        if self.uploads:
            parts.append(f"{len(self.uploads)} upload dir(s)")
        return f"{self.host}: " + ", ".join(parts) + " (" + ", ".join(self.paths) + ")"


def is_leftover_path(path: str) -> bool:
    """Only a rollout's own names may be removed: ``*.fabflows-next/-prev/-absent``, or an
    absolute ``.../.fabflows-stage-<token>`` directory."""
    if not path.startswith("/") or "\n" in path:
        return False
    if path.endswith((NEXT_SUFFIX, PREV_SUFFIX, ABSENT_SUFFIX)):
        return True
    name = posixpath.basename(path)
    return name.startswith(STAGE_DIR_PREFIX) and len(name) > len(STAGE_DIR_PREFIX)


_UPLOADS_SCRIPT = f"""for d in "$HOME"/{STAGE_DIR_PREFIX}*; do
  [ -d "$d" ] && printf '%s\\n' "$d"
done
exit 0
"""
"""The SSH user's upload directories, one per line."""


def find_leftovers(remote: Remote, paths: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """(staged, backups, uploads) beside ``paths`` and in the SSH user's home (two round trips)."""
    candidates = [p + s for p in paths for s in (NEXT_SUFFIX, PREV_SUFFIX, ABSENT_SUFFIX)]
    stats = stat_files(remote, candidates)
    present = [p for p in candidates if stats.get(p) is not None]
    uploads = remote.read(sh_argv(_UPLOADS_SCRIPT)).stdout.splitlines()
    return (
        [p for p in present if p.endswith(NEXT_SUFFIX)],
        [p for p in present if not p.endswith(NEXT_SUFFIX)],
        [u for u in uploads if is_leftover_path(u)],
    )


@task(name="list-staged-secret-files", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def list_staged_secret_files(
    pool: ConnectionPool, hosts: list[FleetHost], paths: list[str]
) -> tuple[list[StagedLeftovers], list[str]]:
    """Read-only: each server's staged files, uncommitted backups and upload directories of the
    secret files ``paths``. Returns (servers with leftovers, names of servers that could not be
    read)."""

    def step(remote: Remote, host: FleetHost) -> HostResult:
        staged, backups, uploads = find_leftovers(remote, paths)
        found = StagedLeftovers(
            host=host.label, address=host.address, staged=staged, backups=backups, uploads=uploads
        )
        return HostResult(
            status="unchanged", message=f"{len(found.paths)} leftover(s)", output=found
        )

    result = run_fleet(
        hosts,
        step,
        pool=pool,
        rate=RateControl(max_concurrency="100%", max_errors="100%"),
        dry_run=True,
        name="list-staged-secret-files",
    )
    found = [r.output for r in result.results if r.status == "unchanged" and r.output.paths]
    # names only: the reasons (in the fleet's log) vary from one try to the next, and a plan that
    # lists these servers must be the same plan when gathered again
    unread = [r.host for r in result.results if r.status != "unchanged"]
    return found, unread


@task(name="remove-staged-secret-files", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def remove_staged_secret_files(
    pool: ConnectionPool,
    hosts: list[FleetHost],
    paths_by_address: dict[str, list[str]],
    *,
    dry_run: bool,
) -> FleetResult:
    """Remove what a dead rollout left (staged files, kept backups, upload directories).

    No compensation: the removed files were never live (staged, uploads) or are the copies of what
    was live before a swap that was never committed (the live files stay as they are). Only the
    rollout's own names are accepted; a path already gone is unchanged.

    Raises:
        ValueError: a path is not a rollout's leftover name.
    """
    bad = [p for ps in paths_by_address.values() for p in ps if not is_leftover_path(p)]
    if bad:
        raise ValueError(f"not a staged secret file: {', '.join(bad)}")

    def step(remote: Remote, host: FleetHost) -> HostResult:
        wanted = paths_by_address.get(host.address, [])
        stats = stat_files(remote, wanted)
        there = [p for p in wanted if stats.get(p) is not None]
        if not there:
            return HostResult(status="unchanged", message="no leftovers")
        remote.write(["rm", "-rf", "--", *there], sudo=True)
        return HostResult(status="changed", message="removed " + ", ".join(there))

    return run_fleet(
        hosts,
        step,
        pool=pool,
        rate=RateControl(max_concurrency="100%", max_errors="100%"),
        dry_run=dry_run,
        name="remove-staged-secret-files",
    )
