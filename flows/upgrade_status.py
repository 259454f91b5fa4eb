"""upgrade-status: is the environment in upgrade mode, on which web servers, since when, by whom."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict

from config import EnvironmentConfig
from fabflows.report import artifact_key, publish_markdown, publish_table
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, execute
from fabflows.runtime.plan import RunbookPlan
from fabflows.upgrade_mode import UpgradeStatus, gather_upgrade_status, holder_alive, judge_holder

FLOW_NAME = "upgrade-status"


class UpgradeStatusParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class UpgradeStatusFacts:
    status: UpgradeStatus
    holder_alive: bool | None


class UpgradeStatusPlan(RunbookPlan):
    """Nothing to change: the plan of a read-only runbook is what it read."""

    status: UpgradeStatus
    warn: bool = False
    """The holder should have turned upgrade mode off (begin-upgrade's holds it on purpose)."""

    def render_markdown(self) -> str:
        return self.status.render_markdown()

    def render_text(self) -> str:
        return self.status.describe()


def plan_upgrade_status(facts: UpgradeStatusFacts, env: EnvironmentConfig) -> UpgradeStatusPlan:
    """Pure: the status, with what to say about the run holding upgrade mode."""
    status, warn = facts.status, False
    if status.holder is not None:
        warn, said = judge_holder(status.holder, facts.holder_alive)
        status = status.model_copy(update={"holder_state": said})
    return UpgradeStatusPlan(
        title=f"{FLOW_NAME} on {env.label}", environment=env.label, status=status, warn=warn
    )


class UpgradeStatusRunbook(Runbook[UpgradeStatusParams, UpgradeStatusFacts, UpgradeStatusPlan]):
    name = FLOW_NAME
    Params = UpgradeStatusParams
    plan_type = UpgradeStatusPlan
    read_only = True

    def gather(self, scope: Scope, params: UpgradeStatusParams) -> UpgradeStatusFacts:
        status = gather_upgrade_status(scope.rc, scope.pool)
        alive = holder_alive(status.holder) if status.holder is not None else None
        return UpgradeStatusFacts(status, alive)

    def plan(
        self, facts: UpgradeStatusFacts, params: UpgradeStatusParams, env: EnvironmentConfig
    ) -> UpgradeStatusPlan:
        return plan_upgrade_status(facts, env)

    def read_outcome(self, plan: UpgradeStatusPlan) -> str:
        return plan.status.describe().splitlines()[0]

    def read_result(
        self, scope: Scope, plan: UpgradeStatusPlan, report: RunbookReport
    ) -> UpgradeStatus:
        """The table and summary artifacts; a warning only for a holder that should have ended."""
        env, status = scope.env, plan.status
        key = artifact_key(FLOW_NAME, env.deployment, env.environment)
        publish_table(key, status.rows(), status.describe())
        publish_markdown(key + "-summary", status.render_markdown(), f"Upgrade mode on {env.label}")
        logger = get_run_logger()
        logger.info("%s", status.describe())
        if plan.warn:
            logger.warning("%s", status.holder_state)
        return status


RUNBOOK = UpgradeStatusRunbook()


@flow(name=FLOW_NAME, log_prints=False)
def upgrade_status(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
) -> UpgradeStatus:
    """Show whether the site is in upgrade mode: per web server, since when and by which run.

    **What it reads:** on every running web server, the 503 page, the health-check override and
    fabflows' marker (which run turned upgrade mode on, and when) from nginx's document root; on
    the web autoscaling group, fabflows' record (the holder and the processes it suspended) and
    the processes suspended now. Says whether the run holding upgrade mode is still alive, and warns
    only when that run should have turned upgrade mode off: after begin-upgrade, upgrade mode is
    held on purpose (its run has ended) until end-upgrade.

    **When to run:** any time; before end-upgrade to see what it would end.

    **Blast radius:** none (read-only).

    Args:
        environment: Environment to look at (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
    """
    return execute(RUNBOOK, locals())
