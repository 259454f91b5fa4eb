"""watchdog: find maintenance state that no live run holds, say so once, recover where allowed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows import registry
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, execute
from fabflows.runtime.plan import RunbookPlan

FLOW_NAME = "watchdog"
Recovery = Literal["end-upgrade", "resume-processes", "recover-environment", ""]


class WatchdogParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Finding(BaseModel):
    """Maintenance state found with no live run holding it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(
        description="upgrade-page, autoscaling-suspended, reload-leftovers, staged-secret-files, ..."
    )
    what: str = Field(description="What was found, where (stable between runs: the notice key).")
    detail: str = ""
    recovery: Recovery = Field(default="", description="What recovers it ('' : by hand).")
    processes: list[str] = Field(default_factory=list)
    group: str | None = None


class WatchdogFacts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    findings: list[Finding] = Field(default_factory=list)
    live_holder: str | None = None
    notes: list[str] = Field(default_factory=list)


class WatchdogPlan(RunbookPlan):
    findings: list[Finding] = Field(default_factory=list)


def plan_watchdog(facts: WatchdogFacts, env: EnvironmentConfig) -> WatchdogPlan:
    """Pure: the findings as the run's report (the watchdog changes nothing itself)."""
    notes = [
        f"FOUND {f.kind}: {f.what}"
        + (f" ({f.detail})" if f.detail else "")
        + (f" -> {f.recovery}" if f.recovery else " -> by hand")
        for f in facts.findings
    ]
    if facts.live_holder:
        notes.append(f"held by a live run, not judged: {facts.live_holder}")
    notes += facts.notes
    return WatchdogPlan(
        title=f"watchdog on {env.label}",
        environment=env.label,
        noops=[] if facts.findings else ["no maintenance state left behind"],
        notes=notes,
        findings=facts.findings,
    )


def _prefect_run_final(run_id: str | None) -> bool | None:
    import uuid

    if not run_id:
        return None
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            run = client.read_flow_run(uuid.UUID(run_id))
    except Exception:  # noqa: BLE001 - not a Prefect run, or Prefect cannot say
        return None
    return bool(run.state and run.state.is_final())


def _dead_runs(scope: Scope, facts: WatchdogFacts) -> None:
    from fabflows.runtime.journal import Journal
    from fabflows.runtime.recovery import dead_runs

    journal = Journal.for_environment(scope.env.label, scope.rc.config)
    dead, recovers, _alive = dead_runs(journal, scope.rc.config)
    for run in dead:
        facts.findings.append(
            Finding(
                kind="dead-run",
                what=f"{run.flow} run {run.run_id} died with steps applied",
                detail=run.describe(),
                recovery="recover-environment" if run.undo else "",
            )
        )
    for entry in recovers:
        facts.notes.append(f"a dead recover-environment run {entry.run_id} left its journal open")


def _lock(scope: Scope, facts: WatchdogFacts) -> bool:
    """Record a lock held by a dead run; True when a live run holds the environment."""
    from fabflows import lock

    holder = lock.read_holder(scope.env, scope.rc.config)
    if holder is None or holder.flow_run_id == scope.run_id:
        return False
    if _prefect_run_final(holder.flow_run_id):
        facts.findings.append(
            Finding(
                kind="dead-lock-holder",
                what=f"the lock is held by {holder.flow_name} run {holder.flow_run_id}, which ended",
                detail=holder.describe(),
            )
        )
        return False
    facts.live_holder = holder.describe()
    return True


def _upgrade_and_groups(scope: Scope, facts: WatchdogFacts) -> None:
    from fabflows.upgrade_mode import gather_upgrade_status, holder_alive, judge_holder

    status = gather_upgrade_status(scope.rc, scope.pool)
    holder = status.holder
    hosts = [h.host for h in status.hosts_in_upgrade_mode]
    owned: list[str] = []
    if status.in_upgrade_mode:
        if holder is None:
            facts.findings.append(
                Finding(
                    kind="upgrade-page",
                    what=f"upgrade page on {', '.join(hosts) or 'web servers'} with no holder",
                    detail=status.describe(),
                    recovery="end-upgrade",
                )
            )
        else:
            warn, said = judge_holder(holder, holder_alive(holder))
            owned = list(status.recorded.suspended) if status.recorded else []
            if warn:
                facts.findings.append(
                    Finding(
                        kind="upgrade-page",
                        what=f"upgrade mode left on by {holder.flow} run {holder.run}",
                        detail=said,
                        recovery="end-upgrade",
                    )
                )
    others = [p for p in status.suspended_processes if p not in owned]
    if others and status.auto_scaling_group:
        facts.findings.append(
            Finding(
                kind="autoscaling-suspended",
                what=f"{status.auto_scaling_group}: {', '.join(sorted(others))} suspended by no run",
                recovery="resume-processes",
                processes=sorted(others),
                group=status.auto_scaling_group,
            )
        )


