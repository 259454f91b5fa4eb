"""The web group's instances one by one: standby (out of service), surge, and removal.

- :func:`enter_standby` / :func:`exit_standby`: AWS takes an instance in Standby out of the group's
  load balancers and target groups and does not replace it; exiting puts it back. Entering records
  whether the instance was InService, and exit is its compensation. The group keeps the state itself,
  so a run killed half-way leaves a visible Standby instance (describe-environment shows it).
- :func:`set_desired_capacity` records the capacity it found; setting it back is the compensation.
- :func:`terminate_group_instance` has **no compensation** (a terminated instance is gone); the
  refresh calls it only after the replacement serves.
- :func:`wait_for_in_service` polls until the group has the instances wanted InService, with a
  timeout and an error naming what is missing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict, Field

from tasks.aws.session import aws_client
from tasks.plan import StepResult


class GroupTimeout(TimeoutError):
    """The group did not reach the wanted state in time; the message says what it has."""


class GroupInstance(BaseModel):
    """One instance of the group as Auto Scaling and EC2 see it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instance_id: str
    lifecycle_state: str = Field(description="InService, Pending, Standby, Terminating...")
    health_status: str
    launch_template_version: str | None = None
    image_id: str | None = None
    private_ip_address: str | None = None
    state: str | None = Field(default=None, description="EC2 state (running...).")
    launch_time: datetime | None = None


@task(name="describe-group-instances", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def describe_group_instances(
    creds: AwsCredentials, auto_scaling_group_name: str
) -> list[GroupInstance]:
    """The group's instances with lifecycle state, template version, image and address."""
    return group_instances(creds, auto_scaling_group_name)


def group_instances(creds: AwsCredentials, auto_scaling_group_name: str) -> list[GroupInstance]:
    asg = aws_client(creds, "autoscaling")
    groups = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[auto_scaling_group_name])[
        "AutoScalingGroups"
    ]
    if not groups:
        raise ValueError(f"autoscaling group {auto_scaling_group_name} does not exist")
    members = groups[0].get("Instances", [])
    ec2_facts: dict[str, dict] = {}
    ids = [m["InstanceId"] for m in members]
    if ids:
        ec2 = aws_client(creds, "ec2")
        for page in ec2.get_paginator("describe_instances").paginate(InstanceIds=ids):
            for r in page["Reservations"]:
                for inst in r["Instances"]:
                    ec2_facts[inst["InstanceId"]] = inst
    out = []
    for m in members:
        inst = ec2_facts.get(m["InstanceId"], {})
        out.append(
            GroupInstance(
                instance_id=m["InstanceId"],
                lifecycle_state=m["LifecycleState"],
                health_status=m.get("HealthStatus", ""),
                launch_template_version=(m.get("LaunchTemplate") or {}).get("Version"),
                image_id=inst.get("ImageId"),
                private_ip_address=inst.get("PrivateIpAddress"),
                state=(inst.get("State") or {}).get("Name"),
                launch_time=inst.get("LaunchTime"),
            )
        )
    return sorted(out, key=lambda i: i.instance_id)


class StandbyResult(StepResult):
    """What enter_standby / exit_standby did."""

    auto_scaling_group_name: str
    instance_id: str
    lifecycle_before: str


def _lifecycle(creds: AwsCredentials, group: str, instance_id: str) -> str:
    for inst in group_instances(creds, group):
        if inst.instance_id == instance_id:
            return inst.lifecycle_state
    raise ValueError(f"{instance_id} is not in autoscaling group {group}")


@task(
    name="enter-standby",
    task_run_name="enter-standby-{instance_id}",
    retries=0,
    cache_policy=NO_CACHE,
)
def enter_standby(
    creds: AwsCredentials, auto_scaling_group_name: str, instance_id: str, *, dry_run: bool
) -> StandbyResult:
    """Put an InService instance in Standby (out of the load balancers, not replaced).

    The group's desired capacity goes down by one meanwhile (AWS requires it to keep the instance
    from being replaced); :func:`exit_standby` brings both back.
    """
    before = _lifecycle(creds, auto_scaling_group_name, instance_id)
    if before == "Standby":
        summary, changed = f"{instance_id} is already in Standby", False
    elif before != "InService":
        raise ValueError(f"{instance_id} is {before}, not InService: it cannot enter Standby")
    elif dry_run:
        summary, changed = f"Would put {instance_id} in Standby", True
    else:
        aws_client(creds, "autoscaling").enter_standby(
            AutoScalingGroupName=auto_scaling_group_name,
            InstanceIds=[instance_id],
            ShouldDecrementDesiredCapacity=True,
        )
        summary, changed = f"Put {instance_id} in Standby", True
    get_run_logger().info("%s", summary)
    return StandbyResult(
        changed=changed,
        dry_run=dry_run,
        summary=summary,
        auto_scaling_group_name=auto_scaling_group_name,
        instance_id=instance_id,
        lifecycle_before=before,
    )


