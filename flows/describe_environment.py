"""describe-environment: what runs in an environment, and how the load balancers see it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows.procedures.db_servers import db_server
from fabflows.report import (
    artifact_key,
    markdown_table,
    publish_markdown,
    publish_table,
    text_table,
)
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, execute
from fabflows.runtime.plan import RunbookPlan
from tasks.aws.autoscaling import AutoScalingGroup, describe_auto_scaling_group
from tasks.aws.ec2 import Server, describe_servers
from tasks.aws.elb import TargetHealth, describe_instance_health, describe_target_health
from tasks.aws.session import CALLS, calls_since
from tasks.postgres.replication import describe_primary_replication, describe_replica_replication
from tasks.ssh.connection import ConnectionPool, SshOptions

SERVER_COLUMNS = (
    "role",
    "instance_id",
    "name",
    "instance_type",
    "state",
    "private_ip",
    "public_ip",
    "availability_zone",
    "launch_time",
    "load_balancer_health",
    "replication",
    "notes",
)
DB_ROLES = ("db-primary", "db-replica")


class DbReplication(BaseModel):
    """Replication as one running database server reports it."""

    model_config = ConfigDict(frozen=True)

    instance_id: str
    role: str
    state: str = Field(
        description="db-replica: streaming / not streaming / not a replica / unknown; "
        "db-primary: primary / in recovery / unknown."
    )
    lag_bytes: int | None = Field(
        default=None, description="WAL the replica has not replayed, behind the primary's LSN."
    )
    lag_seconds: float | None = Field(
        default=None, description="Age of its last replayed transaction; 0 when caught up."
    )
    detail: str = ""

    def text(self) -> str:
        """What the table's replication column shows."""
        if self.role == "db-replica" and self.state in ("streaming", "not streaming"):
            lag = _lag_text(self.lag_bytes, self.lag_seconds)
            return f"{self.state}, {lag}" + (f" ({self.detail})" if self.detail else "")
        return self.state + (f": {self.detail}" if self.detail else "")


def _lag_text(lag_bytes: int | None, lag_seconds: float | None) -> str:
    b = "? B" if lag_bytes is None else f"{lag_bytes} B"
    sec = "? s" if lag_seconds is None else f"{lag_seconds:g} s"
    return f"lag {b} / {sec}"


class ServerRow(BaseModel):
    """One line of the describe table."""

    model_config = ConfigDict(frozen=True)

    role: str
    instance_id: str
    name: str
    instance_type: str
    state: str
    private_ip: str | None
    public_ip: str | None
    availability_zone: str | None
    launch_time: str | None
    load_balancer_health: str = Field(description="name: state per load balancer / target group")
    replication: str = Field(default="", description="Database servers: replication and lag.")
    replication_state: str | None = None
    replication_lag_bytes: int | None = None
    replication_lag_seconds: float | None = None
    notes: str = ""


class EnvironmentDescription(BaseModel):
    """The result of describe-environment."""

    model_config = ConfigDict(frozen=True)

    deployment: str
    environment: str
    servers: list[ServerRow]
    auto_scaling_group: AutoScalingGroup | None
    problems: list[str] = Field(description="Things an operator should look at.")
    aws_calls: int = Field(description="AWS API calls this description needed.")
    replication: list[DbReplication] = Field(
        default_factory=list, description="Each running database server's replication."
    )

    def counts_by_role(self) -> dict[str, int]:
        return dict(Counter(s.role for s in self.servers))

    def render_text(self) -> str:
        """What ``fabflows run describe-environment`` prints."""
        out = [f"{self.deployment}/{self.environment}", ""]
        out.append(text_table([r.model_dump() for r in self.servers], SERVER_COLUMNS))
        g = self.auto_scaling_group
        if g:
            out += [
                "",
                f"autoscaling group {g.auto_scaling_group_name}: min {g.min_size} / desired "
                f"{g.desired_capacity} / max {g.max_size}; suspended: "
                f"{', '.join(g.suspended_processes) or 'none'}",
            ]
        out += [f"problem: {p}" for p in self.problems]
        out.append(f"({self.aws_calls} AWS calls)")
        return "\n".join(out)


