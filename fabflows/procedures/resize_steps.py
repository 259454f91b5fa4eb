"""resize-environment's steps, each with the undo that puts the previous types back.

- ``resize-<role>-<id>``: one server at a time (drained, stopped, changed, started, back in
  service); undo: the previous type back, started again if it ran, back in service;
- ``upgrade-mode-on`` / ``resize-window`` / ``upgrade-mode-off``: the primary and the cache in one
  short upgrade window (workers drained meanwhile); upgrade mode's undo ends it (the pages off,
  exactly the recorded autoscaling processes resumed), the window's undo puts the previous types
  back and the workers into service;
- the primary's switchover (``switchover-*``, :mod:`fabflows.procedures.switchover_steps`):
  the replica that takes over is resized first (``resize-db-replica-<id>``), the old primary
  after, as a replica;
- ``resize-stopped``: stopped servers' types (undo: the previous types);
- ``new-launch-template-version``: the web group's template (undo: one more version with the
  previous type, which the group then launches).

The previous type of every server is journaled (and tagged ``fabflows:resize``) before its stop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from fabflows.procedures.resize_plan import WINDOW_ORDER, ResizeChange, ResizeRunbookPlan
from fabflows.procedures.server_service import (
    hosts_of,
    in_service,
    journaled,
    quiet,
    stop_keeping_records,
    wait_states,
)
from fabflows.runtime.engine import Scope, Step
from tasks.aws.ec2 import Server, describe_servers
from tasks.aws.ec2_writes import (
    RESIZE_TAG,
    STOPPED_TAG,
    RunRecord,
    clear_instance_tag,
    create_launch_template_version,
    describe_instances,
    modify_instance_type,
    start_instances,
    stop_instances,
    tag_instances,
)
from tasks.aws.group_sizes import use_launch_template_version
from tasks.http.probe import HttpProbe
from tasks.ssh.fleet import FleetHost


def _host(c: ResizeChange) -> list[FleetHost]:
    if not c.address or not c.instance_id:
        return []
    return [FleetHost(name=c.name, address=c.address, role=c.role, instance_id=c.instance_id)]


def _tag_resizing(scope: Scope, changes: Sequence[ResizeChange]) -> None:
    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for c in changes:
        assert c.instance_id is not None
        value = json.dumps(
            {"run": scope.run_id, "from": c.current_type, "to": c.wanted_type, "since": since},
            separators=(",", ":"),
        )
        tag_instances(scope.rc.creds, [c.instance_id], {RESIZE_TAG: value}, dry_run=False)


def _clear_tags(scope: Scope, ids: list[str]) -> None:
    clear_instance_tag(scope.rc.creds, ids, RESIZE_TAG, dry_run=False)
    clear_instance_tag(scope.rc.creds, ids, STOPPED_TAG, dry_run=False)


def _stop_change_start(scope: Scope, changes: Sequence[ResizeChange], flow: str) -> list[Server]:
    """Stop, change each type, start, wait until running."""
    creds = scope.rc.creds
    ids = [c.instance_id for c in changes if c.instance_id]
    record = RunRecord(run=scope.run_id, flow=flow, since=datetime.now(UTC))
    stop_instances(creds, ids, record, dry_run=False)
    wait_states(scope.rc, ids, "stopped")
    for c in changes:
        assert c.instance_id is not None
        modify_instance_type(creds, c.instance_id, c.wanted_type, dry_run=False)
    start_instances(creds, ids, dry_run=False)
    return wait_states(scope.rc, ids, "running")


def put_back(scope: Scope, changes: Sequence[ResizeChange], flow: str) -> None:
    """Undo of a resize: each server on its previous type, running again if it ran before (and
    back in service), records removed. Reads first: already as before is left alone."""
    creds = scope.rc.creds
    ids = [c.instance_id for c in changes if c.instance_id]
    now = {s.instance_id: s for s in describe_instances(creds, ids)}
    wrong = [
        c
        for c in changes
        if c.instance_id in now and now[c.instance_id].instance_type != c.current_type
    ]
    if wrong:
        stop_keeping_records(scope, [c.instance_id for c in wrong if c.instance_id], flow)
        for c in wrong:
            assert c.instance_id is not None
            modify_instance_type(creds, c.instance_id, c.current_type, dry_run=False)
    ran = [c.instance_id for c in changes if c.state == "running" and c.instance_id]
    if ran:
        start_instances(creds, ran, dry_run=False)
        fresh = wait_states(scope.rc, ran, "running")
        for role in dict.fromkeys(c.role for c in changes):
            hosts = hosts_of(scope.rc, [s for s in fresh if s.role == role])
            in_service(scope, hosts, role, f"in-service-{role}")
    _clear_tags(scope, ids)


def _one_at_a_time(c: ResizeChange, flow: str) -> Step:
    assert c.instance_id is not None
    iid = c.instance_id

    def apply(scope: Scope) -> dict[str, str]:
        scope.record(previous=c.current_type, was=c.state)
        _tag_resizing(scope, [c])
        if c.state == "running":
            quiet(scope, _host(c), c.role, f"drain-{c.role}")
        fresh = _stop_change_start(scope, [c], flow)
        in_service(scope, hosts_of(scope.rc, fresh), c.role, f"in-service-{c.role}")
        _clear_tags(scope, [iid])
        return {"summary": f"{c.name}: {c.current_type} -> {c.wanted_type}"}

    return Step(
        f"resize-{c.role}-{iid}",
        apply,
        lambda scope, data: put_back(scope, [c], flow),
        summary=f"{c.name}: drain, stop, {c.current_type} -> {c.wanted_type}, start, in service",
    )


def _running_workers(scope: Scope) -> list[Server]:
    env = scope.env
    return describe_servers(
        scope.rc.creds, env.deployment, env.environment, roles=["worker"], states=("running",)
    )


_PROBES: dict[str, HttpProbe] = {}
"""Run id -> the probe polling the site through the window (this process only)."""


def _start_probe(scope: Scope) -> None:
    """Poll the site (or the first web server) every 100 ms until upgrade mode is off."""
    from fabflows.upgrade_mode import server_url, web_servers

    url = scope.env.site_url
    if not url:
        hosts = hosts_of(scope.rc, [s for s in web_servers(scope.rc) if s.state == "running"])
        url = server_url(scope.rc.config.fabflows.upgrade, hosts[0]) if hosts else None
    if url:
        _PROBES[scope.run_id] = HttpProbe(url).start()
        scope.on_close(lambda: _stop_probe(scope))


def _stop_probe(scope: Scope) -> str:
    probe = _PROBES.pop(scope.run_id, None)
    if probe is None:
        return ""
    summary = probe.stop()
    scope.details["Measured downtime"] = summary.describe()
    scope.details["measured_downtime_s"] = summary.total_downtime_s
    return f"; measured: {summary.describe()}"


def _upgrade_mode_on(flow: str) -> Step:
    def apply(scope: Scope) -> dict[str, str]:
        from fabflows.upgrade_mode import enter_decision, load_upgrade_pages, turn_on

        params = scope.params
        pages = load_upgrade_pages(scope.rc.config, getattr(params, "config_path", None))
        decision, _ = enter_decision(scope.rc, scope.pool, flow)
        scope.record(mode=decision.mode)
        _start_probe(scope)
        on = turn_on(scope.rc, scope.pool, pages, decision.record, dry_run=False)
        return {"mode": decision.mode, "summary": on.pages.summary()}

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        _stop_probe(scope)
        turn_off(scope, data)

    return Step("upgrade-mode-on", apply, undo, site_down=True)


def turn_off(scope: Scope, data: dict[str, Any]) -> str:
    """Upgrade mode off (pages off, exactly the recorded processes resumed), unless this run
    joined begin-upgrade's upgrade mode, which end-upgrade ends."""
    from fabflows.upgrade_mode import UpgradeModeNotEnded
    from fabflows.upgrade_mode import turn_off as off

    if data.get("mode") == "joined":
        return "left in upgrade mode for end-upgrade"
    result = off(scope.rc, scope.pool, dry_run=False)
    if result.problems:
        raise UpgradeModeNotEnded(
            f"{scope.env.label}: upgrade mode not fully ended: " + "; ".join(result.problems)
        )
    return result.pages.summary() if result.pages else "upgrade mode off"


