"""promote-replica on real peers: a primary whose host is killed, a replica promoted, the app
writing again through it, the old primary started again and fenced; bad input refused before any
change; and the pure plan as a table.

One stack per module (moto, a db-primary, two streaming replicas, two web servers and a worker
running the sandbox's Django app). The tests run in file order: each leaves the cluster with one
primary and two streaming replicas (the old primary rebuilt as a replica of the new one), so the
next can kill the primary again.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from config import load_config, resolve_environment
from fabflows.errors import BadInput
from fabflows.procedures.promote_plan import (
    DECOMMISSIONED_TAG,
    AppServer,
    DbNode,
    PromoteFacts,
    plan_promote_replica,
)
from fabflows.runbook import RunContext
from fabflows.runtime.journal import Journal
from fabflows.testing.app_env import AppEnv
from fabflows.testing.failover_lab import (
    build_failover_env,
    cluster,
    name_of,
    post_ok,
    psql,
    rebuild_old_primary,
    role_ids,
    tags_of,
    web_urls,
    writable,
)
from fabflows.testing.faults import run_until_paused
from fabflows.testing.moto_server import MotoServer
from flows.promote_replica import RUNBOOK, PromoteReplicaParams, promote_replica
from flows.recover_environment import recover_environment
from flows.resume_run import resume_run
from sandbox.replication import wait_for_postgres
from tasks.postgres.failover import Reachability, StandbyState
from tasks.postgres.server import DbServer
from tasks.ssh.fleet import FleetHost

# --------------------------------------------------------------------------- the plan (pure)


def _node(name: str, role: str, lsn: str | None = "0/5000000", **kw) -> DbNode:  # noqa: ANN003
    standby = None
    if lsn is not None:
        standby = StandbyState(
            server=name,
            in_recovery=role != "db-primary",
            replay_lsn=lsn,
            receive_lsn=lsn,
            sender_host="10.0.0.1",
            receiver_status="streaming",
        )
    return DbNode(
        server=DbServer(
            name=name,
            address=f"a-{name}",
            db_address=kw.pop("ip", f"ip-{name}"),
            instance_id=f"i-{name}",
        ),
        role=role,
        standby=standby,
        **kw,
    )


def _facts(reach_flow=(False, False), reach_replica=(False, False), nodes=None) -> PromoteFacts:  # noqa: ANN001
    nodes = nodes or [
        _node("p", "db-primary", lsn=None, ip="10.0.0.1", error="TimeoutError"),
        _node("r1", "db-replica", "0/5000000"),
        _node("r2", "db-replica", "0/6000000"),
    ]
    web = FleetHost(name="w1", address="10.0.1.1", role="web", instance_id="i-w1")
    return PromoteFacts(
        nodes=nodes,
        others={"w1": "web", "i-w1": "web"},
        reach=[
            Reachability(seen_from="flow", ssh=reach_flow[0], postgres=reach_flow[1]),
            Reachability(seen_from="r1", ssh=reach_replica[0], postgres=reach_replica[1]),
        ],
        apps=[
            AppServer(
                host=web, groups=["s-pgbouncer", "s-web"], database_hosts=["10.0.0.1", "127.0.0.1"]
            )
        ],
    )


@pytest.fixture(scope="module")
def staging_env(tmp_path_factory):  # noqa: ANN001, ANN201
    from fabflows.testing.configs import write_config

    path = write_config(tmp_path_factory.mktemp("pr-plan"), {})
    return resolve_environment(load_config(path), "staging")


@pytest.mark.parametrize(
    ("facts", "replica", "lost", "problem"),
    [
        (_facts(reach_flow=(True, False)), None, False, "the db-primary p answers (from flow: ssh"),
        (
            _facts(reach_replica=(False, True)),
            None,
            False,
            "from r1: ssh no answer, postgres answers",
        ),
        (_facts(), "w1", False, "w1 is a web server, not a db-replica"),
        (_facts(), "i-w1", False, "i-w1 is a web server, not a db-replica"),
        (_facts(), "p", False, "p is the db-primary, not a db-replica"),
        (_facts(), "nope", False, "unknown replica 'nope'"),
        (
            _facts(nodes=[_node("p", "db-primary", lsn=None), _node("r1", "db-replica", None)]),
            None,
            False,
            "no readable db-replica in recovery",
        ),
        (_facts(nodes=[_node("r1", "db-replica")]), None, False, "0 servers are tagged db-primary"),
    ],
    ids=[
        "ssh-answers",
        "pg-answers-from-replica",
        "web-name",
        "web-id",
        "primary",
        "unknown",
        "no-replica",
        "no-primary",
    ],
)
def test_plan_refusals(staging_env, facts, replica, lost, problem) -> None:  # noqa: ANN001
    plan = plan_promote_replica(facts, replica=replica, primary_is_lost=lost, env=staging_env)
    assert any(problem in p for p in plan.problems), plan.problems
    assert not plan.changes


def test_plan_least_lag_named_and_override(staging_env) -> None:  # noqa: ANN001
    plan = plan_promote_replica(_facts(), replica=None, primary_is_lost=False, env=staging_env)
    assert plan.new is not None and plan.new.name == "r2"  # the most WAL replayed
    steps = [c.step for c in plan.changes]
    assert steps == [
        "upgrade-page-on",
        "fence-p",
        "promote-r2",
        "retag-r2",
        "repoint-i-w1",
        "upgrade-page-off",
        "follow-r1",
        "finish-failover",
    ]
    assert plan.fence[0].stop_postgres is False and plan.fence[0].tag
    assert plan.open_for == {"replica_r1": "ip-r1"}
    named = plan_promote_replica(_facts(), replica="r1", primary_is_lost=False, env=staging_env)
    assert named.new is not None and named.new.name == "r1"
    forced = plan_promote_replica(
        _facts(reach_flow=(True, True)), replica=None, primary_is_lost=True, env=staging_env
    )
    assert not forced.problems and forced.fence[0].stop_postgres


def test_protected_environment_needs_primary_is_lost(staging_env) -> None:  # noqa: ANN001
    rc = RunContext(config=None, env=staging_env.model_copy(update={"protected": True}), creds=None)
    with pytest.raises(BadInput, match="primary_is_lost"):
        RUNBOOK.validate(rc, PromoteReplicaParams())
    RUNBOOK.validate(rc, PromoteReplicaParams(primary_is_lost=True))


# --------------------------------------------------------------------------- real peers


@pytest.fixture(scope="module")
def stack(test_network, tmp_path_factory, prefect_server):  # noqa: ANN001, ANN201
    moto = MotoServer().start()
    env = build_failover_env(moto.endpoint, test_network, tmp_path_factory.mktemp("promote"), "pr")
    try:
        yield env
    finally:
        env.destroy()
        moto.stop()


def assert_failed_over(env: AppEnv, old_iid: str) -> str:
    """One primary (tagged and writable), the old one fenced, every replica streaming from the
    new one, the app writing through every web server. Returns the new primary's instance id."""
    roles = cluster(env)
    (new_iid,) = [i for i, r in roles.items() if r == "db-primary"]
    assert roles[old_iid] == "decommissioned"
    record = json.loads(tags_of(env, old_iid)[DECOMMISSIONED_TAG])
    assert record["promoted"] == new_iid and record["done"] is True
    new = env.hosts[new_iid]
    assert writable(new)
    replicas = [env.hosts[i] for i, r in roles.items() if r == "db-replica"]
    assert replicas
    for r in replicas:
        deadline = time.monotonic() + 30
        while (
            psql(r, "SELECT sender_host || ' ' || status FROM pg_stat_wal_receiver;", "postgres")
            != f"{new.ip} streaming"
        ):
            assert time.monotonic() < deadline, f"{r.name} does not stream from {new.name}"
            time.sleep(0.3)
    for url in web_urls(env):
        assert post_ok(url), url
    return new_iid