def _reload_leftovers(scope: Scope, facts: WatchdogFacts) -> None:
    from fabflows.errors import BadInput
    from fabflows.procedures import reload_recovery
    from fabflows.upgrade_mode import current_run

    try:
        _t, target_db, _w, _k, app, upgrade = reload_recovery.gather_target_state(
            scope.rc, scope.pool
        )
    except BadInput as exc:
        facts.notes.append(f"reload leftovers not checked: {exc}")
        return
    found = reload_recovery.recovery_for(scope.rc, target_db, app, upgrade, current_run()[0])
    if found.needed:
        facts.findings.append(
            Finding(
                kind="reload-leftovers",
                what=f"a reload's leftovers on {scope.env.label}: " + "; ".join(found.lines()),
                recovery="recover-environment",
            )
        )


def _staged_secret_files(scope: Scope, facts: WatchdogFacts) -> None:
    """Files a secret-file rollout staged or kept, on any server, that no open journal claims."""
    from fabflows.procedures.staged_secrets import gather_staged_leftovers
    from fabflows.runtime.journal import Journal

    journal = Journal.for_environment(scope.env.label, scope.rc.config)
    found, unread = gather_staged_leftovers(scope.rc, scope.pool, journal.open_entries())
    facts.notes += [f"staged secret files not checked on {u}: it could not be read" for u in unread]
    if found:
        facts.findings.append(
            Finding(
                kind="staged-secret-files",
                what=f"secret-file rollout leftovers on {len(found)} server(s) with no run: "
                + "; ".join(s.describe() for s in found),
                detail="staged (.fabflows-next), kept (.fabflows-prev/-absent) or uploaded files "
                "no journal accounts for; none is live",
                recovery="recover-environment",
            )
        )


def _stopped_past_start(scope: Scope, facts: WatchdogFacts) -> None:
    """Every server stopped although the environment's start-environment schedule has fired."""
    from datetime import UTC, datetime, timedelta

    from prefect.server.schemas.schedules import CronSchedule

    from tasks.aws.ec2 import describe_servers

    settings = scope.rc.config.fabflows.environments.get(scope.env.environment)
    start = settings.schedules.get("start-environment") if settings else None
    if start is None:
        return
    now = datetime.now(UTC)
    schedule = CronSchedule(cron=start.cron, timezone=scope.env.time_zone)
    fired = [d for d in schedule._get_dates_generator(n=200, start=now - timedelta(days=8))]
    past = [d for d in fired if d <= now]
    if not past:
        return
    servers = describe_servers(scope.rc.creds, scope.env.deployment, scope.env.environment)
    if servers and all(s.state == "stopped" for s in servers):
        facts.findings.append(
            Finding(
                kind="stopped-past-start",
                what=f"{scope.env.label} is stopped; its start schedule fired at "
                f"{past[-1]:%Y-%m-%d %H:%M %Z}",
            )
        )


class Watchdog(Runbook[WatchdogParams, WatchdogFacts, WatchdogPlan]):
    name = FLOW_NAME
    Params = WatchdogParams
    plan_type = WatchdogPlan
    read_only = True

    def gather(self, scope: Scope, params: WatchdogParams) -> WatchdogFacts:
        facts = WatchdogFacts()
        checks = [
            _dead_runs,
            _upgrade_and_groups,
            _reload_leftovers,
            _staged_secret_files,
            _stopped_past_start,
        ]
        live = _lock(scope, facts)
        if live:  # a live run holds the environment: what it changed is its own
            checks = [_dead_runs]
        for check in checks:
            try:
                check(scope, facts)
            except Exception as exc:  # noqa: BLE001 - one unreadable system must not hide the rest
                facts.notes.append(f"{check.__name__.strip('_')}: not checked: {exc}")
        _FOUND[scope.run_id] = facts.findings
        return facts

    def plan(self, facts: WatchdogFacts, params: WatchdogParams, env: EnvironmentConfig):  # noqa: ANN201
        return plan_watchdog(facts, env)


RUNBOOK = Watchdog()
_FOUND: dict[str, list[Finding]] = {}
"""The last gather's findings by run id, for the flow to notify and recover after the report."""


# --------------------------------------------------------------------------- after the report