def _window(changes: list[ResizeChange], flow: str) -> Step:
    def apply(scope: Scope) -> dict[str, Any]:
        workers = [s.instance_id for s in _running_workers(scope)]
        scope.record(workers=workers)
        running = describe_instances(scope.rc.creds, workers) if workers else []
        quiet(scope, hosts_of(scope.rc, running), "worker", "drain-worker")
        _tag_resizing(scope, changes)
        fresh = _stop_change_start(scope, changes, flow)
        for role in WINDOW_ORDER:
            hosts = hosts_of(scope.rc, [s for s in fresh if s.role == role])
            in_service(scope, hosts, role, f"in-service-{role}")
        in_service(scope, hosts_of(scope.rc, running), "worker", "in-service-worker")
        _clear_tags(scope, [c.instance_id for c in changes if c.instance_id])
        summary = ", ".join(f"{c.name}: {c.current_type} -> {c.wanted_type}" for c in changes)
        return {"summary": summary, "workers": workers}

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        order = {r: n for n, r in enumerate(WINDOW_ORDER)}
        put_back(scope, sorted(changes, key=lambda c: order.get(c.role, 9)), flow)
        workers = data.get("workers") or []
        running = [s for s in describe_instances(scope.rc.creds, workers) if s.state == "running"]
        in_service(scope, hosts_of(scope.rc, running), "worker", "in-service-worker")

    return Step("resize-window", apply, undo, site_down=True)


