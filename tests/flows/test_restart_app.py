"""restart-app: the plan as a table; restarts, a stuck celery killed, a SIGKILLed run recovered
and resumed, on real test hosts behind a moto server."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import load_config, resolve_environment
from fabflows.runtime.journal import Journal
from fabflows.testing import faults
from fabflows.testing.app_env import build_app_env
from fabflows.testing.moto_server import MotoServer
from flows.recover_environment import recover_environment
from flows.restart_app import AppFacts, RestartAppParams, plan_restart_app, restart_app
from flows.resume_run import resume_run
from tasks.ssh.fleet import FleetHost
from tasks.ssh.programs import ProgramState


def _facts(web: int, workers: int = 1) -> AppFacts:
    hosts = [
        FleetHost(name="web", address=f"10.0.0.{i}", role="web", instance_id=f"i-w{i}")
        for i in range(web)
    ] + [
        FleetHost(name=f"wk{i}", address=f"10.0.1.{i}", role="worker", instance_id=f"i-k{i}")
        for i in range(workers)
    ]
    programs = {
        h.address: [
            ProgramState(name="staging-web:staging-server", state="RUNNING"),
            ProgramState(name="staging-celery:staging-celery-main", state="STOPPING"),
        ]
        for h in hosts
    }
    return AppFacts(hosts=hosts, programs=programs)


@pytest.fixture(scope="module")
def staging(tmp_path_factory):  # noqa: ANN201
    from fabflows.testing.configs import write_config

    path = write_config(tmp_path_factory.mktemp("ra"), {})
    return resolve_environment(load_config(path), "staging")


@pytest.mark.parametrize(
    ("web", "concurrency", "batches", "downtime"),
    [
        (2, 1, ["restart-web-1", "restart-web-2"], None),
        (2, "100%", ["restart-web-1"], 5.0),
        (3, 2, ["restart-web-1", "restart-web-2"], None),
        (1, 1, ["restart-web-1"], 5.0),
    ],
)
def test_plan_batches_and_downtime(staging, web, concurrency, batches, downtime) -> None:  # noqa: ANN001
    params = RestartAppParams(roles=["web"], max_concurrency=concurrency)
    plan = plan_restart_app(_facts(web), params, staging)
    assert [b.step for b in plan.batches] == batches
    assert plan.downtime_seconds == downtime
    # two servers named alike are told apart by their instance ids
    assert {c.target for c in plan.changes} == {f"web (i-w{i})" for i in range(web)}


def test_plan_defaults_states_and_problems(staging) -> None:  # noqa: ANN001
    plan = plan_restart_app(_facts(1, 1), RestartAppParams(roles=["worker"]), staging)
    (change,) = plan.changes
    assert change.action == "restart staging-celery"
    assert "STOPPING" in change.detail
    none = plan_restart_app(_facts(0, 0), RestartAppParams(), staging)
    assert none.problems == [
        "no running web server in myproject/staging",
        "no running worker server in myproject/staging",
    ]
    with pytest.raises(ValueError, match="max_concurrency"):
        RestartAppParams(max_concurrency="150%")


# --------------------------------------------------------------------------- real peers

CONF = """\
[program:staging-server]
command=/bin/sh -c 'exec sleep 100000'
startsecs=0
[group:staging-web]
programs=staging-server
[program:staging-celery-main]
command=/bin/sh -c 'trap "" TERM; while true; do sleep 1; done'
startsecs=0
stopwaitsecs=600
[group:staging-celery]
programs=staging-celery-main
"""


def _install(host) -> None:  # noqa: ANN001
    host.exec(
        [
            "sh",
            "-c",
            "cat > /etc/supervisor/conf.d/40-app.conf; for i in $(seq 100); do "
            "supervisorctl update && exit 0; sleep 0.1; done; exit 1",
        ],
        input=CONF,
    )


def _pid(host, program: str) -> str:  # noqa: ANN001
    return host.exec(["supervisorctl", "pid", program]).stdout.strip()


@pytest.fixture(scope="module")
def stack(test_network, tmp_path_factory, prefect_server):  # noqa: ANN001, ANN201
    moto = MotoServer().start()
    env = build_app_env(
        moto.endpoint,
        test_network,
        tmp_path_factory.mktemp("restart"),
        app=False,
        rabbitmq=False,
        prefix="ra",
    )
    try:
        for host in env.by_role("web") + env.by_role("worker"):
            _install(host)
        yield env
    finally:
        env.destroy()
        moto.stop()


@pytest.mark.hosts
@pytest.mark.flow
def test_rolling_web_restart_and_a_stuck_celery_killed(stack) -> None:  # noqa: ANN001
    cfg = str(stack.config_path)
    web = stack.by_role("web")
    (worker,) = stack.by_role("worker")
    before = {h.name: _pid(h, "staging-web:staging-server") for h in web}
    celery = _pid(worker, "staging-celery:staging-celery-main")
    dry = restart_app(environment="staging", config=cfg)
    assert dry.dry_run and "restart-web-2" in dry.plan_text
    assert {h.name: _pid(h, "staging-web:staging-server") for h in web} == before
    report = restart_app(environment="staging", config=cfg, dry_run=False, stop_timeout_seconds=2)
    assert all(s.state == "done" for s in report.steps), report.render_text()
    after = {h.name: _pid(h, "staging-web:staging-server") for h in web}
    assert all(after[n] != before[n] for n in before)
    assert _pid(worker, "staging-celery:staging-celery-main") != celery
    worker_step = next(s for s in report.steps if s.name == "restart-worker-1")
    assert "stuck stopping" in worker_step.summary and "killed pid" in worker_step.summary
    state = worker.exec(["supervisorctl", "status", "staging-celery:*"], check=False).stdout
    assert "RUNNING" in state


@pytest.mark.hosts
@pytest.mark.flow
def test_sigkill_mid_run_then_recover_and_resume(stack, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = str(stack.config_path)
    web = stack.by_role("web")
    before = {h.name: _pid(h, "staging-web:staging-server") for h in web}
    faults.run_until_paused(
        "restart-app",
        "restart-web-2",
        ["-e", "staging", "-c", cfg, "--roles", "web", "--apply"],
        tmp_path / "paused",
        timeout=120,
    )
    journal = Journal.for_environment("myproject/staging", load_config(cfg))
    (entry,) = journal.open_entries()
    assert entry.step("restart-web-1").state == "done"
    # recover has nothing to undo (a restart has no undo) and says how to finish it
    found = recover_environment(environment="staging", config=cfg)
    assert f"fabflows resume {entry.run_id}" in found.plan_text
    mid = {h.name: _pid(h, "staging-web:staging-server") for h in web}
    report = resume_run(environment="staging", run_id=entry.run_id, config=cfg, dry_run=False)
    states = {s.name: s.state for s in report.steps}
    assert states == {"restart-web-1": "skipped", "restart-web-2": "done"}
    after = {h.name: _pid(h, "staging-web:staging-server") for h in web}
    restarted_first = [n for n in before if mid[n] != before[n]]
    assert len(restarted_first) == 1  # the dead run had restarted one server
    (n1,) = restarted_first
    assert after[n1] == mid[n1]  # not restarted again by the resume
    assert all(after[n] != before[n] for n in before)
    assert journal.entry(entry.run_id).state == "done"
