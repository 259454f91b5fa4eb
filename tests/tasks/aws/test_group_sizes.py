"""The web group's sizes against a moto server: recorded before the change, restored exactly,
the first record kept by a second stop, waits that name the group's state."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from config import load_config
from fabflows.testing.configs import moto_section, write_config
from sandbox.aws_seed import seed
from tasks.aws.autoscaling import describe_auto_scaling_group
from tasks.aws.group_sizes import (
    CACHE_TAG,
    SIZES_TAG,
    CacheRecord,
    GroupWaitTimeout,
    clear_group_record,
    record_cache,
    record_group_sizes,
    recorded_cache,
    recorded_sizes,
    set_group_sizes,
    wait_for_group,
)
from tasks.aws.session import make_credentials

GROUP = "myproject-staging-ag"
SINCE = datetime(2026, 11, 27, 20, 0, tzinfo=UTC)


@pytest.fixture
def creds(tmp_path: Path, aws):
    cfg = load_config(write_config(tmp_path, fabflows=moto_section(aws.endpoint)))
    seed(
        aws.endpoint,
        cfg,
        ["staging"],
        "10.250.0.0/24",
        (f"10.250.0.{i}" for i in itertools.count(10)),
    )
    return make_credentials(cfg.fabflows.aws, cfg.region)


def _group(creds):
    with disable_run_logger():
        return describe_auto_scaling_group.fn(creds, GROUP)


def test_record_scale_to_zero_and_restore(creds) -> None:
    with disable_run_logger():
        dry = record_group_sizes.fn(creds, GROUP, SINCE, "run-1", dry_run=True)
        assert dry.changed and recorded_sizes(_group(creds)) is None
        rec = record_group_sizes.fn(creds, GROUP, SINCE, "run-1", dry_run=False)
        assert (rec.recorded.min, rec.recorded.desired, rec.recorded.max) == (1, 2, 4)
        assert recorded_sizes(_group(creds)) == rec.recorded

        assert set_group_sizes.fn(creds, GROUP, 0, 0, 0, dry_run=True).changed
        assert _group(creds).desired_capacity == 2
        down = set_group_sizes.fn(creds, GROUP, 0, 0, 0, dry_run=False)
        assert down.previous == (1, 2, 4)
        assert wait_for_group.fn(creds, GROUP, 0, timeout=10, poll=0.1).instance_ids == []
        assert not set_group_sizes.fn(creds, GROUP, 0, 0, 0, dry_run=False).changed

        # a second stop keeps the first record (it must not record 0/0/0)
        again = record_group_sizes.fn(creds, GROUP, datetime.now(UTC), "run-2", dry_run=False)
        assert not again.changed and again.recorded == rec.recorded

        # compensation: exactly the recorded sizes, and new instances
        set_group_sizes.fn(creds, GROUP, *down.previous, dry_run=False)
        back = wait_for_group.fn(creds, GROUP, 2, timeout=10, poll=0.1)
        assert (back.min_size, back.desired_capacity, back.max_size) == (1, 2, 4)
        assert clear_group_record.fn(creds, GROUP, [SIZES_TAG, CACHE_TAG], dry_run=False).changed
        assert SIZES_TAG not in _group(creds).tags
        assert not clear_group_record.fn(creds, GROUP, [SIZES_TAG], dry_run=False).changed


def test_cache_record_and_bad_sizes(creds) -> None:
    record = CacheRecord(
        ip="10.250.0.10",
        subnet="subnet-1",
        type="t1.micro",
        name="myproject_staging_cache",
        since=SINCE,
    )
    with disable_run_logger():
        assert record_cache.fn(creds, GROUP, record, dry_run=False).changed
        assert recorded_cache(_group(creds)) == record
        assert not record_cache.fn(creds, GROUP, record, dry_run=False).changed
        with pytest.raises(ValueError, match="min <= desired <= max"):
            set_group_sizes.fn(creds, GROUP, 2, 1, 4, dry_run=False)
        with pytest.raises(GroupWaitTimeout, match="has 2 instance"):
            wait_for_group.fn(creds, GROUP, 3, timeout=0.3, poll=0.1)
        with pytest.raises(ValueError, match="does not exist"):
            record_group_sizes.fn(creds, "no-such-group", SINCE, "r", dry_run=False)


def test_group_follows_or_is_pointed_at_a_version(creds, aws) -> None:
    from fabflows.testing.aws_fixtures import boto_client
    from tasks.aws.group_sizes import use_launch_template_version

    lt = "myproject-staging-web"
    with disable_run_logger():
        latest = use_launch_template_version.fn(creds, GROUP, lt, 2, dry_run=False)
        assert not latest.changed and "follows $Latest" in latest.summary
        boto_client(aws, "autoscaling").update_auto_scaling_group(
            AutoScalingGroupName=GROUP, LaunchTemplate={"LaunchTemplateName": lt, "Version": "1"}
        )
        boto_client(aws, "ec2").create_launch_template_version(
            LaunchTemplateName=lt,
            SourceVersion="1",
            LaunchTemplateData={"InstanceType": "m5.large"},
        )
        assert use_launch_template_version.fn(creds, GROUP, lt, 2, dry_run=True).changed
        assert _group(creds).launch_template_version == "1"
        pointed = use_launch_template_version.fn(creds, GROUP, lt, 2, dry_run=False)
        assert pointed.changed and _group(creds).launch_template_version == "2"
        assert not use_launch_template_version.fn(creds, GROUP, lt, 2, dry_run=False).changed
        use_launch_template_version.fn(creds, GROUP, lt, 1, dry_run=False)  # compensation
        assert _group(creds).launch_template_version == "1"
