"""Upgrade mode for every runbook with a maintenance window: one implementation, used by all.

    from fabflows.procedures.upgrade_window import upgrade_window

    with environment_lock(ctx.env, ctx.config):
        with upgrade_window(ctx, config_path=config) as window:
            ...                         # users get the 503 page; the web group adds/replaces nothing
        report.window = window.report   # time in upgrade mode, servers, processes, measured downtime

**On** (entering the block): suspend the web autoscaling group's processes (``fabflows.upgrade.
suspend_processes``: Launch and everything that would add, replace or remove instances), recording
on the group *first* which ones fabflows suspended (those already suspended stay out of the
record); list the web servers again (so one launched just before the suspension is not missed);
put the health-check override and the 503 page on every running web server, with a marker naming
this run; then check from outside that users get 503 (the page) and the health check 200.

**Off** (leaving the block, whatever happened inside, ``finally``): the reverse. Pages off on every
web server (listed again), resume exactly the recorded processes and drop the record, then check
that every web server (and the site URL) answers 200. Every step is attempted even if an earlier
one failed; what could not be undone is raised, naming the hosts.

**Durable.** The record on the group and the marker on each web server survive the process. A run
killed outright (SIGKILL, a lost worker) leaves them, and is undone by:

- ``end-upgrade``, safe to run at any time (it refuses only while the holder run is alive);
- the next window or ``begin-upgrade`` on the environment, which finds a holder that is no longer
  alive and takes its record over (merging the processes to resume), so its own exit ends it.

A holder is dead when it ran on this machine and its process is gone, or when Prefect says its run
is over (failed, crashed, cancelled, completed). A run killed on another machine stays RUNNING in
Prefect until the zombie automation marks it crashed; until then end-upgrade needs ``force``.

**Joining.** ``begin-upgrade`` puts an environment in upgrade mode until ``end-upgrade`` (the
original's begin_upgrade / upgrade_packages / end_upgrade sequence). A window opened while
begin-upgrade holds upgrade mode *joins* it: it makes sure every web server has the page and every
process is suspended, and leaves upgrade mode on at its exit for end-upgrade to end.

Run windows while holding the environment's lock (``fabflows.lock.environment_lock``) so that no
two runs change one environment at once. Runbooks on the engine use the same on/off as journaled
steps (:mod:`fabflows.procedures.upgrade_steps`) instead of this context manager.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from config import FabulawsConfig
from config.models import UpgradeSettings
from fabflows.errors import BadInput, Refused
from fabflows.report import artifact_key, markdown_table, publish_markdown, text_table
from fabflows.runbook import RunContext
from tasks.aws.autoscaling import (
    ProcessesResult,
    RecordedUpgradeMode,
    UpgradeModeRecord,
    get_upgrade_mode_record,
    resume_processes,
    suspend_processes,
)
from tasks.aws.ec2 import Server, describe_servers
from tasks.http.probe import (
    HttpCheck,
    HttpCheckFailed,
    HttpProbe,
    ProbeSummary,
    check_site_up,
    check_upgrade_mode,
)
from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import FleetHost, FleetResult, hosts_from_servers, server_label
from tasks.ssh.upgrade_mode import (
    HostUpgradeMode,
    UpgradePages,
    disable_upgrade_pages,
    enable_upgrade_pages,
    get_upgrade_pages,
)

BEGIN_UPGRADE = "begin-upgrade"
"""The flow whose upgrade mode lasts until end-upgrade (windows join it instead of ending it)."""

DEFAULT_PAGE = b"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Down for maintenance</title>
<style>body{font-family:system-ui,sans-serif;max-width:36em;margin:15vh auto;padding:0 1em;color:#222}</style>
</head>
<body>
<h1>We'll be right back</h1>
<p>The site is down for scheduled maintenance. Please try again in a few minutes.</p>
</body>
</html>
"""

DEFAULT_HEALTHCHECK = b"OK\n"

WindowMode = Literal["fresh", "recovered", "joined"]


class UpgradeModeBusy(Refused):
    """Another live run holds upgrade mode on this environment. Nothing was changed."""


class UpgradeModeNotEnded(RuntimeError):
    """Leaving upgrade mode failed somewhere; the message names what is still in upgrade mode."""


