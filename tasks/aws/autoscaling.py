"""Auto Scaling: the web group's state, and suspending/resuming its processes for upgrade mode.

Upgrade mode is recorded durably on the group itself (tags ``fabflows:upgrade-mode`` and
``fabflows:upgrade-mode-suspended``), so that a run killed in the middle (SIGKILL, a lost worker)
can be undone by the next end-upgrade, which resumes exactly what fabflows suspended.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict, Field

from tasks.aws.session import aws_client
from tasks.plan import RunRecord, StepResult


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


@task(cache_policy=NO_CACHE, name="describe-auto-scaling-group", retries=2, retry_delay_seconds=2)
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


# --------------------------------------------------------------------------- upgrade mode record

UPGRADE_MODE_TAG = "fabflows:upgrade-mode"
"""Group tag naming the run that holds upgrade mode (JSON: run, flow, since, by)."""

UPGRADE_MODE_SUSPENDED_TAG = "fabflows:upgrade-mode-suspended"
"""Group tag listing the processes fabflows suspended (comma-separated): exactly what to resume."""

TAG_VALUE_LIMIT = 256
"""Auto Scaling tag values are at most 256 characters."""


class UpgradeModeRecord(RunRecord):
    """Who put the environment in upgrade mode, and when. Kept on the group and on each web server."""

    run: str = Field(
        description="Flow run id that holds upgrade mode (local-<uuid> outside Prefect)."
    )
    flow: str = Field(
        description="Flow holding it: begin-upgrade (until end-upgrade) or a runbook with a window."
    )
    since: datetime = Field(description="When upgrade mode began (UTC).")
    by: str = Field(
        default="", description="host:pid:start of the process that took it (liveness check)."
    )

    @classmethod
    def from_json(cls, text: str) -> UpgradeModeRecord:
        """Parse a record; a damaged one still says *that* upgrade mode is on (flow "unknown")."""
        try:
            return cls.model_validate_json(text)
        except ValueError:
            return cls(run="unknown", flow="unknown", since=datetime.now(UTC), by=text[:200])


class RecordedUpgradeMode(BaseModel):
    """The group's durable record: the holder, and the processes fabflows suspended."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    record: UpgradeModeRecord
    suspended: list[str] = Field(
        default_factory=list, description="Processes fabflows suspended; end-upgrade resumes these."
    )


class ProcessesResult(StepResult):
    """What suspend_processes / resume_processes did, with the state they found."""

    auto_scaling_group_name: str
    suspended_before: list[str] = Field(description="Processes suspended when the task started.")
    processes: list[str] = Field(
        description="Processes this task suspended or resumed (or would, in a dry run)."
    )
    recorded: RecordedUpgradeMode | None = Field(
        description="The record on the group after the task (None: no record)."
    )


def recorded_upgrade_mode(group: AutoScalingGroup) -> RecordedUpgradeMode | None:
    """Pure: the record kept in the group's tags, or None."""
    raw = group.tags.get(UPGRADE_MODE_TAG)
    suspended = group.tags.get(UPGRADE_MODE_SUSPENDED_TAG, "")
    if raw is None and not suspended:
        return None
    record = UpgradeModeRecord.from_json(raw or "")
    return RecordedUpgradeMode(
        record=record, suspended=sorted({p for p in suspended.split(",") if p})
    )


def _tags(group_name: str, values: dict[str, str]) -> list[dict[str, Any]]:
    for key, value in values.items():
        if len(value) > TAG_VALUE_LIMIT:
            raise ValueError(
                f"{group_name}: tag {key} would be {len(value)} characters (AWS allows {TAG_VALUE_LIMIT})"
            )
    return [
        {
            "ResourceId": group_name,
            "ResourceType": "auto-scaling-group",
            "Key": key,
            "Value": value,
            "PropagateAtLaunch": False,
        }
        for key, value in values.items()
    ]