def build_description(
    env: EnvironmentConfig,
    servers: list[Server],
    health: list[TargetHealth],
    group: AutoScalingGroup | None,
    aws_calls: int,
    replication: list[DbReplication] | None = None,
) -> EnvironmentDescription:
    """Pure: join servers with load-balancer health (and replication) and compare with config."""
    replication = replication or []
    by_db = {r.instance_id: r for r in replication}
    by_instance: dict[str, list[TargetHealth]] = {}
    for h in health:
        by_instance.setdefault(h.instance_id, []).append(h)
    rows = []
    for s in servers:
        notes = []
        wanted = env.instance_types.get(s.role)
        if wanted and wanted != s.instance_type:
            notes.append(f"config wants {wanted}")
        if s.role == "web" and group and s.instance_id not in group.instance_ids:
            notes.append("not in the autoscaling group")
        db = by_db.get(s.instance_id)
        rows.append(
            ServerRow(
                role=s.role,
                instance_id=s.instance_id,
                name=s.name,
                instance_type=s.instance_type,
                state=s.state,
                private_ip=s.private_ip_address,
                public_ip=s.public_ip_address,
                availability_zone=s.availability_zone,
                launch_time=s.launch_time.strftime("%Y-%m-%d %H:%M") if s.launch_time else None,
                load_balancer_health=", ".join(
                    f"{h.load_balancer}: {h.state}" for h in by_instance.get(s.instance_id, [])
                ),
                replication=db.text() if db else "",
                replication_state=db.state if db else None,
                replication_lag_bytes=db.lag_bytes if db else None,
                replication_lag_seconds=db.lag_seconds if db else None,
                notes="; ".join(notes),
            )
        )
    problems = []
    present = {s.role for s in servers}
    for role in env.roles:
        if role not in present and role in env.instance_types:
            problems.append(f"no {role} server")
    if env.auto_scaling_group and group is None:
        problems.append(f"autoscaling group {env.auto_scaling_group} does not exist")
    if group and group.suspended_processes:
        problems.append(
            f"autoscaling processes suspended on {group.auto_scaling_group_name}: "
            + ", ".join(group.suspended_processes)
        )
    for h in health:
        if h.state not in ("InService", "healthy"):
            problems.append(f"{h.instance_id} is {h.state} in {h.load_balancer}")
    problems += replication_problems(replication)
    return EnvironmentDescription(
        deployment=env.deployment,
        environment=env.environment,
        servers=rows,
        auto_scaling_group=group,
        problems=problems,
        aws_calls=aws_calls,
        replication=replication,
    )


