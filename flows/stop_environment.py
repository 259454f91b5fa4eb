"""stop-environment: stop an environment off-hours, in order, remembering what to bring back."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from prefect import flow
from prefect.logging import get_run_logger

from config.models import EnvironmentSettings
from fabflows import audit, guard, lock
from fabflows.errors import BadInput, Refused
from fabflows.report import artifact_key, publish_markdown
from fabflows.runbook import load_context
from flows.environment_power import (
    PowerReport,
    clear_records,
    gather_start_plan,
    hourly_cost,
    plan_stop_environment,
    power_down,
    power_up,
    render_plan,
    run_id,
    servers_and_group,
)
from tasks.aws.ec2_writes import RunRecord, describe_instance_subnet, describe_launch_template_type
from tasks.aws.pricing import price_table
from tasks.plan import StepResult
from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import FleetHost, RateControl, run_fleet
from tasks.ssh.mount import broker_queues_step

FLOW_NAME = "stop-environment"


@flow(name=FLOW_NAME, log_prints=False)
def stop_environment(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    drop_queued_messages: bool = False,
    window_override_reason: str | None = None,
) -> PowerReport:
    """Stop an environment (nights, weekends): web group to zero, then workers, replicas, primary,
    cache, with the group's sizes recorded so start-environment restores them exactly.

    **When to run:** on a schedule off-hours (the deployments issue adds the schedules), or by
    hand. Safe unattended and safe to run twice: an environment already stopped is a no-op, and a
    run killed half-way is finished by the next stop or undone by start-environment.

    **Refused:** protected environments (production by default) unless
    `fabflows.environments.<env>.allow_stop` is true (that setting is the standing approval, so
    scheduled runs never wait for a person); outside the maintenance window unless an override
    reason is given; a cache termination that would drop queued messages (see below).

    **Order:** 1. record min/desired/max on the web autoscaling group (tag
    `fabflows:stopped-sizes`, before any change), scale it to 0/0/0 and wait until its instances are
    gone; 2. stop the workers' background services (`<env>-celery`) so nothing runs against the
    databases; 3. stop the workers, 4. the replicas, 5. the primary, each waited for until stopped
    and tagged `fabflows:stopped` (who, when) before the stop; 6. the cache server:
    - `cache_strategy: stop` (default): stopped like the others. Right in a VPC: a stopped instance
      keeps its private address, so RabbitMQ (node named after the host), Redis and memcached
      clients reconnect to the same place.
    - `cache_strategy: terminate-and-recreate`: the original's procedure, for brokers reached at an
      address a stop changes (EC2-Classic, public DNS names). Its location (private IP, subnet,
      type) is recorded on the group, then it is terminated; start-environment launches a new one
      from `cache_launch_template` there. Its queues are read first: queued messages refuse the
      run unless `drop_queued_messages`; Redis sessions and Celery results are lost either way.

    **Blast radius:** the whole environment is down until start-environment. EBS volumes (and
    their data) stay; only a terminated cache loses its own state.

    **Dry run shows:** each server, its state and the action, the group's sizes, queued messages,
    and what the stopped capacity costs per hour (the saving).

    **Rollback:** if any step fails, the environment is brought back up (start-environment's
    sequence, from the records) before the run fails.

    Args:
        environment: Environment to stop (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Untick to apply.
        drop_queued_messages: With cache_strategy terminate-and-recreate: terminate the cache even
            though messages are queued (they are lost).
        window_override_reason: Run outside the maintenance window, for this recorded reason.
    """
    logger = get_run_logger()
    started = time.monotonic()
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    settings = ctx.config.fabflows.environments.get(env.environment) or EnvironmentSettings()
    if env.protected and not env.allow_stop:
        raise Refused(
            f"{env.label} is protected; stopping it needs "
            f"fabflows.environments.{env.environment}.allow_stop: true in the config"
        )
    audit.record_start(env)
    try:
        guard.require_window(env, override_reason=window_override_reason, flow_name=FLOW_NAME)
    except guard.OutsideWindow as exc:
        return exc.as_state()
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    opts = SshOptions.from_settings(ctx.config.fabflows.ssh, env.deploy_user)

    servers, group = servers_and_group(ctx)
    queued = None
    cache_subnet = None
    caches = [s for s in servers if s.role == "cache"]
    if settings.cache_strategy == "terminate-and-recreate" and caches:
        cache_subnet = describe_instance_subnet(ctx.creds, caches[0].instance_id)
        running = [s for s in caches if s.state == "running"]
        if running:
            hosts = [
                FleetHost(
                    name=s.name or s.instance_id,
                    address=s.address(env.address_attribute),
                    role="cache",
                    instance_id=s.instance_id,
                )
                for s in running
            ]
            with ConnectionPool(opts) as pool:
                result = run_fleet(
                    hosts,
                    broker_queues_step(f"{env.project}_{env.environment}"),
                    pool=pool,
                    rate=RateControl(max_concurrency="100%", max_errors=0),
                    dry_run=True,
                    name="read-broker-queues",
                )
            result.raise_for_errors()
            outputs = [r.output for r in result.results if r.output is not None]
            queued = {q: n for out in outputs for q, n in out.items()} if outputs else None
    plan = plan_stop_environment(
        env.label,
        servers,
        group,
        group_configured=env.auto_scaling_group,
        cache_strategy=settings.cache_strategy,
        queued_messages=queued,
        drop_queued_messages=drop_queued_messages,
        cache_subnet_id=cache_subnet,
        address_attribute=env.address_attribute,
        now=datetime.now(UTC),
    )
    web_type = None
    if group is not None and group.launch_template:
        web_type = describe_launch_template_type(
            ctx.creds, group.launch_template, group.launch_template_version
        )
    web_type = web_type or env.instance_types.get("web")
    per_hour = hourly_cost(plan, price_table(ctx.config.fabflows.prices), web_type)
    plan_md = render_plan(plan, f"stop-environment: {env.label}")
    plan_md += f"\n\nWhile stopped this saves about **${per_hour:.3f} per hour** (on-demand)."
    key = artifact_key(FLOW_NAME, env.deployment, env.environment)
    publish_markdown(key + "-plan", plan_md, f"Stop plan for {env.label}")
    if plan.problems:
        raise BadInput("; ".join(plan.problems))

    def report(outcome: str, steps: list[StepResult] | None = None) -> PowerReport:
        audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, flow_name=FLOW_NAME)
        return PowerReport(
            deployment=env.deployment,
            environment=env.environment,
            dry_run=dry_run,
            outcome=outcome,
            plan=plan,
            steps=steps or [],
            usd_per_hour_stopped=per_hour,
            seconds=round(time.monotonic() - started, 2),
        )

    if dry_run:
        return report(
            "dry run: " + ("would stop the environment" if plan.changed else "already stopped")
        )
    if not plan.changed:
        return report("already stopped: nothing to do")

    record = RunRecord(run=run_id(), flow=FLOW_NAME, since=datetime.now(UTC))
    log: list[StepResult] = []
    with lock.environment_lock(env, ctx.config):
        try:
            power_down(ctx, plan, opts=opts, record=record, log=log)
        except BaseException as exc:
            logger.error("stop failed (%s): bringing %s back up from the records", exc, env.label)
            try:
                _, undo = gather_start_plan(ctx, settings)
                from flows.start_environment import load_passphrase

                undo_log: list[StepResult] = []
                ids = power_up(ctx, undo, opts=opts, passphrase=load_passphrase(ctx), log=undo_log)
                clear_records(ctx, undo, ids, undo_log)
                logger.warning(
                    "%s is back up: %s", env.label, "; ".join(s.summary for s in undo_log)
                )
            except Exception as undo_exc:
                raise RuntimeError(
                    f"stop-environment failed ({exc}) and bringing {env.label} back up failed too "
                    f"({undo_exc}): run start-environment (the records are on the group and the "
                    "instances)"
                ) from exc
            report(f"failed and rolled back: {exc}", log)
            raise
    logger.info("%s stopped: %s", env.label, "; ".join(s.summary for s in log))
    return report("stopped", log)
