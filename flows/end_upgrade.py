"""end-upgrade: take an environment out of upgrade mode; safe to run at any time."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows.procedures.upgrade_steps import OFF_STEP
from fabflows.procedures.upgrade_window import (
    BEGIN_UPGRADE,
    UpgradeModeBusy,
    UpgradeModeNotEnded,
    UpgradeStatus,
    current_run,
    gather_upgrade_status,
    holder_alive,
    turn_off,
)
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from fabflows.runtime.plan import Change, RunbookPlan

FLOW_NAME = "end-upgrade"


class EndUpgradeParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    force: bool = Field(
        default=False, description="End upgrade mode even if its holder may still be alive."
    )


@dataclass(frozen=True)
class EndUpgradeFacts:
    status: UpgradeStatus
    note: str


class EndUpgradePlan(RunbookPlan):
    """What end-upgrade removes and resumes (and it always checks the site answers 200)."""

    note: str = ""
    web_servers: list[str] = Field(default_factory=list)


def check_holder(before: UpgradeStatus, force: bool) -> str:
    """Refuse to end upgrade mode under a run that is still working in it (unless forced)."""
    holder = before.holder
    if holder is None:
        return "not in upgrade mode"
    if holder.flow == BEGIN_UPGRADE or holder.run == current_run()[0]:
        return f"ending upgrade mode begun by {holder.flow} run {holder.run}"
    alive = holder_alive(holder)
    if alive is False:
        return f"{holder.flow} run {holder.run} left upgrade mode on and is no longer running"
    if force:
        return f"FORCED: ending upgrade mode held by {holder.flow} run {holder.run} ({'alive' if alive else 'state unknown'})"
    state = "is still running" if alive else "may still be running (it ran on another machine)"
    raise UpgradeModeBusy(
        f"upgrade mode on {before.environment} is held by {holder.flow} run {holder.run} since "
        f"{holder.since:%Y-%m-%d %H:%M:%S}Z, which {state}: it ends upgrade mode itself when it "
        "finishes. If that run is dead, run end-upgrade with force."
    )


def plan_end_upgrade(facts: EndUpgradeFacts, env: EnvironmentConfig) -> EndUpgradePlan:
    """Pure: pages off where they are, the recorded processes resumed, and the check for 200."""
    status = facts.status
    changes: list[Change] = []
    for h in status.hosts:
        if h.page or h.record or h.healthcheck_override or not h.reachable:
            what = "page, health-check override and marker off"
            detail = "unreachable now: " + h.error if not h.reachable else ""
            changes.append(
                Change(target=f"{h.host} ({h.address})", action=what, detail=detail, step=OFF_STEP)
            )
    if status.recorded is not None and status.auto_scaling_group:
        changes.append(
            Change(
                target=status.auto_scaling_group,
                action="resume " + (", ".join(status.recorded.suspended) or "nothing"),
                detail="exactly what fabflows recorded as suspended by it; the record is dropped",
                step=OFF_STEP,
            )
        )
    changes.append(
        Change(
            target=env.label,
            action="check every web server (and the site URL) answers 200",
            step=OFF_STEP,
        )
    )
    return EndUpgradePlan(
        title=f"{FLOW_NAME} on {env.label}",
        environment=env.label,
        changes=changes,
        notes=[facts.note],
        note=facts.note,
        web_servers=[h.host for h in status.hosts],
    )


def end_upgrade_step(scope: Scope) -> dict:
    """Pages off everywhere, the recorded processes resumed, the site checked for 200."""
    off = turn_off(scope.rc, scope.pool, dry_run=False)
    if off.problems:
        raise UpgradeModeNotEnded(
            f"{scope.env.label}: upgrade mode NOT fully ended: " + "; ".join(off.problems)
        )
    pages = off.pages.summary() if off.pages else "no web server"
    resumed = off.processes.summary if off.processes else "no autoscaling group"
    return {
        "pages": [r.status for r in off.pages.results] if off.pages else [],
        "checks": [c.status for c in off.checks],
        "summary": f"{pages}; {resumed}",
    }


class EndUpgrade(Runbook[EndUpgradeParams, EndUpgradeFacts, EndUpgradePlan]):
    name = FLOW_NAME
    Params = EndUpgradeParams
    plan_type = EndUpgradePlan

    def gather(self, scope: Scope, params: EndUpgradeParams) -> EndUpgradeFacts:
        status = gather_upgrade_status(scope.rc, scope.pool)
        return EndUpgradeFacts(status, check_holder(status, params.force))

    def plan(
        self, facts: EndUpgradeFacts, params: EndUpgradeParams, env: EnvironmentConfig
    ) -> EndUpgradePlan:
        return plan_end_upgrade(facts, env)

    def steps(self, plan: EndUpgradePlan, params: EndUpgradeParams) -> list[Step]:
        return [
            Step(
                OFF_STEP,
                end_upgrade_step,
                no_undo="it ends upgrade mode (begin-upgrade puts it on again)",
            )
        ]

    def verify(self, scope: Scope, plan: EndUpgradePlan, params: EndUpgradeParams) -> list[str]:
        after = gather_upgrade_status(scope.rc, scope.pool)
        scope.details["Upgrade mode"] = after.describe()
        return [after.describe()] if after.in_upgrade_mode else []


RUNBOOK = EndUpgrade()


@flow(name=FLOW_NAME, log_prints=False)
def end_upgrade(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    force: bool = False,
    window_override_reason: str | None = None,
) -> RunbookReport:
    """Take the site out of upgrade mode and restore the web autoscaling group exactly.

    **Purpose:** the original's `end_upgrade`, and the recovery for any run that left upgrade mode
    on (killed, crashed, lost worker). One step, `upgrade-mode-off`: remove the 503 page, then the
    health-check override, then fabflows' marker from nginx's document root on every web server
    listed now (including any launched during the window); resume exactly the autoscaling
    processes fabflows recorded as suspended by it (processes suspended by anyone else stay
    suspended) and drop the record; check from outside that every web server (and the site URL)
    answers 200. The engine's gates apply (window in protected environments, lock, journal,
    summary).

    **When to run:** after begin-upgrade and the manual work; or whenever `upgrade-status` shows
    upgrade mode left on by a run that is gone (`fabflows recover` also ends upgrade mode a dead
    journaled run left on). Safe at any time: what is already off is left as is, and the site is
    checked.

    **Refuses** while the run that holds upgrade mode is still alive (it ends it itself); a holder
    that ran on this machine and whose process is gone, or whose Prefect run is over, is dead. A
    run killed on another machine may still look alive: then pass `force`.

    **Blast radius:** the site serves users again; the autoscaling group may launch, replace and
    terminate instances again.

    **Dry run** (default): shows the state (from the hosts and the group's record) and what would be
    removed and resumed.

    **Rolls back:** nothing to roll back (it ends maintenance state); a failure names what is still
    in upgrade mode, and running it again finishes it.

    Args:
        environment: Environment to take out of upgrade mode (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show what would be done (default). Pass false (CLI: --apply) to do it.
        force: End upgrade mode even if the run holding it may still be alive.
        window_override_reason: In a protected environment outside its maintenance window: why.
    """
    return execute(RUNBOOK, locals())