def replication_problems(replication: list[DbReplication]) -> list[str]:
    """Pure: replicas that do not stream, servers whose replication could not be read."""
    out = []
    for r in replication:
        if r.state == "unknown":
            out.append(f"{r.instance_id} ({r.role}): replication unknown: {r.detail}")
        elif r.role == "db-replica" and r.state == "not a replica":
            out.append(f"{r.instance_id} (db-replica) is not a replica: it is not in recovery")
        elif r.role == "db-replica" and r.state != "streaming":
            out.append(
                f"{r.instance_id} (db-replica) is {r.state}: {r.detail or 'no WAL receiver'}"
            )
        elif r.role == "db-primary" and r.state != "primary":
            out.append(f"{r.instance_id} (db-primary) is {r.state}")
    writable = [r.instance_id for r in replication if r.state == "primary"]
    if len(writable) > 1:
        out.append(f"more than one db-primary takes writes: {', '.join(writable)}")
    return out


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def gather_replication(
    opts: SshOptions, env: EnvironmentConfig, servers: list[Server]
) -> list[DbReplication]:
    """Each running database server's replication, over SSH (one psql each): the primary first,
    then the replicas in parallel with the lag measured against the primary's current LSN. A server
    that cannot be read is ``unknown`` with the reason (a problem in the description)."""
    running = [s for s in servers if s.role in DB_ROLES and s.state == "running"]
    primaries = [s for s in running if s.role == "db-primary"]
    replicas = [s for s in running if s.role == "db-replica"]
    out: list[DbReplication] = []
    primary_lsn: str | None = None
    with ConnectionPool(opts) as pool:
        read_primary = describe_primary_replication.with_options(retries=0)
        futures = [(s, read_primary.submit(pool, db_server(s, env))) for s in primaries]
        for s, future in futures:
            try:
                p = future.result()
            except Exception as exc:  # noqa: BLE001 - reported as a problem of the description
                out.append(
                    DbReplication(
                        instance_id=s.instance_id, role=s.role, state="unknown", detail=_reason(exc)
                    )
                )
                continue
            primary_lsn = primary_lsn or p.current_lsn
            active = sum(1 for slot in p.slots if slot.active)
            detail = f"{len(p.streaming)} streaming, slots {active}/{len(p.slots)} active"
            state = "in recovery" if p.in_recovery else "primary"
            out.append(
                DbReplication(instance_id=s.instance_id, role=s.role, state=state, detail=detail)
            )
        read_replica = describe_replica_replication.with_options(retries=0)
        futures = [(s, read_replica.submit(pool, db_server(s, env), primary_lsn)) for s in replicas]
        for s, future in futures:
            try:
                r = future.result()
            except Exception as exc:  # noqa: BLE001 - reported as a problem of the description
                out.append(
                    DbReplication(
                        instance_id=s.instance_id, role=s.role, state="unknown", detail=_reason(exc)
                    )
                )
                continue
            detail = ""
            if r.state == "not streaming":
                detail = f"WAL receiver {r.receiver.status}" if r.receiver else "no WAL receiver"
            elif r.state == "streaming" and r.replay_paused:
                detail = "replay paused"
            if r.state != "not a replica" and primary_lsn is None:
                detail = ", ".join(x for x in (detail, "primary's LSN unknown") if x)
            out.append(
                DbReplication(
                    instance_id=s.instance_id,
                    role=s.role,
                    state=r.state,
                    lag_bytes=r.lag_bytes,
                    lag_seconds=r.lag_seconds,
                    detail=detail,
                )
            )
    return out


def render_markdown(d: EnvironmentDescription) -> str:
    out = [f"# {d.deployment}/{d.environment}", ""]
    counts = ", ".join(f"{n} {role}" for role, n in d.counts_by_role().items()) or "no servers"
    out += [f"**Servers:** {counts}", ""]
    g = d.auto_scaling_group
    if g:
        out += [
            f"**Autoscaling group** `{g.auto_scaling_group_name}`: min {g.min_size} / desired "
            f"{g.desired_capacity} / max {g.max_size}; suspended: "
            f"{', '.join(g.suspended_processes) or 'none'}; launch template "
            f"`{g.launch_template or '-'}` v{g.launch_template_version or '-'}",
            "",
        ]
    if d.problems:
        out += ["**Look at:**", *[f"- {p}" for p in d.problems], ""]
    out.append(markdown_table([r.model_dump() for r in d.servers], SERVER_COLUMNS))
    return "\n".join(out)


# --------------------------------------------------------------------------- the runbook

FLOW_NAME = "describe-environment"


class DescribeParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    replication: bool = Field(
        default=True, description="Read each running database server's replication over SSH."
    )


@dataclass
class DescribeFacts:
    servers: list[Server]
    health: list[TargetHealth]
    group: AutoScalingGroup | None
    aws_calls: int
    replication: list[DbReplication]


class DescribePlan(RunbookPlan):
    """Nothing to change: the plan of a read-only runbook is what it read."""

    description: EnvironmentDescription

    def render_markdown(self) -> str:
        return render_markdown(self.description)

    def render_text(self) -> str:
        return self.description.render_text()


