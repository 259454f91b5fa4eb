"""reset-replicas on real peers: a replica whose replication is really broken (WAL receiver
stopped, the WAL it needs removed from the primary) rebuilt while the site keeps writing; the run
SIGKILLed at each step boundary and recover/resume leaving a consistent cluster; bad input refused
before any change; and the pure plan as a table.

One stack per module (moto, a db-primary, two streaming replicas, two web servers and a worker
running the sandbox's Django app). Every real-peer test ends with the end state read from the
peers: each replica in the primary's ``pg_stat_replication`` as streaming, zero bytes of lag, and
the same row counts as the primary; so the next test starts from a healthy cluster.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import requests

from config import load_config, resolve_environment
from fabflows.errors import BadInput
from fabflows.runtime.journal import Journal
from fabflows.testing.failover_lab import (
    break_replication,
    build_failover_env,
    cluster,
    name_of,
    psql,
    replicas_caught_up,
    role_ids,
    streaming_replicas,
    web_urls,
    writable,
)
from fabflows.testing.faults import run_until_paused
from fabflows.testing.moto_server import MotoServer
from flows.recover_environment import recover_environment
from flows.reset_replicas import (
    ReplicaTarget,
    ResetFacts,
    ResetReplicasParams,
    plan_reset_replicas,
    reset_replicas,
)
from flows.resume_run import resume_run
from tasks.postgres.server import DbServer

# --------------------------------------------------------------------------- the plan (pure)


@pytest.fixture(scope="module")
def staging_env(tmp_path_factory):  # noqa: ANN001, ANN201
    from fabflows.testing.configs import write_config

    path = write_config(tmp_path_factory.mktemp("rr-plan"), {})
    return resolve_environment(load_config(path), "staging")


def _target(name: str, state: str = "streaming") -> ReplicaTarget:
    return ReplicaTarget(
        server=DbServer(name=name, address=name, db_address=name, instance_id=f"i-{name}"),
        slot=f"replica_{name}",
        data_directory="/var/lib/postgresql/15/main",
        state=state,
    )


@pytest.mark.parametrize(
    ("wanted", "primaries", "steps", "problem"),
    [
        (None, 1, ["rebuild-r1", "rebuild-r2"], None),
        (["r2"], 1, ["rebuild-r2"], None),
        (["i-r1"], 1, ["rebuild-r1"], None),
        (["r1", "i-r1"], 1, ["rebuild-r1"], None),
        (["w1"], 1, [], "w1 is a web server, not a db-replica"),
        (["p"], 1, [], "p is a db-primary server, not a db-replica"),
        (["nope"], 1, [], "unknown replica 'nope'"),
        (None, 0, [], "0 running db-primary servers"),
        (None, 2, [], "2 running db-primary servers"),
    ],
)
def test_reset_plan(staging_env, wanted, primaries, steps, problem) -> None:  # noqa: ANN001
    primary = DbServer(name="p", address="p", db_address="p", instance_id="i-p")
    facts = ResetFacts(
        primaries=[primary] * primaries,
        replicas=[_target("r1", "not streaming"), _target("r2")],
        others={"w1": "web", "p": "db-primary"},
    )
    plan = plan_reset_replicas(facts, ResetReplicasParams(replicas=wanted), staging_env)
    assert [c.step for c in plan.changes] == steps
    if problem:
        assert any(problem in p for p in plan.problems), plan.problems
    else:
        assert not plan.problems and plan.downtime_seconds is None and plan.destructive
        assert "now not streaming" in plan.changes[0].detail or wanted == ["r2"]


# --------------------------------------------------------------------------- real peers


@pytest.fixture(scope="module")
def stack(test_network, tmp_path_factory, prefect_server):  # noqa: ANN001, ANN201
    moto = MotoServer().start()
    env = build_failover_env(moto.endpoint, test_network, tmp_path_factory.mktemp("reset"), "rr")
    try:
        assert replicas_caught_up(env) == []
        yield env
    finally:
        env.destroy()
        moto.stop()


class SiteProbe:
    """POSTs the app's write-check page through every web server, every 0.2 s, in a thread."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.answers: list[int | str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for url in self.urls:
                try:
                    answer: int | str = requests.post(url, data={"text": "probe"}, timeout=5)
                    answer = answer.status_code
                except requests.RequestException as exc:
                    answer = type(exc).__name__
                self.answers.append(answer)
            self._stop.wait(0.2)

    def __enter__(self) -> SiteProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.hosts
