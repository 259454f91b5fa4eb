"""The steps of stop-environment and start-environment, each with the undo that puts it back.

A stop's steps are undone by the matching part of a start, newest first: the cache (started, or
launched again at its recorded address), the primary, replicas, workers (started, reachable over
SSH with the known host key, brought into service), the workers' background services, and last
the web group's sizes as they were before the stop. A start's steps are undone by stopping again
what that start started (the records of the stop are kept, so the next start restores them).

Every undo reads the systems first and does only what is still needed, so it is safe after a
partial apply (a run killed in the middle of a step) and safe to run twice. The data an undo needs
beyond the plan (the group's sizes before, the records removed) is journaled before the write.

The helpers that take a server out of and back into service (shared with resize-environment)
are in :mod:`fabflows.procedures.server_service`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fabflows.procedures.environment_power import PowerPlan, RolePhase
from fabflows.procedures.server_service import (
    action_hosts,
    hosts_of,
    in_service,
    quiet,
    start_into_service,
    stop_keeping_records,
    wait_states,
)
from fabflows.runtime.engine import Scope, Step
from tasks.aws.autoscaling import describe_auto_scaling_group
from tasks.aws.ec2 import Server, describe_servers
from tasks.aws.ec2_writes import (
    STOPPED_TAG,
    RunRecord,
    clear_instance_tag,
    describe_instances,
    run_instance_from_template,
    stop_instances,
    tag_instances,
    terminate_instances,
)
from tasks.aws.group_sizes import (
    CACHE_TAG,
    SIZES_TAG,
    CacheRecord,
    SizesRecord,
    clear_group_record,
    record_cache,
    record_group_sizes,
    recorded_sizes,
    set_group_sizes,
    wait_for_group,
)
from tasks.http.probe import check_site_up


def _done(log: list[str]) -> dict[str, str]:
    return {"summary": "; ".join(x for x in log if x)}


# --------------------------------------------------------------------------- stop-environment


def _group_sizes_step(plan: PowerPlan) -> Step:
    g = plan.group
    assert g is not None and g.target is not None
    name = g.auto_scaling_group_name

    def apply(scope: Scope) -> dict[str, Any]:
        creds = scope.rc.creds
        now = describe_auto_scaling_group(creds, name)
        before = (
            list(g.current) if now is None else [now.min_size, now.desired_capacity, now.max_size]
        )
        had_record = now is not None and recorded_sizes(now) is not None
        scope.record(before=before, had_record=had_record)
        log = [
            record_group_sizes(creds, name, datetime.now(UTC), scope.run_id, dry_run=False).summary,
            set_group_sizes(creds, name, *g.target, dry_run=False).summary,
        ]
        settings = scope.rc.config.fabflows.stop_start
        wait_for_group(
            creds, name, 0, timeout=settings.instance_wait_seconds, poll=settings.poll_seconds
        )
        return _done(log) | {"before": before, "had_record": had_record}

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        creds = scope.rc.creds
        before = data.get("before") or list(g.current)
        settings = scope.rc.config.fabflows.stop_start
        set_group_sizes(creds, name, *before, dry_run=False)
        wait_for_group(
            creds,
            name,
            before[1],
            timeout=settings.instance_wait_seconds,
            poll=settings.poll_seconds,
        )
        if not data.get("had_record", g.recorded is not None):
            clear_group_record(creds, name, [SIZES_TAG], dry_run=False)

    return Step(
        "scale-web-group-to-zero",
        apply,
        undo,
        site_down=True,
        summary=f"record {name}'s sizes, set 0/0/0, wait until its instances are gone",
    )


def _quiet_step(plan: PowerPlan) -> Step:
    actions = list(plan.quiet)

    def apply(scope: Scope) -> dict[str, str]:
        return _done([quiet(scope, action_hosts(actions), "worker", "quiet-workers")])

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        ids = [a.instance_id for a in actions]
        running = [s for s in describe_instances(scope.rc.creds, ids) if s.state == "running"]
        in_service(scope, hosts_of(scope.rc, running), "worker", "in-service-worker")

    return Step("quiet-workers", apply, undo, site_down=True)


def _stop_role_step(phase: RolePhase, flow: str) -> Step:
    ids = phase.ids("stop")

    def apply(scope: Scope) -> dict[str, str]:
        record = RunRecord(run=scope.run_id, flow=flow, since=datetime.now(UTC))
        log = [stop_instances(scope.rc.creds, ids, record, dry_run=False).summary]
        wait_states(scope.rc, ids, "stopped")
        return _done(log)

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        start_into_service(scope, ids, phase.role)
        clear_instance_tag(scope.rc.creds, ids, STOPPED_TAG, dry_run=False)

    return Step(f"stop-{phase.role}", apply, undo, site_down=True)


def find_cache(scope: Scope, ip: str | None) -> Server | None:
    """A running (or starting) cache server of the environment, at ``ip`` when given."""
    env = scope.env
    for s in describe_servers(scope.rc.creds, env.deployment, env.environment, roles=["cache"]):
        if s.state in ("pending", "running") and (ip is None or s.private_ip_address == ip):
            return s
    return None


def launch_cache(scope: Scope, launch_template: str, record: CacheRecord) -> tuple[str, str]:
    """Launch the cache server from its template at its recorded address (one already running
    there: nothing to do); wait until it runs. (instance id, summary)"""
    env = scope.env
    found = find_cache(scope, record.ip)
    if found is not None:
        return found.instance_id, f"cache server {found.instance_id} already at {record.ip}"
    tags = {
        "Name": record.name or f"{env.deployment}_{env.environment}_cache",
        "deployment": env.deployment,
        "environment": env.environment,
        "role": "cache",
    }
    launched = run_instance_from_template(
        scope.rc.creds,
        launch_template,
        subnet_id=record.subnet,
        private_ip_address=record.ip,
        instance_type=record.type,
        tags=tags,
        dry_run=False,
    )
    wait_states(scope.rc, [launched.instance_id], "running")
    return launched.instance_id, launched.summary


def _terminate_cache_step(plan: PowerPlan, phase: RolePhase) -> Step:
    ids = phase.ids("terminate")
    g = plan.group
    record = plan.cache_record

    def apply(scope: Scope) -> dict[str, str]:
        creds = scope.rc.creds
        log = []
        if record is not None and g is not None:
            log.append(
                record_cache(creds, g.auto_scaling_group_name, record, dry_run=False).summary
            )
        log.append(terminate_instances(creds, ids, dry_run=False).summary)
        wait_states(scope.rc, ids, "terminated")
        return _done(log)

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        creds = scope.rc.creds
        alive = [
            s
            for s in describe_instances(creds, ids)
            if s.state not in ("terminated", "shutting-down")
        ]
        if alive:
            start_into_service(scope, [s.instance_id for s in alive], "cache")
        elif record is not None:
            settings = scope.rc.config.fabflows.environments.get(scope.env.environment)
            template = settings.cache_launch_template if settings else None
            if not template:
                raise RuntimeError(
                    "the cache server was terminated and no cache_launch_template is set"
                )
            launch_cache(scope, template, record)
        if g is not None and record is not None:
            clear_group_record(creds, g.auto_scaling_group_name, [CACHE_TAG], dry_run=False)

    return Step(f"terminate-{phase.role}", apply, undo, site_down=True)


def stop_steps(plan: PowerPlan, flow: str) -> list[Step]:
    """stop-environment's steps, in order; each undone by its part of a start."""
    out = []
    if plan.group is not None and plan.group.target is not None:
        out.append(_group_sizes_step(plan))
    if plan.quiet:
        out.append(_quiet_step(plan))
    for phase in plan.phases:
        if phase.ids("stop"):
            out.append(_stop_role_step(phase, flow))
        if phase.ids("terminate"):
            out.append(_terminate_cache_step(plan, phase))
    return out


