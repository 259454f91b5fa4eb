"""restart-app: restart gunicorn, celery or pgbouncer by role, a batch at a time."""

from __future__ import annotations

from typing import Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, field_validator

from config import EnvironmentConfig
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from fabflows.runtime.plan import Change, RunbookPlan
from tasks.aws.ec2 import describe_servers
from tasks.ssh.fleet import FleetHost, RateControl, concurrency_for, run_fleet
from tasks.ssh.programs import ProgramState, describe_programs, restart_or_kill

FLOW_NAME = "restart-app"
Role = Literal["web", "worker"]
Program = Literal["web", "celery", "pgbouncer"]
DEFAULT_PROGRAMS: dict[str, list[str]] = {"web": ["web"], "worker": ["celery"]}


class RestartAppParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roles: list[Role] = Field(default_factory=lambda: ["web", "worker"], min_length=1)
    programs: list[Program] | None = None
    max_concurrency: int | str = 1
    stop_timeout_seconds: float = Field(default=60, gt=0, le=3600)

    @field_validator("max_concurrency")
    @classmethod
    def _concurrency(cls, v: int | str) -> int | str:
        concurrency_for(v, 100)  # ValueError names the option
        return v


class Batch(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    step: str
    hosts: list[FleetHost]
    groups: list[str] = Field(description="supervisor groups restarted on these hosts")


class RestartAppPlan(RunbookPlan):
    batches: list[Batch] = Field(default_factory=list)


class AppFacts(BaseModel):
    hosts: list[FleetHost]
    programs: dict[str, list[ProgramState]] = Field(description="address -> supervisor programs")


def plan_restart_app(
    facts: AppFacts, params: RestartAppParams, env: EnvironmentConfig
) -> RestartAppPlan:
    """Pure: per role, batches of at most ``max_concurrency`` servers; what each restarts."""
    names = env.supervisor_groups
    changes: list[Change] = []
    batches: list[Batch] = []
    problems: list[str] = []
    notes: list[str] = []
    downtime = None
    for role in params.roles:
        hosts = [h for h in facts.hosts if h.role == role]
        if not hosts:
            problems.append(f"no running {role} server in {env.label}")
            continue
        groups = [names[p] for p in (params.programs or DEFAULT_PROGRAMS[role])]
        size = concurrency_for(params.max_concurrency, len(hosts))
        if role == "web" and size >= len(hosts):
            downtime = 5.0
            notes.append("every web server restarts at once: users see errors for a few seconds")
        for n, start in enumerate(range(0, len(hosts), size), 1):
            batch = Batch(
                step=f"restart-{role}-{n}", hosts=hosts[start : start + size], groups=groups
            )
            batches.append(batch)
            for h in batch.hosts:
                states = facts.programs.get(h.address, [])
                now = ", ".join(
                    f"{p.name} {p.state}" for p in states if p.group in groups or p.name in groups
                )
                changes.append(
                    Change(
                        target=h.label,
                        action="restart " + ", ".join(groups),
                        detail=now or "none of them on this server",
                        step=batch.step,
                    )
                )
    return RestartAppPlan(
        title=f"restart-app on {env.label}",
        environment=env.label,
        changes=changes,
        downtime_seconds=downtime,
        problems=problems,
        notes=notes,
        batches=batches,
    )


def _restart(batch: Batch, stop_timeout: float):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, str]:
        result = run_fleet(
            batch.hosts,
            lambda remote, host: restart_or_kill(remote, batch.groups, stop_timeout),
            pool=scope.pool,
            rate=RateControl(max_concurrency="100%", max_errors=0),
            dry_run=False,
            name=batch.step,
            command_timeout=stop_timeout + 120,
        )
        result.raise_for_errors()
        return {"summary": "; ".join(f"{r.label}: {r.message}" for r in result.results)}

    return apply


