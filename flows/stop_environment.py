"""stop-environment: stop an environment off-hours, in order, remembering what to bring back."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from config.models import EnvironmentSettings
from fabflows.errors import Refused
from fabflows.procedures.environment_power import (
    hourly_cost,
    plan_stop_environment,
    servers_and_group,
)
from fabflows.procedures.power_plans import StopPlan, stop_runbook_plan
from fabflows.procedures.power_steps import stop_steps, verify_stopped
from fabflows.runbook import RunContext
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from tasks.aws.autoscaling import AutoScalingGroup
from tasks.aws.ec2 import Server
from tasks.aws.ec2_writes import describe_instance_subnet, describe_launch_template_type
from tasks.aws.pricing import price_table
from tasks.ssh.fleet import FleetHost, RateControl, run_fleet
from tasks.ssh.mount import broker_queues_step

FLOW_NAME = "stop-environment"


class StopEnvironmentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    drop_queued_messages: bool = Field(
        default=False,
        description="terminate-and-recreate: terminate the cache even with messages queued.",
    )


class StopFacts(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    servers: list[Server]
    group: AutoScalingGroup | None
    queued: dict[str, int] | None = None
    cache_subnet: str | None = None
    web_type: str | None = None
    cache_strategy: str = "stop"
    prices: dict[str, float] = Field(default_factory=dict)


def _settings(rc: RunContext) -> EnvironmentSettings:
    return rc.config.fabflows.environments.get(rc.env.environment) or EnvironmentSettings()


def _queued_messages(scope: Scope, caches: list[Server]) -> dict[str, int] | None:
    """The broker's queues on the running cache servers (read only), None without RabbitMQ."""
    env = scope.env
    hosts = [
        FleetHost(
            name=s.name or s.instance_id,
            address=s.address(env.address_attribute),
            role="cache",
            instance_id=s.instance_id,
        )
        for s in caches
        if s.state == "running"
    ]
    if not hosts:
        return None
    result = run_fleet(
        hosts,
        broker_queues_step(f"{env.project}_{env.environment}"),
        pool=scope.pool,
        rate=RateControl(max_concurrency="100%", max_errors=0),
        dry_run=True,
        name="read-broker-queues",
    )
    result.raise_for_errors()
    outputs = [r.output for r in result.results if r.output is not None]
    return {q: n for out in outputs for q, n in out.items()} if outputs else None


class StopEnvironment(Runbook[StopEnvironmentParams, StopFacts, StopPlan]):
    name = FLOW_NAME
    Params = StopEnvironmentParams
    plan_type = StopPlan
    may_take_site_down = True

    def validate(self, rc: RunContext, params: StopEnvironmentParams) -> None:
        env = rc.env
        if env.protected and not env.allow_stop:
            raise Refused(
                f"{env.label} is protected; stopping it needs "
                f"fabflows.environments.{env.environment}.allow_stop: true in the config"
            )

    def gather(self, scope: Scope, params: StopEnvironmentParams) -> StopFacts:
        rc, env = scope.rc, scope.env
        servers, group = servers_and_group(rc)
        facts = StopFacts(
            servers=servers,
            group=group,
            cache_strategy=_settings(rc).cache_strategy,
            prices=price_table(rc.config.fabflows.prices),
        )
        caches = [s for s in servers if s.role == "cache"]
        if facts.cache_strategy == "terminate-and-recreate" and caches:
            facts.cache_subnet = describe_instance_subnet(rc.creds, caches[0].instance_id)
            facts.queued = _queued_messages(scope, caches)
        if group is not None and group.launch_template:
            facts.web_type = describe_launch_template_type(
                rc.creds, group.launch_template, group.launch_template_version
            )
        facts.web_type = facts.web_type or env.instance_types.get("web")
        return facts

    def plan(
        self, facts: StopFacts, params: StopEnvironmentParams, env: EnvironmentConfig
    ) -> StopPlan:
        power = plan_stop_environment(
            env.label,
            facts.servers,
            facts.group,
            group_configured=env.auto_scaling_group,
            cache_strategy=facts.cache_strategy,
            queued_messages=facts.queued,
            drop_queued_messages=params.drop_queued_messages,
            cache_subnet_id=facts.cache_subnet,
            address_attribute=env.address_attribute,
            now=datetime.now(UTC),
        )
        per_hour = hourly_cost(power, facts.prices, facts.web_type)
        return stop_runbook_plan(power, per_hour, f"{FLOW_NAME} on {env.label}")

    def steps(self, plan: StopPlan, params: StopEnvironmentParams) -> list[Step]:
        return stop_steps(plan.power, FLOW_NAME)

    def verify(self, scope: Scope, plan: StopPlan, params: StopEnvironmentParams) -> list[str]:
        return verify_stopped(scope, plan.power)