def verify_stopped(scope: Scope, plan: PowerPlan) -> list[str]:
    problems = []
    wanted = {
        s.instance_id: ("stopped" if s.action == "stop" else "terminated")
        for p in plan.phases
        for s in p.servers
        if s.action in ("stop", "terminate")
    }
    for s in describe_instances(scope.rc.creds, list(wanted)) if wanted else []:
        if s.state != wanted[s.instance_id]:
            problems.append(f"{s.name or s.instance_id} is {s.state}, not {wanted[s.instance_id]}")
    g = plan.group
    if g is not None:
        now = describe_auto_scaling_group(scope.rc.creds, g.auto_scaling_group_name)
        if now is not None and now.instance_ids:
            problems.append(
                f"{g.auto_scaling_group_name} still has {len(now.instance_ids)} instance(s)"
            )
    return problems


# --------------------------------------------------------------------------- start-environment


def _launch_cache_step(plan: PowerPlan) -> Step:
    assert plan.cache_recreate is not None
    template = plan.cache_recreate.launch_template
    record = plan.cache_recreate.record

    def apply(scope: Scope) -> dict[str, str]:
        iid, summary = launch_cache(scope, template, record)
        return {"summary": summary, "instance_id": iid}

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        found = find_cache(scope, record.ip)
        if found is not None:  # its record stays on the group for the next start
            terminate_instances(scope.rc.creds, [found.instance_id], dry_run=False)
            wait_states(scope.rc, [found.instance_id], "terminated")

    return Step("launch-cache", apply, undo, auto_undo=False)