class DescribeEnvironment(Runbook[DescribeParams, DescribeFacts, DescribePlan]):
    name = FLOW_NAME
    Params = DescribeParams
    plan_type = DescribePlan
    read_only = True

    def gather(self, scope: Scope, params: DescribeParams) -> DescribeFacts:
        rc, env = scope.rc, scope.env
        before = CALLS.copy()
        servers_f = describe_servers.submit(rc.creds, env.deployment, env.environment)
        group_f = (
            describe_auto_scaling_group.submit(rc.creds, env.auto_scaling_group)
            if env.auto_scaling_group
            else None
        )
        health_fs = [describe_instance_health.submit(rc.creds, lb) for lb in env.load_balancers]
        health_fs += [describe_target_health.submit(rc.creds, tg) for tg in env.target_groups]
        servers = servers_f.result()
        repl = (
            gather_replication(
                SshOptions.from_settings(rc.config.fabflows.ssh, env.deploy_user), env, servers
            )
            if params.replication
            else []
        )
        group = group_f.result() if group_f else None
        health = [h for f in health_fs for h in f.result()]
        return DescribeFacts(servers, health, group, sum(calls_since(before).values()), repl)

    def plan(
        self, facts: DescribeFacts, params: DescribeParams, env: EnvironmentConfig
    ) -> DescribePlan:
        description = build_description(
            env, facts.servers, facts.health, facts.group, facts.aws_calls, facts.replication
        )
        return DescribePlan(
            title=f"{FLOW_NAME} on {env.label}", environment=env.label, description=description
        )

    def read_outcome(self, plan: DescribePlan) -> str:
        d = plan.description
        return f"described {len(d.servers)} servers, {len(d.problems)} problem(s)"

    def read_result(
        self, scope: Scope, plan: DescribePlan, report: RunbookReport
    ) -> EnvironmentDescription:
        """The table and summary artifacts, the table in the log, a warning per problem."""
        env, description = scope.env, plan.description
        rows = [r.model_dump() for r in description.servers]
        key = artifact_key("describe", env.deployment, env.environment)
        publish_table(key, rows, f"Servers of {env.label}")
        publish_markdown(key + "-summary", render_markdown(description), f"Summary of {env.label}")
        logger = get_run_logger()
        logger.info("%s\n%s", env.label, text_table(rows, SERVER_COLUMNS))
        for problem in description.problems:
            logger.warning("%s", problem)
        return description


RUNBOOK = DescribeEnvironment()


@flow(name=FLOW_NAME, log_prints=False)
def describe_environment(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    replication: bool = True,
) -> EnvironmentDescription:
    """Describe an environment: every server by role, load-balancer health, the autoscaling group,
    and each database server's replication.

    **When to run:** before and after any maintenance, or whenever you need to know what is running
    (the original's `fab describe:<deployment>,<environment>`).

    **Blast radius:** none. Read-only: EC2 DescribeInstances (one paginated, filtered query),
    ELB DescribeInstanceHealth / ELBv2 DescribeTargetHealth per load balancer, Auto Scaling
    DescribeAutoScalingGroups. With `replication` (the default), one read-only `psql` over SSH on
    each running database server, as the postgres OS user (no password involved, no AWS call).

    **Shows:** per server the role, instance id, Name tag, type (and whether config wants another),
    state, private and public IP, AZ, launch time and load-balancer health; for database servers
    their replication: each db-replica streaming / not streaming / not a replica, with its lag in
    bytes (WAL not replayed, behind the primary's current LSN) and seconds (age of the last replayed
    transaction, 0 when caught up), the primary's streaming replicas and slots; the group's
    min/desired/max and suspended processes; problems worth a look (suspended processes left behind,
    unhealthy instances, missing roles, replicas not streaming). Published as the
    `describe-<deployment>-<environment>` table artifact and a markdown summary.

    Args:
        environment: Environment to describe (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        replication: Read each running database server's replication state and lag over SSH.
    """
    return execute(RUNBOOK, locals())
