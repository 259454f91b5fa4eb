"""end-upgrade: take an environment out of upgrade mode; safe to run at any time."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict

from fabflows import audit
from fabflows.lock import environment_lock
from fabflows.report import artifact_key, markdown_table, publish_markdown
from fabflows.runbook import load_context
from fabflows.upgrade_mode import (
    BEGIN_UPGRADE,
    UpgradeModeBusy,
    UpgradeModeNotEnded,
    UpgradeModeOff,
    UpgradeStatus,
    current_run,
    gather_upgrade_status,
    holder_alive,
    ssh_options,
    turn_off,
)
from tasks.ssh.connection import ConnectionPool

FLOW_NAME = "end-upgrade"


class EndUpgradeReport(BaseModel):
    """The outcome of end-upgrade."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    dry_run: bool
    outcome: str
    before: UpgradeStatus
    off: UpgradeModeOff
    after: UpgradeStatus | None = None

    def render_text(self) -> str:
        out = [self.outcome, "", "before:", self.before.render_text()]
        if self.off.pages:
            out += ["", self.off.pages.summary()]
        if self.off.processes:
            out += [self.off.processes.summary]
        out += [c.describe() for c in self.off.checks]
        if self.after:
            out += ["", "after:", self.after.render_text()]
        return "\n".join(out)


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


@flow(name=FLOW_NAME, log_prints=False)
def end_upgrade(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    force: bool = False,
) -> EndUpgradeReport:
    """Take the site out of upgrade mode and restore the web autoscaling group exactly.

    **Purpose:** the original's `end_upgrade`, and the recovery for any run that left upgrade mode
    on (killed, crashed, lost worker). In order: remove the 503 page, then the health-check
    override, then fabflows' marker from nginx's document root on every web server listed now
    (including any launched during the window); resume exactly the autoscaling processes fabflows
    recorded as suspended by it (processes suspended by anyone else stay suspended) and drop the
    record; check from outside that every web server (and the site URL) answers 200.

    **When to run:** after begin-upgrade and the manual work; or whenever `upgrade-status` shows
    upgrade mode left on by a run that is gone. Safe at any time: what is already off is left as is.

    **Refuses** while the run that holds upgrade mode is still alive (it ends it itself); a holder
    that ran on this machine and whose process is gone, or whose Prefect run is over, is dead. A
    run killed on another machine may still look alive: then pass `force`.

    **Blast radius:** the site serves users again; the autoscaling group may launch, replace and
    terminate instances again.

    **Dry run** (default): shows the state (from the hosts and the group's record) and what would
    be removed and resumed.

    Args:
        environment: Environment to take out of upgrade mode (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show what would be done (default). Pass false (CLI: --apply) to do it.
        force: End upgrade mode even if the run holding it may still be alive.
    """
    logger = get_run_logger()
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    starter = audit.record_start(env)
    key = artifact_key(FLOW_NAME, env.deployment, env.environment)
    with ConnectionPool(ssh_options(ctx)) as pool:
        before = gather_upgrade_status(ctx, pool)
        publish_markdown(key + "-before", before.render_markdown(), f"Upgrade mode on {env.label}")
        note = check_holder(before, force)
        logger.info("%s: %s", env.label, note)
        if dry_run:
            off = turn_off(ctx, pool, dry_run=True)
            plan_md = _render(before, off, note)
            publish_markdown(key + "-plan", plan_md, f"end-upgrade plan for {env.label}")
            outcome = f"dry run: {note}"
            audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, starter=starter)
            return EndUpgradeReport(
                environment=env.label, dry_run=True, outcome=outcome, before=before, off=off
            )
        with environment_lock(env, ctx.config):
            off = turn_off(ctx, pool, dry_run=False)
            after = gather_upgrade_status(ctx, pool)
    plan_md = _render(before, off, note)
    publish_markdown(key + "-after", after.render_markdown(), f"Upgrade mode on {env.label}")
    if off.problems:
        outcome = f"{env.label}: upgrade mode NOT fully ended: " + "; ".join(off.problems)
        audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, starter=starter)
        raise UpgradeModeNotEnded(outcome)
    outcome = f"{env.label}: out of upgrade mode ({note}); " + after.describe()
    audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, starter=starter)
    logger.info("%s", outcome)
    return EndUpgradeReport(
        environment=env.label, dry_run=False, outcome=outcome, before=before, off=off, after=after
    )


def _render(before: UpgradeStatus, off: UpgradeModeOff, note: str) -> str:
    lines = [f"# end-upgrade on {before.environment}", "", f"**Now:** {before.describe()}", ""]
    lines += [f"**Decision:** {note}", ""]
    if off.processes:
        lines += [f"- autoscaling: {off.processes.summary}"]
    if off.pages:
        lines += ["", markdown_table(off.pages.rows())]
    lines += [f"- **problem:** {p}" for p in off.problems]
    return "\n".join(lines)
