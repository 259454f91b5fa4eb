"""EC2 writes for stopping, starting and resizing servers, with the waits and records they need.

Durable records (so a run killed half-way can be finished or undone by the next one):

- ``fabflows:stopped`` on each instance fabflows stopped: JSON ``{"run", "flow", "since"}``. Written
  *before* the stop; start-environment reads it for the savings report and removes it once the
  server is back in service.
- ``fabflows:resize`` on an instance being resized: JSON ``{"run", "from", "to", "since"}``; the
  previous type is what the compensation puts back.

Waits poll DescribeInstances for the given ids every ``poll`` seconds up to ``timeout`` and fail
naming every instance not yet there (and its state); an instance that turns ``terminated`` while
we wait for ``running`` fails at once. Writes never retry blindly (``retries=0``); botocore's
standard retry mode handles throttling underneath.
"""

from __future__ import annotations

import time
from typing import Any

from botocore.exceptions import ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict, Field

from fabflows.progress import Waiting
from tasks.aws.ec2 import Server, server_from_instance
from tasks.aws.session import aws_client
from tasks.plan import RunRecord, StepResult

STOPPED_TAG = "fabflows:stopped"
RESIZE_TAG = "fabflows:resize"


class InstanceWaitTimeout(TimeoutError):
    """Instances did not reach the wanted state in time; the message names them."""


def stop_record_of(server: Server) -> RunRecord | None:
    return RunRecord.from_tag(server.tags.get(STOPPED_TAG))


# --------------------------------------------------------------------------- reads


def _describe_ids(creds: AwsCredentials, instance_ids: list[str]) -> list[Server]:
    if not instance_ids:
        return []
    ec2 = aws_client(creds, "ec2")
    out = []
    for page in ec2.get_paginator("describe_instances").paginate(InstanceIds=list(instance_ids)):
        for reservation in page["Reservations"]:
            out.extend(server_from_instance(i) for i in reservation["Instances"])
    order = {iid: n for n, iid in enumerate(instance_ids)}
    return sorted(out, key=lambda s: order.get(s.instance_id, 0))


@task(cache_policy=NO_CACHE, name="describe-instances", retries=2, retry_delay_seconds=2)
def describe_instances(creds: AwsCredentials, instance_ids: list[str]) -> list[Server]:
    """The given instances (any state, terminated included while EC2 still lists them)."""
    return _describe_ids(creds, instance_ids)


@task(name="wait-for-instances", cache_policy=NO_CACHE, retries=0)
def wait_for_instances(
    creds: AwsCredentials,
    instance_ids: list[str],
    state: str,
    *,
    timeout: float,
    poll: float = 5.0,
) -> list[Server]:
    """Poll until every instance is in ``state``; return them as last described.

    Raises:
        InstanceWaitTimeout: some are not there after ``timeout`` (or one was terminated while
            waiting for it to run).
    """
    deadline = time.monotonic() + timeout
    waiting = Waiting(f"{len(instance_ids)} instance(s) to be {state}", timeout)
    while True:
        servers = _describe_ids(creds, instance_ids)
        found = {s.instance_id for s in servers}
        pending = [s for s in servers if s.state != state]
        missing = [i for i in instance_ids if i not in found]
        if not pending and not missing:
            waiting.finish()
            return servers
        waiting.tick(", ".join(f"{s.instance_id} {s.state}" for s in pending) or "not listed yet")
        dead = [
            s for s in pending if s.state in ("terminated", "shutting-down") and state != s.state
        ]
        if dead and state in ("running", "stopped"):
            raise InstanceWaitTimeout(
                "; ".join(f"{s.instance_id} ({s.name or s.role}) is {s.state}" for s in dead)
                + f", waiting for {state}"
            )
        if time.monotonic() >= deadline:
            what = [f"{s.instance_id} ({s.name or s.role}) is {s.state}" for s in pending]
            what += [f"{i} not found" for i in missing]
            raise InstanceWaitTimeout(f"after {timeout:.0f} s, not {state}: " + "; ".join(what))
        time.sleep(min(poll, max(0.05, deadline - time.monotonic())))


