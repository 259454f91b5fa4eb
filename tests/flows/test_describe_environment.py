"""describe-environment: the pure join is table-tested; one real flow run against moto + Prefect."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from config import load_config, resolve_environment
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.configs import SAMPLE, moto_section, write_config
from fabflows.testing.pgreplica import ReplicatedPair, start_replicated_pair
from flows.describe_environment import DbReplication, build_description, describe_environment
from sandbox.aws_seed import seed
from sandbox.replication import start_wal_receiver, stop_wal_receiver
from sandbox.seed_db import psql
from sandbox.testhosts import TestNetwork
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
    # one DescribeInstances, one ASG call, one ELB call, two ELBv2 calls (name -> arn, health);
    # replication is read over SSH, not AWS
    assert d.aws_calls == 5
    # nothing answers SSH at these addresses: the database servers' replication is unknown
    dbs = [r for r in d.servers if r.role.startswith("db-")]
    assert {r.replication_state for r in dbs} == {"unknown"}
    assert any("replication unknown" in p for p in d.problems)

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


# --------------------------------------------------------------------------- replication, for real

REPLICATION_CASES = [
    (
        "streaming",
        [
            DbReplication(instance_id="i-p", role="db-primary", state="primary"),
            DbReplication(
                instance_id="i-r", role="db-replica", state="streaming", lag_bytes=0, lag_seconds=0
            ),
        ],
        [],
        {"i-r": "streaming, lag 0 B / 0 s"},
    ),
    (
        "receiver stopped",
        [
            DbReplication(
                instance_id="i-r",
                role="db-replica",
                state="not streaming",
                lag_bytes=4096,
                lag_seconds=12.5,
                detail="no WAL receiver",
            )
        ],
        ["i-r (db-replica) is not streaming: no WAL receiver"],
        {"i-r": "not streaming, lag 4096 B / 12.5 s (no WAL receiver)"},
    ),
    (
        "not a replica",
        [DbReplication(instance_id="i-r", role="db-replica", state="not a replica")],
        ["i-r (db-replica) is not a replica: it is not in recovery"],
        {"i-r": "not a replica"},
    ),
    (
        "two primaries",
        [
            DbReplication(instance_id="i-p", role="db-primary", state="primary"),
            DbReplication(instance_id="i-r", role="db-primary", state="primary"),
        ],
        [],
        {"i-p": "primary"},
    ),
    (
        "primary in recovery",
        [DbReplication(instance_id="i-p", role="db-primary", state="in recovery")],
        ["i-p (db-primary) is in recovery"],
        {"i-p": "in recovery"},
    ),
]


@pytest.mark.parametrize(
    ("what", "replication", "problems", "shown"),
    REPLICATION_CASES,
    ids=[c[0] for c in REPLICATION_CASES],
)
def test_build_description_replication(what, replication, problems, shown) -> None:
    servers = [_server("i-p", "db-primary"), _server("i-r", "db-replica")]
    d = build_description(ENV, servers, [], _group(), aws_calls=1, replication=replication)
    rows = {r.instance_id: r for r in d.servers}
    for iid, text in shown.items():
        assert rows[iid].replication == text
    assert [p for p in d.problems if "(db-" in p] == problems
    assert ("more than one db-primary takes writes: i-p, i-r" in d.problems) == (
        what == "two primaries"
    )
    assert "replication" in d.render_text().splitlines()[2]


@pytest.fixture(scope="module")
def pair(test_network: TestNetwork) -> Iterator[ReplicatedPair]:
    made = start_replicated_pair(test_network, ("dspri", "dsrep"))
    try:
        yield made
    finally:
        made.destroy(test_network)


def _artifact_rows(key: str) -> list[dict]:
    import asyncio
    import json

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC,
                limit=1,
            )

    (art,) = asyncio.run(read())
    data = art.data
    return json.loads(data) if isinstance(data, str) else data


@pytest.mark.hosts
@pytest.mark.usefixtures("prefect_server")
def test_describe_shows_replica_streaming_and_its_lag(
    tmp_path: Path, aws, test_network: TestNetwork, pair: ReplicatedPair
) -> None:
    section = moto_section(aws.endpoint, staging={"target_groups": ["myproject-staging-web"]})
    section["ssh"] = {
        "user": "deploy",
        "identity_file": str(test_network.client_key),
        "known_hosts_file": str(test_network.known_hosts),
        "address_attribute": "private_ip_address",
        "connect_timeout": 5,
    }
    path = write_config(tmp_path, fabflows=section)
    subnet = test_network.subnet
    # NON_WEB_ROLES order: cache, db-primary, db-replica, worker (cache and worker: no host)
    addresses = iter([f"{subnet}.251", pair.primary.ip, pair.replica.ip, f"{subnet}.252"])
    seed(aws.endpoint, load_config(path), ["staging"], f"{subnet}.0/24", addresses)

    def describe() -> tuple:
        d = describe_environment(environment="staging", config=str(path))
        rows = {r.role: r for r in d.servers if r.role.startswith("db-")}
        return d, rows["db-primary"], rows["db-replica"]

    # a transaction replayed on the replica: its time is what the lag in seconds counts from
    psql(pair.primary, "CREATE TABLE describe_first AS SELECT 1 AS one;")
    for _ in range(10):  # caught up: a checkpoint may write WAL just between the two reads
        d, primary, replica = describe()
        if replica.replication_lag_bytes == 0:
            break
    assert d.aws_calls == 5  # as without replication
    assert primary.replication_state == "primary"
    assert primary.replication == "primary: 1 streaming, slots 1/1 active"
    assert replica.replication_state == "streaming"
    assert replica.replication_lag_bytes == 0 and replica.replication_lag_seconds == 0
    assert "streaming, lag 0 B / 0 s" in d.render_text()
    assert not [p for p in d.problems if "db-" in p]

    saved = stop_wal_receiver(pair.replica)
    try:
        # flushed at commit (the test hosts commit asynchronously), so in the primary's LSN
        psql(
            pair.primary,
            "SET synchronous_commit = on;\n"
            "CREATE TABLE describe_probe AS SELECT generate_series(1, 1000) g;",
        )
        time.sleep(0.05)  # a lag in seconds above 0
        d, primary, replica = describe()
    finally:
        start_wal_receiver(pair.replica, saved)
    assert replica.replication_state == "not streaming"
    assert replica.replication_lag_bytes > 0
    assert replica.replication_lag_seconds > 0
    assert primary.replication == "primary: 0 streaming, slots 0/1 active"
    assert any("(db-replica) is not streaming" in p for p in d.problems)
    text = d.render_text()
    assert f"not streaming, lag {replica.replication_lag_bytes} B" in text
    # the artifact carries the state and both lags
    rows = _artifact_rows("describe-myproject-staging")
    shown = next(r for r in rows if r["role"] == "db-replica")
    assert shown["replication_state"] == "not streaming"
    assert shown["replication_lag_bytes"] == replica.replication_lag_bytes
    assert shown["replication_lag_seconds"] == replica.replication_lag_seconds