@pytest.mark.hosts
@pytest.mark.flow
def test_refused_while_the_primary_answers(stack) -> None:  # noqa: ANN001
    cfg = str(stack.config_path)
    before = cluster(stack)
    with pytest.raises(BadInput, match="answers"):
        promote_replica(environment="staging", config=cfg, dry_run=False)
    (replica_iid,) = [i for i, r in before.items() if r == "db-replica"][:1]
    with pytest.raises(BadInput, match="not in recovery|is the db-primary"):
        promote_replica(
            environment="staging",
            config=cfg,
            dry_run=False,
            replica=role_ids(stack, "db-primary")[0],
            primary_is_lost=True,
        )
    assert cluster(stack) == before
    assert not writable(stack.hosts[replica_iid])


@pytest.mark.hosts
@pytest.mark.flow
def test_primary_killed_then_promoted_and_the_site_writes(stack) -> None:  # noqa: ANN001
    cfg = str(stack.config_path)
    (old_iid,) = role_ids(stack, "db-primary")
    old = stack.hosts[old_iid]
    stack.net.stop(old.name, graceful=False)
    before = cluster(stack)
    web_name = name_of(stack, role_ids(stack, "web")[0])
    # bad input with the primary really gone: still refused before any change
    for replica, message in [
        ("no-such-server", "unknown replica"),
        (web_name, "is a web server, not a db-replica"),
        (old_iid, "is the db-primary, not a db-replica"),
    ]:
        with pytest.raises(BadInput, match=message):
            promote_replica(environment="staging", config=cfg, dry_run=False, replica=replica)
        assert cluster(stack) == before
    started = time.monotonic()
    report = promote_replica(environment="staging", config=cfg, dry_run=False)
    took = time.monotonic() - started
    assert all(s.state == "done" for s in report.steps), report.render_text()
    new_iid = assert_failed_over(stack, old_iid)
    assert took < 60, report.render_text()
    assert report.downtime_seconds is not None
    # the old primary comes back: nothing writes to it, and the next run fences it
    new = stack.hosts[new_iid]
    stack.net.start_again(old.name)
    wait_for_postgres(old, 60)
    notes_old = psql(old, "SELECT count(*) FROM shop_sitenote;")
    notes_new = psql(new, "SELECT count(*) FROM shop_sitenote;")
    for url in web_urls(stack):
        assert post_ok(url)
    assert psql(old, "SELECT count(*) FROM shop_sitenote;") == notes_old
    assert int(psql(new, "SELECT count(*) FROM shop_sitenote;")) == int(notes_new) + 2
    dry = promote_replica(environment="staging", config=cfg)
    assert f"fence-{name_of(stack, old_iid)}" in dry.plan_text, dry.plan_text
    assert "answers again and takes writes" in dry.plan_text
    again = promote_replica(environment="staging", config=cfg, dry_run=False)
    assert [s.name for s in again.steps] == [f"fence-{name_of(stack, old_iid)}"]
    old.exec(["supervisorctl", "start", "postgresql"])
    wait_for_postgres(old, 60)
    assert not writable(old)  # started again, it comes up read-only
    rebuild_old_primary(stack, old_iid, new_iid)


