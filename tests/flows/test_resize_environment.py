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
from fabflows import boundaries
from fabflows.errors import BadInput
from fabflows.testing.approver import resume_when_paused
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.configs import moto_section, write_config
from fabflows.testing.ec2_hosts import Ec2HostMirror
from fabflows.testing.power_lab import SEED_TYPES, build_power_lab, celery_state, psql
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


# --------------------------------------------------------------------------- stale approval
# A protected environment (approval needed), moto only: resize-environment gathers from AWS
# alone, so the refusal needs no host, and an apply that went on anyway would show in moto (types,
# states, resize tags, template versions, suspended processes). The environment changes after the
# approval, before the lock (the engine's "lock" boundary), as a colleague's console click would.

WEB_TAGS = ("Name", "deployment", "environment", "role")


@dataclass
class Protected:
    config: str
    aws: object

    def client(self, service: str):  # noqa: ANN201
        return boto_client(self.aws, service)

    def instances(self) -> dict[str, dict]:
        out = {}
        for r in self.client("ec2").describe_instances()["Reservations"]:
            for i in r["Instances"]:
                out[i["InstanceId"]] = i
        return out

    def snapshot(self) -> dict[str, object]:
        """What an apply would change: types, states, resize tags, template versions, group."""
        group = self.client("autoscaling").describe_auto_scaling_groups(
            AutoScalingGroupNames=["myproject-staging-ag"]
        )["AutoScalingGroups"][0]
        versions = self.client("ec2").describe_launch_template_versions(
            LaunchTemplateName="myproject-staging-web"
        )["LaunchTemplateVersions"]
        return {
            "instances": {
                iid: (
                    i["InstanceType"],
                    i["State"]["Name"],
                    sorted(t["Key"] for t in i.get("Tags", [])),
                )
                for iid, i in self.instances().items()
            },
            "template": sorted(
                (v["VersionNumber"], v["LaunchTemplateData"]["InstanceType"]) for v in versions
            ),
            "suspended": group["SuspendedProcesses"],
            "sizes": (group["MinSize"], group["DesiredCapacity"], group["MaxSize"]),
        }


@pytest.fixture
def protected(aws, tmp_path: Path) -> Protected:
    """Staging seeded with the power lab's types, protected, asked to resize to NEW_TYPES."""
    section = moto_section(aws.endpoint, staging={"protected": True})
    section["approval"] = {"poll_seconds": 1, "timeout_minutes": 2}
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    seed_cfg = write_config(seed_dir, fabflows=section, instance_types={"staging": SEED_TYPES})
    seed(
        aws.endpoint,
        load_config(seed_cfg),
        ["staging"],
        "10.250.0.0/24",
        (f"10.250.0.{i}" for i in range(10, 20)),
    )
    path = write_config(tmp_path, fabflows=section, instance_types={"staging": NEW_TYPES})
    return Protected(str(path), aws)


def _approve_when_paused(approver: str):
    """An approver in the UI: waits for the paused run and approves the plan it shows."""
    return resume_when_paused({"approve": True, "approver": approver, "reason": "agreed"})


def _refused_after_a_change(env: Protected, change) -> tuple[object, object]:  # noqa: ANN001
    """Apply with approval; ``change()`` runs between the approval and the lock. Returns the
    final state and what the environment looked like right after the change."""
    seen: dict[str, object] = {}

    def observer(flow: str, step: str, when: str) -> None:
        if flow == "resize-environment" and step == "lock" and when == "before":
            change()
            seen["after change"] = env.snapshot()

    boundaries.observe(observer)
    t, approved = _approve_when_paused("alice")
    try:
        state = resize_environment("staging", config=env.config, dry_run=False, return_state=True)
    finally:
        boundaries.forget(observer)
        t.join(10)
    assert approved, "the run never waited for approval"
    assert "after change" in seen, "the run never reached the lock"
    return state, seen["after change"]


def _web_tags(env: Protected) -> list[dict[str, str]]:
    web = next(i for i in env.instances().values() if _tag(i, "role") == "web")
    return [t for t in web["Tags"] if t["Key"] in WEB_TAGS]


def _tag(instance: dict, key: str) -> str:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}.get(key, "")


def _group_instances(env: Protected) -> set[str]:
    group = env.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=["myproject-staging-ag"]
    )["AutoScalingGroups"][0]
    return {i["InstanceId"] for i in group["Instances"]}


@pytest.mark.flow
@pytest.mark.parametrize("launched_by", ["hand", "group"])
def test_one_more_web_server_after_the_approval_is_refused(
    prefect_server, protected: Protected, launched_by: str
) -> None:
    env = protected
    ec2 = env.client("ec2")
    new: list[str] = []

    def launch_web_server() -> None:
        if launched_by == "hand":  # with the others' tags, outside the group
            subnet = next(iter(env.instances().values()))["SubnetId"]
            res = ec2.run_instances(
                ImageId="ami-12345678",
                MinCount=1,
                MaxCount=1,
                InstanceType="m1.small",
                SubnetId=subnet,
                TagSpecifications=[{"ResourceType": "instance", "Tags": _web_tags(env)}],
            )
            new.append(res["Instances"][0]["InstanceId"])
        else:  # the group scaled out: it launches one from its template, with its tags
            before = _group_instances(env)
            env.client("autoscaling").set_desired_capacity(
                AutoScalingGroupName="myproject-staging-ag", DesiredCapacity=len(before) + 1
            )
            new.extend(_group_instances(env) - before)
        ec2.get_waiter("instance_running").wait(
            InstanceIds=new, WaiterConfig={"Delay": 1, "MaxAttempts": 30}
        )

    state, after = _refused_after_a_change(env, launch_web_server)
    assert state.is_cancelled(), state
    message = state.message
    assert "the plan changed since it was made and approved" in message, message
    assert "nothing was applied" in message
    [iid] = new
    assert f"({iid})" in message and "m1.small -> m5.large" in message, message  # named
    assert env.snapshot() == after  # nothing applied: no type, state, template or group changed


@pytest.mark.flow
def test_an_instance_type_changed_after_the_approval_is_refused(
    prefect_server, protected: Protected
) -> None:
    env = protected
    ec2 = env.client("ec2")
    worker = next(iid for iid, i in env.instances().items() if _tag(i, "role") == "worker")

    def change_worker_type() -> None:  # as in the console: stop, change the type, start
        ec2.stop_instances(InstanceIds=[worker])
        ec2.get_waiter("instance_stopped").wait(
            InstanceIds=[worker], WaiterConfig={"Delay": 1, "MaxAttempts": 30}
        )
        ec2.modify_instance_attribute(InstanceId=worker, InstanceType={"Value": "m3.xlarge"})
        ec2.start_instances(InstanceIds=[worker])
        ec2.get_waiter("instance_running").wait(
            InstanceIds=[worker], WaiterConfig={"Delay": 1, "MaxAttempts": 30}
        )

    state, after = _refused_after_a_change(env, change_worker_type)
    assert state.is_cancelled(), state
    message = state.message
    assert "the plan changed since it was made and approved" in message, message
    assert f"({worker})" in message and "m3.xlarge -> m5.xlarge" in message, message
    assert after["instances"][worker][:2] == ("m3.xlarge", "running")
    assert env.snapshot() == after  # nothing applied