class UpgradeModeNotStarted(RuntimeError):
    """Entering upgrade mode failed; whatever was turned on has been turned off again."""


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # outside a run
        return logging.getLogger("fabflows.procedures.upgrade_window")


# --------------------------------------------------------------------------- who holds it


def _start_time(pid: int) -> str:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = data.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def process_tag() -> str:
    """``host:pid:start``: identifies this process (the pid's start time guards against reuse)."""
    pid = os.getpid()
    return f"{socket.gethostname()[:63]}:{pid}:{_start_time(pid)}"


def current_run() -> tuple[str, str]:
    """(flow run id, flow name) of the current run; ``local-<id>`` outside Prefect."""
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
    except Exception:
        ctx = None
    if ctx is not None and ctx.flow_run is not None:
        return str(ctx.flow_run.id), ctx.flow.name if ctx.flow else "flow"
    return f"local-{uuid.uuid4().hex[:12]}", "local"


def _process_alive(tag: str) -> bool | None:
    """True/False if ``tag`` is a process on this machine; None if it ran elsewhere."""
    host, _, rest = tag.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname()[:63] or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    if state in ("Z", "X"):
        return False
    return not start or _start_time(pid) == start


def _prefect_run_over(run: str) -> bool | None:
    """True if Prefect says the run is over, False if it is not, None if Prefect cannot say."""
    try:
        run_id = uuid.UUID(run)
    except ValueError:
        return None
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(run_id)
    except Exception:
        return None
    return bool(flow_run.state and flow_run.state.is_final())


def holder_alive(record: UpgradeModeRecord) -> bool | None:
    """Is the run that holds upgrade mode still running? None: cannot tell."""
    local = _process_alive(record.by) if record.by else None
    if local is not None:
        return local
    over = _prefect_run_over(record.run)
    if over is None:
        return None
    return not over


def judge_holder(holder: UpgradeModeRecord, alive: bool | None) -> tuple[bool, str]:
    """Pure: (worth a warning, what to say) about the run that holds upgrade mode.

    begin-upgrade holds upgrade mode on purpose after its run has ended, until end-upgrade: that is
    the expected state, not a warning. Any other holder (a window inside a flow) should have turned
    upgrade mode off when it ended: if it is no longer running, it left upgrade mode behind.
    """
    since = f"{holder.since:%Y-%m-%d %H:%M:%S}Z"
    if holder.flow == BEGIN_UPGRADE:
        return False, (
            f"held by {BEGIN_UPGRADE} run {holder.run} since {since} until end-upgrade"
            + (" (its run is still going)" if alive else "")
        )
    if alive:
        return False, f"held by {holder.flow} run {holder.run}, which is running"
    if alive is None:
        return True, (
            f"held by {holder.flow} run {holder.run} since {since}; cannot tell whether that run "
            "is still going (end-upgrade refuses while it is, unless forced)"
        )
    return True, (
        f"{holder.flow} run {holder.run} is NOT running but left upgrade mode on (since {since}): "
        "run end-upgrade"
    )


@dataclass(frozen=True)
class WindowDecision:
    """How a window (or begin-upgrade) enters upgrade mode."""

    mode: WindowMode
    record: UpgradeModeRecord
    reason: str


def decide_window(
    holder: UpgradeModeRecord | None,
    run: str,
    flow: str,
    by: str,
    alive: bool | None,
    now: datetime,
) -> WindowDecision:
    """Pure: enter fresh, take over a dead holder's upgrade mode, join begin-upgrade's, or refuse.

    Raises:
        UpgradeModeBusy: a live (or unknown) run holds upgrade mode with a window of its own.
    """
    ours = UpgradeModeRecord(run=run, flow=flow, since=now, by=by)
    if holder is None:
        return WindowDecision("fresh", ours, "not in upgrade mode")
    if holder.run == run:
        return WindowDecision(
            "recovered",
            holder.model_copy(update={"by": by}),
            "this run already holds upgrade mode (retried)",
        )
    since = holder.since
    if holder.flow in (BEGIN_UPGRADE, "unknown"):
        if flow == BEGIN_UPGRADE:
            # begin-upgrade again: keep the first holder and its time
            return WindowDecision("joined", holder, f"already begun by run {holder.run}")
        return WindowDecision(
            "joined",
            holder,
            f"upgrade mode was begun by {holder.flow} run {holder.run} at {since:%Y-%m-%d %H:%M:%S}Z "
            "and stays on after this run (end it with end-upgrade)",
        )
    if alive is False:
        return WindowDecision(
            "recovered",
            ours.model_copy(update={"since": since}),
            f"{holder.flow} run {holder.run} left upgrade mode on and is no longer running: "
            "taking it over (this run ends it)",
        )
    state = "is still running" if alive else "may still be running (cannot tell)"
    raise UpgradeModeBusy(
        f"upgrade mode is held by {holder.flow} run {holder.run} (since "
        f"{since:%Y-%m-%d %H:%M:%S}Z, process {holder.by or 'unknown'}), which {state}. Wait for "
        "it; if it is dead, run end-upgrade (with force if it ran on another machine)."
    )