def _upgrade_mode_off() -> Step:
    def apply(scope: Scope) -> dict[str, str]:
        summary = turn_off(scope, journaled(scope, "upgrade-mode-on"))
        return {"summary": summary + _stop_probe(scope)}

    return Step("upgrade-mode-off", apply, no_undo="it ends upgrade mode", site_down=True)


def _while_stopped(changes: list[ResizeChange]) -> Step:
    def apply(scope: Scope) -> dict[str, str]:
        log = [
            modify_instance_type(
                scope.rc.creds, c.instance_id, c.wanted_type, dry_run=False
            ).summary
            for c in changes
            if c.instance_id
        ]
        return {"summary": "; ".join(log)}

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        now = {
            s.instance_id: s
            for s in describe_instances(
                scope.rc.creds, [c.instance_id for c in changes if c.instance_id]
            )
        }
        for c in changes:
            s = now.get(c.instance_id or "")
            if s is not None and s.instance_type != c.current_type and s.state == "stopped":
                modify_instance_type(scope.rc.creds, s.instance_id, c.current_type, dry_run=False)

    return Step("resize-stopped", apply, undo)


def _launch_template(plan: ResizeRunbookPlan, c: ResizeChange) -> Step:
    group, template = plan.auto_scaling_group_name, plan.launch_template
    assert group and template

    def use(scope: Scope, instance_type: str) -> str:
        created = create_launch_template_version(
            scope.rc.creds, template, instance_type, dry_run=False
        )
        assert created.version is not None
        used = use_launch_template_version(
            scope.rc.creds, group, template, created.version, dry_run=False
        )
        return f"{created.summary}; {used.summary}"

    return Step(
        "new-launch-template-version",
        lambda scope: {"summary": use(scope, c.wanted_type)},
        lambda scope, data: use(scope, c.current_type),
    )


def resize_steps(plan: ResizeRunbookPlan, flow: str) -> list[Step]:
    from fabflows.procedures.switchover_steps import keep_after_promotion, switchover_steps

    resize = plan.resize
    sw = resize.switchover
    out = [
        keep_after_promotion(_one_at_a_time(c, flow), sw)
        if sw is not None and c.instance_id == sw.new.instance_id
        else _one_at_a_time(c, flow)
        for c in resize.by_strategy("one-at-a-time")
    ]
    for c in resize.by_strategy("switchover"):
        assert resize.switchover is not None
        out += switchover_steps(
            resize.switchover,
            c,
            resize_as_replica=lambda change: _one_at_a_time(change, flow),
            start_probe=_start_probe,
            stop_probe=_stop_probe,
        )
    window = resize.by_strategy("window")
    if window:
        out += [_upgrade_mode_on(flow), _window(window, flow), _upgrade_mode_off()]
    stopped = resize.by_strategy("while-stopped")
    if stopped:
        out.append(_while_stopped(stopped))
    for c in resize.by_strategy("launch-template"):
        out.append(_launch_template(plan, c))
    return out
