"""describe-environment: the pure join is table-tested; one real flow run against moto + Prefect."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from config import load_config, resolve_environment
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.configs import SAMPLE, moto_section, write_config
from flows.describe_environment import build_description, describe_environment
from sandbox.aws_seed import seed
from tasks.aws.autoscaling import AutoScalingGroup
from tasks.aws.ec2 import Server
from tasks.aws.elb import TargetHealth

ENV = resolve_environment(load_config(SAMPLE), "staging")


def _server(iid: str, role: str, itype: str = "m1.small", state: str = "running") -> Server:
    return Server(
        instance_id=iid,
        name=f"n-{iid}",
        role=role,
        deployment="myproject",
        environment="staging",
        instance_type=itype,
        state=state,
        launch_time=datetime(2026, 1, 1, tzinfo=UTC),
    )


def _group(**kw) -> AutoScalingGroup:
    base = dict(
        auto_scaling_group_name="myproject-staging-ag",
        min_size=1,
        desired_capacity=2,
        max_size=4,
        instance_ids=["i-w1"],
    )
    return AutoScalingGroup(**(base | kw))


CASES = [
    (
        "healthy",
        [_server("i-w1", "web")],
        [TargetHealth(load_balancer="lb", instance_id="i-w1", state="InService")],
        _group(),
        [],
        {},
    ),
    (
        "type drift",
        [_server("i-c", "cache", "m5.large")],
        [],
        _group(),
        [],
        {"i-c": "config wants t1.micro"},
    ),
    (
        "out of service",
        [_server("i-w1", "web")],
        [TargetHealth(load_balancer="lb", instance_id="i-w1", state="OutOfService")],
        _group(),
        ["i-w1 is OutOfService in lb"],
        {},
    ),
    (
        "left suspended",
        [],
        [],
        _group(suspended_processes=["Launch", "Terminate"]),
        ["suspended on myproject-staging-ag: Launch, Terminate"],
        {},
    ),
    ("no group", [], [], None, ["myproject-staging-ag does not exist"], {}),
    (
        "stray web",
        [_server("i-w9", "web")],
        [],
        _group(),
        [],
        {"i-w9": "not in the autoscaling group"},
    ),
]


@pytest.mark.parametrize(
    ("what", "servers", "health", "group", "problems", "notes"), CASES, ids=[c[0] for c in CASES]
)
def test_build_description(what, servers, health, group, problems, notes) -> None:
    d = build_description(ENV, servers, health, group, aws_calls=3)
    text = "\n".join(d.problems)
    for p in problems:
        assert p in text
    rows = {r.instance_id: r for r in d.servers}
    for iid, note in notes.items():
        assert note in rows[iid].notes
    if what == "healthy":
        assert rows["i-w1"].load_balancer_health == "lb: InService"
        assert not [p for p in d.problems if "i-w1" in p]


@pytest.mark.usefixtures("prefect_server")
def test_describe_flow_against_moto(tmp_path: Path, aws) -> None:
    path = write_config(
        tmp_path,
        fabflows=moto_section(aws.endpoint, staging={"target_groups": ["myproject-staging-web"]}),
    )
    cfg = load_config(path)
    result = seed(
        aws.endpoint,
        cfg,
        ["staging", "production"],
        "10.250.0.0/24",
        (f"10.250.0.{i}" for i in itertools.count(10)),
    )
    staging = result.environments[0]
    boto_client(aws, "ec2").stop_instances(InstanceIds=staging.instance_ids["worker"])

    d = describe_environment(environment="staging", config=str(path))

    assert d.counts_by_role() == {
        "cache": 1,
        "db-primary": 1,
        "db-replica": 1,
        "web": 2,
        "worker": 1,
    }
    web = [r for r in d.servers if r.role == "web"]
    assert all("myproject-staging-lb: InService" in r.load_balancer_health for r in web)
    assert all("myproject-staging-web: healthy" in r.load_balancer_health for r in web)
    worker = next(r for r in d.servers if r.role == "worker")
    assert worker.state == "stopped"
    assert d.auto_scaling_group.desired_capacity == 2
    # one DescribeInstances, one ASG call, one ELB call, two ELBv2 calls (name -> arn, health)
    assert d.aws_calls == 5

    async def artifacts():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["describe-myproject-staging"])
                )
            )

    import asyncio

    arts = asyncio.run(artifacts())
    assert arts and arts[0].type == "table"
    assert "i-" in str(arts[0].data)