# --------------------------------------------------------------------------- pages from config


def _read_page(path_text: str, key: str, config_path: str | None) -> tuple[bytes, str]:
    path = Path(path_text).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    if not path.is_absolute() and config_path:
        candidates.append(Path(config_path).expanduser().resolve().parent / path)
    for candidate in candidates:
        if candidate.is_file():
            data = candidate.read_bytes()
            if not data.strip():
                raise BadInput(f"static_html.{key}: {candidate} is empty")
            return data, str(candidate)
    raise BadInput(
        f"static_html.{key}: {path_text} not found (looked in "
        + ", ".join(str(c.parent) for c in candidates)
        + "); fix the path or remove the key to use the default page"
    )


def load_upgrade_pages(config: FabulawsConfig, config_path: str | None = None) -> UpgradePages:
    """The 503 page and health-check override from ``static_html`` (paths relative to the current
    directory, as FabulAWS read them, or to the config file), else fabflows' defaults.

    Raises:
        BadInput: a configured file is missing or empty.
    """
    html = config.static_html
    if html.upgrade_message:
        page, page_source = _read_page(html.upgrade_message, "upgrade_message", config_path)
    else:
        page, page_source = DEFAULT_PAGE, "fabflows default page"
    if html.healthcheck_override:
        health, health_source = _read_page(
            html.healthcheck_override, "healthcheck_override", config_path
        )
    else:
        health, health_source = DEFAULT_HEALTHCHECK, "fabflows default (OK)"
    return UpgradePages(
        page=page, healthcheck=health, page_source=page_source, healthcheck_source=health_source
    )


# --------------------------------------------------------------------------- status


