"""Upgrade mode on the web servers: the 503 page and the health-check override in nginx's root.

FabulAWS's nginx serves a requested file if it exists in the document root
(``<home>/services/nginx/html``); else, if ``503.html`` exists there, answers 503 with it; else
proxies to the app. So upgrade mode is two files:

- ``healthcheck.html``: the load balancer's health check gets a static 200, and servers stay in
  service while users see the page;
- ``503.html``: every other request gets 503 with this page.

Next to the root (not inside it, so nginx never serves it) each server also gets a marker,
``<home>/services/nginx/fabflows-upgrade-mode.json``, with the run that turned upgrade mode on and
since when: the hosts themselves say who put them in upgrade mode (``upgrade-status``).

Order matters. On: marker, health-check override, then the page (the health check never sees a
503). Off: the page first, then the override, then the marker (a server never answers the health
check with the app while users still get the page, and a marker always outlives the files it
describes, so a run killed half-way is visible).
"""

from __future__ import annotations

import hashlib
import posixpath
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from tasks.aws.autoscaling import UpgradeModeRecord
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.fleet import FleetHost, FleetResult, HostResult, RateControl, run_fleet
from tasks.ssh.remote import Remote, sh_argv

PAGE_FILE = "503.html"
HEALTHCHECK_FILE = "healthcheck.html"
MARKER_FILE = "fabflows-upgrade-mode.json"

ALL_AT_ONCE = RateControl(max_concurrency="100%", max_errors="100%")
"""Upgrade pages go up and down on every web server at once, and a failure does not stop the rest."""

_STATE_SCRIPT = r"""set -u
root=$1; marker=$2
if [ ! -d "$root" ]; then echo noroot; exit 0; fi
for f in 503.html healthcheck.html; do
  if [ -f "$root/$f" ]; then
    echo "file $f $(stat -c %Y -- "$root/$f") $(sha256sum < "$root/$f" | cut -d' ' -f1)"
  fi
done
if [ -f "$marker" ]; then printf 'marker '; head -c 4000 -- "$marker" | tr -d '\n'; echo; fi
"""
"""Prints ``noroot``, or one ``file NAME MTIME SHA256`` line per upgrade file and ``marker JSON``."""


class UpgradePages(BaseModel):
    """The two files of upgrade mode, read from config (or the defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    page: bytes = Field(description="503.html: what users see.")
    healthcheck: bytes = Field(description="healthcheck.html: the load balancer's static 200.")
    page_source: str = Field(description="Where the page came from (a file, or the default).")
    healthcheck_source: str = Field(description="Where the override came from.")


class HostUpgradeMode(BaseModel):
    """What one web server says about upgrade mode."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    address: str
    reachable: bool = True
    error: str = ""
    document_root: bool = Field(default=True, description="The nginx document root exists.")
    page: bool = Field(default=False, description="503.html is there (users get 503).")
    healthcheck_override: bool = False
    page_since: datetime | None = Field(default=None, description="503.html's modification time.")
    page_sha256: str | None = None
    healthcheck_sha256: str | None = None
    record: UpgradeModeRecord | None = Field(
        default=None, description="The marker: which run turned upgrade mode on, and when."
    )

    @property
    def in_upgrade_mode(self) -> bool:
        return self.page


def marker_path(nginx_root: str) -> str:
    """``<home>/services/nginx/html`` -> ``<home>/services/nginx/fabflows-upgrade-mode.json``."""
    return posixpath.join(posixpath.dirname(nginx_root.rstrip("/")), MARKER_FILE)


def parse_state(host: str, address: str, text: str) -> HostUpgradeMode:
    """Pure: the output of the state script -> HostUpgradeMode."""
    lines = [line for line in text.splitlines() if line.strip()]
    if lines[:1] == ["noroot"]:
        return HostUpgradeMode(host=host, address=address, document_root=False)
    files: dict[str, tuple[datetime, str]] = {}
    record = None
    for line in lines:
        kind, _, rest = line.partition(" ")
        if kind == "file":
            name, mtime, digest = rest.split()
            files[name] = (datetime.fromtimestamp(int(mtime), UTC), digest)
        elif kind == "marker":
            record = UpgradeModeRecord.from_json(rest)
    page = files.get(PAGE_FILE)
    health = files.get(HEALTHCHECK_FILE)
    return HostUpgradeMode(
        host=host,
        address=address,
        page=page is not None,
        healthcheck_override=health is not None,
        page_since=page[0] if page else None,
        page_sha256=page[1] if page else None,
        healthcheck_sha256=health[1] if health else None,
        record=record,
    )


