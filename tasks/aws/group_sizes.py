"""The web autoscaling group's sizes: recorded on the group before scaling it to zero, restored
exactly afterwards (the original set 0/0/0 by hand and forgot the sizes).

Records are tags on the group, so they outlive the run and the machine that ran it:

- ``fabflows:stopped-sizes``: JSON ``{"min", "desired", "max", "since", "run"}``, written *before*
  the group is scaled down; the first record is kept by later stops (a second stop of a stopped
  environment must not record 0/0/0). Removed once the sizes are restored.
- ``fabflows:stopped-cache``: JSON ``{"ip", "subnet", "type", "name", "since"}``: where the cache
  server was, for start-environment to launch a new one there (cache strategy
  terminate-and-recreate).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fabflows.progress import Waiting
from tasks.aws.autoscaling import AutoScalingGroup, describe_auto_scaling_group
from tasks.aws.session import aws_client
from tasks.plan import StepResult

SIZES_TAG = "fabflows:stopped-sizes"
CACHE_TAG = "fabflows:stopped-cache"
TAG_VALUE_LIMIT = 256


class GroupWaitTimeout(TimeoutError):
    """The group did not reach the wanted number of instances in time."""


def _utc(v: datetime) -> datetime:
    if v.tzinfo is None:
        raise ValueError("must carry a time zone")
    return v.astimezone(UTC).replace(microsecond=0)


class SizesRecord(BaseModel):
    """The group's sizes before fabflows scaled it to zero."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: int = Field(ge=0)
    desired: int = Field(ge=0)
    max: int = Field(ge=0)
    since: datetime
    run: str = ""

    _since = field_validator("since")(classmethod(lambda cls, v: _utc(v)))

    def to_json(self) -> str:
        data = self.model_dump()
        data["since"] = self.since.strftime("%Y-%m-%dT%H:%M:%SZ")
        return json.dumps(data, separators=(",", ":"))


class CacheRecord(BaseModel):
    """Where the terminated cache server was (to launch its replacement there)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ip: str | None
    subnet: str | None
    type: str
    name: str = ""
    since: datetime

    _since = field_validator("since")(classmethod(lambda cls, v: _utc(v)))

    def to_json(self) -> str:
        data = self.model_dump()
        data["since"] = self.since.strftime("%Y-%m-%dT%H:%M:%SZ")
        return json.dumps(data, separators=(",", ":"))


def recorded_sizes(group: AutoScalingGroup) -> SizesRecord | None:
    """Pure: the sizes record on the group, or None (an unreadable one is None too)."""
    raw = group.tags.get(SIZES_TAG)
    if not raw:
        return None
    try:
        return SizesRecord.model_validate_json(raw)
    except ValueError:
        return None


def recorded_cache(group: AutoScalingGroup) -> CacheRecord | None:
    raw = group.tags.get(CACHE_TAG)
    if not raw:
        return None
    try:
        return CacheRecord.model_validate_json(raw)
    except ValueError:
        return None


def _group_or_fail(creds: AwsCredentials, name: str) -> AutoScalingGroup:
    group = describe_auto_scaling_group.fn(creds, name)
    if group is None:
        raise ValueError(f"autoscaling group {name} does not exist")
    return group


def _put_tags(creds: AwsCredentials, group: str, values: dict[str, str]) -> None:
    for key, value in values.items():
        if len(value) > TAG_VALUE_LIMIT:
            raise ValueError(f"{group}: tag {key} would be {len(value)} characters (max 256)")
    aws_client(creds, "autoscaling").create_or_update_tags(
        Tags=[
            {
                "ResourceId": group,
                "ResourceType": "auto-scaling-group",
                "Key": k,
                "Value": v,
                "PropagateAtLaunch": False,
            }
            for k, v in values.items()
        ]
    )


class RecordResult(StepResult):
    auto_scaling_group_name: str
    recorded: SizesRecord | None = Field(description="The record on the group after the task.")


@task(
    cache_policy=NO_CACHE,
    name="record-group-sizes",
    task_run_name="record-group-sizes-{auto_scaling_group_name}",
    retries=0,
)
def record_group_sizes(
    creds: AwsCredentials, auto_scaling_group_name: str, since: datetime, run: str, *, dry_run: bool
) -> RecordResult:
    """Record the group's current min/desired/max on the group (an existing record is kept)."""
    group = _group_or_fail(creds, auto_scaling_group_name)
    prior = recorded_sizes(group)
    if prior is not None:
        return RecordResult(
            changed=False,
            dry_run=dry_run,
            auto_scaling_group_name=group.auto_scaling_group_name,
            recorded=prior,
            summary=f"{auto_scaling_group_name}: sizes already recorded "
            f"({prior.min}/{prior.desired}/{prior.max} since {prior.since:%Y-%m-%d %H:%M}Z)",
        )
    record = SizesRecord(
        min=group.min_size, desired=group.desired_capacity, max=group.max_size, since=since, run=run
    )
    verb = "Would record" if dry_run else "Recorded"
    if not dry_run:
        _put_tags(creds, auto_scaling_group_name, {SIZES_TAG: record.to_json()})
    summary = f"{verb} {auto_scaling_group_name}'s sizes {record.min}/{record.desired}/{record.max}"
    get_run_logger().info("%s", summary)
    return RecordResult(
        changed=True,
        dry_run=dry_run,
        auto_scaling_group_name=auto_scaling_group_name,
        recorded=record if not dry_run else None,
        summary=summary,
    )


