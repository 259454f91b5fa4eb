"""The web group's instances against moto: standby, desired capacity, termination, waits."""

from __future__ import annotations

import itertools

import pytest
from prefect.logging import disable_run_logger

from config import load_config
from fabflows.runbook import load_context
from fabflows.testing import moto_fidelity
from fabflows.testing.configs import moto_section, write_config
from sandbox.aws_seed import seed
from tasks.aws.instance_refresh import (
    GroupTimeout,
    enter_standby,
    exit_standby,
    group_instances,
    set_desired_capacity,
    terminate_group_instance,
    wait_for_new_instance,
)
from tasks.aws.load_balancers import Targets, health_of

GROUP = "myproject-staging-ag"


@pytest.fixture
def ctx(aws, tmp_path):
    moto_fidelity.apply()
    path = write_config(tmp_path, fabflows=moto_section(aws.endpoint))
    seed(
        aws.endpoint,
        load_config(path),
        ["staging"],
        "10.98.0.0/24",
        (f"10.98.0.{n}" for n in itertools.count(200)),
    )
    return load_context("staging", config=str(path))


def test_standby_rhythm_and_load_balancers(ctx) -> None:
    a, b = [i.instance_id for i in group_instances(ctx.creds, GROUP)]
    group = ctx.creds.get_client("autoscaling").describe_auto_scaling_groups()["AutoScalingGroups"][
        0
    ]
    targets = Targets(
        load_balancer_names=group["LoadBalancerNames"], target_group_arns=group["TargetGroupARNs"]
    )
    with disable_run_logger():
        assert enter_standby.fn(ctx.creds, GROUP, a, dry_run=True).changed
        assert {i.lifecycle_state for i in group_instances(ctx.creds, GROUP)} == {"InService"}
        out = enter_standby.fn(ctx.creds, GROUP, a, dry_run=False)
        assert out.changed and out.lifecycle_before == "InService"
        assert set(health_of(ctx.creds, [a], targets).values()) == {"absent"}
        assert not enter_standby.fn(ctx.creds, GROUP, a, dry_run=False).changed
        back = exit_standby.fn(ctx.creds, GROUP, a, dry_run=False)
        assert back.changed and back.lifecycle_before == "Standby"
        assert set(health_of(ctx.creds, [a, b], targets).values()) <= {"InService", "healthy"}
        assert not exit_standby.fn(ctx.creds, GROUP, a, dry_run=False).changed


def test_surge_wait_and_terminate(ctx) -> None:
    known = [i.instance_id for i in group_instances(ctx.creds, GROUP)]
    with disable_run_logger():
        with pytest.raises(GroupTimeout, match="no new InService instance"):
            wait_for_new_instance.fn(ctx.creds, GROUP, known, timeout=0.2, poll=0.1)
        with pytest.raises(ValueError, match="outside min"):
            set_desired_capacity.fn(ctx.creds, GROUP, 9, dry_run=False)
        up = set_desired_capacity.fn(ctx.creds, GROUP, 3, dry_run=False)
        assert up.desired_before == 2 and up.changed
        new = wait_for_new_instance.fn(ctx.creds, GROUP, known, timeout=5, poll=0.1)
        assert new.instance_id not in known and new.private_ip_address
        assert terminate_group_instance.fn(
            ctx.creds, GROUP, known[0], decrement=True, dry_run=True
        ).changed
        assert len(group_instances(ctx.creds, GROUP)) == 3
        assert terminate_group_instance.fn(
            ctx.creds, GROUP, known[0], decrement=True, dry_run=False
        ).changed
        ids = [i.instance_id for i in group_instances(ctx.creds, GROUP)]
        assert known[0] not in ids and len(ids) == 2
        again = terminate_group_instance.fn(
            ctx.creds, GROUP, known[0], decrement=True, dry_run=False
        )
        assert not again.changed