def _describe_or_fail(creds: AwsCredentials, auto_scaling_group_name: str) -> AutoScalingGroup:
    group = describe_auto_scaling_group.fn(creds, auto_scaling_group_name)
    if group is None:
        raise ValueError(f"autoscaling group {auto_scaling_group_name} does not exist")
    return group


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry AWS trouble, not a group that does not exist (ValueError)."""
    try:
        state.result()
    except ValueError:
        return False
    except Exception:
        return True
    return True


@task(
    cache_policy=NO_CACHE,
    name="get-upgrade-mode-record",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_transient,
)
def get_upgrade_mode_record(
    creds: AwsCredentials, auto_scaling_group_name: str
) -> tuple[AutoScalingGroup, RecordedUpgradeMode | None]:
    """The group and the upgrade-mode record on it (None when fabflows recorded nothing)."""
    group = _describe_or_fail(creds, auto_scaling_group_name)
    return group, recorded_upgrade_mode(group)


@task(
    cache_policy=NO_CACHE,
    name="suspend-processes",
    task_run_name="suspend-processes-{auto_scaling_group_name}",
    retries=0,
)
def suspend_processes(
    creds: AwsCredentials,
    auto_scaling_group_name: str,
    processes: list[str],
    record: UpgradeModeRecord,
    *,
    dry_run: bool,
) -> ProcessesResult:
    """Suspend ``processes`` on the group, recording first exactly which ones fabflows suspended.

    Processes already suspended (by someone else, or by an earlier run whose record is kept) are
    not recorded as ours, so the compensation (:func:`resume_processes`) leaves them suspended.
    The record is written *before* the suspension: a run killed in between leaves a record naming
    processes that may not be suspended, which resuming handles (resuming a running process is a
    no-op); the other order could leave suspended processes nobody knows about.

    Idempotent: run again, it suspends nothing new and keeps the record (merged with the earlier one).
    """
    group = _describe_or_fail(creds, auto_scaling_group_name)
    before = list(group.suspended_processes)
    prior = recorded_upgrade_mode(group)
    to_suspend = [p for p in processes if p not in before]
    ours = sorted(set(prior.suspended if prior else []) | set(to_suspend))
    after = RecordedUpgradeMode(record=record, suspended=ours)
    tag_values = {UPGRADE_MODE_TAG: record.to_json(), UPGRADE_MODE_SUSPENDED_TAG: ",".join(ours)}
    tags = _tags(auto_scaling_group_name, tag_values)
    record_changes = prior != after
    changed = bool(to_suspend) or record_changes
    if not changed:
        summary = (
            f"{auto_scaling_group_name}: {', '.join(processes)} already suspended and recorded"
        )
    elif dry_run:
        summary = (
            f"Would suspend {', '.join(to_suspend) or 'nothing new'} on {auto_scaling_group_name}"
            f" (already suspended: {', '.join(before) or 'none'}) and record it"
        )
    else:
        client = aws_client(creds, "autoscaling")
        if record_changes:
            client.create_or_update_tags(Tags=tags)
        if to_suspend:
            client.suspend_processes(
                AutoScalingGroupName=auto_scaling_group_name, ScalingProcesses=to_suspend
            )
        summary = (
            f"Suspended {', '.join(to_suspend) or 'nothing new'} on {auto_scaling_group_name}"
            f" (already suspended: {', '.join(before) or 'none'})"
        )
    get_run_logger().info("%s", summary)
    return ProcessesResult(
        changed=changed,
        dry_run=dry_run,
        summary=summary,
        auto_scaling_group_name=auto_scaling_group_name,
        suspended_before=before,
        processes=to_suspend,
        recorded=after,
    )


@task(
    cache_policy=NO_CACHE,
    name="resume-processes",
    task_run_name="resume-processes-{auto_scaling_group_name}",
    retries=0,
)
def resume_processes(
    creds: AwsCredentials, auto_scaling_group_name: str, *, dry_run: bool
) -> ProcessesResult:
    """Resume exactly the processes fabflows recorded as suspended by it, then drop the record.

    The compensation of :func:`suspend_processes`. Processes suspended by anyone else stay
    suspended. Without a record it changes nothing. Resume first, record removed last: a run killed
    in between leaves the record, and the next end-upgrade resumes (a no-op) and removes it.
    """
    group = _describe_or_fail(creds, auto_scaling_group_name)
    before = list(group.suspended_processes)
    prior = recorded_upgrade_mode(group)
    if prior is None:
        others = f" (suspended, not by fabflows: {', '.join(before)})" if before else ""
        summary = f"{auto_scaling_group_name}: no upgrade-mode record; nothing to resume{others}"
        get_run_logger().info("%s", summary)
        return ProcessesResult(
            changed=False,
            dry_run=dry_run,
            summary=summary,
            auto_scaling_group_name=auto_scaling_group_name,
            suspended_before=before,
            processes=[],
            recorded=None,
        )
    to_resume = list(prior.suspended)
    left = [p for p in before if p not in to_resume]
    tail = f"; still suspended (not by fabflows): {', '.join(left)}" if left else ""
    if dry_run:
        summary = (
            f"Would resume {', '.join(to_resume) or 'nothing'} on {auto_scaling_group_name}"
            f" and remove the upgrade-mode record{tail}"
        )
        recorded: RecordedUpgradeMode | None = prior
    else:
        client = aws_client(creds, "autoscaling")
        if to_resume:
            client.resume_processes(
                AutoScalingGroupName=auto_scaling_group_name, ScalingProcesses=to_resume
            )
        client.delete_tags(
            Tags=[
                {
                    "ResourceId": auto_scaling_group_name,
                    "ResourceType": "auto-scaling-group",
                    "Key": k,
                }
                for k in (UPGRADE_MODE_TAG, UPGRADE_MODE_SUSPENDED_TAG)
            ]
        )
        summary = f"Resumed {', '.join(to_resume) or 'nothing'} on {auto_scaling_group_name}{tail}"
        recorded = None
    get_run_logger().info("%s", summary)
    return ProcessesResult(
        changed=True,
        dry_run=dry_run,
        summary=summary,
        auto_scaling_group_name=auto_scaling_group_name,
        suspended_before=before,
        processes=to_resume,
        recorded=recorded,
    )


@task(
    cache_policy=NO_CACHE,
    name="resume-listed-processes",
    task_run_name="resume-listed-processes-{auto_scaling_group_name}",
    retries=0,
)
def resume_listed_processes(
    creds: AwsCredentials, auto_scaling_group_name: str, processes: list[str], *, dry_run: bool
) -> ProcessesResult:
    """Resume exactly ``processes`` (found suspended with no run holding them; the watchdog).

    No compensation: the processes were suspended by no live run (by hand, or by a run that is
    gone), and resuming them is what brings the group back to normal. Processes not listed stay
    as they are; an upgrade-mode record is left to end-upgrade.
    """
    group = _describe_or_fail(creds, auto_scaling_group_name)
    before = list(group.suspended_processes)
    to_resume = [p for p in processes if p in before]
    if not to_resume:
        summary = f"{auto_scaling_group_name}: none of {', '.join(processes)} is suspended"
        changed = False
    elif dry_run:
        summary = f"Would resume {', '.join(to_resume)} on {auto_scaling_group_name}"
        changed = True
    else:
        aws_client(creds, "autoscaling").resume_processes(
            AutoScalingGroupName=auto_scaling_group_name, ScalingProcesses=to_resume
        )
        summary = f"Resumed {', '.join(to_resume)} on {auto_scaling_group_name}"
        changed = True
    get_run_logger().info("%s", summary)
    return ProcessesResult(
        changed=changed,
        dry_run=dry_run,
        summary=summary,
        auto_scaling_group_name=auto_scaling_group_name,
        suspended_before=before,
        processes=to_resume,
        recorded=recorded_upgrade_mode(group),
    )