@task(
    cache_policy=NO_CACHE,
    name="record-cache",
    task_run_name="record-cache-{auto_scaling_group_name}",
    retries=0,
)
def record_cache(
    creds: AwsCredentials, auto_scaling_group_name: str, record: CacheRecord, *, dry_run: bool
) -> StepResult:
    """Record where the cache server is before it is terminated (an existing record is kept)."""
    group = _group_or_fail(creds, auto_scaling_group_name)
    if recorded_cache(group) is not None:
        return StepResult(changed=False, dry_run=dry_run, summary="cache location already recorded")
    if not dry_run:
        _put_tags(creds, auto_scaling_group_name, {CACHE_TAG: record.to_json()})
    return StepResult(
        changed=True,
        dry_run=dry_run,
        summary=f"{'Would record' if dry_run else 'Recorded'} the cache server's "
        f"location ({record.ip}, {record.type})",
    )


class SizesResult(StepResult):
    auto_scaling_group_name: str
    previous: tuple[int, int, int] = Field(description="min, desired, max before the task.")
    sizes: tuple[int, int, int]


@task(
    cache_policy=NO_CACHE,
    name="set-group-sizes",
    task_run_name="set-group-sizes-{auto_scaling_group_name}",
    retries=0,
)
def set_group_sizes(
    creds: AwsCredentials,
    auto_scaling_group_name: str,
    min_size: int,
    desired_capacity: int,
    max_size: int,
    *,
    dry_run: bool,
) -> SizesResult:
    """UpdateAutoScalingGroup to these sizes (already there: no-op). The compensation is the same
    task with ``previous``."""
    if not min_size <= desired_capacity <= max_size:
        raise ValueError(
            f"sizes {min_size}/{desired_capacity}/{max_size}: need min <= desired <= max"
        )
    group = _group_or_fail(creds, auto_scaling_group_name)
    before = (group.min_size, group.desired_capacity, group.max_size)
    after = (min_size, desired_capacity, max_size)
    if before == after:
        return SizesResult(
            changed=False,
            dry_run=dry_run,
            auto_scaling_group_name=auto_scaling_group_name,
            previous=before,
            sizes=after,
            summary=f"{auto_scaling_group_name} already {min_size}/{desired_capacity}/{max_size}",
        )
    if dry_run:
        summary = f"Would set {auto_scaling_group_name} {'/'.join(map(str, before))} -> {'/'.join(map(str, after))}"
    else:
        aws_client(creds, "autoscaling").update_auto_scaling_group(
            AutoScalingGroupName=auto_scaling_group_name,
            MinSize=min_size,
            DesiredCapacity=desired_capacity,
            MaxSize=max_size,
        )
        summary = f"Set {auto_scaling_group_name} {'/'.join(map(str, before))} -> {'/'.join(map(str, after))}"
        get_run_logger().info("%s", summary)
    return SizesResult(
        changed=True,
        dry_run=dry_run,
        auto_scaling_group_name=auto_scaling_group_name,
        previous=before,
        sizes=after,
        summary=summary,
    )


