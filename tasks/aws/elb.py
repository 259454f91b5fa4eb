"""Load balancer reads: classic ELB instance health and ELBv2 target health."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict

from tasks.aws.session import aws_client


class TargetHealth(BaseModel):
    """Health of one instance behind one load balancer or target group."""

    model_config = ConfigDict(frozen=True)

    load_balancer: str
    instance_id: str
    state: str
    reason: str | None = None
    kind: str = "elb"


@task(cache_policy=NO_CACHE, name="describe-instance-health", retries=2, retry_delay_seconds=2)
def describe_instance_health(creds: AwsCredentials, load_balancer_name: str) -> list[TargetHealth]:
    """Classic ELB DescribeInstanceHealth: InService / OutOfService per registered instance."""
    elb = aws_client(creds, "elb")
    states = elb.describe_instance_health(LoadBalancerName=load_balancer_name)["InstanceStates"]
    return [
        TargetHealth(
            load_balancer=load_balancer_name,
            instance_id=s["InstanceId"],
            state=s["State"],
            reason=(s.get("Description") or None) if s["State"] != "InService" else None,
        )
        for s in states
    ]


@task(cache_policy=NO_CACHE, name="describe-target-health", retries=2, retry_delay_seconds=2)
def describe_target_health(creds: AwsCredentials, target_group: str) -> list[TargetHealth]:
    """ELBv2 DescribeTargetHealth for a target group given by name or ARN."""
    elbv2 = aws_client(creds, "elbv2")
    if target_group.startswith("arn:"):
        arn = target_group
    else:
        arn = elbv2.describe_target_groups(Names=[target_group])["TargetGroups"][0][
            "TargetGroupArn"
        ]
    descriptions = elbv2.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
    name = target_group if not target_group.startswith("arn:") else arn.split("/")[-2]
    return [
        TargetHealth(
            load_balancer=name,
            instance_id=d["Target"]["Id"],
            state=d["TargetHealth"]["State"],
            reason=d["TargetHealth"].get("Reason"),
            kind="target-group",
        )
        for d in descriptions
    ]