class UpgradeStatus(BaseModel):
    """Whether an environment is in upgrade mode, from the hosts and from the recorded group state."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    checked_at: datetime
    auto_scaling_group: str | None
    suspended_processes: list[str] = Field(description="Suspended on the group now.")
    recorded: RecordedUpgradeMode | None = Field(
        description="fabflows' record on the group: the holder and what it suspended."
    )
    hosts: list[HostUpgradeMode]
    not_running: list[str] = Field(
        default_factory=list, description="Web servers not running (pending, stopping...)."
    )
    notes: list[str] = Field(default_factory=list, description="What could not be read.")
    holder_state: str | None = Field(
        default=None, description="Whether the run holding upgrade mode is expected to hold it."
    )

    @property
    def holder(self) -> UpgradeModeRecord | None:
        if self.recorded:
            return self.recorded.record
        return next((h.record for h in self.hosts if h.record), None)

    @property
    def hosts_in_upgrade_mode(self) -> list[HostUpgradeMode]:
        return [h for h in self.hosts if h.in_upgrade_mode]

    @property
    def in_upgrade_mode(self) -> bool:
        return bool(
            self.recorded or self.hosts_in_upgrade_mode or any(h.record for h in self.hosts)
        )

    @property
    def unreachable(self) -> list[HostUpgradeMode]:
        return [h for h in self.hosts if not h.reachable]

    def describe(self) -> str:
        holder = self.holder
        if not self.in_upgrade_mode:
            text = (
                f"{self.environment}: not in upgrade mode ({len(self.hosts)} web server(s) serving)"
            )
        else:
            n = len(self.hosts_in_upgrade_mode)
            text = f"{self.environment}: IN UPGRADE MODE on {n} of {len(self.hosts)} web server(s)"
            if holder:
                text += (
                    f", since {holder.since:%Y-%m-%d %H:%M:%S}Z by {holder.flow} run {holder.run}"
                )
        if self.recorded:
            text += f"; fabflows suspended {', '.join(self.recorded.suspended) or 'nothing'}"
        others = [
            p
            for p in self.suspended_processes
            if not self.recorded or p not in self.recorded.suspended
        ]
        if others:
            text += f"; suspended by others: {', '.join(others)}"
        if self.unreachable:
            text += f"; unreachable: {', '.join(h.host for h in self.unreachable)}"
        for note in self.notes:
            text += f"; {note}"
        if self.holder_state:
            text += f"; {self.holder_state}"
        return text

    def rows(self) -> list[dict[str, object]]:
        return [
            {
                "host": h.host,
                "address": h.address,
                "upgrade_mode": "unreachable"
                if not h.reachable
                else ("ON" if h.page else ("marker only" if h.record else "off")),
                "healthcheck_override": h.healthcheck_override,
                "since": h.record.since.strftime("%Y-%m-%d %H:%M:%SZ")
                if h.record
                else (h.page_since.strftime("%Y-%m-%d %H:%M:%SZ") if h.page_since else ""),
                "holder": f"{h.record.flow} {h.record.run}" if h.record else "",
                "note": h.error,
            }
            for h in self.hosts
        ]

    def render_text(self) -> str:
        return self.describe() + "\n\n" + text_table(self.rows())

    def render_markdown(self) -> str:
        return f"**{self.describe()}**\n\n" + markdown_table(self.rows())


def ssh_options(ctx: RunContext) -> SshOptions:
    return SshOptions.from_settings(ctx.config.fabflows.ssh, ctx.env.deploy_user)


def web_servers(ctx: RunContext) -> list[Server]:
    return describe_servers(ctx.creds, ctx.env.deployment, ctx.env.environment, roles=["web"])


def _web_hosts(ctx: RunContext, servers: Sequence[Server]) -> list[FleetHost]:
    running = [s for s in servers if s.role == "web" and s.state == "running"]
    return hosts_from_servers(running, ctx.env.address_attribute)


def server_url(settings: UpgradeSettings, host: FleetHost) -> str:
    return settings.web_server_url.format(address=host.address)


def gather_upgrade_status(
    ctx: RunContext, pool: ConnectionPool, servers: Sequence[Server] | None = None
) -> UpgradeStatus:
    """Read-only: the group's record and suspended processes, and each web server's files."""
    env = ctx.env
    group_name = env.auto_scaling_group
    suspended: list[str] = []
    recorded = None
    notes: list[str] = []
    if group_name:
        try:
            group, recorded = get_upgrade_mode_record(ctx.creds, group_name)
            suspended = group.suspended_processes
        except ValueError as exc:  # the group is gone: the web servers can still be switched
            notes.append(str(exc))
    servers = list(servers) if servers is not None else web_servers(ctx)
    hosts = _web_hosts(ctx, servers)
    states = get_upgrade_pages(hosts, pool, env.nginx_root) if hosts else []
    return UpgradeStatus(
        environment=env.label,
        checked_at=datetime.now(UTC),
        auto_scaling_group=group_name,
        suspended_processes=suspended,
        recorded=recorded,
        hosts=states,
        not_running=[
            f"{server_label(s.name, s.instance_id)} ({s.state})"
            for s in servers
            if s.role == "web" and s.state not in ("running", "stopped", "terminated")
        ],
        notes=notes,
    )


# --------------------------------------------------------------------------- on and off


class UpgradeModeOn(BaseModel):
    """What turning upgrade mode on did (or would do)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dry_run: bool
    record: UpgradeModeRecord
    processes: ProcessesResult | None
    pages: FleetResult
    checks: list[HttpCheck] = Field(default_factory=list)
    web_servers: list[str]


