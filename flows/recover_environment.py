"""recover-environment: repair what a killed reload-production-db left behind."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from config import ConfigError
from fabflows import audit
from fabflows.errors import BadInput
from fabflows.lock import environment_lock
from fabflows.report import artifact_key, publish_markdown
from fabflows.runbook import load_context
from fabflows.upgrade_mode import current_run, ssh_options
from flows.reload_production_db import (
    RecoveryPlan,
    apply_recovery,
    gather_target_state,
    recovery_for,
)
from tasks.ssh.connection import ConnectionPool

FLOW_NAME = "recover-environment"


class RecoverReport(BaseModel):
    """What recover-environment found and repaired."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    dry_run: bool
    found: RecoveryPlan
    repaired: list[str] = Field(default_factory=list)
    left: RecoveryPlan | None = Field(default=None, description="What a second look still finds.")

    def render_text(self) -> str:
        if not self.found.needed:
            return f"{self.environment}: nothing left behind by a dead reload"
        lines = [f"{self.environment}: a dead reload left:"] + [
            f"  - {x}" for x in self.found.lines()
        ]
        if self.dry_run:
            lines.append("dry run: nothing repaired (run with --apply)")
        else:
            lines.append("repaired: " + ("; ".join(self.repaired) or "nothing"))
            if self.left is not None and self.left.needed:
                lines.append("STILL LEFT: " + "; ".join(self.left.lines()))
        return "\n".join(lines)


@flow(name=FLOW_NAME, log_prints=False)
def recover_environment(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
) -> RecoverReport:
    """Repair the leftovers of a reload-production-db run that died (SIGKILL, lost worker, crash).

    **When to run:** after a reload run was killed and before using the environment; the next
    reload-production-db run does the same repairs first on its own.

    **What it repairs** (found on the systems themselves, not in the dead process's memory):
    a copy still running on the target database server (killed) and its side database (dropped);
    a live database swapped in whose migrations never finished (the previous one put back); one
    whose migrations finished (kept, marker cleared); a live database refusing connections
    (allowed again); app servers whose app a reload stopped (started again); upgrade mode left on
    by a reload run (ended: pages off, exactly the recorded autoscaling processes resumed).
    Upgrade mode held by begin-upgrade or another flow is left alone (see end-upgrade).

    **Blast radius:** the environment's database server, web and worker servers and web
    autoscaling group; only what a dead reload left is touched.

    **Dry run** (the default) shows what would be repaired.

    Args:
        environment: The environment a reload was running on (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show what would be repaired (default). Set false (CLI --apply) to repair.
    """
    logger = get_run_logger()
    try:
        ctx = load_context(environment, deployment, config)
    except ConfigError as exc:
        raise BadInput(str(exc)) from None
    env = ctx.env
    audit.record_start(env)
    run, _ = current_run()
    with environment_lock(env, ctx.config), ConnectionPool(ssh_options(ctx)) as pool:
        target, target_db, web, workers, app, upgrade = gather_target_state(ctx, pool)
        found = recovery_for(ctx, target_db, app, upgrade, run)
        report = RecoverReport(environment=env.label, dry_run=dry_run, found=found)
        if found.needed and not dry_run:
            repaired = apply_recovery(
                ctx, pool, target, env.database_name, found, web + workers, dry_run=False
            )
            _, target_db, _, _, app, upgrade = gather_target_state(ctx, pool)
            left = recovery_for(ctx, target_db, app, upgrade, run)
            report = report.model_copy(update={"repaired": repaired, "left": left})
        publish_markdown(
            artifact_key("recover-environment", env.deployment, env.environment),
            "```\n" + report.render_text() + "\n```",
            f"Recovery of {env.label}",
        )
        logger.info("%s", report.render_text())
        if report.left is not None and report.left.needed:
            raise RuntimeError(
                f"{env.label}: still left after recovery: {'; '.join(report.left.lines())}"
            )
        return report