@pytest.mark.flow
def test_reset_replicas_rebuilds_a_broken_replica(stack) -> None:  # noqa: ANN001
    cfg = str(stack.config_path)
    (primary_iid,) = role_ids(stack, "db-primary")
    broken_iid, healthy_iid = role_ids(stack, "db-replica")[:2]
    primary, broken, healthy = (stack.hosts[i] for i in (primary_iid, broken_iid, healthy_iid))
    break_replication(stack, broken_iid)
    assert broken.ip not in streaming_replicas(primary)
    name = name_of(stack, broken_iid)
    before = cluster(stack)
    for bad, message in [
        ("no-such-server", "unknown replica"),
        (name_of(stack, primary_iid), "is a db-primary server, not a db-replica"),
        (name_of(stack, role_ids(stack, "web")[0]), "is a web server, not a db-replica"),
    ]:
        with pytest.raises(BadInput, match=message):
            reset_replicas(environment="staging", config=cfg, dry_run=False, replicas=[bad])
    assert cluster(stack) == before and broken.ip not in streaming_replicas(primary)
    dry = reset_replicas(environment="staging", config=cfg, replicas=[name])
    assert "now not streaming" in dry.plan_text, dry.plan_text
    assert re.findall(r"^(rebuild-\S+)\s", dry.plan_text, re.M) == [f"rebuild-{name}"]
    healthy_pid = psql(healthy, "SELECT pid FROM pg_stat_wal_receiver;", "postgres")
    with SiteProbe(web_urls(stack)) as probe:  # the site keeps writing while it is rebuilt
        report = reset_replicas(environment="staging", config=cfg, dry_run=False, replicas=[name])
    assert [(s.name, s.state) for s in report.steps] == [(f"rebuild-{name}", "done")], (
        report.render_text()
    )
    assert "rebuilt from" in report.steps[0].summary and not report.problems
    assert probe.answers and set(probe.answers) == {200}, probe.answers
    # the end state, read from the peers: streaming, zero lag, the same rows everywhere
    assert replicas_caught_up(stack) == []
    assert psql(broken, "SELECT status FROM pg_stat_wal_receiver;", "postgres") == "streaming"
    assert not writable(broken)
    # the notes the probe wrote during the rebuild reached the rebuilt replica too
    notes = int(psql(broken, "SELECT count(*) FROM shop_sitenote WHERE text = 'probe';"))
    assert notes == probe.answers.count(200)
    # the other replica was left alone: the same WAL receiver, never restarted
    assert psql(healthy, "SELECT pid FROM pg_stat_wal_receiver;", "postgres") == healthy_pid


# --------------------------------------------------------------------------- SIGKILL at each step

BOUNDARIES = ["first", "first:after", "second", "second:after"]
DEFAULT_KILL_POINT = "second"
"""make test runs this one (one applied rebuild, the other not started); the rest are in
make crash-matrix."""


@pytest.mark.hosts
@pytest.mark.flow
@pytest.mark.parametrize(
    "kind",
    [
        k if k == DEFAULT_KILL_POINT else pytest.param(k, marks=pytest.mark.crash_matrix)
        for k in BOUNDARIES
    ],
)
def test_reset_replicas_sigkill_then_recover(stack, kind, tmp_path: Path) -> None:  # noqa: ANN001
    """The run SIGKILLed at a step boundary; recover leaves a consistent cluster (one primary,
    taking writes; every replica read-only and streaming, or reported for resume); resume (or a
    new run, when nothing was applied) finishes: every replica streams with zero lag."""
    cfg = str(stack.config_path)
    assert replicas_caught_up(stack, timeout=30) == [], "an earlier test left the cluster broken"
    (primary_iid,) = role_ids(stack, "db-primary")
    replicas = role_ids(stack, "db-replica")
    names = [name_of(stack, i) for i in replicas]
    dry = reset_replicas(environment="staging", config=cfg)
    steps = re.findall(r"^(rebuild-\S+)\s", dry.plan_text, re.M)
    assert sorted(steps) == sorted(f"rebuild-{n}" for n in names) and len(steps) >= 2
    step = steps[0] if kind.startswith("first") else steps[1]
    target = step + (":after" if kind.endswith(":after") else "")
    run_until_paused(
        "reset-replicas", target, ["-e", "staging", "-c", cfg, "--apply"], tmp_path / "paused", 240
    )
    journal = Journal.for_environment("myproject/staging", load_config(cfg))
    entries = [e for e in journal.open_entries() if e.flow == "reset-replicas"]
    # a run killed before its first step applied nothing: its journal needs no attention
    assert len(entries) == (0 if kind == "first" else 1), entries
    run_id = entries[0].run_id if entries else ""
    applied = [s.name for s in entries[0].applied] if entries else []
    expected = steps[: steps.index(step) + (1 if kind.endswith(":after") else 0)]
    assert applied == expected
    found = recover_environment(environment="staging", config=cfg, dry_run=False)
    # consistent: one primary, taking writes; the replicas read-only, streaming or reported
    primary = stack.hosts[primary_iid]
    assert writable(primary)
    assert [r for r in cluster(stack).values() if r == "db-primary"] == ["db-primary"]
    streaming = streaming_replicas(primary)
    for iid, name in zip(replicas, names, strict=True):
        host = stack.hosts[iid]
        assert not writable(host), name
        assert host.ip in streaming or f"rebuild-{name}" in found.plan_text, found.plan_text
    if applied:
        assert f"fabflows resume {run_id}" in found.plan_text, found.plan_text
        report = resume_run(environment="staging", run_id=run_id, config=cfg, dry_run=False)
        how = "resumed"
    else:
        report = reset_replicas(environment="staging", config=cfg, dry_run=False)
        how = "run again"
    assert all(s.state in ("done", "skipped") for s in report.steps), report.render_text()
    assert [s.name for s in report.steps if s.state == "skipped"] == applied
    assert not report.problems, report.problems
    assert replicas_caught_up(stack) == []
    assert not journal.open_entries(), (how, journal.open_entries())