@task(
    cache_policy=NO_CACHE,
    name="clear-group-record",
    task_run_name="clear-group-record-{auto_scaling_group_name}",
    retries=0,
)
def clear_group_record(
    creds: AwsCredentials, auto_scaling_group_name: str, keys: list[str], *, dry_run: bool
) -> StepResult:
    """Remove fabflows' record tags ``keys`` from the group (absent: no-op)."""
    group = _group_or_fail(creds, auto_scaling_group_name)
    present = [k for k in keys if k in group.tags]
    if not present:
        return StepResult(changed=False, dry_run=dry_run, summary="no record to remove")
    if not dry_run:
        aws_client(creds, "autoscaling").delete_tags(
            Tags=[
                {
                    "ResourceId": auto_scaling_group_name,
                    "ResourceType": "auto-scaling-group",
                    "Key": k,
                }
                for k in present
            ]
        )
    return StepResult(
        changed=True,
        dry_run=dry_run,
        summary=f"{'Would remove' if dry_run else 'Removed'} {', '.join(present)} "
        f"from {auto_scaling_group_name}",
    )


@task(name="wait-for-group", cache_policy=NO_CACHE, retries=0)
def wait_for_group(
    creds: AwsCredentials,
    auto_scaling_group_name: str,
    count: int,
    *,
    timeout: float,
    poll: float = 5.0,
) -> AutoScalingGroup:
    """Poll until the group has exactly ``count`` instances, all InService (for 0: none at all).

    Raises:
        GroupWaitTimeout: not there after ``timeout``.
    """
    asg = aws_client(creds, "autoscaling")
    deadline = time.monotonic() + timeout
    waiting = Waiting(f"{auto_scaling_group_name} to have {count} instance(s) InService", timeout)
    while True:
        raw = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[auto_scaling_group_name])[
            "AutoScalingGroups"
        ]
        if not raw:
            raise ValueError(f"autoscaling group {auto_scaling_group_name} does not exist")
        instances = raw[0].get("Instances", [])
        in_service = [i for i in instances if i.get("LifecycleState") == "InService"]
        if len(instances) == count and len(in_service) == count:
            waiting.finish()
            return describe_auto_scaling_group.fn(creds, auto_scaling_group_name)
        waiting.tick(f"{len(instances)} instance(s), {len(in_service)} InService")
        if time.monotonic() >= deadline:
            states = ", ".join(f"{i['InstanceId']} {i.get('LifecycleState')}" for i in instances)
            raise GroupWaitTimeout(
                f"{auto_scaling_group_name}: after {timeout:.0f} s it has {len(instances)} "
                f"instance(s) ({states or 'none'}), {len(in_service)} InService; wanted {count}"
            )
        time.sleep(min(poll, max(0.05, deadline - time.monotonic())))


@task(
    cache_policy=NO_CACHE,
    name="use-launch-template-version",
    task_run_name="use-launch-template-version-{auto_scaling_group_name}",
    retries=0,
)
def use_launch_template_version(
    creds: AwsCredentials,
    auto_scaling_group_name: str,
    launch_template: str,
    version: int,
    *,
    dry_run: bool,
) -> StepResult:
    """Make the group launch ``version`` of its template: nothing to do when it follows
    ``$Latest``; the template's default version when it follows ``$Default``; else the group is
    pointed at the version. Compensation: the same task with the previous version."""
    group = _group_or_fail(creds, auto_scaling_group_name)
    pinned = group.launch_template_version
    if pinned == "$Latest":
        return StepResult(
            changed=False,
            dry_run=dry_run,
            summary=f"{auto_scaling_group_name} follows $Latest (v{version})",
        )
    if pinned == "$Default":
        ec2 = aws_client(creds, "ec2")
        current = ec2.describe_launch_templates(LaunchTemplateNames=[launch_template])[
            "LaunchTemplates"
        ][0]["DefaultVersionNumber"]
        if int(current) == version:
            return StepResult(
                changed=False,
                dry_run=dry_run,
                summary=f"{launch_template}'s default is already v{version}",
            )
        if not dry_run:
            ec2.modify_launch_template(
                LaunchTemplateName=launch_template, DefaultVersion=str(version)
            )
        return StepResult(
            changed=True,
            dry_run=dry_run,
            summary=f"{'Would make' if dry_run else 'Made'} v{version} the default "
            f"of {launch_template} (was v{current})",
        )
    if pinned == str(version):
        return StepResult(
            changed=False,
            dry_run=dry_run,
            summary=f"{auto_scaling_group_name} already uses v{version}",
        )
    if not dry_run:
        aws_client(creds, "autoscaling").update_auto_scaling_group(
            AutoScalingGroupName=auto_scaling_group_name,
            LaunchTemplate={"LaunchTemplateName": launch_template, "Version": str(version)},
        )
    return StepResult(
        changed=True,
        dry_run=dry_run,
        summary=f"{'Would point' if dry_run else 'Pointed'} {auto_scaling_group_name} "
        f"at {launch_template} v{version} (was v{pinned})",
    )
