"""Rolling new config files out to servers and restarting what reads them, undoably.

Used by push-server-secrets and update-newrelic-keys. Each server gets a :class:`HostChange`: the
files it needs (staged first as ``<path>.fabflows-next``, see :mod:`tasks.ssh.secrets`) and the
supervisor programs to restart once they are live. Three ways to make them live:

- ``rolling``: the other servers (workers, cache, databases) all at once, then the web servers one
  at a time: out of the load balancers (Standby for the group's instances, deregistration for
  others), wait until no load balancer sends it traffic, let requests drain, swap the files in and
  restart, check the server itself answers 200, put it back, wait until it is in service again. A
  probe on the site URL counts every non-200 answer users got.
- ``fast`` (the original's update_newrelic_keys order): the other servers first, then upgrade mode
  on (503 page, health-check override, group processes suspended), every web server at once, upgrade
  mode off. The probe measures the downtime.
- ``window``: upgrade mode around everything, with an optional step before the files go live
  (changing a password where it is checked: the database role, the broker user).

**Undo.** Until :meth:`Rollout.commit`, every server keeps its previous files as backups. When a
server fails (its restart, its own check, its return to service), the rollout stops, the failed
server and every server already done get their previous files back and are restarted again (web
servers one at a time out of the load balancers in rolling mode), the step before the files (if
any) is undone, and :class:`RolloutFailed` says which servers run what.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from config.models import NewRelicSettings
from fabflows.report import markdown_table
from fabflows.runbook import RunContext
from tasks.aws.autoscaling import describe_auto_scaling_group
from tasks.aws.instance_refresh import enter_standby, exit_standby
from tasks.aws.load_balancers import (
    Targets,
    deregister_instance,
    register_instance,
    resolve_target_groups,
    wait_for_load_balancers,
)
from tasks.http.probe import HttpProbe, ProbeSummary, check_site_up
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.fleet import FleetHost, FleetResult, HostResult, RateControl, run_fleet
from tasks.ssh.programs import restart_programs
from tasks.ssh.remote import Remote
from tasks.ssh.secrets import StagedFile, restore, stage_secret_files, swap_in

Mode = Literal["rolling", "fast", "window"]
HostStatus = Literal["applied", "restored", "not started", "failed", "unchanged"]


class HostChange(BaseModel):
    """What one server gets: files (contents never shown) and programs restarted after them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: FleetHost
    files: list[StagedFile] = Field(default_factory=list)
    restart: list[str] = Field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    @property
    def is_web(self) -> bool:
        return self.host.role == "web"


class HostOutcome(BaseModel):
    """Where one server ended up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    address: str
    role: str
    status: HostStatus
    files: list[str] = Field(default_factory=list)
    restarted: list[str] = Field(default_factory=list)
    message: str = ""


class RolloutReport(BaseModel):
    """What a rollout did, with what users saw."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode
    dry_run: bool
    outcomes: list[HostOutcome]
    duration_s: float
    probe: ProbeSummary | None = Field(
        default=None, description="What users got at the site URL meanwhile (None: no URL)."
    )
    window_seconds: float | None = Field(
        default=None, description="Time in upgrade mode (fast and window modes)."
    )
    rolled_back: bool = False
    problems: list[str] = Field(default_factory=list)

    def rows(self) -> list[dict[str, str]]:
        return [
            {
                "server": o.host,
                "address": o.address,
                "role": o.role,
                "status": o.status,
                "files": ", ".join(o.files) or "-",
                "restarted": ", ".join(o.restarted) or "-",
                "message": o.message,
            }
            for o in self.outcomes
        ]

    def describe(self) -> str:
        done = sum(1 for o in self.outcomes if o.status == "applied")
        text = (
            f"{self.mode}: {done}/{len(self.outcomes)} server(s) applied in {self.duration_s:.1f} s"
        )
        if self.probe:
            text += f"; users: {self.probe.describe()}"
        if self.rolled_back:
            text += "; ROLLED BACK"
        return text

    def render_markdown(self) -> str:
        out = [f"**{self.describe()}**", "", markdown_table(self.rows())]
        out += [f"- **problem:** {p}" for p in self.problems]
        return "\n".join(out)


