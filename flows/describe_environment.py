"""describe-environment: what runs in an environment, and how the load balancers see it."""

from __future__ import annotations

from collections import Counter

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows import audit
from fabflows.report import (
    artifact_key,
    markdown_table,
    publish_markdown,
    publish_table,
    text_table,
)
from fabflows.runbook import load_context
from tasks.aws.autoscaling import AutoScalingGroup, describe_auto_scaling_group
from tasks.aws.ec2 import Server, describe_servers
from tasks.aws.elb import TargetHealth, describe_instance_health, describe_target_health
from tasks.aws.session import CALLS, calls_since

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
    "notes",
)


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
) -> EnvironmentDescription:
    """Pure: join servers with load-balancer health and compare with config."""
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
    return EnvironmentDescription(
        deployment=env.deployment,
        environment=env.environment,
        servers=rows,
        auto_scaling_group=group,
        problems=problems,
        aws_calls=aws_calls,
    )


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


@flow(name="describe-environment", log_prints=False)
def describe_environment(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
) -> EnvironmentDescription:
    """Describe an environment: every server by role, load-balancer health, the autoscaling group.

    **When to run:** before and after any maintenance, or whenever you need to know what is running
    (the original's `fab describe:<deployment>,<environment>`).

    **Blast radius:** none. Read-only: EC2 DescribeInstances (one paginated, filtered query),
    ELB DescribeInstanceHealth / ELBv2 DescribeTargetHealth per load balancer, Auto Scaling
    DescribeAutoScalingGroups.

    **Shows:** per server the role, instance id, Name tag, type (and whether config wants another),
    state, private and public IP, AZ, launch time and load-balancer health; the group's
    min/desired/max and suspended processes; problems worth a look (suspended processes left behind,
    unhealthy instances, missing roles). Published as the `describe-<deployment>-<environment>` table
    artifact and a markdown summary.

    Args:
        environment: Environment to describe (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
    """
    logger = get_run_logger()
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    starter = audit.record_start(env)
    before = CALLS.copy()

    servers_f = describe_servers.submit(ctx.creds, env.deployment, env.environment)
    group_f = (
        describe_auto_scaling_group.submit(ctx.creds, env.auto_scaling_group)
        if env.auto_scaling_group
        else None
    )
    health_fs = [describe_instance_health.submit(ctx.creds, lb) for lb in env.load_balancers]
    health_fs += [describe_target_health.submit(ctx.creds, tg) for tg in env.target_groups]
    servers = servers_f.result()
    group = group_f.result() if group_f else None
    health = [h for f in health_fs for h in f.result()]

    description = build_description(env, servers, health, group, sum(calls_since(before).values()))
    rows = [r.model_dump() for r in description.servers]
    key = artifact_key("describe", env.deployment, env.environment)
    publish_table(key, rows, f"Servers of {env.label}")
    publish_markdown(key + "-summary", render_markdown(description), f"Summary of {env.label}")
    logger.info("%s\n%s", env.label, text_table(rows, SERVER_COLUMNS))
    for problem in description.problems:
        logger.warning("%s", problem)
    audit.record_summary(
        env,
        outcome=f"described {len(description.servers)} servers, {len(description.problems)} problem(s)",
        plan_markdown=render_markdown(description),
        starter=starter,
    )
    return description
