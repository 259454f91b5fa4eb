"""begin-upgrade: put an environment in upgrade mode until end-upgrade."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows.procedures.upgrade_steps import ON_STEP, mode_on, mode_undo
from fabflows.procedures.upgrade_window import (
    BEGIN_UPGRADE,
    UpgradeStatus,
    WindowDecision,
    enter_decision,
    gather_upgrade_status,
    load_upgrade_pages,
)
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from fabflows.runtime.plan import Change, RunbookPlan

FLOW_NAME = BEGIN_UPGRADE


class BeginUpgradeParams(BaseModel):
    """begin-upgrade has no options of its own (the common ones are the engine's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class BeginUpgradeFacts:
    decision: WindowDecision
    status: UpgradeStatus
    to_suspend: list[str]
    page_source: str


class BeginUpgradePlan(RunbookPlan):
    """What begin-upgrade turns on: the group's processes and the page on each web server."""

    mode: str = Field(description="fresh, recovered (took over a dead run's), joined (already on).")
    reason: str
    page_source: str
    web_servers: list[str] = Field(default_factory=list)


def plan_begin_upgrade(facts: BeginUpgradeFacts, env: EnvironmentConfig) -> BeginUpgradePlan:
    """Pure: a change for what is not in upgrade mode yet (processes, pages); noops for the rest."""
    status = facts.status
    changes: list[Change] = []
    noops: list[str] = []
    group = status.auto_scaling_group
    if group and facts.to_suspend:
        changes.append(
            Change(
                target=group,
                action="suspend " + ", ".join(facts.to_suspend),
                detail="recorded on the group first; end-upgrade resumes exactly these",
                step=ON_STEP,
            )
        )
    elif group:
        noops.append(f"{group}: processes already suspended")
    for h in status.hosts:
        target = f"{h.host} ({h.address})"
        if h.reachable and h.page:
            noops.append(f"{target}: page already on")
        else:
            detail = "unreachable: " + h.error if not h.reachable else "users get 503"
            changes.append(Change(target=target, action="page on", detail=detail, step=ON_STEP))
    return BeginUpgradePlan(
        title=f"{FLOW_NAME} on {env.label}",
        environment=env.label,
        changes=changes,
        noops=noops,
        notes=[
            f"mode: {facts.decision.mode} ({facts.decision.reason})",
            f"page: {facts.page_source}",
            "the site stays down (503) until end-upgrade",
        ]
        + [f"not running (not switched): {', '.join(status.not_running)}"]
        * bool(status.not_running),
        mode=facts.decision.mode,
        reason=facts.decision.reason,
        page_source=facts.page_source,
        web_servers=[h.host for h in status.hosts],
    )


class BeginUpgrade(Runbook[BeginUpgradeParams, BeginUpgradeFacts, BeginUpgradePlan]):
    name = FLOW_NAME
    Params = BeginUpgradeParams
    plan_type = BeginUpgradePlan
    may_take_site_down = True

    def validate(self, rc, params: BeginUpgradeParams) -> None:  # noqa: ANN001
        load_upgrade_pages(rc.config, rc.config_path)  # a missing page file is bad input

    def gather(self, scope: Scope, params: BeginUpgradeParams) -> BeginUpgradeFacts:
        decision, status = enter_decision(scope.rc, scope.pool, flow=FLOW_NAME)
        wanted = list(scope.rc.config.fabflows.upgrade.suspend_processes)
        to_suspend = [p for p in wanted if p not in status.suspended_processes]
        pages = load_upgrade_pages(scope.rc.config, scope.rc.config_path)
        return BeginUpgradeFacts(decision, status, to_suspend, pages.page_source)

    def plan(
        self, facts: BeginUpgradeFacts, params: BeginUpgradeParams, env: EnvironmentConfig
    ) -> BeginUpgradePlan:
        return plan_begin_upgrade(facts, env)

    def steps(self, plan: BeginUpgradePlan, params: BeginUpgradeParams) -> list[Step]:
        def on(scope: Scope) -> dict:
            data = mode_on(scope, FLOW_NAME, scope.rc.config_path)
            scope.details["Mode"] = data["mode"]
            return data

        return [Step(ON_STEP, on, mode_undo, site_down=True)]

    def verify(self, scope: Scope, plan: BeginUpgradePlan, params: BeginUpgradeParams) -> list[str]:
        after = gather_upgrade_status(scope.rc, scope.pool)
        scope.details["Upgrade mode"] = after.describe()
        off = [f"{h.host} ({h.address})" for h in after.hosts if not h.in_upgrade_mode]
        return [f"not in upgrade mode: {', '.join(off)}"] if off else []


RUNBOOK = BeginUpgrade()


@flow(name=FLOW_NAME, log_prints=False)
def begin_upgrade(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    window_override_reason: str | None = None,
) -> RunbookReport:
    """Put the site in upgrade mode: users get the 503 page until end-upgrade.

    **Purpose:** the original's `begin_upgrade`, made safe. One step, `upgrade-mode-on`: suspend the
    web autoscaling group's processes that add, replace or remove instances
    (`fabflows.upgrade.suspend_processes`; those already suspended are left out of the record, so
    end-upgrade resumes exactly what this suspended), recorded on the group (`fabflows:upgrade-mode*`
    tags) *before* suspending; list the web servers again; write the health-check override, then
    the 503 page, into nginx's document root (`<home>/services/nginx/html`) on every running web
    server, with a marker naming this run; check from outside that every web server (and the site
    URL, if configured) answers users 503 with the page and the health check 200 (load balancers
    keep the servers in service). The engine's gates apply: the maintenance window, approval in
    protected environments, the environment's lock (the plan is made again under it), the journal
    and the run summary.

    **When to run:** before manual maintenance that needs the site down; then end-upgrade.
    Runbooks with a window of their own (upgrade-packages, reload-production-db) do this
    themselves and do not need it; if begin-upgrade was run first, they join its upgrade mode and
    leave it on. Running it again when everything is already on changes nothing.

    **Blast radius:** the whole site shows the maintenance page. The web autoscaling group stops
    launching, replacing and terminating instances until end-upgrade.

    **Dry run** (default): reads the group and every web server and shows the plan: what would be
    suspended, which servers would get the page, and how it enters (fresh, taking over a dead
    run's upgrade mode, or joining one already begun).

    **Rolls back:** if any web server cannot be switched or the check fails, upgrade mode is
    turned off again at once (pages removed, recorded processes resumed). A run killed half-way is
    journaled: `fabflows recover` (recover-environment) turns upgrade mode off again; end-upgrade
    does too.

    Args:
        environment: Environment to put in upgrade mode (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show what would be done (default). Pass false (CLI: --apply) to do it.
        window_override_reason: Start outside the environment's maintenance window anyway; why.
    """
    return execute(RUNBOOK, locals())
