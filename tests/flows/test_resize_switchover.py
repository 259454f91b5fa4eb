"""resize-environment's switchover path for the primary: the plan table-tested (no peer), then the
flow on real peers (moto, test hosts following EC2 states, a streaming replica, the sandbox's app
behind pgbouncer, an HTTP probe through the app during the run)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml

from fabflows import boundaries
from fabflows.procedures.promote_plan import AppServer
from fabflows.procedures.resize_plan import (
    ReplicaFact,
    SwitchoverFacts,
    plan_resize_environment,
    resize_runbook_plan,
)
from fabflows.testing.app_env import AppEnv, build_app_env
from fabflows.testing.ec2_hosts import Ec2HostMirror
from fabflows.testing.failover_lab import (
    ec2_of,
    post_ok,
    psql,
    role_ids,
    row_counts,
    web_urls,
    writable,
)
from fabflows.testing.moto_server import MotoServer
from flows.resize_environment import resize_environment
from tasks.aws.ec2 import Server
from tasks.aws.ec2_writes import InstanceTypeInfo
from tasks.http.probe import HttpProbe
from tasks.postgres.failover import StandbyState
from tasks.postgres.server import DbServer
from tasks.ssh.fleet import FleetHost

# --------------------------------------------------------------------------- the plan (pure)

MIN = {"db-primary": 1740, "db-replica": 1740, "worker": 1740}
TYPES = {
    t: InstanceTypeInfo(instance_type=t, vcpus=2, memory_mib=m)
    for t, m in (("m1.small", 1740), ("m5.large", 8192), ("m5.xlarge", 16384))
}


def _server(iid: str, role: str, itype: str = "m1.small", ip: str = "10.0.0.1") -> Server:
    return Server(
        instance_id=iid,
        name=f"{role}-{iid}",
        role=role,
        deployment="myproject",
        environment="staging",
        instance_type=itype,
        state="running",
        private_ip_address=ip,
    )


def _db(s: Server) -> DbServer:
    assert s.private_ip_address
    return DbServer(
        name=s.name or s.instance_id,
        address=s.private_ip_address,
        db_address=s.private_ip_address,
        instance_id=s.instance_id,
    )


PRIMARY = _server("i-p", "db-primary", ip="10.0.0.1")
R1 = _server("i-r1", "db-replica", ip="10.0.0.2")
R2 = _server("i-r2", "db-replica", ip="10.0.0.3")
WORKER = _server("i-wk", "worker", ip="10.0.0.9")
APP = AppServer(
    host=FleetHost(name="worker-i-wk", address="10.0.0.9", role="worker", instance_id="i-wk"),
    groups=["HUP:staging-pgbouncer"],
    database_hosts=["10.0.0.1"],
)


def _replica(s: Server, lag: int | None = 0, streaming: bool = True, slot: str = "") -> ReplicaFact:
    return ReplicaFact(
        server=_db(s),
        instance_type=s.instance_type,
        state=s.state,
        standby=StandbyState(server=s.name or "", in_recovery=True, slot_name=slot),
        streaming_from_primary=streaming,
        lag_bytes=lag,
    )


def _facts(*replicas: ReplicaFact, blockers: tuple[str, ...] = ()) -> SwitchoverFacts:
    return SwitchoverFacts(
        primary=_db(PRIMARY),
        replicas=list(replicas),
        apps=[APP],
        pgbouncer_blockers=list(blockers),
        database="myproject_staging",
    )


def _plan(wanted, servers=(PRIMARY, R1, WORKER), facts=None, path="auto"):  # noqa: ANN001, ANN202
    return plan_resize_environment(
        "myproject/staging",
        wanted,
        list(servers),
        None,
        None,
        known_types=TYPES,
        unknown_types=[],
        minimum_memory_mib=MIN,
        cache_strategy="stop",
        switchover_facts=facts,
        primary_path=path,
    )


def _steps(p) -> list[str]:  # noqa: ANN001
    rp = resize_runbook_plan(
        p, title="t", goal_seconds=60, auto_scaling_group_name=None, launch_template=None
    )
    return [c.step for c in rp.changes]


BOTH = {"db-primary": "m5.xlarge", "db-replica": "m5.large"}


def test_switchover_with_a_streaming_replica() -> None:
    p = _plan(BOTH, facts=_facts(_replica(R1, lag=0)))
    assert p.primary_path == "switchover" and not p.problems
    assert (
        "db-replica-i-r1 streams from the primary (the least lag of 1 streaming)"
        in p.primary_reason
    )
    # each server ends with its new role's type: the replica the primary's, the old primary the
    # replicas'; the replica first (one at a time), then the switchover
    assert [(c.instance_id, c.strategy, c.wanted_type) for c in p.changes] == [
        ("i-r1", "one-at-a-time", "m5.xlarge"),
        ("i-p", "switchover", "m5.large"),
    ]
    sw = p.switchover
    assert sw is not None and sw.new.instance_id == "i-r1" and sw.old.instance_id == "i-p"
    assert sw.open_for == {"replica_db_primary_i_p": "10.0.0.1"}
    assert sw.apps == [APP] and sw.database == "myproject_staging"
    assert _steps(p) == [
        "resize-db-replica-i-r1",
        "switchover-pause",
        "switchover-stop-db-primary-i-p",
        "switchover-promote-db-replica-i-r1",
        "switchover-resume",
        "switchover-retag",
        "switchover-rejoin-db-primary-i-p",
        "resize-db-replica-i-p",
    ]
    rp = resize_runbook_plan(
        p, title="t", goal_seconds=60, auto_scaling_group_name=None, launch_template=None
    )
    # the expected downtime is the switchover's pause, not the window's stop/start
    assert rp.downtime_seconds == sw.expected_seconds < 60
    text = rp.render_text()
    assert "the primary takes the switchover path" in text
    assert "becomes a streaming db-replica of db-replica-i-r1" in text
    assert "no automatic way back" in text and "fabflows recover" in text
    assert "upgrade-mode-on" not in text


def test_least_lag_wins_and_other_replicas_follow() -> None:
    facts = _facts(_replica(R1, lag=4096), _replica(R2, lag=0, slot="replica_r2host"))
    p = _plan(BOTH, servers=(PRIMARY, R1, R2), facts=facts)
    sw = p.switchover
    assert sw is not None and sw.new.instance_id == "i-r2"
    assert [f.instance_id for f in sw.followers] == ["i-r1"]
    # a follower keeps its own slot name (primary_slot_name) when it has one
    assert sw.open_for == {
        "replica_db_primary_i_p": "10.0.0.1",
        "replica_db_replica_i_r1": "10.0.0.2",
    }
    steps = _steps(p)
    assert steps.index("resize-db-replica-i-r2") < steps.index("switchover-pause")
    assert "switchover-follow-db-replica-i-r1" in steps
    assert steps[-1] == "resize-db-replica-i-p"


def test_only_the_primary_sized_and_the_replica_already_of_its_type() -> None:
    big = _server("i-r1", "db-replica", "m5.xlarge", ip="10.0.0.2")
    p = _plan({"db-primary": "m5.xlarge"}, servers=(PRIMARY, big), facts=_facts(_replica(big)))
    assert p.primary_path == "switchover"
    # nothing to resize on the replica; the old primary keeps its type as a replica
    assert [(c.instance_id, c.strategy, c.wanted_type) for c in p.changes] == [
        ("i-p", "switchover", "m1.small")
    ]
    assert "keeps its type" in p.changes[0].note
    assert "db-replica db-replica-i-r1: m5.xlarge" in p.unchanged
    assert "resize-db-replica-i-p" not in _steps(p)


@pytest.mark.parametrize(
    ("facts", "path", "reason"),
    [
        (None, "auto", "the primary's replication was not read"),
        (_facts(), "auto", "no db-replica streams from the primary"),
        (_facts(_replica(R1, streaming=False)), "auto", "no db-replica streams from the primary"),
        (
            _facts(_replica(R1), blockers=("w1: pgbouncer pool_mode = session",)),
            "auto",
            "pgbouncer cannot be paused (w1: pgbouncer pool_mode = session)",
        ),
        (_facts(_replica(R1)), "in-place", "primary_path is in-place"),
    ],
    ids=["not-read", "no-replica", "not-streaming", "pgbouncer", "asked"],
)
def test_falls_back_to_the_upgrade_window(facts, path, reason) -> None:  # noqa: ANN001
    p = _plan(BOTH, facts=facts, path=path)
    assert p.primary_path == "in-place" and reason in p.primary_reason
    assert not p.problems and p.switchover is None
    assert [(c.instance_id, c.strategy) for c in p.changes] == [
        ("i-r1", "one-at-a-time"),
        ("i-p", "window"),
    ]
    steps = _steps(p)
    assert steps[1:] == ["upgrade-mode-on", "resize-window", "upgrade-mode-off"]


def test_switchover_asked_for_but_impossible_is_refused() -> None:
    p = _plan(BOTH, facts=_facts(), path="switchover")
    assert p.problems == ["primary_path is switchover, but no db-replica streams from the primary"]


# --------------------------------------------------------------------------- real peers


@dataclass
class Stack:
    env: AppEnv
    mirror: Ec2HostMirror
    config: str
    wanted: dict[str, str]

    def types(self) -> dict[str, str]:
        out = ec2_of(self.env).describe_instances(InstanceIds=list(self.env.hosts))
        return {
            i["InstanceId"]: i["InstanceType"] for r in out["Reservations"] for i in r["Instances"]
        }

    def probe(self) -> HttpProbe:
        """GET the home page (it reads the database through pgbouncer) every 100 ms; a held
        request is measured (up to 10 s), not cut off."""
        return HttpProbe(web_urls(self.env, "")[0], interval=0.1, request_timeout=10).start()


def lab_config(env: AppEnv, wanted: dict[str, str]) -> str:
    """The stack's config with the instance types to resize to and quick polls."""
    data = yaml.safe_load(env.config_path.read_text())
    data["instance_types"] = {"staging": wanted}
    data["site_domains_map"] = {"staging": []}  # the web servers are the site (no real ELB name)
    data["fabflows"]["stop_start"] = {
        "poll_seconds": 0.2,
        "reachable_wait_seconds": 120,
        "site_wait_seconds": 120,
        "instance_wait_seconds": 120,
    }
    path = env.config_path.with_name("fabflows-resize.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def stack(test_network, tmp_path_factory, prefect_server) -> Iterator[Stack]:  # noqa: ANN001
    """moto, a db-primary with a streaming db-replica, two web servers and a worker running the
    sandbox's app behind pgbouncer; test hosts that follow EC2's stop and start."""
    moto = MotoServer().start()
    env = build_app_env(
        moto.endpoint,
        test_network,
        tmp_path_factory.mktemp("switchover"),
        rabbitmq=False,
        prefix="rs",
        replicas=True,
    )
    mirror = Ec2HostMirror(test_network, moto.endpoint, test_network.subnet, name_prefix="rsm")
    try:
        for iid, host in env.hosts.items():
            mirror.adopt(iid, host)
        mirror.attach(moto)
        mirror.reconcile()
        types = ec2_of(env).describe_instances(InstanceIds=list(env.hosts))
        current = {i["InstanceType"] for r in types["Reservations"] for i in r["Instances"]}
        big = "m5.xlarge" if "m5.xlarge" not in current else "m5.2xlarge"
        small = "m5.large" if "m5.large" not in current else "m4.large"
        wanted = {"db-primary": big, "db-replica": small}
        yield Stack(env, mirror, lab_config(env, wanted), wanted)
    finally:
        mirror.destroy_created()
        env.destroy()
        moto.stop()


def streams_from(replica, primary, timeout: float = 30) -> bool:  # noqa: ANN001
    query = "SELECT sender_host || ' ' || status FROM pg_stat_wal_receiver;"
    deadline = time.monotonic() + timeout
    while psql(replica, query, "postgres") != f"{primary.ip} streaming":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True


@pytest.mark.hosts
@pytest.mark.flow
def test_a_failure_before_the_promotion_puts_everything_back(stack: Stack) -> None:
    """The replica resized, the primary stopped under the pause, then the promote step fails:
    the old primary runs again, pgbouncer is resumed, the replica has its old type back and
    streams from the primary as before; the app writes."""
    env = stack.env
    (primary_iid,) = role_ids(env, "db-primary")
    (replica_iid,) = role_ids(env, "db-replica")
    before = stack.types()

    def fail_promote(flow: str, step: str, when: str) -> None:
        if flow == "resize-environment" and step.startswith("switchover-promote-"):
            raise RuntimeError("injected: the promotion fails")

    boundaries.observe(fail_promote)
    try:
        with pytest.raises(Exception, match="injected"):
            stack.mirror.run(resize_environment, "staging", config=stack.config, dry_run=False)
    finally:
        boundaries.forget(fail_promote)
    assert role_ids(env, "db-primary") == [primary_iid]
    assert role_ids(env, "db-replica") == [replica_iid]
    assert stack.types() == before
    primary, replica = env.hosts[primary_iid], env.hosts[replica_iid]
    assert writable(primary) and not writable(replica)
    assert streams_from(replica, primary)
    for url in web_urls(env):
        assert post_ok(url), url


@pytest.mark.hosts
@pytest.mark.flow
def test_switchover_resizes_the_primary_with_no_error_page(stack: Stack) -> None:
    env = stack.env
    (old_iid,) = role_ids(env, "db-primary")
    (new_iid,) = role_ids(env, "db-replica")
    dry = resize_environment("staging", config=stack.config)
    assert "the primary takes the switchover path" in dry.plan_text, dry.plan_text
    assert "upgrade-mode-on" not in dry.plan_text

    probe = stack.probe()
    try:
        done = stack.mirror.run(resize_environment, "staging", config=stack.config, dry_run=False)
    finally:
        seen = probe.stop()
    assert done.outcome.startswith("applied"), done.render_text()
    names = [s.name for s in done.steps]
    assert (
        names[0] == f"resize-db-replica-{new_iid}" and names[-1] == f"resize-db-replica-{old_iid}"
    )
    assert "switchover-pause" in names and "switchover-resume" in names
    # the resized replica is the new primary (tags and PostgreSQL), the old primary a replica
    # of it, each with its new role's type
    assert role_ids(env, "db-primary") == [new_iid]
    assert role_ids(env, "db-replica") == [old_iid]
    types = stack.types()
    assert types[new_iid] == stack.wanted["db-primary"]
    assert types[old_iid] == stack.wanted["db-replica"]
    new, old = env.hosts[new_iid], env.hosts[old_iid]
    assert writable(new) and not writable(old)
    assert streams_from(old, new)
    # writes go through the app to the new primary and reach the old one
    notes = int(psql(new, "SELECT count(*) FROM shop_sitenote;"))
    for url in web_urls(env):
        assert post_ok(url), url
    assert int(psql(new, "SELECT count(*) FROM shop_sitenote;")) == notes + len(web_urls(env))
    deadline = time.monotonic() + 30
    while row_counts(old) != row_counts(new):
        assert time.monotonic() < deadline, (row_counts(old), row_counts(new))
        time.sleep(0.3)
    # users never got anything but a 200 (requests were held, not refused)
    assert seen.samples > 50 and seen.non_200 == 0, seen.describe()
    print(
        f"switchover: {done.details.get('switchover_seconds')} s, longest request "
        f"{seen.latency_max_s} s, {seen.describe()}"
    )
    again = resize_environment("staging", config=stack.config)
    assert again.outcome.endswith("nothing to change"), again.render_text()


@pytest.mark.hosts
@pytest.mark.flow
def test_a_failure_after_the_promotion_finishes_forward(stack: Stack) -> None:
    """Back the other way: the replica resized to a third type for the primary, then the run fails
    just before RESUME, after the promotion: there is no going back, so the undo finishes the
    switchover forward (what `fabflows recover` does for a run that died there): the app
    repointed and resumed, the roles retagged, the old primary streaming from the new one, and
    the new primary keeps its new type (its resize is not undone: that would stop the primary).
    The run still fails."""
    env = stack.env
    (old_iid,) = role_ids(env, "db-primary")
    (new_iid,) = role_ids(env, "db-replica")
    third = "m5.2xlarge" if "m5.2xlarge" not in stack.wanted.values() else "m4.xlarge"
    swapped = {"db-primary": third, "db-replica": stack.wanted["db-primary"]}
    config = lab_config(env, swapped)

    def fail_resume(flow: str, step: str, when: str) -> None:
        if flow == "resize-environment" and step == "switchover-resume" and when == "before":
            raise RuntimeError("injected: the run fails after the promotion")

    boundaries.observe(fail_resume)
    probe = stack.probe()
    try:
        with pytest.raises(Exception, match="injected"):
            stack.mirror.run(resize_environment, "staging", config=config, dry_run=False)
    finally:
        boundaries.forget(fail_resume)
        seen = probe.stop()
    assert role_ids(env, "db-primary") == [new_iid]
    assert role_ids(env, "db-replica") == [old_iid]
    assert stack.types()[new_iid] == third
    new, old = env.hosts[new_iid], env.hosts[old_iid]
    assert writable(new) and not writable(old)
    assert streams_from(old, new)
    for url in web_urls(env):
        assert post_ok(url), url
    assert seen.non_200 == 0, seen.describe()
    # each has its new role's type (the old primary's was the replicas' already): nothing left
    dry = resize_environment("staging", config=config)
    assert dry.outcome.endswith("nothing to change"), dry.render_text()
