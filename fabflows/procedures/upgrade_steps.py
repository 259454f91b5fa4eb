"""Upgrade mode as runbook-engine steps: on (with its undo) and off, shared by the runbooks that
take the site down with the 503 page (begin-upgrade, upgrade-packages).

``mode_on`` decides how to enter (fresh, taking a dead holder's record over, or joining
begin-upgrade's upgrade mode), journals that decision *before* writing (``scope.record``), then
suspends the web group's processes (recorded on the group first) and puts the page on every web
server, checked from outside. Its undo (``mode_undo``) turns upgrade mode off only when the run that
journaled it still holds it (it is safe twice, after a partial apply, and from ``recover``): a
joined upgrade mode belongs to begin-upgrade and is left on for end-upgrade. ``mode_off`` is the
planned end of the window.
"""

from __future__ import annotations

import time
from typing import Any

from fabflows.procedures.upgrade_window import (
    UpgradeStatus,
    enter_decision,
    gather_upgrade_status,
    load_upgrade_pages,
    server_url,
    turn_off,
    turn_on,
)
from fabflows.runtime.engine import Scope
from tasks.http.probe import HttpProbe
from tasks.ssh.fleet import FleetHost

ON_STEP = "upgrade-mode-on"
OFF_STEP = "upgrade-mode-off"


def step_data(scope: Scope, step: str) -> dict[str, Any]:
    """What ``step`` returned in this run, or (resumed, recovered) what the journal recorded."""
    value = scope.results.get(step)
    if isinstance(value, dict):
        return value
    if scope.journal is not None:
        entry = scope.journal.entry(scope.run_id)
        rec = entry.step(step) if entry else None
        if rec is not None:
            return dict(rec.data)
    return {}


def start_probe(scope: Scope, status: UpgradeStatus) -> None:
    """Poll what users get (the site URL, else the first web server) every 100 ms until the
    window ends (``mode_off``) or the run does: the measured downtime in the run's details."""
    hosts = [h for h in status.hosts if h.reachable]
    url = scope.env.site_url or (
        server_url(
            scope.rc.config.fabflows.upgrade,
            FleetHost(name=hosts[0].host, address=hosts[0].address, role="web"),
        )
        if hosts
        else None
    )
    if not url or getattr(scope, "upgrade_probe", None) is not None:
        return
    probe = HttpProbe(url).start()
    scope.upgrade_probe = probe  # type: ignore[attr-defined]
    scope.on_close(lambda: stop_probe(scope))


def stop_probe(scope: Scope) -> None:
    probe = getattr(scope, "upgrade_probe", None)
    if probe is None:
        return
    scope.upgrade_probe = None  # type: ignore[attr-defined]
    summary = probe.stop()
    scope.details["Probe"] = summary.describe()
    scope.details["Probe downtime s"] = summary.total_downtime_s


def mode_on(
    scope: Scope, flow: str, config_file: str | None, *, probe: bool = False
) -> dict[str, Any]:
    """Enter upgrade mode (see the module docstring); returns the decision and what was done.
    ``probe``: measure what users get until ``mode_off`` (a window inside one run)."""
    pages = load_upgrade_pages(scope.rc.config, config_file)
    decision, status = enter_decision(scope.rc, scope.pool, flow=flow)
    scope.record(mode=decision.mode, run=decision.record.run)
    if decision.mode != "fresh":
        scope.log("%s: %s", scope.env.label, decision.reason, level="warning")
    if probe:
        start_probe(scope, status)
    started = time.monotonic()
    on = turn_on(scope.rc, scope.pool, pages, decision.record, dry_run=False)
    seconds = round(time.monotonic() - started, 2)
    suspended = (
        list(on.processes.recorded.suspended) if on.processes and on.processes.recorded else []
    )
    return {
        "mode": decision.mode,
        "run": decision.record.run,
        "reason": decision.reason,
        "web_servers": on.web_servers,
        "processes_suspended": suspended,
        "pages": [r.status for r in on.pages.results],
        "checks": [c.status for c in on.checks],
        "seconds": seconds,
        "summary": f"{len(on.web_servers)} web server(s) in upgrade mode ({decision.mode}, "
        f"{seconds:.1f} s)",
    }


def holds_upgrade_mode(status: UpgradeStatus, run: str) -> bool:
    """Pure: is upgrade mode (still) this run's to end? Not when another run holds it now."""
    holder = status.holder
    if holder is not None and holder.run != run:
        return False
    return holder is not None or status.in_upgrade_mode


def mode_undo(scope: Scope, data: dict[str, Any]) -> None:
    """Pages off and the recorded processes resumed, when the journaled run (still) holds upgrade
    mode; a joined upgrade mode is begin-upgrade's and stays on."""
    run = data.get("run")
    if not run or data.get("mode") == "joined":
        return
    status = gather_upgrade_status(scope.rc, scope.pool)
    if not holds_upgrade_mode(status, run):
        if status.holder is not None:
            scope.log("upgrade mode is held by run %s: left", status.holder.run, level="warning")
        return
    off = turn_off(scope.rc, scope.pool, dry_run=False)
    if off.problems:
        raise RuntimeError("upgrade mode not fully ended: " + "; ".join(off.problems))


def mode_off(scope: Scope) -> dict[str, Any]:
    """The planned end of the window (left on when it joined begin-upgrade's upgrade mode)."""
    on = step_data(scope, ON_STEP)
    if on.get("mode") == "joined":
        scope.details["Upgrade mode"] = "left on: begin-upgrade holds it until end-upgrade"
        return {"left_on": True, "summary": "left on: begin-upgrade holds it until end-upgrade"}
    started = time.monotonic()
    off = turn_off(scope.rc, scope.pool, dry_run=False)
    stop_probe(scope)
    if off.problems:
        raise RuntimeError("upgrade mode not fully ended: " + "; ".join(off.problems))
    seconds = round(time.monotonic() - started, 2)
    return {
        "left_on": False,
        "seconds": seconds,
        "summary": f"{len(off.web_servers)} web server(s) serving again ({seconds:.1f} s)",
    }
