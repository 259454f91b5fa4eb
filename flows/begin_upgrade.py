"""begin-upgrade: put an environment in upgrade mode until end-upgrade."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from fabflows import audit, guard
from fabflows.lock import environment_lock
from fabflows.report import artifact_key, markdown_table, publish_markdown
from fabflows.runbook import load_context
from fabflows.upgrade_mode import (
    BEGIN_UPGRADE,
    UpgradeModeOn,
    UpgradeStatus,
    enter_decision,
    gather_upgrade_status,
    load_upgrade_pages,
    ssh_options,
    turn_off,
    turn_on,
)
from tasks.ssh.connection import ConnectionPool

FLOW_NAME = BEGIN_UPGRADE


class BeginUpgradeReport(BaseModel):
    """The outcome of begin-upgrade."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    dry_run: bool
    outcome: str
    mode: str = Field(description="fresh, recovered (took over a dead run's), joined (already on).")
    before: UpgradeStatus
    on: UpgradeModeOn
    after: UpgradeStatus | None = None

    def render_text(self) -> str:
        out = [self.outcome, "", self.before.render_text()]
        if self.on.processes:
            out += ["", self.on.processes.summary]
        out += ["", self.on.pages.summary()]
        if self.after:
            out += ["", "after:", self.after.render_text()]
        return "\n".join(out)


def render_plan(
    report_on: UpgradeModeOn, before: UpgradeStatus, note: str, page_source: str
) -> str:
    lines = [
        f"# begin-upgrade on {before.environment}",
        "",
        f"**Now:** {before.describe()}",
        "",
        f"**Decision:** {note}",
        "",
        f"- page: {page_source}",
    ]
    if report_on.processes:
        lines.append(f"- autoscaling: {report_on.processes.summary}")
    lines += ["", markdown_table(report_on.pages.rows())]
    return "\n".join(lines)


@flow(name=FLOW_NAME, log_prints=False)
def begin_upgrade(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    window_override_reason: str | None = None,
) -> BeginUpgradeReport:
    """Put the site in upgrade mode: users get the 503 page until end-upgrade.

    **Purpose:** the original's `begin_upgrade`, made safe. In order: suspend the web autoscaling
    group's processes that add, replace or remove instances (`fabflows.upgrade.suspend_processes`;
    those already suspended are left out of the record, so end-upgrade resumes exactly what this
    suspended), recorded on the group (`fabflows:upgrade-mode*` tags) *before* suspending; list the
    web servers again; write the health-check override, then the 503 page, into nginx's document
    root (`<home>/services/nginx/html`) on every running web server, with a marker naming this run;
    check from outside that every web server (and the site URL, if configured) answers users 503
    with the page and the health check 200 (load balancers keep the servers in service).

    **When to run:** before manual maintenance that needs the site down; then end-upgrade.
    Runbooks with a window of their own (upgrade-packages, reload-production-db) do this
    themselves and do not need it; if begin-upgrade was run first, they join its upgrade mode and
    leave it on.

    **Blast radius:** the whole site shows the maintenance page. The web autoscaling group stops
    launching, replacing and terminating instances until end-upgrade.

    **Dry run** (default): reads the group and every web server and shows what would be written.

    **Rolls back:** if any web server cannot be switched or the check fails, upgrade mode is
    turned off again (pages removed, recorded processes resumed). Running it again is harmless.
    A run killed half-way leaves the record: end-upgrade (or the next begin-upgrade) finds it.

    Args:
        environment: Environment to put in upgrade mode (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show what would be done (default). Pass false (CLI: --apply) to do it.
        window_override_reason: Start outside the environment's maintenance window anyway; why.
    """
    logger = get_run_logger()
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    pages = load_upgrade_pages(ctx.config, config)
    starter = audit.record_start(env)
    key = artifact_key(FLOW_NAME, env.deployment, env.environment)
    with ConnectionPool(ssh_options(ctx)) as pool:
        if dry_run:
            decision, before = enter_decision(ctx, pool, flow=FLOW_NAME)
            on = turn_on(ctx, pool, pages, decision.record, dry_run=True)
            plan_md = render_plan(on, before, decision.reason, pages.page_source)
            publish_markdown(key + "-plan", plan_md, f"begin-upgrade plan for {env.label}")
            outcome = f"dry run: {decision.reason}; {on.pages.summary()}"
            audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, starter=starter)
            return BeginUpgradeReport(
                environment=env.label,
                dry_run=True,
                outcome=outcome,
                mode=decision.mode,
                before=before,
                on=on,
            )
        guard.require_window(env, override_reason=window_override_reason, flow_name=FLOW_NAME)
        with environment_lock(env, ctx.config):
            decision, before = enter_decision(ctx, pool, flow=FLOW_NAME)
            logger.info("%s: %s", env.label, decision.reason)
            try:
                on = turn_on(ctx, pool, pages, decision.record, dry_run=False)
            except BaseException:
                if decision.mode != "joined":
                    logger.error("%s: begin-upgrade failed; turning upgrade mode off", env.label)
                    turn_off(ctx, pool, dry_run=False)
                raise
            after = gather_upgrade_status(ctx, pool)
    plan_md = render_plan(on, before, decision.reason, pages.page_source)
    outcome = f"{env.label} in upgrade mode: " + after.describe()
    publish_markdown(key + "-status", after.render_markdown(), f"Upgrade mode on {env.label}")
    audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, starter=starter)
    logger.info("%s", outcome)
    return BeginUpgradeReport(
        environment=env.label,
        dry_run=False,
        outcome=outcome,
        mode=decision.mode,
        before=before,
        on=on,
        after=after,
    )