def _start_role_step(phase: RolePhase, flow: str) -> Step:
    start_ids = phase.ids("start")
    check = [s for s in phase.servers if s.action == "check"]

    def apply(scope: Scope) -> dict[str, str]:
        scope.record(started=start_ids)
        log = []
        if start_ids:
            log += start_into_service(scope, start_ids, phase.role)
        if check:
            log.append(
                in_service(scope, action_hosts(check), phase.role, f"in-service-{phase.role}")
            )
        return _done(log)

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        stop_keeping_records(scope, start_ids, flow)

    return Step(f"start-{phase.role}", apply, undo, auto_undo=False)


def _restore_group_step(plan: PowerPlan) -> Step:
    g = plan.group
    assert g is not None and g.recorded is not None
    name = g.auto_scaling_group_name
    target = g.target or (g.recorded.min, g.recorded.desired, g.recorded.max)

    def apply(scope: Scope) -> dict[str, Any]:
        creds = scope.rc.creds
        now = describe_auto_scaling_group(creds, name)
        before = (
            list(g.current) if now is None else [now.min_size, now.desired_capacity, now.max_size]
        )
        scope.record(before=before)
        log = [set_group_sizes(creds, name, *target, dry_run=False).summary]
        settings = scope.rc.config.fabflows.stop_start
        wait_for_group(
            creds,
            name,
            target[1],
            timeout=settings.instance_wait_seconds,
            poll=settings.poll_seconds,
        )
        return _done(log) | {"before": before}

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        before = data.get("before") or list(g.current)
        settings = scope.rc.config.fabflows.stop_start
        set_group_sizes(scope.rc.creds, name, *before, dry_run=False)
        wait_for_group(
            scope.rc.creds,
            name,
            before[1],
            timeout=settings.instance_wait_seconds,
            poll=settings.poll_seconds,
        )

    return Step("restore-web-group", apply, undo, auto_undo=False)


def _check_site_step(plan: PowerPlan) -> Step:
    g = plan.group
    web_expected = bool(g and g.recorded and g.recorded.desired)

    def apply(scope: Scope) -> dict[str, str]:
        rc, env = scope.rc, scope.env
        web = describe_servers(
            rc.creds, env.deployment, env.environment, roles=["web"], states=("running",)
        )
        if web_expected and not web:
            raise RuntimeError(f"{env.label}: the group's instances are InService but none runs")
        upgrade = rc.config.fabflows.upgrade
        checks = check_site_up(
            [upgrade.web_server_url.format(address=s.address(env.address_attribute)) for s in web],
            upgrade.healthcheck_path,
            site_url=env.site_url,
            timeout=rc.config.fabflows.stop_start.site_wait_seconds,
        )
        ok = sum(1 for c in checks if c.ok)
        scope.details["Site checks"] = "; ".join(c.describe() for c in checks)
        note = "" if env.site_url else " (no site URL configured: each web server checked)"
        return {"summary": f"{ok}/{len(checks)} checks answered 200{note}"}

    return Step("check-site", apply, no_undo="reads only")