class UpgradeModeOff(BaseModel):
    """What turning upgrade mode off did (or would do), and what could not be undone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dry_run: bool
    pages: FleetResult | None
    processes: ProcessesResult | None
    checks: list[HttpCheck] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)
    web_servers: list[str] = Field(default_factory=list)


def turn_on(
    ctx: RunContext,
    pool: ConnectionPool,
    pages: UpgradePages,
    record: UpgradeModeRecord,
    *,
    dry_run: bool,
    verify: bool = True,
) -> UpgradeModeOn:
    """Suspend (recorded first), list the web servers again, pages on everywhere, check over HTTP.

    Does not undo on failure (the caller's ``finally`` does: see :func:`upgrade_window`).

    Raises:
        UpgradeModeNotStarted: a web server is still launching or could not be switched, or the
            HTTP check failed.
    """
    env = ctx.env
    settings = ctx.config.fabflows.upgrade
    logger = _logger()
    processes = None
    if env.auto_scaling_group:
        processes = suspend_processes(
            ctx.creds,
            env.auto_scaling_group,
            list(settings.suspend_processes),
            record,
            dry_run=dry_run,
        )
    servers = web_servers(ctx)
    launching = [
        f"{server_label(s.name, s.instance_id)} ({s.state})"
        for s in servers
        if s.state in ("pending",)
    ]
    hosts = _web_hosts(ctx, servers)
    result = enable_upgrade_pages(hosts, pool, env.nginx_root, pages, record, dry_run=dry_run)
    logger.info("%s", result.summary())
    problems = [f"{r.host} ({r.address}): {r.message}" for r in result.failed]
    if launching:
        problems.append(
            "web server(s) still launching, they would serve live traffic: " + ", ".join(launching)
        )
    if problems:
        raise UpgradeModeNotStarted(
            f"{env.label}: upgrade mode could not be turned on: " + "; ".join(problems)
        )
    checks: list[HttpCheck] = []
    if verify and not dry_run and hosts:
        try:
            checks = check_upgrade_mode(
                [server_url(settings, h) for h in hosts],
                settings.healthcheck_path,
                pages.page,
                site_url=env.site_url,
                timeout=settings.check_timeout_seconds,
            )
        except HttpCheckFailed as exc:
            raise UpgradeModeNotStarted(f"{env.label}: {exc}") from None
    return UpgradeModeOn(
        dry_run=dry_run,
        record=record,
        processes=processes,
        pages=result,
        checks=checks,
        web_servers=[h.name for h in hosts],
    )


def check_web_up(ctx: RunContext, hosts: list[FleetHost] | None = None) -> list[HttpCheck]:
    """Every web server (those running now, unless ``hosts``) and the site answer 200 for users
    and the health check, waited for up to ``upgrade.check_timeout_seconds``.

    Raises:
        HttpCheckFailed: something did not answer 200 in time.
    """
    settings = ctx.config.fabflows.upgrade
    if hosts is None:
        hosts = _web_hosts(ctx, web_servers(ctx))
    return check_site_up(
        [server_url(settings, h) for h in hosts],
        settings.healthcheck_path,
        site_url=ctx.env.site_url,
        timeout=settings.check_timeout_seconds,
    )


def turn_off(
    ctx: RunContext, pool: ConnectionPool, *, dry_run: bool, verify: bool = True
) -> UpgradeModeOff:
    """Pages off on every web server (listed now), resume exactly the recorded processes, check 200.

    Every step runs even if an earlier one failed; ``problems`` says what is left. Never raises
    for a host or a check (the caller decides); AWS errors while resuming are reported as problems.
    """
    env = ctx.env
    logger = _logger()
    problems: list[str] = []
    pages = None
    hosts: list[FleetHost] = []
    try:
        hosts = _web_hosts(ctx, web_servers(ctx))
        pages = disable_upgrade_pages(hosts, pool, env.nginx_root, dry_run=dry_run)
        logger.info("%s", pages.summary())
        problems += [
            f"{r.host} ({r.address}) may still be in upgrade mode: {r.message}"
            for r in pages.failed
        ]
    except Exception as exc:  # keep going: the group must be resumed whatever happened here
        problems.append(f"upgrade pages: {type(exc).__name__}: {exc}")
    processes = None
    if env.auto_scaling_group:
        try:
            processes = resume_processes(ctx.creds, env.auto_scaling_group, dry_run=dry_run)
        except Exception as exc:
            problems.append(
                f"autoscaling group {env.auto_scaling_group}: processes not resumed: "
                f"{type(exc).__name__}: {exc}"
            )
    checks: list[HttpCheck] = []
    if verify and not dry_run and hosts:
        ok = {r.address for r in pages.results if r.status != "failed"} if pages else set()
        try:
            checks = check_web_up(ctx, [h for h in hosts if h.address in ok])
        except HttpCheckFailed as exc:
            checks = exc.checks
            problems.append(str(exc))
    for p in problems:
        logger.error("%s", p)
    return UpgradeModeOff(
        dry_run=dry_run,
        pages=pages,
        processes=processes,
        checks=checks,
        problems=problems,
        web_servers=[h.name for h in hosts],
    )


# --------------------------------------------------------------------------- the window


class UpgradeWindowReport(BaseModel):
    """One upgrade window, for run reports and benchmarks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    mode: WindowMode = Field(description="fresh, recovered (took over a dead run's), or joined.")
    holder: UpgradeModeRecord
    note: str = ""
    web_servers: list[str]
    processes_suspended: list[str] = Field(
        description="What fabflows had suspended (and resumed at the end, unless joined)."
    )
    entered_at: datetime | None = None
    left_at: datetime | None = None
    seconds_in_upgrade_mode: float | None = Field(
        default=None,
        description="From the start of entering (suspension) to the end of leaving (pages off, "
        "processes resumed, site checked).",
    )
    seconds_to_enter: float | None = None
    seconds_to_leave: float | None = None
    left_on: bool = Field(
        default=False, description="Upgrade mode is still on at the end (joined, or not undone)."
    )
    problems: list[str] = Field(default_factory=list)
    downtime: ProbeSummary | None = Field(
        default=None, description="What users got at the probed URL during the window."
    )

    def describe(self) -> str:
        if self.seconds_in_upgrade_mode is None:
            text = f"{self.environment}: upgrade mode not entered"
        else:
            text = (
                f"{self.environment}: {self.seconds_in_upgrade_mode:.1f} s in upgrade mode on "
                f"{len(self.web_servers)} web server(s)"
            )
        if self.mode != "fresh":
            text += f" ({self.mode}: {self.note})"
        if self.left_on:
            text += "; STILL IN UPGRADE MODE"
        if self.downtime:
            text += f"; probe: {self.downtime.describe()}"
        return text

    def render_markdown(self) -> str:
        out = [f"**{self.describe()}**", ""]
        out.append(
            f"- holder: {self.holder.flow} run `{self.holder.run}` since {self.holder.since:%Y-%m-%d %H:%M:%S}Z"
        )
        out.append(f"- web servers: {', '.join(self.web_servers) or 'none'}")
        out.append(
            f"- processes suspended by fabflows: {', '.join(self.processes_suspended) or 'none'}"
        )
        if self.seconds_to_enter is not None:
            out.append(f"- entering took {self.seconds_to_enter:.1f} s")
        if self.seconds_to_leave is not None:
            out.append(f"- leaving took {self.seconds_to_leave:.1f} s")
        out += [f"- **problem:** {p}" for p in self.problems]
        return "\n".join(out)


@dataclass
class UpgradeWindow:
    """What ``upgrade_window`` yields; ``report`` is set when the block is left."""

    decision: WindowDecision
    on: UpgradeModeOn | None = None
    off: UpgradeModeOff | None = None
    report: UpgradeWindowReport | None = None
    probe: HttpProbe | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def joined(self) -> bool:
        return self.decision.mode == "joined"

    @property
    def web_servers(self) -> list[str]:
        return self.on.web_servers if self.on else []


def enter_decision(
    ctx: RunContext, pool: ConnectionPool, flow: str | None = None
) -> tuple[WindowDecision, UpgradeStatus]:
    """Read the current state and decide how to enter (raises UpgradeModeBusy)."""
    status = gather_upgrade_status(ctx, pool)
    run, run_flow = current_run()
    holder = status.holder
    alive = holder_alive(holder) if holder and holder.run != run else None
    decision = decide_window(holder, run, flow or run_flow, process_tag(), alive, datetime.now(UTC))
    return decision, status


@contextmanager
def upgrade_window(
    ctx: RunContext,
    *,
    pool: ConnectionPool | None = None,
    pages: UpgradePages | None = None,
    config_path: str | None = None,
    probe_url: str | None | Literal[False] = None,
) -> Iterator[UpgradeWindow]:
    """Upgrade mode for the duration of the block (see the module docstring).

    Args:
        ctx: The run's context (config, environment, AWS credentials).
        pool: SSH connections to reuse (default: a pool of its own, closed at the end).
        pages: The pages (default: from ``static_html`` in config, else fabflows' defaults).
        config_path: The config file, to find ``static_html`` paths relative to it.
        probe_url: URL polled every 100 ms during the window for measured downtime; default the
            site URL or else the first web server; False: no probe.

    Raises:
        UpgradeModeBusy: a live run holds upgrade mode (nothing was changed).
        UpgradeModeNotStarted: entering failed (and was undone).
        UpgradeModeNotEnded: leaving failed; the message names what is still in upgrade mode.
    """
    env = ctx.env
    logger = _logger()
    pages = pages or load_upgrade_pages(ctx.config, config_path)
    own_pool = pool is None
    pool = pool or ConnectionPool(ssh_options(ctx))
    try:
        decision, status = enter_decision(ctx, pool)
        window = UpgradeWindow(decision=decision)
        if decision.mode != "fresh":
            logger.warning("%s: %s", env.label, decision.reason)
        url = probe_url
        if url is None:
            url = env.site_url or (
                server_url(ctx.config.fabflows.upgrade, _web_hosts_of_status(status)[0])
                if _web_hosts_of_status(status)
                else None
            )
        if url:
            window.probe = HttpProbe(url).start()
        started = time.monotonic()
        entered_at = datetime.now(UTC)
        entered = None
        body_error: BaseException | None = None
        try:
            window.on = turn_on(ctx, pool, pages, decision.record, dry_run=False)
            entered = time.monotonic()
            logger.info("%s: in upgrade mode (%.1f s to enter)", env.label, entered - started)
            yield window
        except BaseException as exc:
            body_error = exc
            raise
        finally:
            leaving = time.monotonic()
            left_on = False
            if decision.mode == "joined":
                # the holder (begin-upgrade) ends it, with end-upgrade
                left_on = True
                logger.warning("%s: left in upgrade mode (%s)", env.label, decision.reason)
            else:
                window.off = turn_off(ctx, pool, dry_run=False)
                window.problems += window.off.problems
                left_on = bool(window.off.problems)
            left = time.monotonic()
            downtime = window.probe.stop() if window.probe else None
            window.report = UpgradeWindowReport(
                environment=env.label,
                mode=decision.mode,
                holder=decision.record,
                note=decision.reason if decision.mode != "fresh" else "",
                web_servers=window.on.web_servers if window.on else [],
                processes_suspended=list(window.on.processes.recorded.suspended)
                if window.on and window.on.processes and window.on.processes.recorded
                else [],
                entered_at=entered_at,
                left_at=datetime.now(UTC),
                seconds_in_upgrade_mode=round(left - started, 3),
                seconds_to_enter=round(entered - started, 3) if entered else None,
                seconds_to_leave=round(left - leaving, 3) if not left_on else None,
                left_on=left_on,
                problems=window.problems,
                downtime=downtime,
            )
            publish_markdown(
                artifact_key("upgrade-window", env.deployment, env.environment),
                window.report.render_markdown(),
                f"Upgrade window on {env.label}",
            )
            logger.info("%s", window.report.describe())
            if window.problems:
                message = f"{env.label}: upgrade mode not fully ended: " + "; ".join(
                    window.problems
                )
                if body_error is not None:
                    message += (
                        f" (the run had already failed: {type(body_error).__name__}: {body_error})"
                    )
                raise UpgradeModeNotEnded(message)
            if (
                entered is None
                and body_error is not None
                and not isinstance(body_error, UpgradeModeBusy)
            ):
                logger.error("%s: entering upgrade mode failed and was undone", env.label)
    finally:
        if own_pool:
            pool.close()


def _web_hosts_of_status(status: UpgradeStatus) -> list[FleetHost]:
    return [
        FleetHost(name=h.host, address=h.address, role="web") for h in status.hosts if h.reachable
    ]
