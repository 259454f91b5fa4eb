"""Auto Scaling reads (and, in later runbooks, the writes that suspend and resume processes)."""

from __future__ import annotations

from prefect import task
from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict, Field

from tasks.aws.session import aws_client


class AutoScalingGroup(BaseModel):
    """The state of the web tier's group that maintenance cares about."""

    model_config = ConfigDict(frozen=True)

    auto_scaling_group_name: str
    min_size: int
    desired_capacity: int
    max_size: int
    suspended_processes: list[str] = Field(default_factory=list)
    instance_ids: list[str] = Field(default_factory=list)
    launch_template: str | None = None
    launch_template_version: str | None = None
    load_balancer_names: list[str] = Field(default_factory=list)
    target_group_arns: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)


@task(name="describe-auto-scaling-group", retries=2, retry_delay_seconds=2)
def describe_auto_scaling_group(
    creds: AwsCredentials, auto_scaling_group_name: str
) -> AutoScalingGroup | None:
    """The group's sizes, suspended processes, instances and launch template; None if it does not exist."""
    asg = aws_client(creds, "autoscaling")
    groups = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[auto_scaling_group_name])[
        "AutoScalingGroups"
    ]
    if not groups:
        return None
    g = groups[0]
    template = g.get("LaunchTemplate") or (g.get("MixedInstancesPolicy") or {}).get(
        "LaunchTemplate", {}
    ).get("LaunchTemplateSpecification")
    return AutoScalingGroup(
        auto_scaling_group_name=g["AutoScalingGroupName"],
        min_size=g["MinSize"],
        desired_capacity=g["DesiredCapacity"],
        max_size=g["MaxSize"],
        suspended_processes=sorted(p["ProcessName"] for p in g.get("SuspendedProcesses", [])),
        instance_ids=sorted(i["InstanceId"] for i in g.get("Instances", [])),
        launch_template=(template or {}).get("LaunchTemplateName")
        or g.get("LaunchConfigurationName"),
        launch_template_version=(template or {}).get("Version"),
        load_balancer_names=list(g.get("LoadBalancerNames", [])),
        target_group_arns=list(g.get("TargetGroupARNs", [])),
        tags={t["Key"]: t["Value"] for t in g.get("Tags", [])},
    )