@task(cache_policy=NO_CACHE, name="describe-instance-subnet", retries=2, retry_delay_seconds=2)
def describe_instance_subnet(creds: AwsCredentials, instance_id: str) -> str | None:
    """The subnet an instance runs in (to launch its replacement in the same place)."""
    reservations = aws_client(creds, "ec2").describe_instances(InstanceIds=[instance_id])[
        "Reservations"
    ]
    for reservation in reservations:
        for instance in reservation["Instances"]:
            return instance.get("SubnetId")
    return None


class InstanceTypeInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    instance_type: str
    vcpus: int
    memory_mib: int


@task(cache_policy=NO_CACHE, name="describe-instance-types", retries=2, retry_delay_seconds=2)
def describe_instance_types(
    creds: AwsCredentials, instance_types: list[str]
) -> tuple[dict[str, InstanceTypeInfo], list[str]]:
    """(known types with vCPUs and memory, types EC2 does not know) for the region."""
    ec2 = aws_client(creds, "ec2")
    known: dict[str, InstanceTypeInfo] = {}
    unknown: list[str] = []
    for itype in sorted(set(instance_types)):
        try:
            found = ec2.describe_instance_types(InstanceTypes=[itype])["InstanceTypes"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in (
                "InvalidInstanceType",
                "InvalidParameterValue",
            ):
                unknown.append(itype)
                continue
            raise
        if not found:
            unknown.append(itype)
            continue
        info = found[0]
        known[itype] = InstanceTypeInfo(
            instance_type=itype,
            vcpus=info["VCpuInfo"]["DefaultVCpus"],
            memory_mib=info["MemoryInfo"]["SizeInMiB"],
        )
    return known, unknown


@task(cache_policy=NO_CACHE, name="describe-launch-template-type", retries=2, retry_delay_seconds=2)
def describe_launch_template_type(
    creds: AwsCredentials, launch_template: str, version: str | None = None
) -> str | None:
    """The instance type a launch template version launches (None if it does not say)."""
    ec2 = aws_client(creds, "ec2")
    versions = ec2.describe_launch_template_versions(
        LaunchTemplateName=launch_template, Versions=[version or "$Latest"]
    )["LaunchTemplateVersions"]
    if not versions:
        return None
    return versions[0]["LaunchTemplateData"].get("InstanceType")


# --------------------------------------------------------------------------- writes


class InstancesResult(StepResult):
    """What a stop/start/terminate did, with the states it found."""

    instance_ids: list[str] = Field(description="Instances this task acted on (or would).")
    previous_states: dict[str, str] = Field(description="instance id -> state before the task.")


def _states(servers: list[Server]) -> dict[str, str]:
    return {s.instance_id: s.state for s in servers}


@task(cache_policy=NO_CACHE, name="stop-instances", retries=0)
def stop_instances(
    creds: AwsCredentials, instance_ids: list[str], record: RunRecord, *, dry_run: bool
) -> InstancesResult:
    """Stop the running (or pending) ones among ``instance_ids``, tagging each with ``record``
    first (``fabflows:stopped``). Stopped ones keep their first record. Compensation:
    :func:`start_instances`."""
    servers = _describe_ids(creds, instance_ids)
    targets = [s.instance_id for s in servers if s.state in ("running", "pending")]
    untagged = [
        s.instance_id
        for s in servers
        if s.state in ("stopped", "stopping") and STOPPED_TAG not in s.tags
    ]
    before = _states(servers)
    if not targets:
        summary = f"{', '.join(instance_ids) or 'nothing'}: already stopped"
        return InstancesResult(
            changed=False, dry_run=dry_run, summary=summary, instance_ids=[], previous_states=before
        )
    if dry_run:
        summary = f"Would stop {', '.join(targets)}"
    else:
        ec2 = aws_client(creds, "ec2")
        ec2.create_tags(
            Resources=targets + untagged, Tags=[{"Key": STOPPED_TAG, "Value": record.to_json()}]
        )
        ec2.stop_instances(InstanceIds=targets)
        summary = f"Stopping {', '.join(targets)}"
        get_run_logger().info("%s", summary)
    return InstancesResult(
        changed=True, dry_run=dry_run, summary=summary, instance_ids=targets, previous_states=before
    )


@task(cache_policy=NO_CACHE, name="start-instances", retries=0)
def start_instances(
    creds: AwsCredentials, instance_ids: list[str], *, dry_run: bool
) -> InstancesResult:
    """Start the stopped ones among ``instance_ids`` (running ones: no-op). Their
    ``fabflows:stopped`` records stay until :func:`clear_stop_records`."""
    servers = _describe_ids(creds, instance_ids)
    gone = [s.instance_id for s in servers if s.state in ("terminated", "shutting-down")]
    if gone:
        raise ValueError(f"cannot start terminated instance(s) {', '.join(gone)}")
    targets = [s.instance_id for s in servers if s.state in ("stopped", "stopping")]
    before = _states(servers)
    if not targets:
        return InstancesResult(
            changed=False,
            dry_run=dry_run,
            summary=f"{', '.join(instance_ids) or 'nothing'}: already running",
            instance_ids=[],
            previous_states=before,
        )
    if dry_run:
        summary = f"Would start {', '.join(targets)}"
    else:
        ec2 = aws_client(creds, "ec2")
        stopping = [s.instance_id for s in servers if s.state == "stopping"]
        if stopping:  # EC2 refuses to start an instance that is still stopping
            wait_for_instances.fn(creds, stopping, "stopped", timeout=600, poll=5)
        ec2.start_instances(InstanceIds=targets)
        summary = f"Starting {', '.join(targets)}"
        get_run_logger().info("%s", summary)
    return InstancesResult(
        changed=True, dry_run=dry_run, summary=summary, instance_ids=targets, previous_states=before
    )


@task(cache_policy=NO_CACHE, name="clear-instance-tag", retries=0)
def clear_instance_tag(
    creds: AwsCredentials, instance_ids: list[str], key: str, *, dry_run: bool
) -> StepResult:
    """Remove tag ``key`` (a fabflows record) from the instances that have it."""
    servers = _describe_ids(creds, instance_ids)
    tagged = [s.instance_id for s in servers if key in s.tags]
    if not tagged:
        return StepResult(changed=False, dry_run=dry_run, summary=f"no {key} record")
    if dry_run:
        return StepResult(
            changed=True, dry_run=True, summary=f"Would remove {key} from {', '.join(tagged)}"
        )
    aws_client(creds, "ec2").delete_tags(Resources=tagged, Tags=[{"Key": key}])
    return StepResult(
        changed=True, dry_run=False, summary=f"Removed {key} from {', '.join(tagged)}"
    )


@task(cache_policy=NO_CACHE, name="terminate-instances", retries=0, tags=["non-idempotent"])
def terminate_instances(
    creds: AwsCredentials, instance_ids: list[str], *, dry_run: bool
) -> InstancesResult:
    """Terminate the instances (already terminated: no-op). NO compensation: the instance and
    its instance-store data are gone; plans put this after the last point they can back out."""
    servers = _describe_ids(creds, instance_ids)
    targets = [s.instance_id for s in servers if s.state not in ("terminated", "shutting-down")]
    before = _states(servers)
    if not targets:
        return InstancesResult(
            changed=False,
            dry_run=dry_run,
            summary="already terminated",
            instance_ids=[],
            previous_states=before,
        )
    if dry_run:
        summary = f"Would terminate {', '.join(targets)}"
    else:
        aws_client(creds, "ec2").terminate_instances(InstanceIds=targets)
        summary = f"Terminating {', '.join(targets)}"
        get_run_logger().info("%s", summary)
    return InstancesResult(
        changed=True, dry_run=dry_run, summary=summary, instance_ids=targets, previous_states=before
    )


@task(
    cache_policy=NO_CACHE,
    name="reboot-instance",
    task_run_name="reboot-{instance_id}",
    retries=0,
    tags=["non-idempotent"],
)
def reboot_instance(creds: AwsCredentials, instance_id: str, *, dry_run: bool) -> StepResult:
    """Ask EC2 to reboot a running instance (RebootInstances: an orderly OS reboot).

    Not idempotent (each call reboots) and never retried: the caller waits for the new boot
    (:func:`tasks.ssh.boot.wait_for_reboot`). No compensation: a reboot cannot be undone; a server
    that does not come back is reported.
    """
    (server,) = _describe_ids(creds, [instance_id])
    if server.state != "running":
        raise ValueError(f"{instance_id} is {server.state}, not running: not rebooted")
    if dry_run:
        return StepResult(changed=True, dry_run=True, summary=f"Would reboot {instance_id}")
    aws_client(creds, "ec2").reboot_instances(InstanceIds=[instance_id])
    summary = f"Rebooting {instance_id}"
    get_run_logger().info("%s", summary)
    return StepResult(changed=True, dry_run=False, summary=summary)


class LaunchResult(StepResult):
    instance_id: str | None = Field(description="The new instance (None in a dry run).")
    private_ip_address: str | None = None


@task(cache_policy=NO_CACHE, name="run-instance-from-template", retries=0, tags=["non-idempotent"])
def run_instance_from_template(
    creds: AwsCredentials,
    launch_template: str,
    *,
    subnet_id: str | None,
    private_ip_address: str | None,
    instance_type: str | None,
    tags: dict[str, str],
    dry_run: bool,
) -> LaunchResult:
    """Launch one instance from ``launch_template`` (latest version) into the recorded subnet, at
    the recorded private address when given, with ``tags``. Not idempotent: callers check that no
    such server runs first. Compensation: :func:`terminate_instances`."""
    where = f" at {private_ip_address}" if private_ip_address else ""
    if dry_run:
        return LaunchResult(
            changed=True,
            dry_run=True,
            instance_id=None,
            private_ip_address=private_ip_address,
            summary=f"Would launch {tags.get('role', 'a server')} from {launch_template}{where}",
        )
    kwargs: dict[str, Any] = {
        "LaunchTemplate": {"LaunchTemplateName": launch_template, "Version": "$Latest"},
        "MinCount": 1,
        "MaxCount": 1,
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ],
    }
    if subnet_id:
        kwargs["SubnetId"] = subnet_id
    if private_ip_address:
        kwargs["PrivateIpAddress"] = private_ip_address
    if instance_type:
        kwargs["InstanceType"] = instance_type
    instance = aws_client(creds, "ec2").run_instances(**kwargs)["Instances"][0]
    summary = (
        f"Launched {instance['InstanceId']} from {launch_template}"
        f" at {instance.get('PrivateIpAddress')}"
    )
    get_run_logger().info("%s", summary)
    return LaunchResult(
        changed=True,
        dry_run=False,
        instance_id=instance["InstanceId"],
        private_ip_address=instance.get("PrivateIpAddress"),
        summary=summary,
    )