# --------------------------------------------------------------------------- SIGKILL at each step

STEP_RE = re.compile(
    r"^(upgrade-page-on|fence-\S+|promote-\S+|retag-\S+|repoint-\S+|upgrade-page-off|"
    r"follow-\S+|finish-failover)\s",
    re.M,
)
BOUNDARIES = [
    "upgrade-page-on",
    "fence",
    "promote",
    "retag",
    "repoint-first",
    "repoint-last",
    "upgrade-page-off",
    "follow",
    "finish-failover",
    "finish-failover:after",
]


def resolve_boundary(kind: str, steps: list[str]) -> str:
    when = ":after" if kind.endswith(":after") else ""
    kind = kind.removesuffix(":after")
    repoints = [s for s in steps if s.startswith("repoint-")]
    if kind == "repoint-first":
        return repoints[0] + when
    if kind == "repoint-last":
        return repoints[-1] + when
    return next(s for s in steps if s == kind or s.startswith(kind + "-")) + when


def page_on(env: AppEnv) -> list[str]:
    return [
        h.name
        for h in env.by_role("web")
        if h.exec(
            ["test", "-e", "/home/deploy/services/nginx/html/503.html"], check=False
        ).returncode
        == 0
    ]


@pytest.mark.hosts
@pytest.mark.flow
@pytest.mark.parametrize(
    "kind",
    [k if k == "promote" else pytest.param(k, marks=pytest.mark.crash_matrix) for k in BOUNDARIES],
)
def test_sigkill_at_each_step_then_recover(stack, kind, tmp_path: Path) -> None:  # noqa: ANN001
    """Primary killed; the run SIGKILLed at a step boundary; recover leaves a consistent cluster
    (at most one server takes writes, no upgrade page, the rest reported for resume); resume
    finishes the failover."""
    cfg = str(stack.config_path)
    (old_iid,) = role_ids(stack, "db-primary")
    old = stack.hosts[old_iid]
    new_iid = role_ids(stack, "db-replica")[0]
    new_name = name_of(stack, new_iid)
    stack.net.stop(old.name, graceful=False)
    before = cluster(stack)
    dry = promote_replica(environment="staging", config=cfg, replica=new_name)
    steps = [s for s in STEP_RE.findall(dry.plan_text) if s != "promote-replica"]  # the title
    target = resolve_boundary(kind, steps)
    run_until_paused(
        "promote-replica",
        target,
        ["-e", "staging", "-c", cfg, "--replica", new_name, "--apply"],
        tmp_path / "paused",
    )
    journal = Journal.for_environment("myproject/staging", load_config(cfg))
    # a run killed before its first step applied nothing: its journal needs no attention
    entries = [e for e in journal.open_entries() if e.flow == "promote-replica"]
    assert len(entries) == (0 if kind == "upgrade-page-on" else 1)
    run_id = entries[0].run_id if entries else ""
    applied = [s.name for s in entries[0].applied] if entries else []
    found = recover_environment(environment="staging", config=cfg, dry_run=False)
    # consistent: at most one server takes writes, and it is the promoted one
    running = [iid for iid in cluster(stack) if stack.hosts[iid].running]
    writers = [iid for iid in running if writable(stack.hosts[iid])]
    assert writers in ([], [new_iid]), (target, writers)
    assert (writers == [new_iid]) == any(s.startswith("promote-") for s in applied)
    roles = cluster(stack)
    assert [i for i, r in roles.items() if r == "db-primary"] in ([], [old_iid], [new_iid])
    assert not page_on(stack), target  # the upgrade page never outlives recover
    forward = [s for s in applied if s not in ("upgrade-page-on", "upgrade-page-off")]
    if forward:
        assert f"fabflows resume {run_id}" in found.plan_text, found.plan_text
    # every replica streams from the new primary, or the report says to resume
    others = [i for i, r in roles.items() if r == "db-replica" and i != new_iid]
    for iid in others:
        sender = psql(stack.hosts[iid], "SELECT sender_host FROM pg_stat_wal_receiver;", "postgres")
        assert (
            sender == stack.hosts[new_iid].ip
            or f"fabflows resume {run_id}" in (found.plan_text)
            or not forward
        )
    after = journal.entry(run_id) if run_id else None
    if after is not None and after.open:
        report = resume_run(environment="staging", run_id=run_id, config=cfg, dry_run=False)
        how = "resumed"
    else:  # recover undid everything the run had done: exactly as before, so a new run
        assert cluster(stack) == before and not writers
        report = promote_replica(environment="staging", config=cfg, dry_run=False, replica=new_name)
        how = "run again"
    assert all(s.state in ("done", "skipped") for s in report.steps), (how, report.render_text())
    assert assert_failed_over(stack, old_iid) == new_iid
    rebuild_old_primary(stack, old_iid, new_iid)