def _clear_records_step(plan: PowerPlan, savings_markdown: str | None) -> Step:
    ids = list(
        dict.fromkeys(
            s.instance_id
            for p in plan.phases
            for s in p.servers
            if s.action == "start" or s.stopped_since
        )
    )
    g = plan.group

    def apply(scope: Scope) -> dict[str, str]:
        creds = scope.rc.creds
        tags = (
            {
                s.instance_id: s.tags[STOPPED_TAG]
                for s in describe_instances(creds, ids)
                if STOPPED_TAG in s.tags
            }
            if ids
            else {}
        )
        group_tags: dict[str, str] = {}
        if g is not None:
            now = describe_auto_scaling_group(creds, g.auto_scaling_group_name)
            group_tags = {
                k: v for k, v in (now.tags if now else {}).items() if k in (SIZES_TAG, CACHE_TAG)
            }
        scope.record(instance_tags=tags, group_tags=group_tags)
        log = []
        if ids:
            log.append(clear_instance_tag(creds, ids, STOPPED_TAG, dry_run=False).summary)
        if g is not None:
            log.append(
                clear_group_record(
                    creds, g.auto_scaling_group_name, [SIZES_TAG, CACHE_TAG], dry_run=False
                ).summary
            )
        if savings_markdown:
            from fabflows.report import artifact_key, publish_markdown

            env = scope.env
            publish_markdown(
                artifact_key("start-environment", env.deployment, env.environment) + "-savings",
                "# Saved while stopped\n\n" + savings_markdown,
                f"Savings of the stop of {env.label}",
            )
        return _done(log)

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        creds = scope.rc.creds
        for iid, value in (data.get("instance_tags") or {}).items():
            tag_instances(creds, [iid], {STOPPED_TAG: value}, dry_run=False)
        group_tags = data.get("group_tags") or {}
        if g is not None and SIZES_TAG in group_tags:
            rec = SizesRecord.model_validate_json(group_tags[SIZES_TAG])
            record_group_sizes(creds, g.auto_scaling_group_name, rec.since, rec.run, dry_run=False)
        if g is not None and CACHE_TAG in group_tags:
            rec_c = CacheRecord.model_validate_json(group_tags[CACHE_TAG])
            record_cache(creds, g.auto_scaling_group_name, rec_c, dry_run=False)

    return Step("clear-records", apply, undo, auto_undo=False)


def start_steps(plan: PowerPlan, flow: str, savings_markdown: str | None = None) -> list[Step]:
    """start-environment's steps, in order. A start's failure leaves what it did (running it
    again goes on); recover undoes them (stops again what it started, records kept)."""
    out = [_launch_cache_step(plan)] if plan.cache_recreate is not None else []
    out += [_start_role_step(p, flow) for p in plan.phases if p.ids("start", "check")]
    if plan.group is not None and plan.group.recorded is not None:
        out.append(_restore_group_step(plan))
    if out:
        out += [_check_site_step(plan), _clear_records_step(plan, savings_markdown)]
    return out


def verify_started(scope: Scope, plan: PowerPlan) -> list[str]:
    ids = [s.instance_id for p in plan.phases for s in p.servers]
    problems = [
        f"{s.name or s.instance_id} is {s.state}"
        for s in (describe_instances(scope.rc.creds, ids) if ids else [])
        if s.state != "running"
    ]
    g = plan.group
    if g is not None and g.recorded is not None:
        now = describe_auto_scaling_group(scope.rc.creds, g.auto_scaling_group_name)
        want = (g.recorded.min, g.recorded.desired, g.recorded.max)
        if now is not None and (now.min_size, now.desired_capacity, now.max_size) != want:
            problems.append(f"{g.auto_scaling_group_name} is not at {'/'.join(map(str, want))}")
    return problems