def _read_state(remote: Remote, host: FleetHost, nginx_root: str) -> HostUpgradeMode:
    result = remote.read(sh_argv(_STATE_SCRIPT, nginx_root, marker_path(nginx_root)), sudo=True)
    return parse_state(host.label, host.address, result.stdout)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pages_on_step(nginx_root: str, pages: UpgradePages, record: UpgradeModeRecord):
    marker = (record.to_json() + "\n").encode()

    def step(remote: Remote, host: FleetHost) -> HostResult:
        state = _read_state(remote, host, nginx_root)
        if not state.document_root:
            return HostResult(
                status="failed",
                message=f"nginx document root {nginx_root} does not exist (not a web server?)",
                output=state,
            )
        done = []
        if state.record != record:
            remote.write_file(
                marker_path(nginx_root), marker, owner="root", group="root", mode=0o644
            )
            done.append("marker")
        if state.healthcheck_sha256 != _sha(pages.healthcheck):
            remote.write_file(
                posixpath.join(nginx_root, HEALTHCHECK_FILE),
                pages.healthcheck,
                owner="root",
                group="root",
                mode=0o644,
            )
            done.append(HEALTHCHECK_FILE)
        if state.page_sha256 != _sha(pages.page):
            remote.write_file(
                posixpath.join(nginx_root, PAGE_FILE),
                pages.page,
                owner="root",
                group="root",
                mode=0o644,
            )
            done.append(PAGE_FILE)
        if not done:
            return HostResult(status="unchanged", message="already in upgrade mode", output=state)
        verb = "would write" if remote.dry_run else "wrote"
        return HostResult(status="changed", message=f"{verb} {', '.join(done)}", output=state)

    return step


def _pages_off_step(nginx_root: str):
    def step(remote: Remote, host: FleetHost) -> HostResult:
        state = _read_state(remote, host, nginx_root)
        if not state.document_root:
            return HostResult(
                status="unchanged",
                message=f"no nginx document root {nginx_root}: not in upgrade mode",
                output=state,
            )
        present = [
            (state.page, posixpath.join(nginx_root, PAGE_FILE)),
            (state.healthcheck_override, posixpath.join(nginx_root, HEALTHCHECK_FILE)),
            (state.record is not None, marker_path(nginx_root)),
        ]
        removed = []
        for exists, path in present:
            if exists:
                remote.write(["rm", "-f", "--", path], sudo=True)
                removed.append(posixpath.basename(path))
        if not removed:
            return HostResult(status="unchanged", message="not in upgrade mode", output=state)
        verb = "would remove" if remote.dry_run else "removed"
        return HostResult(status="changed", message=f"{verb} {', '.join(removed)}", output=state)

    return step


def _state_step(nginx_root: str):
    def step(remote: Remote, host: FleetHost) -> HostResult:
        state = _read_state(remote, host, nginx_root)
        message = "in upgrade mode" if state.in_upgrade_mode else "serving"
        if state.record:
            message += f" (marker: {state.record.flow} run {state.record.run} since {state.record.since:%Y-%m-%d %H:%M:%S}Z)"
        return HostResult(status="unchanged", message=message, output=state)

    return step


@task(
    name="enable-upgrade-pages",
    cache_policy=NO_CACHE,
    retries=0,
)
def enable_upgrade_pages(
    hosts: list[FleetHost],
    pool: ConnectionPool,
    nginx_root: str,
    pages: UpgradePages,
    record: UpgradeModeRecord,
    *,
    dry_run: bool,
) -> FleetResult:
    """Put every web server in upgrade mode (marker, health-check override, 503 page), all at once.

    Idempotent: files already there with the same content are not rewritten. The marker names
    ``record`` (the holder of upgrade mode: this run, or the run whose window this one joins).
    Compensation: :func:`disable_upgrade_pages`.
    """
    return run_fleet(
        hosts,
        _pages_on_step(nginx_root, pages, record),
        pool=pool,
        rate=ALL_AT_ONCE,
        dry_run=dry_run,
        name="enable-upgrade-pages",
    )


@task(
    name="disable-upgrade-pages",
    cache_policy=NO_CACHE,
    retries=0,
)
def disable_upgrade_pages(
    hosts: list[FleetHost], pool: ConnectionPool, nginx_root: str, *, dry_run: bool
) -> FleetResult:
    """Take every web server out of upgrade mode (page, override, then marker), all at once.

    Safe at any time: a server not in upgrade mode is unchanged. Every server is tried even if
    some fail; the result says which.
    """
    return run_fleet(
        hosts,
        _pages_off_step(nginx_root),
        pool=pool,
        rate=ALL_AT_ONCE,
        dry_run=dry_run,
        name="disable-upgrade-pages",
    )


@task(name="get-upgrade-pages", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def get_upgrade_pages(
    hosts: list[FleetHost], pool: ConnectionPool, nginx_root: str
) -> list[HostUpgradeMode]:
    """Read-only: which web servers are in upgrade mode, since when, and by which run (from the hosts)."""
    result = run_fleet(
        hosts,
        _state_step(nginx_root),
        pool=pool,
        rate=ALL_AT_ONCE,
        dry_run=True,
        name="upgrade-status",
    )
    out = []
    for r in result.results:
        if isinstance(r.output, HostUpgradeMode):
            out.append(r.output)
        else:
            out.append(
                HostUpgradeMode(host=r.host, address=r.address, reachable=False, error=r.message)
            )
    return out