@task(
    name="exit-standby",
    task_run_name="exit-standby-{instance_id}",
    retries=0,
    cache_policy=NO_CACHE,
)
def exit_standby(
    creds: AwsCredentials, auto_scaling_group_name: str, instance_id: str, *, dry_run: bool
) -> StandbyResult:
    """Bring a Standby instance back InService (the compensation of :func:`enter_standby`)."""
    before = _lifecycle(creds, auto_scaling_group_name, instance_id)
    if before != "Standby":
        summary, changed = f"{instance_id} is {before}, not in Standby", False
    elif dry_run:
        summary, changed = f"Would bring {instance_id} back from Standby", True
    else:
        aws_client(creds, "autoscaling").exit_standby(
            AutoScalingGroupName=auto_scaling_group_name, InstanceIds=[instance_id]
        )
        summary, changed = f"Brought {instance_id} back from Standby", True
    get_run_logger().info("%s", summary)
    return StandbyResult(
        changed=changed,
        dry_run=dry_run,
        summary=summary,
        auto_scaling_group_name=auto_scaling_group_name,
        instance_id=instance_id,
        lifecycle_before=before,
    )


class CapacityResult(StepResult):
    """What set_desired_capacity did, with the capacity it found (the compensation's target)."""

    auto_scaling_group_name: str
    desired_before: int
    desired_after: int


@task(name="set-desired-capacity", retries=0, cache_policy=NO_CACHE)
def set_desired_capacity(
    creds: AwsCredentials, auto_scaling_group_name: str, desired: int, *, dry_run: bool
) -> CapacityResult:
    """Set the group's desired capacity (records the one before; setting it back compensates).

    Raises:
        ValueError: ``desired`` is outside the group's min/max.
    """
    asg = aws_client(creds, "autoscaling")
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[auto_scaling_group_name])[
        "AutoScalingGroups"
    ][0]
    before = g["DesiredCapacity"]
    if not g["MinSize"] <= desired <= g["MaxSize"]:
        raise ValueError(
            f"{auto_scaling_group_name}: desired capacity {desired} is outside min {g['MinSize']} "
            f"/ max {g['MaxSize']}"
        )
    if desired == before:
        summary, changed = f"{auto_scaling_group_name} already wants {desired}", False
    elif dry_run:
        summary, changed = (
            f"Would set {auto_scaling_group_name} desired {before} -> {desired}",
            True,
        )
    else:
        asg.set_desired_capacity(
            AutoScalingGroupName=auto_scaling_group_name,
            DesiredCapacity=desired,
            HonorCooldown=False,
        )
        summary, changed = f"Set {auto_scaling_group_name} desired {before} -> {desired}", True
    get_run_logger().info("%s", summary)
    return CapacityResult(
        changed=changed,
        dry_run=dry_run,
        summary=summary,
        auto_scaling_group_name=auto_scaling_group_name,
        desired_before=before,
        desired_after=desired,
    )


@task(
    name="terminate-group-instance",
    task_run_name="terminate-{instance_id}",
    retries=0,
    cache_policy=NO_CACHE,
    tags=["non-idempotent"],
)
def terminate_group_instance(
    creds: AwsCredentials,
    auto_scaling_group_name: str,
    instance_id: str,
    *,
    decrement: bool,
    dry_run: bool,
) -> StepResult:
    """Terminate one instance of the group. **No compensation:** the instance is gone for good.

    ``decrement``: lower the desired capacity with it (False for an instance in Standby, which no
    longer counts). An instance already gone is ``changed=False``.
    """
    present = any(
        i.instance_id == instance_id for i in group_instances(creds, auto_scaling_group_name)
    )
    if not present:
        summary, changed = f"{instance_id} is no longer in {auto_scaling_group_name}", False
    elif dry_run:
        summary, changed = f"Would terminate {instance_id}", True
    else:
        aws_client(creds, "autoscaling").terminate_instance_in_auto_scaling_group(
            InstanceId=instance_id, ShouldDecrementDesiredCapacity=decrement
        )
        summary, changed = f"Terminated {instance_id}", True
    get_run_logger().info("%s", summary)
    return StepResult(changed=changed, dry_run=dry_run, summary=summary)


@task(name="wait-for-new-instance", cache_policy=NO_CACHE, retries=0)
def wait_for_new_instance(
    creds: AwsCredentials,
    auto_scaling_group_name: str,
    known: Sequence[str],
    *,
    timeout: float,
    poll: float = 2.0,
) -> GroupInstance:
    """Wait for an instance not in ``known`` to be InService (and running) in the group.

    Raises:
        GroupTimeout: none after ``timeout`` seconds; names the group's instances and states.
    """
    deadline = time.monotonic() + timeout
    while True:
        instances = group_instances(creds, auto_scaling_group_name)
        fresh = [
            i
            for i in instances
            if i.instance_id not in known
            and i.lifecycle_state == "InService"
            and i.state == "running"
        ]
        if fresh:
            return fresh[0]
        if time.monotonic() >= deadline:
            seen = ", ".join(f"{i.instance_id} {i.lifecycle_state}/{i.state}" for i in instances)
            raise GroupTimeout(
                f"{auto_scaling_group_name}: no new InService instance after {timeout:.0f} s "
                f"(instances: {seen or 'none'})"
            )
        time.sleep(min(poll, max(0.05, deadline - time.monotonic())))