class TypeResult(StepResult):
    instance_id: str
    previous_type: str
    instance_type: str


@task(
    cache_policy=NO_CACHE,
    name="modify-instance-type",
    task_run_name="modify-instance-type-{instance_id}",
    retries=0,
)
def modify_instance_type(
    creds: AwsCredentials, instance_id: str, instance_type: str, *, dry_run: bool
) -> TypeResult:
    """Change a *stopped* instance's type (same type: no-op). Compensation: the same task with
    the result's ``previous_type``."""
    server = _describe_ids(creds, [instance_id])[0]
    if server.instance_type == instance_type:
        return TypeResult(
            changed=False,
            dry_run=dry_run,
            instance_id=instance_id,
            previous_type=server.instance_type,
            instance_type=instance_type,
            summary=f"{instance_id} is already {instance_type}",
        )
    if server.state != "stopped" and not dry_run:
        raise ValueError(f"{instance_id} is {server.state}: its type changes only while stopped")
    if dry_run:
        summary = f"Would change {instance_id} from {server.instance_type} to {instance_type}"
    else:
        aws_client(creds, "ec2").modify_instance_attribute(
            InstanceId=instance_id, InstanceType={"Value": instance_type}
        )
        summary = f"Changed {instance_id} from {server.instance_type} to {instance_type}"
        get_run_logger().info("%s", summary)
    return TypeResult(
        changed=True,
        dry_run=dry_run,
        instance_id=instance_id,
        previous_type=server.instance_type,
        instance_type=instance_type,
        summary=summary,
    )


