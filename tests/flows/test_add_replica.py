"""add-replica on real peers: a new instance launched in moto gets its test host (the ``db``
image, PostgreSQL 15 not yet a replica), the flow builds it into a streaming replica of the
db-primary; bad input is refused before anything is created; a run SIGKILLed at a step boundary
is taken back by recover (instance terminated, slot and pg_hba line gone); and the pure plan as a
table.

One stack for the module (moto, a db-primary with one streaming replica, a web server and a
worker running the sandbox's Django app). The real-peer tests end with the end state read from
the peers: every replica in the primary's ``pg_stat_replication`` as streaming, zero lag, and the
same row counts as the primary.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from config import load_config, resolve_environment
from fabflows.errors import BadInput
from fabflows.runtime.journal import Journal
from fabflows.testing.app_env import InstanceFollower, build_app_env, run_in_thread
from fabflows.testing.failover_lab import (
    ec2_of,
    psql,
    replicas_caught_up,
    role_ids,
    streaming_replicas,
    tags_of,
    writable,
)
from fabflows.testing.faults import run_until_paused
from fabflows.testing.moto_server import MotoServer
from flows.add_replica import (
    PENDING_ROLE,
    RECORD_TAG,
    AddReplicaFacts,
    AddReplicaParams,
    add_replica,
    plan_add_replica,
)
from flows.recover_environment import recover_environment
from flows.resume_run import resume_run
from sandbox.replication import build_replica
from tasks.aws.launch import LaunchSource
from tasks.postgres.server import DbServer

# --------------------------------------------------------------------------- the plan (pure)

ZONES = ["us-east-1a", "us-east-1b", "us-east-1c"]


@pytest.fixture(scope="module")
def staging_env(tmp_path_factory):  # noqa: ANN001, ANN201
    from fabflows.testing.configs import write_config

    path = write_config(tmp_path_factory.mktemp("ar-plan"), {})
    return resolve_environment(load_config(path), "staging")


def _facts(**kw) -> AddReplicaFacts:  # noqa: ANN003
    base = dict(
        primaries=[
            DbServer(name="p", address="10.0.0.1", db_address="10.0.0.1", instance_id="i-p")
        ],
        primary_image="ami-p",
        primary_type="m1.small",
        source=LaunchSource(
            instance_id="i-p", subnet_id="subnet-a", vpc_id="vpc-1", security_group_ids=["sg-1"]
        ),
        region_zones=ZONES,
        configured_zones=["us-east-1a", "us-east-1b"],
        vpc_subnets={"us-east-1a": ["subnet-a"], "us-east-1b": ["subnet-b"]},
        db_servers={"p": "us-east-1a", "r": "us-east-1a", "r2": "us-east-1b"},
        names=["myproject_staging_db-replica"],
        image_id="ami-cfg",
        instance_type="m1.large",
        app_servers=["w1"],
    )
    return AddReplicaFacts(**(base | kw))


@pytest.mark.parametrize(
    ("facts", "zone", "chosen", "problem"),
    [
        ({}, None, "us-east-1b", None),  # a has 2 database servers, b 1
        ({"db_servers": {"p": "us-east-1a"}}, None, "us-east-1b", None),
        ({"db_servers": {"p": "us-east-1b"}}, None, "us-east-1a", None),
        ({"db_servers": {}}, None, "us-east-1a", None),  # a tie: the first listed
        ({}, "a", "us-east-1a", None),
        ({}, "us-east-1a", "us-east-1a", None),
        ({"configured_zones": []}, "c", None, "no subnet of vpc-1 in us-east-1c"),
        ({}, "c", None, "'us-east-1c' is not one of myproject/staging's zones"),
        ({}, "z", None, "'us-east-1z' does not exist in us-east-1"),
        ({}, "eu-west-1a", None, "'eu-west-1a' does not exist in us-east-1"),
        ({"configured_zones": ["us-east-1e"]}, None, None, "which does not exist"),
        ({"primaries": []}, None, None, "0 running db-primary servers"),
        ({"app_replica_files": {"w1": ["/x"]}}, None, None, "the app's settings name db-replicas"),
    ],
)
def test_add_replica_plan(staging_env, facts, zone, chosen, problem) -> None:  # noqa: ANN001
    plan = plan_add_replica(_facts(**facts), AddReplicaParams(availability_zone=zone), staging_env)
    if problem:
        assert any(problem in p for p in plan.problems), plan.problems
        assert not plan.changes
        return
    assert not plan.problems, plan.problems
    assert plan.availability_zone == chosen
    assert plan.name == "myproject_staging_db-replica_2"
    assert plan.slot == "replica_myproject_staging_db_replica_2"
    assert plan.image_id == "ami-cfg" and plan.instance_type == "m1.large"
    assert plan.subnet_id == {"us-east-1a": "subnet-a", "us-east-1b": "subnet-b"}[chosen]
    assert plan.security_group_ids == ["sg-1"]
    assert [c.step for c in plan.changes] == [
        f"{s}-myproject_staging_db-replica_2" for s in ("launch", "build", "tag")
    ]
    assert not plan.destructive and plan.downtime_seconds is None
    assert any("name no db-replica" in n for n in plan.notes)


# --------------------------------------------------------------------------- real peers


@pytest.fixture(scope="module")
def stack(test_network, tmp_path_factory, prefect_server):  # noqa: ANN001, ANN201
    moto = MotoServer().start()
    env = build_app_env(
        moto.endpoint,
        test_network,
        tmp_path_factory.mktemp("addrep"),
        rabbitmq=False,
        prefix="ar",
        web_count=1,
    )
    try:
        assert replicas_caught_up(env) == []
        yield env
    finally:
        env.destroy()
        moto.stop()


def _instances(env) -> dict[str, str]:  # noqa: ANN001
    """instance id -> state, every instance moto has."""
    reservations = ec2_of(env).describe_instances()["Reservations"]
    return {i["InstanceId"]: i["State"]["Name"] for r in reservations for i in r["Instances"]}


def _slots(primary) -> list[str]:  # noqa: ANN001
    out = psql(primary, "SELECT slot_name FROM pg_replication_slots ORDER BY 1;", "postgres")
    return out.split()


def _hba(primary) -> str:  # noqa: ANN001
    return primary.exec(["sh", "-c", "cat /etc/postgresql/*/main/pg_hba.conf"]).stdout


@pytest.mark.hosts
@pytest.mark.flow
def test_add_replica_dry_run_and_bad_input(stack) -> None:  # noqa: ANN001
    cfg = str(stack.config_path)
    before = _instances(stack)
    dry = add_replica(environment="staging", config=cfg)
    # the config's zones are FabulAWS's sample's (e, c); the seed's database servers are all in
    # us-east-1e (where the test hosts' subnet is): the zone with the fewest is c
    assert "launch a db-replica in us-east-1c (the fewest database servers)" in dry.plan_text
    assert "us-east-1e 2, us-east-1c 0" in dry.plan_text, dry.plan_text
    name = "myproject_staging_db-replica_2"
    steps = re.findall(r"^((?:launch|build|tag)-\S+)\s", dry.plan_text, re.M)
    assert steps == [f"launch-{name}", f"build-{name}", f"tag-{name}"], dry.plan_text
    assert "the app's settings name no db-replica" in dry.plan_text
    assert dry.dry_run and dry.outcome.startswith("dry run: would apply 3 step(s)")
    for zone, message in [
        ("us-east-1z", "'us-east-1z' does not exist in us-east-1"),
        ("a", "'us-east-1a' is not one of myproject/staging's zones (avail_zones: "),
    ]:
        with pytest.raises(BadInput, match=re.escape(message)):
            add_replica(environment="staging", config=cfg, dry_run=False, availability_zone=zone)
    with pytest.raises(BadInput, match="availability_zone"):
        add_replica(environment="staging", config=cfg, dry_run=False, availability_zone="A;B")
    with pytest.raises(BadInput, match="unknown environment 'nowhere'"):
        add_replica(environment="nowhere", config=cfg, dry_run=False)
    # the CLI: exit 2, one line
    from prefect.settings import PREFECT_API_URL

    cli = subprocess.run(
        [sys.executable, "-m", "fabflows.cli", "run", "add-replica", "-e", "staging", "-c", cfg]
        + ["--availability-zone", "us-east-1z", "--apply"],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value())),
        cwd=Path(__file__).resolve().parents[2],
    )
    assert cli.returncode == 2, cli.stderr
    lines = [line for line in cli.stderr.splitlines() if "add-replica" in line]
    assert len(lines) == 1, cli.stderr
    assert lines[0].startswith(
        "add-replica: bad input: availability zone 'us-east-1z' does not exist in us-east-1 "
    ), lines
    assert _instances(stack) == before  # nothing was created


@pytest.mark.hosts
@pytest.mark.flow
def test_add_replica_builds_a_streaming_replica(stack) -> None:  # noqa: ANN001
    cfg = str(stack.config_path)
    (primary_iid,) = role_ids(stack, "db-primary")
    primary = stack.hosts[primary_iid]
    (old_iid,) = role_ids(stack, "db-replica")
    old_pid = psql(stack.hosts[old_iid], "SELECT pid FROM pg_stat_wal_receiver;", "postgres")
    follower = InstanceFollower(stack, prefix="an")
    future = run_in_thread(
        add_replica, environment="staging", config=cfg, dry_run=False, availability_zone="e"
    )
    report = follower.run_until(future, timeout=600)
    assert not follower.errors, follower.errors
    name = "myproject_staging_db-replica_2"
    assert [(s.name, s.state) for s in report.steps] == [
        (f"{s}-{name}", "done") for s in ("launch", "build", "tag")
    ], report.render_text()
    assert not report.problems
    (new_iid,) = follower.started
    tags = tags_of(stack, new_iid)
    assert tags["role"] == "db-replica" and tags["Name"] == name and tags[RECORD_TAG]
    new = stack.hosts[new_iid]
    # the end state, read from the peers: both replicas stream, zero lag, the same rows
    assert sorted(role_ids(stack, "db-replica")) == sorted([old_iid, new_iid])
    assert replicas_caught_up(stack) == []
    assert new.ip in streaming_replicas(primary) and not writable(new)
    assert "replica_myproject_staging_db_replica_2" in _slots(primary)
    # the password reached the new server only as files of mode 600
    modes = new.exec(
        ["stat", "-c", "%U %a", "/home/deploy/replication_password", "/var/lib/postgresql/.pgpass"]
    ).stdout.split("\n")
    assert modes[:2] == ["deploy 600", "postgres 600"], modes
    # the other replica was left alone: the same WAL receiver, never restarted
    assert psql(stack.hosts[old_iid], "SELECT pid FROM pg_stat_wal_receiver;", "postgres") == (
        old_pid
    )
    # the sandbox's build_replica rebuilds a replica that streams (its slot, active until the
    # replica stops, is dropped once it has stopped)
    build_replica(new, primary, stack.replication_password, timeout=300)
    assert replicas_caught_up(stack) == []


# --------------------------------------------------------------------------- SIGKILL, then recover

DEFAULT_KILL_POINT = "build"
"""make test runs this one (the instance launched and answering, not yet a replica); the others
are in make crash-matrix."""


@pytest.mark.hosts
@pytest.mark.flow
@pytest.mark.parametrize(
    "kind",
    [
        k if k == DEFAULT_KILL_POINT else pytest.param(k, marks=pytest.mark.crash_matrix)
        for k in ("launch:after", "build", "tag")
    ],
)
def test_add_replica_sigkill_then_recover(stack, kind, tmp_path: Path) -> None:  # noqa: ANN001
    """The run SIGKILLed at a step boundary; recover takes it all back: the launched instance
    terminated, no slot or pg_hba line left for it on the primary, the cluster as before."""
    cfg = str(stack.config_path)
    assert replicas_caught_up(stack, timeout=30) == [], "an earlier test left the cluster broken"
    (primary_iid,) = role_ids(stack, "db-primary")
    primary = stack.hosts[primary_iid]
    replicas_before = role_ids(stack, "db-replica")
    slots_before = _slots(primary)
    dry = add_replica(environment="staging", config=cfg, availability_zone="e")
    (name,) = re.findall(r"^launch-(\S+)\s", dry.plan_text, re.M)
    step, _, when = kind.partition(":")
    target = f"{step}-{name}" + (":after" if when else "")
    follower = InstanceFollower(stack, prefix="ak")
    killed = run_in_thread(
        run_until_paused,
        "add-replica",
        target,
        ["-e", "staging", "-c", cfg, "--availability-zone", "e", "--apply"],
        tmp_path / "paused",
        300,
    )
    follower.run_until(killed, timeout=360)
    assert not follower.errors, follower.errors
    (new_iid,) = follower.started
    assert tags_of(stack, new_iid)["role"] == PENDING_ROLE
    new_ip = stack.hosts[new_iid].ip
    journal = Journal.for_environment("myproject/staging", load_config(cfg))
    (entry,) = [e for e in journal.open_entries() if e.flow == "add-replica"]
    if kind == "tag":  # the replica was built: it streams, with its slot, before recover
        assert new_ip in streaming_replicas(primary)
    found = recover_environment(environment="staging", config=cfg, dry_run=False)
    assert f"undo launch-{name}" in found.plan_text, found.plan_text
    follower.tick()  # the terminated instance's host goes
    assert _instances(stack)[new_iid] in ("shutting-down", "terminated")
    assert new_iid not in stack.hosts
    # consistent: one primary taking writes; the replicas it had, streaming, nothing else
    assert writable(primary)
    assert role_ids(stack, "db-replica") == replicas_before
    assert replicas_caught_up(stack) == []
    assert _slots(primary) == slots_before
    assert f" {new_ip}/32 " not in _hba(primary)
    assert not journal.open_entries(), journal.open_entries()
    assert entry.run_id[:8] in found.plan_text


@pytest.mark.hosts
@pytest.mark.flow
@pytest.mark.crash_matrix
def test_add_replica_sigkill_then_resume(stack, tmp_path: Path) -> None:  # noqa: ANN001
    """Killed once its instance answers (before the build): resume reuses that instance (no
    second launch), builds it and tags it; it streams with zero lag."""
    cfg = str(stack.config_path)
    assert replicas_caught_up(stack, timeout=30) == [], "an earlier test left the cluster broken"
    dry = add_replica(environment="staging", config=cfg, availability_zone="e")
    (name,) = re.findall(r"^launch-(\S+)\s", dry.plan_text, re.M)
    follower = InstanceFollower(stack, prefix="au")
    killed = run_in_thread(
        run_until_paused,
        "add-replica",
        f"build-{name}",
        ["-e", "staging", "-c", cfg, "--availability-zone", "e", "--apply"],
        tmp_path / "paused",
        300,
    )
    follower.run_until(killed, timeout=360)
    (new_iid,) = follower.started
    journal = Journal.for_environment("myproject/staging", load_config(cfg))
    (entry,) = [e for e in journal.open_entries() if e.flow == "add-replica"]
    future = run_in_thread(
        resume_run, environment="staging", run_id=entry.run_id, config=cfg, dry_run=False
    )
    report = follower.run_until(future, timeout=600)
    assert [(s.name, s.state) for s in report.steps] == [
        (f"launch-{name}", "skipped"),
        (f"build-{name}", "done"),
        (f"tag-{name}", "done"),
    ], report.render_text()
    assert follower.started == [new_iid]  # no second instance
    assert tags_of(stack, new_iid)["role"] == "db-replica"
    assert new_iid in role_ids(stack, "db-replica")
    assert replicas_caught_up(stack) == []
    assert not journal.open_entries(), journal.open_entries()
