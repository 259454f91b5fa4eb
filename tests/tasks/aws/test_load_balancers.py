"""Registering and deregistering web servers against moto (classic ELB and a target group)."""

from __future__ import annotations

import itertools

import pytest
from prefect.logging import disable_run_logger

from config import load_config
from fabflows.runbook import load_context
from fabflows.testing import moto_fidelity
from fabflows.testing.configs import moto_section, write_config
from sandbox.aws_seed import seed
from tasks.aws.load_balancers import (
    LoadBalancerTimeout,
    Targets,
    deregister_instance,
    health_of,
    register_instance,
    resolve_target_groups,
    wait_for_load_balancers,
)


@pytest.fixture
def staging(aws, tmp_path):
    moto_fidelity.apply()
    path = write_config(tmp_path, fabflows=moto_section(aws.endpoint))
    seed(
        aws.endpoint,
        load_config(path),
        ["staging"],
        "10.99.0.0/24",
        (f"10.99.0.{n}" for n in itertools.count(200)),
    )
    ctx = load_context("staging", config=str(path))
    group = ctx.creds.get_client("autoscaling").describe_auto_scaling_groups()["AutoScalingGroups"][
        0
    ]
    targets = Targets(
        load_balancer_names=group["LoadBalancerNames"], target_group_arns=group["TargetGroupARNs"]
    )
    return ctx, targets, [i["InstanceId"] for i in group["Instances"]]


def test_deregister_register_rhythm_and_compensation(staging) -> None:
    ctx, targets, (a, b) = staging
    with disable_run_logger():
        assert (
            resolve_target_groups(ctx.creds, ["myproject-staging-web"]) == targets.target_group_arns
        )
        dry = deregister_instance.fn(ctx.creds, a, targets, dry_run=True)
        assert dry.changed and dry.summary.startswith("Would deregister")
        assert all(
            s == "InService" or s == "healthy" for s in health_of(ctx.creds, [a], targets).values()
        )
        out = deregister_instance.fn(ctx.creds, a, targets, dry_run=False)
        assert out.changed and sorted(out.registered_in) == sorted(
            targets.load_balancer_names + targets.target_group_arns
        )
        assert set(health_of(ctx.creds, [a], targets).values()) == {"absent"}
        wait_for_load_balancers.fn(ctx.creds, [a], targets, "out", timeout=5, poll=0.1)
        assert not deregister_instance.fn(ctx.creds, a, targets, dry_run=False).changed
        with pytest.raises(LoadBalancerTimeout, match=f"{a} is absent in myproject-staging-lb"):
            wait_for_load_balancers.fn(ctx.creds, [a, b], targets, "in", timeout=0.3, poll=0.1)

        back = register_instance.fn(ctx.creds, a, targets, only=out.registered_in, dry_run=False)
        assert back.changed and sorted(back.changed_in) == sorted(out.registered_in)
        wait_for_load_balancers.fn(ctx.creds, [a, b], targets, "in", timeout=5, poll=0.1)
        assert not register_instance.fn(ctx.creds, a, targets, dry_run=False).changed