def _state_file(config, label: str) -> Path:  # noqa: ANN001
    from config.models import slug

    path = Path(config.fabflows.state_dir).expanduser() / "notify" / f"watchdog-{slug(label)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def notify_findings(rc, findings: list[Finding], link: str) -> list[str]:  # noqa: ANN001
    """Notify each finding once; a finding gone and back later is notified again."""
    from config.models import slug
    from fabflows.notify import messages, send

    env = rc.env
    state = _state_file(rc.config, env.label)
    before = set(json.loads(state.read_text())) if state.exists() else set()
    notices = {}
    for f in findings:
        action = f.recovery if env_recovers(rc) and f.recovery else (f.recovery or "by hand")
        n = messages.watchdog_notice(env.label, f.kind, f.what, action, link)
        notices[n.key] = n
    sent_dir = Path(rc.config.fabflows.state_dir).expanduser() / "notify" / "sent"
    for gone in before - set(notices):
        (sent_dir / slug(gone)[:200]).unlink(missing_ok=True)
    state.write_text(json.dumps(sorted(notices)))
    return [n.subject for n in notices.values() if send.send_notice(rc.config, env.environment, n)]


def env_recovers(rc) -> bool:  # noqa: ANN001
    settings = rc.config.fabflows.environments.get(rc.env.environment)
    return bool(settings and settings.watchdog_recover)


def recover(rc, findings: list[Finding], config_path: str | None) -> list[str]:  # noqa: ANN001
    """Start the recovery of each finding that has one (in-process, as subflows)."""
    done = []
    env = rc.env
    kinds = {f.recovery for f in findings if f.recovery}
    if "resume-processes" in kinds:
        from tasks.aws.autoscaling import resume_listed_processes

        for f in findings:
            if f.recovery == "resume-processes" and f.group:
                r = resume_listed_processes(rc.creds, f.group, f.processes, dry_run=False)
                done.append(r.summary)
    if "end-upgrade" in kinds:
        end_upgrade = registry.load("end-upgrade")
        r = end_upgrade(env.environment, env.deployment, config_path, dry_run=False)
        done.append(f"end-upgrade: {getattr(r, 'outcome', None) or 'done'}")
    if "recover-environment" in kinds:
        recover_environment = registry.load("recover-environment")
        r = recover_environment(env.environment, env.deployment, config_path, dry_run=False)
        done.append(f"recover-environment: {getattr(r, 'outcome', r)}")
    return done


@flow(name=FLOW_NAME, log_prints=False)
def watchdog(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
) -> RunbookReport:
    """Find maintenance state no live run holds; notify each finding once; recover if allowed.

    **When it runs:** every few minutes in every environment (scheduled by `fabflows deploy`,
    `fabflows.environments.<env>.watchdog_cron`); by hand any time.

    **What it finds:** the upgrade page on with no holder (or a holder that should have ended it),
    autoscaling processes suspended by no run, a reload-production-db's side or previous databases
    and half-done swaps, a lock held by a run that has ended, journals of dead runs with steps
    applied, staged secret files (`.fabflows-next`, kept `.fabflows-prev`/`-absent` copies,
    upload directories) that no run's journal accounts for, an environment still stopped after its
    start-environment schedule fired. When a live run holds the environment's lock it judges only
    the journals: the rest is that run's.

    **What it does:** publishes the findings (the plan artifact), notifies each one once through the
    environment's notification block (again only if it goes away and comes back), and, where
    `fabflows.environments.<env>.watchdog_recover` is true, starts the recovery: end-upgrade for the
    page, resuming exactly the processes it found suspended, recover-environment for dead runs,
    reload leftovers and staged secret files. Itself it only reads.

    **Blast radius:** none without watchdog_recover; with it, the recoveries' own.

    Args:
        environment: Environment to watch (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Ignored: the watchdog only reads (recovery follows watchdog_recover).
    """
    report = execute(RUNBOOK, locals())
    if not isinstance(report, RunbookReport):
        return report
    from fabflows.chatops.notify import ui_link
    from fabflows.runbook import load_context
    from fabflows.runtime.engine import current_run_id

    rc = load_context(environment, deployment, config)
    findings = _FOUND.pop(report.run_id, [])
    sent = notify_findings(rc, findings, ui_link(rc.config, current_run_id()))
    recovered = recover(rc, findings, config) if findings and env_recovers(rc) else []
    details = {
        "findings": [f.model_dump() for f in findings],
        "notified": sent,
        "recovered": recovered,
    }
    return report.model_copy(update={"details": {**report.details, **details}})
