"""start-environment: bring a stopped environment back, in order, and prove the site answers."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from config.models import EnvironmentSettings
from fabflows.procedures.environment_power import (
    plan_start_environment,
    servers_and_group,
    stopped_capacity,
)
from fabflows.procedures.power_plans import StartPlan, start_runbook_plan
from fabflows.procedures.power_steps import start_steps, verify_started
from fabflows.procedures.server_service import load_passphrase
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from tasks.aws.autoscaling import AutoScalingGroup
from tasks.aws.ec2 import Server
from tasks.aws.ec2_writes import describe_launch_template_type
from tasks.aws.pricing import compute_savings, price_table

FLOW_NAME = "start-environment"

__all__ = ["RUNBOOK", "load_passphrase", "start_environment"]


class StartEnvironmentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StartFacts(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    servers: list[Server]
    group: AutoScalingGroup | None
    settings: EnvironmentSettings
    web_type: str | None = None
    prices: dict[str, float] = Field(default_factory=dict)
    now: datetime


class StartEnvironment(Runbook[StartEnvironmentParams, StartFacts, StartPlan]):
    name = FLOW_NAME
    Params = StartEnvironmentParams
    plan_type = StartPlan

    def gather(self, scope: Scope, params: StartEnvironmentParams) -> StartFacts:
        rc, env = scope.rc, scope.env
        servers, group = servers_and_group(rc)
        web_type = None
        if group is not None and group.launch_template:
            web_type = describe_launch_template_type(
                rc.creds, group.launch_template, group.launch_template_version
            )
        return StartFacts(
            servers=servers,
            group=group,
            settings=rc.config.fabflows.environments.get(env.environment) or EnvironmentSettings(),
            web_type=web_type or env.instance_types.get("web"),
            prices=price_table(rc.config.fabflows.prices),
            now=datetime.now(UTC),
        )

    def plan(
        self, facts: StartFacts, params: StartEnvironmentParams, env: EnvironmentConfig
    ) -> StartPlan:
        power = plan_start_environment(
            env.label,
            facts.servers,
            facts.group,
            group_configured=env.auto_scaling_group,
            cache_strategy=facts.settings.cache_strategy,
            cache_launch_template=facts.settings.cache_launch_template,
            address_attribute=env.address_attribute,
        )
        savings = compute_savings(stopped_capacity(power, facts.now, facts.web_type), facts.prices)
        return start_runbook_plan(
            power, savings if savings.rows else None, f"{FLOW_NAME} on {env.label}"
        )

    def steps(self, plan: StartPlan, params: StartEnvironmentParams) -> list[Step]:
        savings = plan.savings.markdown() if plan.savings is not None else None
        return start_steps(plan.power, FLOW_NAME, savings)

    def verify(self, scope: Scope, plan: StartPlan, params: StartEnvironmentParams) -> list[str]:
        return verify_started(scope, plan.power)


RUNBOOK = StartEnvironment()


@flow(name=FLOW_NAME, log_prints=False)
def start_environment(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    window_override_reason: str | None = None,
) -> RunbookReport:
    """Start an environment stopped by stop-environment (or by hand), role by role, and restore
    the web group's recorded sizes; then check that every web server and the site answer 200.

    **When to run:** on a schedule before working hours (the deployments issue adds schedules), or
    by hand. Safe unattended and twice in a row: running servers are only checked (and brought
    into service where they are not), and restored sizes are left alone.

    **Steps (the reverse of a stop):** `launch-cache` (terminate-and-recreate: launched again
    from `cache_launch_template` at its recorded address), `start-cache`, `start-db-primary`,
    `start-db-replica`, `start-worker`, `start-web` (servers outside the group). For each role:
    StartInstances, wait until running, wait until SSH answers with the known host key, then bring
    it into service (the original's `mount_encrypted`): with `instance_settings.fs_encrypt`,
    unlock the data volume with `cryptsetup luksOpen --key-file=-` (the passphrase from the Secret
    block named by `luks_passphrase_block`, written to stdin, never on a command line), mount it
    (`/mount-deferred.sh`) and `swapon -a`; then start the role's services
    (`fabflows.stop_start.role_services`: PostgreSQL, RabbitMQ/Redis/memcached, pgbouncer and celery)
    where they are not running. Then `restore-web-group`: the group's recorded min/desired/max set
    back and its instances waited for; `check-site`: every web server must answer 200 (users and
    health check), and the site URL too when one is configured; `clear-records`: the stop records
    are removed only after that, and the savings published.

    A cache launched again (terminate-and-recreate) gets its recorded private address back (EC2
    releases it when the old instance terminates; if something else took it, the launch fails
    with `InvalidIPAddress.InUse` and the record stays for the next run). It comes up with a new
    SSH host key and empty queues and caches, and is not logged into: add its key to known_hosts.

    **Window:** a protected environment is started inside its maintenance window (or with
    `window_override_reason`).

    **Blast radius:** starts every stopped server of the environment; costs resume.

    **Dry run shows:** each server and its action, the group's sizes now and as recorded, and the
    saving so far (hours stopped x on-demand price, `fabflows.prices` over built-in defaults).

    **Rollback:** nothing is taken down, so a failed step only fails the run, with the step named;
    what was started stays started and `fabflows resume RUN_ID` (or running it again) goes on.
    `fabflows recover` on a run that died puts the environment back as it was before the start:
    it stops again what the run started (the stop records are kept, so the next start restores
    the same sizes).

    **Report:** the savings table (hours stopped x price per instance type) as an artifact.

    Args:
        environment: Environment to start (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Untick to apply.
        window_override_reason: Start a protected environment outside its maintenance window,
            for this recorded reason.
    """
    return execute(RUNBOOK, locals())
