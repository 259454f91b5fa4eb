"""EC2 writes against a moto server: the amazon.aws rhythm, records written before the write,
compensations, waits that name what is late, instance type validation."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from config import load_config
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.configs import moto_section, write_config
from sandbox.aws_seed import seed
from tasks.aws.ec2 import describe_servers
from tasks.aws.ec2_writes import (
    STOPPED_TAG,
    InstanceWaitTimeout,
    RunRecord,
    clear_instance_tag,
    describe_instance_subnet,
    describe_instance_types,
    describe_instances,
    describe_launch_template_type,
    modify_instance_type,
    reboot_instance,
    run_instance_from_template,
    start_instances,
    stop_instances,
    stop_record_of,
    tag_instances,
    terminate_instances,
    wait_for_instances,
)
from tasks.aws.session import make_credentials

RECORD = RunRecord(
    run="run-1", flow="stop-environment", since=datetime(2026, 11, 26, 20, tzinfo=UTC)
)


@pytest.fixture
def env(tmp_path: Path, aws):
    cfg = load_config(write_config(tmp_path, fabflows=moto_section(aws.endpoint)))
    addresses = (f"10.250.0.{i}" for i in itertools.count(10))
    seeded = seed(aws.endpoint, cfg, ["staging"], "10.250.0.0/24", addresses)
    creds = make_credentials(cfg.fabflows.aws, cfg.region)
    return creds, seeded.environments[0], seeded.subnet_id


def _state(creds, iid: str) -> str:
    with disable_run_logger():
        return describe_instances.fn(creds, [iid])[0].state


def test_stop_start_rhythm_with_record_first(env) -> None:
    creds, seeded, _ = env
    worker = seeded.instance_ids["worker"][0]
    with disable_run_logger():
        dry = stop_instances.fn(creds, [worker], RECORD, dry_run=True)
        assert dry.changed and dry.summary == f"Would stop {worker}"
        assert _state(creds, worker) == "running"
        assert stop_record_of(describe_instances.fn(creds, [worker])[0]) is None

        real = stop_instances.fn(creds, [worker], RECORD, dry_run=False)
        assert real.changed and real.previous_states == {worker: "running"}
        stopped = wait_for_instances.fn(creds, [worker], "stopped", timeout=10, poll=0.1)
        assert stop_record_of(stopped[0]) == RECORD
        assert not stop_instances.fn(creds, [worker], RECORD, dry_run=True).changed
        later = RECORD.model_copy(update={"run": "run-2"})
        assert not stop_instances.fn(creds, [worker], later, dry_run=False).changed
        assert stop_record_of(describe_instances.fn(creds, [worker])[0]) == RECORD  # first kept

        # compensation: start brings it back; the record stays until cleared
        assert start_instances.fn(creds, [worker], dry_run=True).changed
        assert _state(creds, worker) == "stopped"
        assert start_instances.fn(creds, [worker], dry_run=False).changed
        wait_for_instances.fn(creds, [worker], "running", timeout=10, poll=0.1)
        assert not start_instances.fn(creds, [worker], dry_run=False).changed
        assert clear_instance_tag.fn(creds, [worker], STOPPED_TAG, dry_run=False).changed
        assert STOPPED_TAG not in describe_instances.fn(creds, [worker])[0].tags
        assert not clear_instance_tag.fn(creds, [worker], STOPPED_TAG, dry_run=False).changed


def test_wait_names_the_late_instances(env) -> None:
    creds, seeded, _ = env
    primary = seeded.instance_ids["db-primary"][0]
    with disable_run_logger(), pytest.raises(InstanceWaitTimeout, match=f"{primary}.*is running"):
        wait_for_instances.fn(creds, [primary], "stopped", timeout=0.3, poll=0.1)


def test_waiting_for_a_terminated_instance_to_run_fails_at_once(env) -> None:
    creds, seeded, _ = env
    cache = seeded.instance_ids["cache"][0]
    with disable_run_logger():
        terminate_instances.fn(creds, [cache], dry_run=False)
        with pytest.raises(InstanceWaitTimeout, match="terminated"):
            wait_for_instances.fn(creds, [cache], "running", timeout=30, poll=0.1)
        with pytest.raises(ValueError, match="cannot start terminated"):
            start_instances.fn(creds, [cache], dry_run=False)
        assert not terminate_instances.fn(creds, [cache], dry_run=False).changed


def test_modify_type_only_while_stopped_and_back(env) -> None:
    creds, seeded, _ = env
    replica = seeded.instance_ids["db-replica"][0]
    with disable_run_logger():
        with pytest.raises(ValueError, match="only while stopped"):
            modify_instance_type.fn(creds, replica, "m5.large", dry_run=False)
        assert modify_instance_type.fn(creds, replica, "m5.large", dry_run=True).changed
        stop_instances.fn(creds, [replica], RECORD, dry_run=False)
        done = modify_instance_type.fn(creds, replica, "m5.large", dry_run=False)
        assert done.previous_type == "m1.small"
        assert describe_instances.fn(creds, [replica])[0].instance_type == "m5.large"
        assert not modify_instance_type.fn(creds, replica, "m5.large", dry_run=False).changed
        modify_instance_type.fn(creds, replica, done.previous_type, dry_run=False)
        assert describe_instances.fn(creds, [replica])[0].instance_type == "m1.small"


def test_launch_from_template_at_the_recorded_place(env, aws) -> None:
    creds, seeded, subnet = env
    boto_client(aws, "ec2").create_launch_template(
        LaunchTemplateName="cache", LaunchTemplateData={"ImageId": "ami-12345678"}
    )
    tags = {
        "Name": "myproject_staging_cache",
        "deployment": "myproject",
        "environment": "staging",
        "role": "cache",
    }
    with disable_run_logger():
        assert describe_instance_subnet.fn(creds, seeded.instance_ids["cache"][0]) == subnet
        dry = run_instance_from_template.fn(
            creds,
            "cache",
            subnet_id=subnet,
            private_ip_address="10.250.0.200",
            instance_type="t3.small",
            tags=tags,
            dry_run=True,
        )
        assert dry.instance_id is None and "Would launch cache" in dry.summary
        new = run_instance_from_template.fn(
            creds,
            "cache",
            subnet_id=subnet,
            private_ip_address="10.250.0.200",
            instance_type="t3.small",
            tags=tags,
            dry_run=False,
        )
        servers = describe_servers.fn(creds, "myproject", "staging", roles=["cache"])
    launched = next(s for s in servers if s.instance_id == new.instance_id)
    assert launched.private_ip_address == "10.250.0.200" and launched.instance_type == "t3.small"


def test_tags_and_types(env) -> None:
    creds, seeded, _ = env
    worker = seeded.instance_ids["worker"][0]
    with disable_run_logger():
        assert tag_instances.fn(creds, [worker], {"k": "v"}, dry_run=False).changed
        assert not tag_instances.fn(creds, [worker], {"k": "v"}, dry_run=False).changed
        known, unknown = describe_instance_types.fn(creds, ["m5.large", "bogus.huge", "t3.micro"])
        assert sorted(known) == ["m5.large", "t3.micro"] and unknown == ["bogus.huge"]
        assert known["m5.large"].memory_mib == 8192
        assert describe_launch_template_type.fn(creds, "myproject-staging-web") == "m1.small"


def test_launch_template_version_rhythm_and_way_back(env) -> None:
    from tasks.aws.ec2_writes import create_launch_template_version

    creds, _, _ = env
    lt = "myproject-staging-web"
    with disable_run_logger():
        dry = create_launch_template_version.fn(creds, lt, "m5.large", dry_run=True)
        assert dry.changed and dry.version is None and dry.previous_type == "m1.small"
        assert describe_launch_template_type.fn(creds, lt) == "m1.small"
        new = create_launch_template_version.fn(creds, lt, "m5.large", dry_run=False)
        assert (new.previous_version, new.version) == (1, 2)
        assert describe_launch_template_type.fn(creds, lt) == "m5.large"
        assert not create_launch_template_version.fn(creds, lt, "m5.large", dry_run=False).changed
        # versions are immutable: the way back is one more version, equal to the old one
        back = create_launch_template_version.fn(creds, lt, new.previous_type, dry_run=False)
        assert back.version == 3 and describe_launch_template_type.fn(creds, lt) == "m1.small"


def test_reboot_instance_dry_apply_and_refused_when_not_running(env, aws) -> None:
    creds, seeded, _ = env
    worker = seeded.instance_ids["worker"][0]

    def reboots() -> int:  # what reached EC2's API
        return aws.injector.requests.count(("ec2", "RebootInstances"))

    with disable_run_logger():
        dry = reboot_instance.fn(creds, worker, dry_run=True)
        assert dry.changed and dry.dry_run and dry.summary == f"Would reboot {worker}"
        assert reboots() == 0
        done = reboot_instance.fn(creds, worker, dry_run=False)
        assert done.summary == f"Rebooting {worker}" and not done.dry_run
        assert reboots() == 1
        stop_instances.fn(creds, [worker], RECORD, dry_run=False)
        with pytest.raises(ValueError, match="stopped, not running: not rebooted"):
            reboot_instance.fn(creds, worker, dry_run=False)
        assert reboots() == 1