@task(cache_policy=NO_CACHE, name="tag-instances", retries=0)
def tag_instances(
    creds: AwsCredentials, instance_ids: list[str], tags: dict[str, str], *, dry_run: bool
) -> StepResult:
    """Set ``tags`` on the instances (already set to these values: no-op)."""
    servers = _describe_ids(creds, instance_ids)
    todo = [s.instance_id for s in servers if any(s.tags.get(k) != v for k, v in tags.items())]
    if not todo:
        return StepResult(changed=False, dry_run=dry_run, summary="tags already set")
    if dry_run:
        return StepResult(
            changed=True,
            dry_run=True,
            summary=f"Would tag {', '.join(todo)} with {', '.join(tags)}",
        )
    aws_client(creds, "ec2").create_tags(
        Resources=todo, Tags=[{"Key": k, "Value": v} for k, v in tags.items()]
    )
    return StepResult(
        changed=True, dry_run=False, summary=f"Tagged {', '.join(todo)} with {', '.join(tags)}"
    )


class LaunchTemplateResult(StepResult):
    launch_template: str
    version: int | None = Field(description="The version launches now use (None: dry run).")
    previous_version: int
    previous_type: str | None


@task(
    cache_policy=NO_CACHE,
    name="create-launch-template-version",
    task_run_name="create-launch-template-version-{launch_template}",
    retries=0,
)
def create_launch_template_version(
    creds: AwsCredentials, launch_template: str, instance_type: str, *, dry_run: bool
) -> LaunchTemplateResult:
    """A new version of the launch template: its latest version with ``instance_type`` (the latest
    already has it: no-op). Compensation: the same task with ``previous_type`` (EC2 versions are
    immutable, so the way back is one more version, equal to the old one)."""
    ec2 = aws_client(creds, "ec2")
    latest = ec2.describe_launch_template_versions(
        LaunchTemplateName=launch_template, Versions=["$Latest"]
    )["LaunchTemplateVersions"][0]
    number = int(latest["VersionNumber"])
    current = latest["LaunchTemplateData"].get("InstanceType")
    if current == instance_type:
        return LaunchTemplateResult(
            changed=False,
            dry_run=dry_run,
            launch_template=launch_template,
            version=number,
            previous_version=number,
            previous_type=current,
            summary=f"{launch_template} v{number} already launches {instance_type}",
        )
    if dry_run:
        return LaunchTemplateResult(
            changed=True,
            dry_run=True,
            launch_template=launch_template,
            version=None,
            previous_version=number,
            previous_type=current,
            summary=f"Would add a version of {launch_template} (v{number} with {instance_type})",
        )
    created = ec2.create_launch_template_version(
        LaunchTemplateName=launch_template,
        SourceVersion=str(number),
        VersionDescription=f"fabflows: {current} -> {instance_type}",
        LaunchTemplateData={"InstanceType": instance_type},
    )["LaunchTemplateVersion"]
    version = int(created["VersionNumber"])
    summary = f"{launch_template} v{version}: v{number} with {instance_type} (was {current})"
    get_run_logger().info("%s", summary)
    return LaunchTemplateResult(
        changed=True,
        dry_run=False,
        launch_template=launch_template,
        version=version,
        previous_version=number,
        previous_type=current,
        summary=summary,
    )
