"""suspend_processes / resume_processes against a moto server: the amazon.aws rhythm, compensation,
and the durable record on the group's tags."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from config import load_config
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.configs import moto_section, write_config
from tasks.aws.autoscaling import (
    UPGRADE_MODE_SUSPENDED_TAG,
    UPGRADE_MODE_TAG,
    UpgradeModeRecord,
    describe_auto_scaling_group,
    get_upgrade_mode_record,
    recorded_upgrade_mode,
    resume_processes,
    suspend_processes,
)
from tasks.aws.session import make_credentials

GROUP = "myproject-staging-ag"
WANTED = ["Launch", "Terminate", "HealthCheck", "ReplaceUnhealthy", "AZRebalance"]
RECORD = UpgradeModeRecord(
    run="11111111-2222-3333-4444-555555555555",
    flow="upgrade-packages",
    since=datetime(2026, 11, 26, 20, 0, tzinfo=UTC),
    by="ops1:4242:987654",
)


@pytest.fixture
def creds(tmp_path: Path, aws):
    cfg = load_config(write_config(tmp_path, fabflows=moto_section(aws.endpoint)))
    ec2 = boto_client(aws, "ec2")
    vpc = ec2.create_vpc(CidrBlock="10.251.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.251.0.0/24")["Subnet"]["SubnetId"]
    ec2.create_launch_template(
        LaunchTemplateName="web", LaunchTemplateData={"ImageId": "ami-12345678"}
    )
    boto_client(aws, "autoscaling").create_auto_scaling_group(
        AutoScalingGroupName=GROUP,
        LaunchTemplate={"LaunchTemplateName": "web", "Version": "$Latest"},
        MinSize=1,
        MaxSize=4,
        DesiredCapacity=1,
        VPCZoneIdentifier=subnet,
    )
    return make_credentials(cfg.fabflows.aws, cfg.region)


def _suspended(aws) -> list[str]:
    g = boto_client(aws, "autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])[
        "AutoScalingGroups"
    ][0]
    return sorted(p["ProcessName"] for p in g["SuspendedProcesses"])


def test_suspend_rhythm_and_exact_compensation(creds, aws) -> None:
    asg = boto_client(aws, "autoscaling")
    # someone else suspended AZRebalance and AddToLoadBalancer long ago: those must stay suspended
    asg.suspend_processes(
        AutoScalingGroupName=GROUP, ScalingProcesses=["AZRebalance", "AddToLoadBalancer"]
    )
    before = _suspended(aws)
    with disable_run_logger():
        dry = suspend_processes.fn(creds, GROUP, WANTED, RECORD, dry_run=True)
        assert dry.changed and dry.summary.startswith("Would suspend")
        assert _suspended(aws) == before  # a dry run writes nothing
        assert recorded_upgrade_mode(describe_auto_scaling_group.fn(creds, GROUP)) is None

        real = suspend_processes.fn(creds, GROUP, WANTED, RECORD, dry_run=False)
        assert real.changed
        assert real.processes == ["Launch", "Terminate", "HealthCheck", "ReplaceUnhealthy"]
        assert real.suspended_before == ["AZRebalance", "AddToLoadBalancer"]
        assert set(_suspended(aws)) == set(WANTED) | {"AddToLoadBalancer"}

        _, recorded = get_upgrade_mode_record.fn(creds, GROUP)
        assert recorded.record == RECORD
        assert recorded.suspended == ["HealthCheck", "Launch", "ReplaceUnhealthy", "Terminate"]

        again_dry = suspend_processes.fn(creds, GROUP, WANTED, RECORD, dry_run=True)
        again = suspend_processes.fn(creds, GROUP, WANTED, RECORD, dry_run=False)
        assert not again_dry.changed and not again.changed

        undo_dry = resume_processes.fn(creds, GROUP, dry_run=True)
        assert undo_dry.changed and "still suspended (not by fabflows)" in undo_dry.summary
        assert set(_suspended(aws)) == set(WANTED) | {"AddToLoadBalancer"}

        undo = resume_processes.fn(creds, GROUP, dry_run=False)
        assert undo.changed
        assert _suspended(aws) == before  # exactly the prior state, not "resume all"
        group = describe_auto_scaling_group.fn(creds, GROUP)
        assert UPGRADE_MODE_TAG not in group.tags and UPGRADE_MODE_SUSPENDED_TAG not in group.tags

        assert not resume_processes.fn(creds, GROUP, dry_run=False).changed


def test_second_suspend_merges_the_record_instead_of_forgetting_ours(creds, aws) -> None:
    with disable_run_logger():
        suspend_processes.fn(creds, GROUP, ["Launch"], RECORD, dry_run=False)
        # a later run (recovering a dead one) wants more: Launch is already suspended -- by us
        later = RECORD.model_copy(update={"run": "local-later"})
        suspend_processes.fn(creds, GROUP, ["Launch", "Terminate"], later, dry_run=False)
        _, recorded = get_upgrade_mode_record.fn(creds, GROUP)
        assert recorded.suspended == ["Launch", "Terminate"]
        assert recorded.record.run == "local-later"
        resume_processes.fn(creds, GROUP, dry_run=False)
    assert _suspended(aws) == []


def test_record_written_but_processes_never_suspended_is_undone_cleanly(creds, aws) -> None:
    """A run killed between writing the record and suspending: end-upgrade still ends cleanly."""
    boto_client(aws, "autoscaling").create_or_update_tags(
        Tags=[
            {
                "ResourceId": GROUP,
                "ResourceType": "auto-scaling-group",
                "Key": k,
                "Value": v,
                "PropagateAtLaunch": False,
            }
            for k, v in (
                (UPGRADE_MODE_TAG, RECORD.to_json()),
                (UPGRADE_MODE_SUSPENDED_TAG, "Launch"),
            )
        ]
    )
    with disable_run_logger():
        result = resume_processes.fn(creds, GROUP, dry_run=False)
    assert result.processes == ["Launch"]
    assert _suspended(aws) == []
    assert recorded_upgrade_mode(describe_auto_scaling_group.fn(creds, GROUP)) is None


def test_damaged_record_still_means_upgrade_mode(creds, aws) -> None:
    boto_client(aws, "autoscaling").create_or_update_tags(
        Tags=[
            {
                "ResourceId": GROUP,
                "ResourceType": "auto-scaling-group",
                "Key": UPGRADE_MODE_TAG,
                "Value": "{not json",
                "PropagateAtLaunch": False,
            }
        ]
    )
    group = describe_auto_scaling_group.fn(creds, GROUP)
    recorded = recorded_upgrade_mode(group)
    assert recorded is not None and recorded.record.flow == "unknown"


def test_unknown_group_is_a_clear_error(creds) -> None:
    with disable_run_logger(), pytest.raises(ValueError, match="nope-ag does not exist"):
        suspend_processes.fn(creds, "nope-ag", ["Launch"], RECORD, dry_run=True)


def test_record_too_long_for_a_tag_is_refused_before_any_write(creds, aws) -> None:
    long = RECORD.model_copy(update={"by": "x" * 300})
    with disable_run_logger(), pytest.raises(ValueError, match="AWS allows 256"):
        suspend_processes.fn(creds, GROUP, ["Launch"], long, dry_run=False)
    assert _suspended(aws) == []


def test_throttled_suspend_is_retried_by_botocore(creds, aws) -> None:
    aws.queue_fault("autoscaling", "SuspendProcesses", count=2)
    with disable_run_logger():
        suspend_processes.fn(creds, GROUP, ["Launch"], RECORD, dry_run=False)
    assert _suspended(aws) == ["Launch"]
