"""start-environment: bring a stopped environment back, in order, and prove the site answers."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import SecretStr

from config.models import EnvironmentSettings
from fabflows import audit, lock
from fabflows.errors import BadInput
from fabflows.report import artifact_key, publish_markdown
from fabflows.runbook import RunContext, load_context
from flows.environment_power import (
    PowerReport,
    clear_records,
    gather_start_plan,
    power_up,
    render_plan,
    stopped_capacity,
)
from tasks.aws.ec2 import describe_servers
from tasks.aws.ec2_writes import describe_launch_template_type
from tasks.aws.pricing import compute_savings, price_table
from tasks.http.probe import check_site_up
from tasks.plan import StepResult
from tasks.ssh.connection import SshOptions

FLOW_NAME = "start-environment"


def load_passphrase(ctx: RunContext) -> SecretStr | None:
    """The LUKS passphrase from its Secret block (only when fs_encrypt is on and a block is set)."""
    settings = ctx.config.fabflows.environments.get(ctx.env.environment)
    if (
        not ctx.config.instance_settings.fs_encrypt
        or not settings
        or not settings.luks_passphrase_block
    ):
        return None
    from prefect.blocks.system import Secret

    value = Secret.load(settings.luks_passphrase_block).get()
    return SecretStr(str(value))


@flow(name=FLOW_NAME, log_prints=False)
def start_environment(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
) -> PowerReport:
    """Start an environment stopped by stop-environment (or by hand), role by role, and restore
    the web group's recorded sizes; then check that every web server and the site answer 200.

    **When to run:** on a schedule before working hours (the deployments issue adds schedules), or
    by hand; also to finish or undo a stop-environment run that was killed. Safe unattended and
    twice in a row: running servers are only checked, and restored sizes are left alone.

    **Order (the reverse of a stop):** the cache server (started, or launched again from
    `cache_launch_template` at its recorded address with terminate-and-recreate), the primary, the
    replicas, the workers, servers outside the group. For each role: StartInstances, wait until
    running, wait until SSH answers with the known host key, then bring it into service (the
    original's `mount_encrypted`): with `instance_settings.fs_encrypt`, unlock the data volume with
    `cryptsetup luksOpen --key-file=-` (the passphrase from the Secret block named by
    `luks_passphrase_block`, written to stdin, never on a command line), mount it
    (`/mount-deferred.sh`) and `swapon -a`; then start the role's services
    (`fabflows.stop_start.role_services`: PostgreSQL, RabbitMQ/Redis/memcached, pgbouncer and celery)
    where they are not running. Then the group's recorded min/desired/max are set back and its
    instances waited for; every web server must answer 200 (users and health check), and the site
    URL too when one is configured. Records are removed only after that.

    A cache launched again (terminate-and-recreate) gets its recorded private address back (EC2
    releases it when the old instance terminates; if something else took it, the launch fails
    with `InvalidIPAddress.InUse` and the record stays for the next run). It comes up with a new
    SSH host key and empty queues and caches, and is not logged into: add its key to known_hosts.

    **Blast radius:** starts every stopped server of the environment; costs resume.

    **Dry run shows:** each server and its action, the group's sizes now and as recorded, and the
    saving so far (hours stopped x on-demand price, `fabflows.prices` over built-in defaults).

    **Rollback:** none needed: nothing is taken down. A failed step fails the run with the step
    named; running it again continues from where the environment is.

    **Report:** the savings table (hours stopped x price per instance type) as an artifact.

    Args:
        environment: Environment to start (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Untick to apply.
    """
    logger = get_run_logger()
    started = time.monotonic()
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    cfg = ctx.config
    settings = cfg.fabflows.environments.get(env.environment) or EnvironmentSettings()
    audit.record_start(env)
    opts = SshOptions.from_settings(cfg.fabflows.ssh, env.deploy_user)

    group, plan = gather_start_plan(ctx, settings)
    web_type = None
    if group is not None and group.launch_template:
        web_type = describe_launch_template_type(
            ctx.creds, group.launch_template, group.launch_template_version
        )
    web_type = web_type or env.instance_types.get("web")
    prices = price_table(cfg.fabflows.prices)
    now = datetime.now(UTC)
    savings = compute_savings(stopped_capacity(plan, now, web_type), prices)
    plan_md = render_plan(plan, f"start-environment: {env.label}")
    if savings.rows:
        plan_md += "\n\n## Saved while stopped\n\n" + savings.markdown()
    key = artifact_key(FLOW_NAME, env.deployment, env.environment)
    publish_markdown(key + "-plan", plan_md, f"Start plan for {env.label}")
    if plan.problems:
        raise BadInput("; ".join(plan.problems))

    def report(outcome: str, **kw) -> PowerReport:
        audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, flow_name=FLOW_NAME)
        return PowerReport(
            deployment=env.deployment,
            environment=env.environment,
            dry_run=dry_run,
            outcome=outcome,
            plan=plan,
            seconds=round(time.monotonic() - started, 2),
            **kw,
        )

    if dry_run:
        return report(
            "dry run: "
            + (
                "would start the environment"
                if plan.changed
                else "already running (servers would be checked)"
            ),
            savings=savings if savings.rows else None,
        )
    passphrase = load_passphrase(ctx)
    log: list[StepResult] = []
    with lock.environment_lock(env, ctx.config):
        ids = power_up(ctx, plan, opts=opts, passphrase=passphrase, log=log)
        web = describe_servers(
            ctx.creds, env.deployment, env.environment, roles=["web"], states=("running",)
        )
        if (
            group is not None
            and plan.group
            and plan.group.recorded
            and plan.group.recorded.desired
            and not web
        ):
            raise RuntimeError(f"{env.label}: the group's instances are InService but none runs")
        upgrade = cfg.fabflows.upgrade
        urls = [
            upgrade.web_server_url.format(address=s.address(env.address_attribute)) for s in web
        ]
        checks = check_site_up(
            urls,
            upgrade.healthcheck_path,
            site_url=env.site_url,
            timeout=cfg.fabflows.stop_start.site_wait_seconds,
        )
        clear_records(ctx, plan, ids, log)
    if savings.rows:
        publish_markdown(
            key + "-savings",
            "# Saved while stopped\n\n" + savings.markdown(),
            f"Savings of the stop of {env.label}",
        )
    outcome = "started" if plan.changed else "already running: checked"
    logger.info("%s %s: %s", env.label, outcome, "; ".join(s.summary for s in log))
    if not env.site_url:
        logger.warning("no site URL configured: checked each web server directly")
    return report(outcome, steps=log, site_checks=checks, savings=savings if savings.rows else None)
