"""stop-environment and start-environment for real: moto for AWS, one isolated test host per
instance (following EC2 states as the sandbox does), PostgreSQL on the database hosts, Prefect.

A stop -> stop -> start -> start round trip leaves the environment as it was (group sizes, every
role reachable and in service, the web servers answering 200, the database's rows intact); a stop
that fails half-way brings the environment back up (its steps' undo); production is refused without allow_stop.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from config import load_config
from config.loader import ConfigError
from fabflows.errors import BadInput, Refused
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.configs import moto_section, write_config
from fabflows.testing.ec2_hosts import Ec2HostMirror
from fabflows.testing.hosts_fixtures import TEST_SUBNET
from fabflows.testing.power_lab import SEED_TYPES, build_power_lab, celery_state, psql
from flows.start_environment import start_environment
from flows.stop_environment import stop_environment
from sandbox.aws_seed import seed
from sandbox.testhosts import TestHost
from tasks.aws.ec2_writes import STOPPED_TAG
from tasks.aws.group_sizes import CACHE_TAG, SIZES_TAG

GROUP = "myproject-staging-ag"


@dataclass
class Env:
    config: str
    hosts: dict[str, TestHost]
    ids: dict[str, str]
    mirror: Ec2HostMirror
    aws: object

    def group(self) -> dict:
        return boto_client(self.aws, "autoscaling").describe_auto_scaling_groups(
            AutoScalingGroupNames=[GROUP]
        )["AutoScalingGroups"][0]

    def states(self) -> dict[str, str]:
        ec2 = boto_client(self.aws, "ec2")
        out = {}
        for r in ec2.describe_instances(InstanceIds=list(self.ids.values()))["Reservations"]:
            for i in r["Instances"]:
                out[i["InstanceId"]] = i["State"]["Name"]
        return {role: out[iid] for role, iid in self.ids.items()}


@pytest.fixture
def environment(request, aws, make_hosts, test_network, tmp_path: Path) -> Iterator[Env]:
    strategy = getattr(request, "param", "stop")
    staging = {"cache_strategy": strategy}
    if strategy == "terminate-and-recreate":
        staging["cache_launch_template"] = "myproject-cache"
        boto_client(aws, "ec2").create_launch_template(
            LaunchTemplateName="myproject-cache",
            LaunchTemplateData={"ImageId": "ami-12345678", "InstanceType": "t1.micro"},
        )
    lab = build_power_lab(
        test_network,
        aws,
        tmp_path,
        rows=500,
        instance_types=SEED_TYPES,
        name_prefix="s6",
        staging=staging,
        start=make_hosts,
    )
    try:
        yield Env(str(lab.config), lab.hosts, lab.ids, lab.mirror, aws)
    finally:
        lab.mirror.destroy_created()


@pytest.mark.flow
@pytest.mark.hosts
def test_stop_stop_start_start_leaves_the_environment_as_it_was(
    prefect_server, environment: Env
) -> None:
    env = environment
    assert len(env.group()["Instances"]) == 2

    dry = env.mirror.run(stop_environment, "staging", config=env.config)
    assert dry.changed and dry.steps == [] and env.states()["worker"] == "running"
    per_hour = re.search(r"saves about \$([0-9.]+) per hour", dry.plan_text)
    assert per_hour and float(per_hour.group(1)) > 0

    down = env.mirror.run(stop_environment, "staging", config=env.config, dry_run=False)
    assert down.outcome.startswith("applied"), down.render_text()
    assert [s.name for s in down.steps] == [
        "scale-web-group-to-zero",
        "quiet-workers",
        "stop-worker",
        "stop-db-replica",
        "stop-db-primary",
        "stop-cache",
    ]
    summaries = {s.name: s.summary for s in down.steps}
    assert "-> 0/0/0" in summaries["scale-web-group-to-zero"]
    assert summaries["quiet-workers"].startswith("quiet-workers")
    for role in ("worker", "db-replica", "db-primary", "cache"):
        assert summaries[f"stop-{role}"].startswith(f"Stopping {env.ids[role]}")
    assert all(s.state == "done" for s in down.steps)
    g = env.group()
    assert (g["MinSize"], g["DesiredCapacity"], g["MaxSize"]) == (0, 0, 0)
    assert g["Instances"] == []
    assert '"min":1,"desired":2,"max":4' in {t["Key"]: t["Value"] for t in g["Tags"]}[SIZES_TAG]
    assert set(env.states().values()) == {"stopped"}
    assert not any(h.running for h in env.hosts.values())  # the hosts really stopped
    assert not [n for n in env.mirror.created if n in env.mirror.network.hosts]  # web gone

    again = env.mirror.run(stop_environment, "staging", config=env.config, dry_run=False)
    assert again.outcome == "nothing to change" and not again.changed

    up = env.mirror.run(start_environment, "staging", config=env.config, dry_run=False)
    assert up.outcome.startswith("applied"), up.render_text()
    g = env.group()
    assert (g["MinSize"], g["DesiredCapacity"], g["MaxSize"]) == (1, 2, 4)
    assert len(g["Instances"]) == 2
    tags = {t["Key"] for t in g["Tags"]}
    assert SIZES_TAG not in tags
    assert set(env.states().values()) == {"running"}
    assert all(h.running for h in env.hosts.values())
    assert celery_state(env.hosts["worker"]) == "RUNNING"  # brought into service after boot
    steps = {s.name: s for s in up.steps}
    assert steps["check-site"].summary.startswith("4/4 checks answered 200")  # 2 web x (/, health)
    assert psql(env.hosts["db-primary"], "SELECT count(*), max(id) FROM shop_order") == "500|500"
    assert "(cache, db-primary, db-replica, web, worker)" in up.plan_text  # the savings, by role
    ec2 = boto_client(env.aws, "ec2")
    for r in ec2.describe_instances(InstanceIds=list(env.ids.values()))["Reservations"]:
        for i in r["Instances"]:
            assert STOPPED_TAG not in {t["Key"] for t in i.get("Tags", [])}

    twice = env.mirror.run(start_environment, "staging", config=env.config, dry_run=False)
    assert "check in service" in twice.plan_text and "start, bring" not in twice.plan_text
    assert {s.name: s for s in twice.steps}["check-site"].summary.startswith("4/4 checks")


@pytest.mark.flow
@pytest.mark.hosts
def test_a_stop_failing_half_way_brings_the_environment_back(
    prefect_server, environment: Env
) -> None:
    env = environment
    # the first StopInstances (the worker's) is refused by EC2
    env.aws.queue_fault("ec2", "StopInstances", code="UnauthorizedOperation", status=403)
    with pytest.raises(Exception, match="UnauthorizedOperation"):
        env.mirror.run(stop_environment, "staging", config=env.config, dry_run=False)
    g = env.group()
    assert (g["MinSize"], g["DesiredCapacity"], g["MaxSize"]) == (1, 2, 4)
    assert len(g["Instances"]) == 2
    assert SIZES_TAG not in {t["Key"] for t in g["Tags"]}
    assert set(env.states().values()) == {"running"}
    assert celery_state(env.hosts["worker"]) == "RUNNING"  # quieted, then back in service


@pytest.mark.flow
@pytest.mark.hosts
@pytest.mark.parametrize("environment", ["terminate-and-recreate"], indirect=True)
def test_cache_terminated_at_stop_is_relaunched_where_it_was(
    prefect_server, environment: Env
) -> None:
    env = environment
    cache_ip = env.hosts["cache"].ip
    down = env.mirror.run(stop_environment, "staging", config=env.config, dry_run=False)
    assert "empties Redis" in down.plan_text
    assert "no RabbitMQ found" in down.plan_text
    assert env.states()["cache"] == "terminated"
    assert env.hosts["cache"].name not in env.mirror.network.hosts  # the server is gone
    record = {t["Key"]: t["Value"] for t in env.group()["Tags"]}[CACHE_TAG]
    assert f'"ip":"{cache_ip}"' in record and '"type":"t1.micro"' in record

    # moto never releases a terminated instance's private address (EC2 does, once it is
    # terminated), so the record is moved to a free one: the relaunch path is the same
    free_ip = f"{TEST_SUBNET}.30"
    boto_client(env.aws, "autoscaling").create_or_update_tags(
        Tags=[
            {
                "ResourceId": GROUP,
                "ResourceType": "auto-scaling-group",
                "Key": CACHE_TAG,
                "Value": record.replace(cache_ip, free_ip),
                "PropagateAtLaunch": False,
            }
        ]
    )
    cache_ip = free_ip

    up = env.mirror.run(start_environment, "staging", config=env.config, dry_run=False)
    assert up.outcome.startswith("applied"), up.render_text()
    assert "new SSH host key" in up.plan_text
    ec2 = boto_client(env.aws, "ec2")
    caches = [
        i
        for r in ec2.describe_instances(
            Filters=[
                {"Name": "tag:role", "Values": ["cache"]},
                {"Name": "instance-state-name", "Values": ["running"]},
            ]
        )["Reservations"]
        for i in r["Instances"]
    ]
    assert len(caches) == 1 and caches[0]["InstanceId"] != env.ids["cache"]
    assert caches[0]["PrivateIpAddress"] == cache_ip and caches[0]["InstanceType"] == "t1.micro"
    assert CACHE_TAG not in {t["Key"] for t in env.group()["Tags"]}
    assert {s.name: s for s in up.steps}["check-site"].summary.startswith("4/4 checks")
    again = env.mirror.run(start_environment, "staging", config=env.config, dry_run=False)
    assert "launch-cache" not in [s.name for s in again.steps]  # not launched twice


def test_production_is_refused_without_allow_stop(aws, tmp_path: Path) -> None:
    path = write_config(tmp_path, fabflows=moto_section(aws.endpoint))
    with disable_run_logger(), pytest.raises(Refused, match="allow_stop: true"):
        stop_environment.fn("production", config=str(path), dry_run=False)
    # a protected staging too
    path = write_config(tmp_path, fabflows=moto_section(aws.endpoint, staging={"protected": True}))
    with disable_run_logger(), pytest.raises(Refused, match="protected"):
        stop_environment.fn("staging", config=str(path), dry_run=False)
    assert aws.injector.requests == []  # refused before any AWS call


def test_terminate_and_recreate_needs_a_launch_template(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        fabflows={"environments": {"staging": {"cache_strategy": "terminate-and-recreate"}}},
    )
    with pytest.raises(ConfigError, match="needs cache_launch_template"):
        load_config(path)


@pytest.mark.flow
def test_queued_messages_refuse_a_cache_termination(prefect_server, aws, tmp_path: Path) -> None:
    """Without hosts: a stopped cache cannot be read, so terminating it needs consent."""
    section = moto_section(
        aws.endpoint,
        staging={
            "cache_strategy": "terminate-and-recreate",
            "cache_launch_template": "myproject-cache",
        },
    )
    path = write_config(tmp_path, fabflows=section)
    cfg = load_config(path)
    seeded = seed(
        aws.endpoint, cfg, ["staging"], "10.250.0.0/24", (f"10.250.0.{i}" for i in range(10, 20))
    ).environments[0]
    boto_client(aws, "ec2").stop_instances(InstanceIds=seeded.instance_ids["cache"])
    with pytest.raises(BadInput, match="queues cannot be read"):
        stop_environment("staging", config=str(path), dry_run=False)
    assert (
        boto_client(aws, "autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])[
            "AutoScalingGroups"
        ][0]["DesiredCapacity"]
        == 2
    )  # nothing changed
