"""upgrade-status: is the environment in upgrade mode, on which web servers, since when, by whom."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from fabflows import audit
from fabflows.report import artifact_key, publish_markdown, publish_table
from fabflows.runbook import load_context
from fabflows.upgrade_mode import (
    UpgradeStatus,
    gather_upgrade_status,
    holder_alive,
    judge_holder,
    ssh_options,
)
from tasks.ssh.connection import ConnectionPool


@flow(name="upgrade-status", log_prints=False)
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
    logger = get_run_logger()
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    audit.record_start(env)
    with ConnectionPool(ssh_options(ctx)) as pool:
        status = gather_upgrade_status(ctx, pool)
    holder = status.holder
    warn = False
    if holder is not None:
        warn, said = judge_holder(holder, holder_alive(holder))
        status = status.model_copy(update={"holder_state": said})
    key = artifact_key("upgrade-status", env.deployment, env.environment)
    publish_table(key, status.rows(), status.describe())
    publish_markdown(key + "-summary", status.render_markdown(), f"Upgrade mode on {env.label}")
    logger.info("%s", status.describe())
    if warn:  # only a holder that should have turned upgrade mode off (not begin-upgrade's)
        logger.warning("%s", status.holder_state)
    return status