class RestartApp(Runbook[RestartAppParams, AppFacts, RestartAppPlan]):
    name = FLOW_NAME
    Params = RestartAppParams
    plan_type = RestartAppPlan

    def window_required(self, env: EnvironmentConfig, params: RestartAppParams) -> bool:
        # one web server at a time keeps the site up; more at once may not
        return env.protected or ("web" in params.roles and params.max_concurrency not in (1, "1"))

    def gather(self, scope: Scope, params: RestartAppParams) -> AppFacts:
        env = scope.env
        servers = describe_servers(
            scope.rc.creds, env.deployment, env.environment, list(params.roles)
        )
        hosts = [
            FleetHost(
                name=s.name or s.instance_id,
                address=s.address(env.address_attribute),
                role=s.role,
                instance_id=s.instance_id,
            )
            for s in servers
            if s.state == "running"
        ]
        return AppFacts(hosts=hosts, programs=describe_programs(scope.pool, hosts) if hosts else {})

    def plan(
        self, facts: AppFacts, params: RestartAppParams, env: EnvironmentConfig
    ) -> RestartAppPlan:
        return plan_restart_app(facts, params, env)

    def steps(self, plan: RestartAppPlan, params: RestartAppParams) -> list[Step]:
        return [
            Step(
                b.step,
                _restart(b, params.stop_timeout_seconds),
                no_undo="a restart has nothing to put back",
                site_down=plan.downtime_seconds is not None and b.hosts[0].role == "web",
            )
            for b in plan.batches
        ]

    def verify(self, scope: Scope, plan: RestartAppPlan, params: RestartAppParams) -> list[str]:
        hosts = [h for b in plan.batches for h in b.hosts]
        now = describe_programs(scope.pool, hosts)
        groups = {h.address: b.groups for b in plan.batches for h in b.hosts}
        return [
            f"{h.label}: {p.name} is {p.state}"
            for h in hosts
            for p in now.get(h.address, [])
            if (p.group in groups[h.address] or p.name in groups[h.address])
            and p.state != "RUNNING"
        ]


RUNBOOK = RestartApp()


@flow(name=FLOW_NAME, log_prints=False)
def restart_app(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    roles: list[Role] | None = None,
    programs: list[Program] | None = None,
    max_concurrency: int | str = 1,
    stop_timeout_seconds: float = 60,
    window_override_reason: str | None = None,
) -> RunbookReport:
    """Restart the app's programs (gunicorn, celery, pgbouncer) on the servers of some roles.

    **When to run:** the site is slow or erroring and a restart is the known cure; a celery
    worker does not pick up tasks or will not stop; after changing files the app reads at start.

    **What it does:** per role, a batch of at most `max_concurrency` servers at a time (one by
    default, so with two or more web servers the site stays up), `supervisorctl restart` of the
    role's groups (web: `<env>-web`, worker: `<env>-celery`; `programs` chooses others), then checks
    every restarted program is RUNNING. A program still stopping after `stop_timeout_seconds` is
    stuck (a celery worker waiting on a task that never ends): its processes are killed with
    SIGKILL and it is started again — the troubleshooting guide's `kill -9` by hand.

    **Blast radius:** requests served by a restarting web server may fail; tasks running in a
    killed celery worker are lost (celery retries them if they were acknowledged late).

    **Dry run** (default): every server, by name and instance id, what would be restarted and the
    programs' states now.

    **Rolls back:** nothing to put back. A failed batch stops the run; the batches before it stay
    restarted; `fabflows resume RUN_ID` goes on from the failed batch.

    Args:
        environment: Environment (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Pass false (CLI: --apply) to restart.
        roles: Roles whose servers restart (default: web and worker).
        programs: What to restart: web (gunicorn), celery, pgbouncer (default: web on web servers,
            celery on workers).
        max_concurrency: Servers of one role restarted at once: a number or a percentage (25%).
        stop_timeout_seconds: A program still stopping after this long is killed and started.
        window_override_reason: Run outside the maintenance window, for this recorded reason.
    """
    args = dict(locals())
    args["roles"] = roles or ["web", "worker"]
    return execute(RUNBOOK, args)