class RolloutFailed(RuntimeError):
    """The rollout stopped; ``report`` says which server runs what."""

    def __init__(self, message: str, report: RolloutReport):
        self.report = report
        super().__init__(message)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run
        return logging.getLogger("fabflows.rollout")


def _apply_step(changes: dict[str, HostChange], timeout: float, undo: bool):  # noqa: ANN202
    def step(remote: Remote, host: FleetHost) -> HostResult:
        change = changes[host.address]
        if change.paths:
            (restore if undo else swap_in)(remote, change.paths)
        if change.restart:
            restarted = restart_programs(remote, change.restart, timeout)
            return HostResult(status="changed", message=restarted.message)
        return HostResult(status="changed", message="files " + ("restored" if undo else "live"))

    return step


class Rollout:
    """One rollout of per-server changes (see the module docstring)."""

    def __init__(
        self,
        ctx: RunContext,
        pool: ConnectionPool,
        changes: Sequence[HostChange],
        *,
        settings: NewRelicSettings,
        dry_run: bool,
        config_path: str | None = None,
        probe_url: str | None = None,
    ):
        self.ctx = ctx
        self.pool = pool
        self.changes = [c for c in changes if c.files or c.restart]
        self.by_address = {c.host.address: c for c in self.changes}
        self.settings = settings
        self.dry_run = dry_run
        self.config_path = config_path
        self.probe_url = probe_url if probe_url is not None else ctx.env.site_url
        self.outcomes: dict[str, HostOutcome] = {
            c.host.address: HostOutcome(
                host=c.host.label,
                address=c.host.address,
                role=c.host.role,
                status="not started",
                files=c.paths,
            )
            for c in self.changes
        }
        self.done: list[HostChange] = []
        self.logger = _logger()

    # ------------------------------------------------------------------ building blocks

    def stage(self) -> FleetResult:
        """Stage every file; on any failure drop what was staged and raise."""
        hosts = [c.host for c in self.changes if c.files]
        files = {c.host.address: c.files for c in self.changes}
        result = stage_secret_files(self.pool, hosts, files, dry_run=self.dry_run)
        if not result.ok:
            self._restore_files(hosts)
            result.raise_for_errors()
        return result

    def _restore_files(self, hosts: Sequence[FleetHost]) -> None:
        from tasks.ssh.secrets import restore_secret_files

        paths = {h.address: self.by_address[h.address].paths for h in hosts}
        restore_secret_files(self.pool, list(hosts), paths, dry_run=self.dry_run)

    def _fleet(self, hosts: Sequence[HostChange], *, undo: bool, name: str) -> FleetResult:
        timeout = self.settings.restart_timeout_seconds
        return run_fleet(
            [c.host for c in hosts],
            _apply_step(self.by_address, timeout, undo),
            pool=self.pool,
            rate=RateControl(max_concurrency="100%", max_errors=0),
            dry_run=self.dry_run,
            name=name,
            command_timeout=timeout,
        )

    def _record(self, result: FleetResult, status: HostStatus) -> list[str]:
        failed = []
        for r in result.results:
            change = self.by_address[r.address]
            if r.status == "failed" or r.status == "skipped":
                self.outcomes[r.address] = self.outcomes[r.address].model_copy(
                    update={"status": "failed", "message": r.message}
                )
                failed.append(f"{r.host} ({r.address}): {r.message}")
            else:
                self.outcomes[r.address] = self.outcomes[r.address].model_copy(
                    update={"status": status, "restarted": change.restart, "message": r.message}
                )
                if status == "applied":
                    self.done.append(change)
        return failed

    def apply_all(self, changes: Sequence[HostChange], name: str) -> None:
        """Swap in and restart ``changes`` all at once; raise RuntimeError naming failed servers."""
        if not changes:
            return
        failed = self._record(self._fleet(changes, undo=False, name=name), "applied")
        if failed:
            raise RuntimeError("; ".join(failed))

    # ------------------------------------------------------------------ web servers one by one

    def _targets(self) -> tuple[Targets, str | None, list[str]]:
        env = self.ctx.env
        group = (
            describe_auto_scaling_group(self.ctx.creds, env.auto_scaling_group)
            if env.auto_scaling_group
            else None
        )
        lbs = list(env.load_balancers)
        tgs = resolve_target_groups(self.ctx.creds, env.target_groups) if env.target_groups else []
        if group is not None:
            lbs = sorted(set(lbs) | set(group.load_balancer_names))
            tgs = sorted(set(tgs) | set(group.target_group_arns))
        members = group.instance_ids if group is not None else []
        return (
            Targets(load_balancer_names=lbs, target_group_arns=tgs),
            group.auto_scaling_group_name if group else None,
            members,
        )

    def _server_url(self, host: FleetHost) -> str:
        return self.ctx.config.fabflows.upgrade.web_server_url.format(address=host.address)

    def _one_web(
        self,
        change: HostChange,
        targets: Targets,
        group: str | None,
        members: list[str],
        undo: bool,
    ) -> None:
        """Out of service, apply (or undo), check, back in service. Raises on failure."""
        host = change.host
        iid = host.instance_id
        creds = self.ctx.creds
        in_group = bool(group and iid in members)
        timeout = self.settings.healthy_timeout_seconds
        registered: list[str] | None = None
        if iid and not targets.empty:
            if in_group:
                enter_standby(creds, group, iid, dry_run=self.dry_run)
            else:
                registered = deregister_instance(
                    creds, iid, targets, dry_run=self.dry_run
                ).registered_in
            if not self.dry_run:
                try:
                    wait_for_load_balancers(creds, [iid], targets, "out", timeout=timeout, poll=0.5)
                except Exception as exc:
                    if not undo:
                        raise
                    # putting the previous files back matters more than a clean drain
                    self.logger.error("%s: %s; restoring it anyway", host.name, exc)
                time.sleep(self.settings.drain_seconds)
        back_in = False
        try:
            result = self._fleet([change], undo=undo, name="restore" if undo else "apply")
            failed = self._record(result, "restored" if undo else "applied")
            if failed:
                raise RuntimeError("; ".join(failed))
            if not self.dry_run:
                check_site_up(
                    [self._server_url(host)],
                    self.ctx.config.fabflows.upgrade.healthcheck_path,
                    timeout=timeout,
                )
            back_in = True
        finally:
            if iid and not targets.empty and (back_in or undo):
                if in_group:
                    exit_standby(creds, group, iid, dry_run=self.dry_run)
                else:
                    register_instance(creds, iid, targets, only=registered, dry_run=self.dry_run)
                if not self.dry_run:
                    wait_for_load_balancers(creds, [iid], targets, "in", timeout=timeout, poll=0.5)
            elif iid and not targets.empty:
                self.logger.error(
                    "%s (%s) stays out of the load balancers (%s): it failed; its previous files "
                    "are put back next",
                    host.name,
                    host.address,
                    "Standby" if in_group else "deregistered",
                )

    def roll_web(self, changes: Sequence[HostChange], *, undo: bool = False) -> None:
        targets, group, members = self._targets()
        for change in changes:
            self.logger.info(
                "%s %s (%s)",
                "restoring" if undo else "rolling",
                change.host.label,
                change.host.address,
            )
            self._one_web(change, targets, group, members, undo)

    # ------------------------------------------------------------------ modes

    def run(
        self,
        mode: Mode,
        *,
        before_swap: Callable[[], None] | None = None,
        undo_before_swap: Callable[[], None] | None = None,
    ) -> RolloutReport:
        """Make the staged changes live (see the module docstring). Raises RolloutFailed."""
        started = time.monotonic()
        web = [c for c in self.changes if c.is_web]
        others = [c for c in self.changes if not c.is_web]
        probe = HttpProbe(self.probe_url).start() if self.probe_url and not self.dry_run else None
        window_seconds: float | None = None
        error: BaseException | None = None
        problems: list[str] = []
        try:
            if mode == "rolling":
                try:
                    self.apply_all(others, "apply-other-servers")
                    self.roll_web(web)
                except Exception as exc:
                    error = exc
                    problems += self._undo(mode)
            else:
                from fabflows.upgrade_mode import upgrade_window

                if mode == "fast":
                    try:
                        self.apply_all(others, "apply-other-servers")
                    except Exception as exc:
                        error = exc
                        problems += self._undo(mode)
                if error is None and not self.dry_run:
                    with upgrade_window(
                        self.ctx, pool=self.pool, config_path=self.config_path, probe_url=False
                    ) as window:
                        try:
                            if before_swap is not None:
                                before_swap()
                            if mode == "window":  # users see the page anyway: all at once
                                self.apply_all(others + web, "apply-all-servers")
                            else:
                                self.apply_all(web, "apply-web-servers")
                        except Exception as exc:
                            error = exc
                            problems += self._undo("window")
                            if undo_before_swap is not None:
                                try:
                                    undo_before_swap()
                                except Exception as undo_exc:  # noqa: BLE001 - reported
                                    problems.append(
                                        f"undoing the step before the files: {undo_exc}"
                                    )
                    if window.report is not None:
                        window_seconds = window.report.seconds_in_upgrade_mode
                        problems += window.report.problems
                elif error is None:
                    if before_swap is not None:
                        before_swap()
                    self.apply_all(self.changes, "apply")
        finally:
            summary = probe.stop() if probe else None
        report = RolloutReport(
            mode=mode,
            dry_run=self.dry_run,
            outcomes=list(self.outcomes.values()),
            duration_s=round(time.monotonic() - started, 3),
            probe=summary,
            window_seconds=window_seconds,
            rolled_back=error is not None,
            problems=problems,
        )
        if error is not None:
            raise RolloutFailed(f"{type(error).__name__}: {error}", report) from error
        return report

    def _undo(self, mode: Mode) -> list[str]:
        """Put the previous files back on every server that got (or may have got) the new ones."""
        problems: list[str] = []
        touched = [
            self.by_address[a]
            for a, o in self.outcomes.items()
            if o.status in ("applied", "failed")
        ]
        self.logger.warning(
            "rolling back %d server(s): %s",
            len(touched),
            ", ".join(c.host.label for c in touched) or "none",
        )
        web = [c for c in touched if c.is_web]
        others = [c for c in touched if not c.is_web]
        if others:
            problems += self._record(self._fleet(others, undo=True, name="restore"), "restored")
        if web:
            if mode == "rolling":
                for change in web:
                    try:
                        self.roll_web([change], undo=True)
                    except Exception as exc:  # noqa: BLE001 - keep restoring the others
                        problems.append(f"{change.host.name} ({change.host.address}): {exc}")
            else:
                problems += self._record(self._fleet(web, undo=True, name="restore"), "restored")
        # servers staged but never started: drop the staged files
        untouched = [c.host for a, c in self.by_address.items() if c not in touched and c.files]
        if untouched:
            self._restore_files(untouched)
        return problems

    def commit(self) -> FleetResult:
        """Drop the backups (no undo after this)."""
        from tasks.ssh.secrets import commit_secret_files

        hosts = [c.host for c in self.changes if c.files]
        return commit_secret_files(
            self.pool, hosts, {c.host.address: c.paths for c in self.changes}, dry_run=self.dry_run
        )