RUNBOOK = StopEnvironment()


@flow(name=FLOW_NAME, log_prints=False)
def stop_environment(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    drop_queued_messages: bool = False,
    window_override_reason: str | None = None,
) -> RunbookReport:
    """Stop an environment (nights, weekends): web group to zero, then workers, replicas, primary,
    cache, with the group's sizes recorded so start-environment restores them exactly.

    **When to run:** on a schedule off-hours (the deployments issue adds the schedules), or by
    hand. Safe unattended and safe to run twice: an environment already stopped is a no-op.

    **Refused:** protected environments (production by default) unless
    `fabflows.environments.<env>.allow_stop` is true (that setting is the standing approval, so
    scheduled runs never wait for a person); outside the maintenance window unless an override
    reason is given; a cache termination that would drop queued messages (see below). The
    environment is read again under its lock and the run refused if the plan changed meanwhile.

    **Steps:** 1. `scale-web-group-to-zero`: record min/desired/max on the web autoscaling group
    (tag `fabflows:stopped-sizes`, and in the run's journal, before any change), scale it to 0/0/0
    and wait until its instances are gone; 2. `quiet-workers`: stop the workers' background
    services (`<env>-celery`) so nothing runs against the databases; 3. `stop-worker`,
    4. `stop-db-replica`, 5. `stop-db-primary`, each waited for until stopped and tagged
    `fabflows:stopped` (who, when) before the stop; 6. the cache server:
    - `cache_strategy: stop` (default): `stop-cache`, like the others. Right in a VPC: a stopped
      instance keeps its private address, so RabbitMQ (node named after the host), Redis and
      memcached clients reconnect to the same place.
    - `cache_strategy: terminate-and-recreate`: `terminate-cache`, the original's procedure, for
      brokers reached at an address a stop changes (EC2-Classic, public DNS names). Its location
      (private IP, subnet, type) is recorded on the group, then it is terminated; start-environment
      launches a new one from `cache_launch_template` there. Its queues are read first: queued
      messages refuse the run unless `drop_queued_messages`; Redis sessions and Celery results are
      lost either way.

    **Blast radius:** the whole environment is down until start-environment. EBS volumes (and
    their data) stay; only a terminated cache loses its own state.

    **Dry run shows:** each server and the action, the group's sizes, queued messages, and what
    the stopped capacity costs per hour (the saving).

    **Rollback:** every step's undo is start-environment's part for it, newest first: the cache
    (started, or launched again at its recorded address), the primary, replicas, workers (started,
    reachable over SSH, brought into service), the workers' services, then the group's sizes as
    recorded before the stop. A failing step undoes the steps done so far before the run fails;
    a run that was killed is undone the same way by `fabflows recover` (recover-environment), from
    its journal.

    Args:
        environment: Environment to stop (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Untick to apply.
        drop_queued_messages: With cache_strategy terminate-and-recreate: terminate the cache even
            though messages are queued (they are lost).
        window_override_reason: Run outside the maintenance window, for this recorded reason.
    """
    return execute(RUNBOOK, locals())
