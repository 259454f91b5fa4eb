"""resize-environment: the plan table-tested; the flow for real (moto, a test host per instance
following EC2 states, PostgreSQL on the database hosts, FabulAWS's nginx logic on the web servers,
the shared upgrade window with its 100 ms probe)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from config import load_config
from fabflows.errors import BadInput
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.configs import moto_section, write_config
from fabflows.testing.ec2_hosts import Ec2HostMirror
from fabflows.testing.power_lab import build_power_lab, celery_state, psql
from flows.resize_environment import plan_resize_environment, resize_environment
from sandbox.aws_seed import seed
from sandbox.testhosts import TestHost
from tasks.aws.autoscaling import AutoScalingGroup
from tasks.aws.ec2 import Server
from tasks.aws.ec2_writes import RESIZE_TAG, STOPPED_TAG, InstanceTypeInfo

MIN = {"cache": 1740, "db-primary": 1740, "db-replica": 1740, "web": 1740, "worker": 3840}
TYPES = {
    "m1.small": InstanceTypeInfo(instance_type="m1.small", vcpus=1, memory_mib=1740),
    "m5.large": InstanceTypeInfo(instance_type="m5.large", vcpus=2, memory_mib=8192),
    "t3.micro": InstanceTypeInfo(instance_type="t3.micro", vcpus=2, memory_mib=1024),
}


def server(iid, role, itype="m1.small", state="running", **tags) -> Server:
    return Server(
        instance_id=iid,
        name=f"{role}-{iid}",
        role=role,
        deployment="myproject",
        environment="staging",
        instance_type=itype,
        state=state,
        private_ip_address="10.0.0.1",
        tags=tags,
    )


GROUP = AutoScalingGroup(
    auto_scaling_group_name="ag",
    min_size=1,
    desired_capacity=2,
    max_size=4,
    instance_ids=["i-w1", "i-w2"],
    launch_template="lt",
    launch_template_version="$Latest",
)
SERVERS = [
    server("i-w1", "web"),
    server("i-w2", "web"),
    server("i-wk", "worker"),
    server("i-r", "db-replica"),
    server("i-p", "db-primary"),
    server("i-c", "cache"),
]


def plan(wanted, servers=SERVERS, lt="m1.small", **kw):
    args = dict(known_types=TYPES, unknown_types=[], minimum_memory_mib=MIN, cache_strategy="stop")
    return plan_resize_environment("myproject/staging", wanted, servers, GROUP, lt, **(args | kw))


def how(p) -> list[tuple[str, str, str]]:
    return [(c.role, c.instance_id or "lt", c.strategy) for c in p.changes]


ALL = {r: "m5.large" for r in ("web", "worker", "db-replica", "db-primary", "cache")}


def test_plan_strategies_in_order() -> None:
    p = plan(ALL)
    assert how(p) == [
        ("worker", "i-wk", "one-at-a-time"),
        ("db-replica", "i-r", "one-at-a-time"),
        ("db-primary", "i-p", "window"),
        ("cache", "i-c", "window"),
        ("web", "lt", "launch-template"),
        ("web", "i-w1", "refresh-pending"),
        ("web", "i-w2", "refresh-pending"),
    ]
    assert not p.problems and p.retired == []
    assert "does not run the rolling refresh" in p.warnings[0]
    assert "RabbitMQ keeps persistent messages" in p.warnings[1]
    assert len(plan(ALL, refresh_available=True).warnings) == 1


def test_plan_nothing_to_do() -> None:
    p = plan({"worker": "m1.small", "db-primary": "m1.small"})
    assert p.changes == [] and not p.changed and len(p.unchanged) == 4


def test_plan_validates_wanted_types() -> None:
    p = plan({"worker": "bogus.huge", "db-primary": "t3.micro"}, unknown_types=["bogus.huge"])
    assert "bogus.huge (for worker) is not an instance type EC2 knows" in p.problems[0]
    assert "t3.micro has 1024 MiB; db-primary needs at least 1740 MiB" in p.problems[1]
    worker_small = plan({"worker": "m1.small"}, servers=[server("i-wk", "worker", "m5.large")])
    assert "worker needs at least 3840 MiB" in worker_small.problems[0]


def test_plan_stopped_and_interrupted_servers() -> None:
    servers = [
        server("i-p", "db-primary", state="stopped", **{STOPPED_TAG: "{}"}),
        server("i-wk", "worker", "m5.large", state="stopped", **{RESIZE_TAG: "{}"}),
    ]
    p = plan({"db-primary": "m5.large", "worker": "m5.large"}, servers=servers)
    assert how(p) == [("worker", "i-wk", "one-at-a-time"), ("db-primary", "i-p", "while-stopped")]
    assert "interrupted resize" in p.changes[0].note
    assert "stop-environment" in p.changes[1].note


def test_plan_refuses_a_recreated_cache_and_moving_servers() -> None:
    p = plan({"cache": "m5.large"}, cache_strategy="terminate-and-recreate")
    assert "cache_launch_template" in p.problems[0]
    p = plan({"worker": "m5.large"}, servers=[server("i-wk", "worker", state="pending")])
    assert "pending" in p.problems[0]


# --------------------------------------------------------------------------- the flow, for real

NEW_TYPES = {
    "cache": "t3.small",
    "db-primary": "m5.large",
    "db-replica": "m5.large",
    "web": "m5.large",
    "worker": "m5.xlarge",
}


@dataclass
class Env:
    config: str
    hosts: dict[str, TestHost]
    ids: dict[str, str]
    mirror: Ec2HostMirror
    aws: object

    def types(self) -> dict[str, tuple[str, str]]:
        ec2 = boto_client(self.aws, "ec2")
        out = {}
        for r in ec2.describe_instances(InstanceIds=list(self.ids.values()))["Reservations"]:
            for i in r["Instances"]:
                out[i["InstanceId"]] = (i["InstanceType"], i["State"]["Name"])
        return {role: out[iid] for role, iid in self.ids.items()}


@pytest.fixture
def environment(aws, make_hosts, test_network, tmp_path: Path) -> Iterator[Env]:
    lab = build_power_lab(
        test_network,
        aws,
        tmp_path,
        rows=500,
        instance_types=NEW_TYPES,
        name_prefix="r6",
        start=make_hosts,
    )
    try:
        yield Env(str(lab.config), lab.hosts, lab.ids, lab.mirror, aws)
    finally:
        lab.mirror.destroy_created()


@pytest.mark.flow
@pytest.mark.hosts
def test_resize_in_place_with_a_short_measured_window(prefect_server, environment: Env) -> None:
    env = environment
    dry = env.mirror.run(resize_environment, "staging", config=env.config)
    text = dry.plan_text
    table = text.split("\nstep ", 1)[1]  # the changes, in the order they are applied
    hows = re.findall(r"(one-at-a-time|, window|, launch-template)", table)
    assert hows == ["one-at-a-time", "one-at-a-time", ", window", ", window", ", launch-template"]
    assert text.count("replaced by deploy-serial after the resize") == 2, text  # 2 web instances
    assert env.types()["worker"] == ("m3.large", "running")

    done = env.mirror.run(resize_environment, "staging", config=env.config, dry_run=False)
    assert done.outcome.startswith("applied"), done.render_text()
    assert [s.name for s in done.steps] == [
        f"resize-worker-{env.ids['worker']}",
        f"resize-db-replica-{env.ids['db-replica']}",
        "upgrade-mode-on",
        "resize-window",
        "upgrade-mode-off",
        "new-launch-template-version",
    ]
    assert env.types() == {
        "cache": ("t3.small", "running"),
        "db-primary": ("m5.large", "running"),
        "db-replica": ("m5.large", "running"),
        "worker": ("m5.xlarge", "running"),
    }
    assert all(h.running for h in env.hosts.values())
    assert celery_state(env.hosts["worker"]) == "RUNNING"
    assert psql(env.hosts["db-primary"], "SELECT count(*) FROM shop_order") == "500"
    # measured downtime: the window, seconds, not the database's size
    assert done.downtime_seconds is not None and 0 < done.downtime_seconds < 120
    assert 0 < done.details["measured_downtime_s"] < 120  # the probe's, every 100 ms
    group = boto_client(env.aws, "autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=["myproject-staging-ag"]
    )["AutoScalingGroups"][0]
    assert group["SuspendedProcesses"] == []  # upgrade mode ended
    latest = boto_client(env.aws, "ec2").describe_launch_template_versions(
        LaunchTemplateName="myproject-staging-web", Versions=["$Latest"]
    )["LaunchTemplateVersions"][0]
    assert latest["LaunchTemplateData"]["InstanceType"] == "m5.large"
    # deploy-serial replaced the web instances; its new version kept the new type
    assert done.details["web_refresh"].startswith("deploy-serial: 2 web instance(s) replaced")
    group = boto_client(env.aws, "autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=["myproject-staging-ag"]
    )["AutoScalingGroups"][0]
    web_ids = [i["InstanceId"] for i in group["Instances"]]
    web = boto_client(env.aws, "ec2").describe_instances(InstanceIds=web_ids)["Reservations"]
    assert {i["InstanceType"] for r in web for i in r["Instances"]} == {"m5.large"}
    tags = boto_client(env.aws, "ec2").describe_instances(InstanceIds=list(env.ids.values()))
    for r in tags["Reservations"]:
        for i in r["Instances"]:
            keys = {t["Key"] for t in i.get("Tags", [])}
            assert RESIZE_TAG not in keys and STOPPED_TAG not in keys

    again = env.mirror.run(resize_environment, "staging", config=env.config, dry_run=False)
    assert again.outcome == "nothing to change"


@pytest.mark.flow
@pytest.mark.hosts
def test_a_start_refused_on_the_new_type_puts_the_old_one_back(
    prefect_server, environment: Env
) -> None:
    env = environment
    env.aws.queue_fault("ec2", "StartInstances", code="InsufficientInstanceCapacity", status=400)
    with pytest.raises(Exception, match="InsufficientInstanceCapacity"):
        env.mirror.run(resize_environment, "staging", config=env.config, dry_run=False)
    # the worker (resized first) is back on its type, running and in service; nothing else moved
    assert env.types() == {
        "cache": ("t1.micro", "running"),
        "db-primary": ("m1.small", "running"),
        "db-replica": ("m1.small", "running"),
        "worker": ("m3.large", "running"),
    }
    assert celery_state(env.hosts["worker"]) == "RUNNING"


@pytest.mark.flow
def test_bad_types_are_refused_before_any_change(prefect_server, aws, tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        fabflows=moto_section(aws.endpoint),
        instance_types={"staging": {"worker": "bogus.huge", "db-primary": "t3.micro"}},
    )
    cfg = load_config(path)
    seed(
        aws.endpoint,
        cfg.model_copy(update={"instance_types": {}}),
        ["staging"],
        "10.250.0.0/24",
        (f"10.250.0.{i}" for i in range(10, 20)),
    )
    before = boto_client(aws, "ec2").describe_instances()["Reservations"]
    with pytest.raises(BadInput, match="bogus.huge.*not an instance type.*t3.micro has 1024 MiB"):
        resize_environment("staging", config=str(path), dry_run=False)
    assert boto_client(aws, "ec2").describe_instances()["Reservations"] == before
