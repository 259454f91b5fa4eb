"""Launching one new server for a role, as FabulAWS's ``fab new:<deployment>,<env>,<role>,<AZ>``.

Read tasks: :func:`describe_availability_zones` (the region's zones), :func:`describe_launch_source`
(where an existing server runs: subnet, VPC, security groups), :func:`describe_zone_subnets`
(the subnets of a VPC, by zone) and :func:`find_launched` (the instances a run launched, found by
its record tag, so a run killed between the launch and its journal entry still finds them).

Write task: :func:`launch_instance` (RunInstances with the record tag; compensation:
:func:`tasks.aws.ec2_writes.terminate_instances` on what :func:`find_launched` returns).
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict, Field

from tasks.aws.ec2 import Server, server_from_instance
from tasks.aws.session import aws_client
from tasks.plan import StepResult


class LaunchSource(BaseModel):
    """Where an existing instance runs (a new one of the same kind goes beside it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instance_id: str
    subnet_id: str | None = None
    vpc_id: str | None = None
    security_group_ids: list[str] = Field(default_factory=list)


@task(cache_policy=NO_CACHE, name="describe-availability-zones", retries=2, retry_delay_seconds=2)
def describe_availability_zones(creds: AwsCredentials) -> list[str]:
    """The names of the region's availability zones (``us-east-1a``...), sorted."""
    zones = aws_client(creds, "ec2").describe_availability_zones()["AvailabilityZones"]
    return sorted(z["ZoneName"] for z in zones)


@task(cache_policy=NO_CACHE, name="describe-launch-source", retries=2, retry_delay_seconds=2)
def describe_launch_source(creds: AwsCredentials, instance_id: str) -> LaunchSource:
    """The subnet, VPC and security groups ``instance_id`` runs with."""
    reservations = aws_client(creds, "ec2").describe_instances(InstanceIds=[instance_id])[
        "Reservations"
    ]
    inst = reservations[0]["Instances"][0]
    return LaunchSource(
        instance_id=instance_id,
        subnet_id=inst.get("SubnetId") or None,
        vpc_id=inst.get("VpcId") or None,
        security_group_ids=sorted(g["GroupId"] for g in inst.get("SecurityGroups", [])),
    )


@task(cache_policy=NO_CACHE, name="describe-zone-subnets", retries=2, retry_delay_seconds=2)
def describe_zone_subnets(creds: AwsCredentials, vpc_id: str) -> dict[str, list[str]]:
    """The subnets of ``vpc_id``: zone name -> subnet ids (sorted)."""
    out: dict[str, list[str]] = {}
    subnets = aws_client(creds, "ec2").describe_subnets(
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]}]
    )["Subnets"]
    for s in subnets:
        out.setdefault(s["AvailabilityZone"], []).append(s["SubnetId"])
    return {zone: sorted(ids) for zone, ids in sorted(out.items())}


def find_launched(creds: AwsCredentials, tag: str, value: str) -> list[Server]:
    """The instances (not terminated) whose ``tag`` is ``value``: what a run launched."""
    ec2 = aws_client(creds, "ec2")
    filters = [
        {"Name": f"tag:{tag}", "Values": [value]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
    ]
    out = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            out.extend(server_from_instance(i) for i in reservation["Instances"])
    return sorted(out, key=lambda s: s.instance_id)


class LaunchedInstance(StepResult):
    instance_id: str | None = Field(description="The new instance (None in a dry run).")
    private_ip_address: str | None = None


@task(cache_policy=NO_CACHE, name="launch-instance", retries=0, tags=["non-idempotent"])
def launch_instance(
    creds: AwsCredentials,
    *,
    image_id: str,
    instance_type: str,
    subnet_id: str | None,
    availability_zone: str,
    security_group_ids: list[str],
    tags: dict[str, str],
    dry_run: bool,
) -> LaunchedInstance:
    """Launch one instance of ``image_id`` in ``availability_zone`` (in ``subnet_id`` when the
    environment runs in a VPC), tagged ``tags`` at launch (the tags include the run's record, so
    :func:`find_launched` finds it). Not idempotent: callers look for the run's instance first.
    Compensation: terminate it."""
    where = f"{availability_zone}" + (f" ({subnet_id})" if subnet_id else "")
    what = f"{tags.get('role', 'a server')} {instance_type} from {image_id} in {where}"
    if dry_run:
        return LaunchedInstance(
            changed=True, dry_run=True, instance_id=None, summary=f"Would launch {what}"
        )
    kwargs: dict[str, Any] = {
        "ImageId": image_id,
        "InstanceType": instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ],
    }
    if subnet_id:
        kwargs["SubnetId"] = subnet_id
    else:
        kwargs["Placement"] = {"AvailabilityZone": availability_zone}
    if security_group_ids:
        kwargs["SecurityGroupIds"] = list(security_group_ids)
    instance = aws_client(creds, "ec2").run_instances(**kwargs)["Instances"][0]
    summary = f"Launched {instance['InstanceId']}: {what} at {instance.get('PrivateIpAddress')}"
    get_run_logger().info("%s", summary)
    return LaunchedInstance(
        changed=True,
        dry_run=False,
        instance_id=instance["InstanceId"],
        private_ip_address=instance.get("PrivateIpAddress"),
        summary=summary,
    )
