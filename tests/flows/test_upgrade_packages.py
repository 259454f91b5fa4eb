"""upgrade-packages: the plan table-tested without peers; then for real with a real apt repository
(moto, isolated test hosts, Prefect harness): dry run, a broken package stopping the rollout,
approval both ways and its timeout, and a SIGKILL during the apply recovered by end-upgrade
(the resume after a fixed repository and the SIGKILL at every step boundary, recovered by
recover-environment, are in test_upgrade_packages_crash.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from config import load_config, resolve_environment
from config.models import UpgradeSettings
from fabflows.errors import BadInput
from fabflows.procedures.package_upgrade import (
    RebootOutcome,
    check_params,
    expected_downtime,
    outcomes,
    plan_upgrade_packages,
)
from fabflows.runbook import load_context
from fabflows.runtime.engine import Scope
from fabflows.runtime.journal import Journal
from fabflows.testing.approver import resume_when_paused
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.configs import SAMPLE
from fabflows.testing.ec2_hosts import Ec2HostMirror
from fabflows.testing.upgrade_lab import make_lab, serve_test_repo
from flows.end_upgrade import end_upgrade
from flows.upgrade_packages import RUNBOOK, upgrade_packages
from flows.upgrade_status import upgrade_status
from tasks.aws.autoscaling import UPGRADE_MODE_TAG
from tasks.ssh.apt import AptFacts, AptOutcome, PackageVersion
from tasks.ssh.fleet import FleetHost, FleetResult, HostResult, RateControl

ENV = resolve_environment(load_config(SAMPLE), "staging")
SETTINGS = UpgradeSettings(reboot_packages=["linux-image-*"])
GROUP = "myproject-staging-ag"


# --------------------------------------------------------------------------- pure


def _facts(upgrades=(), installs=(), missing=(), reboot=False, kept=(), broken=()) -> AptFacts:
    return AptFacts(
        upgrades=[PackageVersion(name=n, current=c, new=v) for n, c, v in upgrades],
        kept_back=list(kept),
        app_packages_missing=list(missing),
        installs=[PackageVersion(name=n, current=c, new=v) for n, c, v in installs],
        reboot_required=reboot,
        reboot_packages=[],
        update_attempts=1,
        broken=list(broken),
    )


HOSTS = [
    FleetHost(name="web1", address="10.0.0.1", role="web"),
    FleetHost(name="db1", address="10.0.0.2", role="db-primary"),
    FleetHost(name="worker1", address="10.0.0.3", role="worker"),
    FleetHost(name="cache1", address="10.0.0.4", role="cache"),
]


def _gathered(outputs: dict[str, AptFacts | str]) -> FleetResult:
    results = []
    for h in HOSTS:
        out = outputs.get(h.name, _facts())
        if isinstance(out, str):
            results.append(HostResult(status="failed", message=out, host=h.name, address=h.address))
        else:
            results.append(
                HostResult(status="unchanged", output=out, host=h.name, address=h.address)
            )
    return FleetResult(
        name="g",
        dry_run=True,
        max_concurrency=4,
        error_budget=4,
        stopped=False,
        duration_s=1,
        results=results,
    )


def test_plan_orders_roles_and_says_what_changes_and_where_a_reboot_comes() -> None:
    gathered = _gathered(
        {
            "web1": _facts(
                upgrades=[("libc6", "2.36-1", "2.36-2")],
                installs=[("pgbouncer", None, "1.18"), ("libevent", None, "2.1")],
                missing=["pgbouncer"],
            ),
            "db1": _facts(
                upgrades=[("linux-image-amd64", "6.1.1", "6.1.2")], kept=["postgresql-15"]
            ),
            "worker1": _facts(reboot=True),
        }
    )
    plan = plan_upgrade_packages(ENV, SETTINGS, [], HOSTS, gathered, RateControl(max_concurrency=1))
    assert [h.host for h in plan.hosts] == ["db1", "cache1", "worker1", "web1"]
    assert plan.order == ["db-primary", "cache", "worker", "web"]
    db, cache, worker, web = plan.hosts
    assert db.reboot == "expected (linux-image-amd64)"
    assert db.kept_back == ["postgresql-15"] and "kept back" in db.message
    assert cache.status == "up to date" and cache.reboot == "no"
    assert worker.status == "up to date" and worker.reboot == "already required"
    assert [(c.package, c.current, c.new, c.action) for c in web.changes] == [
        ("libc6", "2.36-1", "2.36-2", "upgrade"),
        ("libevent", None, "2.1", "install (dependency)"),
        ("pgbouncer", None, "1.18", "install (app-server package)"),
    ]
    assert [p.mark_auto for p in web.packages()] == [False, True, False]
    assert plan.image_note and GROUP in plan.image_note
    md = plan.render_markdown()
    assert "2 of 4 server(s) to upgrade, 4 package change(s)" in md
    assert "| web1 | web | libc6 | 2.36-1 | 2.36-2 | upgrade |" in md
    assert "**Reboot will be required on:** db1, worker1" in md


def test_plan_blocks_on_hosts_that_could_not_be_read() -> None:
    gathered = _gathered(
        {
            "db1": "unreachable: connection refused",
            "worker1": _facts(upgrades=[("curl", "1", "2")], broken=["fabflows-broken"]),
        }
    )
    plan = plan_upgrade_packages(
        ENV, SETTINGS, [], HOSTS, gathered, RateControl(max_concurrency=1, max_errors="50%")
    )
    assert [h.host for h in plan.blocked] == ["db1", "worker1"]
    assert "dpkg reports broken packages: fabflows-broken" in plan.blocked[1].message
    assert plan.blocked[1].changes == []
    assert plan.error_budget == 2


def test_outcomes_name_every_host_and_skipped_ones() -> None:
    gathered = _gathered(
        {n: _facts(upgrades=[("curl", "1", "2")]) for n in ("web1", "db1", "worker1")}
    )
    plan = plan_upgrade_packages(ENV, SETTINGS, [], HOSTS, gathered, RateControl(max_concurrency=1))
    applied = FleetResult(
        name="a",
        dry_run=False,
        max_concurrency=1,
        error_budget=0,
        stopped=True,
        duration_s=3,
        results=[
            HostResult(
                status="changed",
                message="upgraded 1 package(s); REBOOT REQUIRED",
                host="db1",
                address="10.0.0.2",
                output=AptOutcome(
                    installed={"curl": "2"},
                    not_as_planned=[],
                    still_pending=[],
                    audit="",
                    reboot_required=True,
                    reboot_packages=["curl"],
                ),
            ),
            HostResult(status="failed", message="boom", host="worker1", address="10.0.0.3"),
        ],
    )
    got = {o.host: (o.result, o.reboot_required) for o in outcomes(plan, [applied])}
    assert got == {
        "db1": ("upgraded", True),
        "cache1": ("up to date", False),
        "worker1": ("failed", False),
        "web1": ("skipped", False),
    }
    assert expected_downtime(plan, 1).total_seconds() == 3 * 23 + 30

    # with reboot: the upgraded server's reboot merges into its outcome
    back = RebootOutcome(host="db1", address="10.0.0.2", ok=True, seconds=41.5)
    [db] = [o for o in outcomes(plan, [applied], [back]) if o.host == "db1"]
    assert (db.reboot, db.reboot_required, db.reboot_packages) == ("rebooted in 41.5 s", False, [])
    lost = RebootOutcome(host="db1", address="10.0.0.2", ok=False, message="RebootTimeout: gone")
    [db] = [o for o in outcomes(plan, [applied], [lost]) if o.host == "db1"]
    assert db.reboot == "FAILED: RebootTimeout: gone" and db.reboot_required
    [db] = [o for o in outcomes(plan, [applied], []) if o.host == "db1"]
    assert db.reboot == "not reached"  # asked for, but the reboots stopped before it
    assert all(o.reboot == "" for o in outcomes(plan, [applied]))  # not asked for


def test_batches_keep_their_names_when_servers_are_done() -> None:
    """A step per batch; a plan made again after some servers were upgraded (a resume) names
    the remaining batches as before, and the done ones have no step."""
    hosts = [FleetHost(name=f"web{i}", address=f"10.0.1.{i}", role="web") for i in range(1, 6)]
    todo = {h.name: _facts(upgrades=[("curl", "1", "2")]) for h in hosts}

    def plan(facts: dict, concurrency: int | str):  # noqa: ANN202
        gathered = _gathered_for(hosts, facts)
        return plan_upgrade_packages(
            ENV, SETTINGS, [], hosts, gathered, RateControl(max_concurrency=concurrency)
        )

    first = plan(todo, 2)
    assert [(b.step, len(b.addresses)) for b in first.upgrade_batches] == [
        ("upgrade web 1/3", 2),
        ("upgrade web 2/3", 2),
        ("upgrade web 3/3", 1),
    ]
    assert {c.step for c in first.changes} == {b.step for b in first.batches}
    # web1, web3 and web4 upgraded: the first batch keeps its name, the second has no step
    later = plan({**todo, "web1": _facts(), "web3": _facts(), "web4": _facts()}, 2)
    assert [b.step for b in later.upgrade_batches] == ["upgrade web 1/3", "upgrade web 3/3"]
    assert [h.host for h in later.batch_hosts(later.upgrade_batches[0])] == ["web2"]
    one = plan(todo, 1)
    assert [b.step for b in one.upgrade_batches] == [f"upgrade web{i}" for i in range(1, 6)]
    assert one.destructive and one.downtime_seconds and not one.problems


def _gathered_for(hosts: list[FleetHost], outputs: dict[str, AptFacts]) -> FleetResult:
    results = [
        HostResult(status="unchanged", output=outputs[h.name], host=h.name, address=h.address)
        for h in hosts
    ]
    return FleetResult(
        name="g",
        dry_run=True,
        max_concurrency=4,
        error_budget=0,
        stopped=False,
        duration_s=1,
        results=results,
    )


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"roles": ["webz"]}, "roles: unknown"),
        ({"roles": ["combo"]}, "roles: unknown"),
        ({"max_concurrency": "150%"}, "more than 100%"),
        ({"max_concurrency": 0}, "at least 1"),
        ({"max_errors": "lots"}, "not a number"),
    ],
)
def test_bad_parameters_are_refused_before_anything(kw, message) -> None:
    args = {"roles": None, "max_concurrency": None, "max_errors": None} | kw
    with pytest.raises(BadInput, match=message):
        check_params(args["roles"], args["max_concurrency"], args["max_errors"], SETTINGS, ENV)


def test_role_not_in_this_environment_is_refused() -> None:
    env = ENV.model_copy(update={"roles": ["web", "worker"]})
    with pytest.raises(BadInput, match=r"\['cache'\] not in myproject/staging's valid_roles"):
        check_params(["cache"], None, None, SETTINGS, env)


# --------------------------------------------------------------------------- for real


@pytest.fixture(scope="module")
def repo(test_network, tmp_path_factory) -> Iterator:
    r = serve_test_repo(tmp_path_factory.mktemp("apt-repo"), test_network)
    yield r
    r.stop()


def _asg(aws) -> dict:
    return boto_client(aws, "autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[GROUP]
    )["AutoScalingGroups"][0]


def _suspended(aws) -> list[str]:
    return sorted(p["ProcessName"] for p in _asg(aws)["SuspendedProcesses"])


def _tag_keys(aws) -> set[str]:
    return {t["Key"] for t in _asg(aws)["Tags"]}


def _version(host, package: str) -> str:
    r = host.exec(["cat", f"/usr/share/fabflows-test/{package}.version"], check=False)
    return r.stdout.strip() if r.returncode == 0 else "-"


def _http(ip: str, path: str = "/") -> int:
    return requests.get(f"http://{ip}{path}", timeout=5, allow_redirects=False).status_code


def _plan(cfg: str, **params):  # noqa: ANN202
    """The runbook's own gather and pure plan, as a dry run makes them (the report only has the
    rendered plan)."""
    rc = load_context("staging", config=cfg)
    scope = Scope(rc, runbook=RUNBOOK.name, run_id="test-plan")
    try:
        p = RUNBOOK.Params(**params)
        return RUNBOOK.plan(RUNBOOK.gather(scope, p), p, rc.env)
    finally:
        scope.close()


def _journal(cfg: str) -> Journal:
    return Journal.for_environment("myproject/staging", load_config(cfg))


def _assert_restored(lab, aws, before: list[str]) -> None:
    assert _suspended(aws) == before
    assert UPGRADE_MODE_TAG not in _tag_keys(aws)
    for h in lab.web:
        assert _http(h.ip) == 200 and _http(h.ip, "/healthcheck.html") == 200
        assert (
            h.exec(
                ["test", "-e", "/home/deploy/services/nginx/fabflows-upgrade-mode.json"],
                check=False,
            ).returncode
            == 1
        )


@pytest.mark.hosts
@pytest.mark.flow
def test_dry_run_then_broken_package_stops_the_rollout_and_upgrade_mode_ends(
    prefect_server, aws, test_network, make_hosts, repo, tmp_path: Path
) -> None:
    lab = make_lab(tmp_path, aws.endpoint, test_network, make_hosts, repo)
    cfg = str(lab.config_path)
    [db] = lab.by_role("db-primary")
    [worker] = lab.by_role("worker")
    worker.exec(["touch", "/etc/fabflows-break"])
    boto_client(aws, "autoscaling").suspend_processes(
        AutoScalingGroupName=GROUP, ScalingProcesses=["AZRebalance"]
    )
    before = _suspended(aws)

    dry = upgrade_packages(environment="staging", config=cfg)
    assert dry.dry_run and "would apply 6 step(s)" in dry.outcome  # on, 4 servers, off
    assert "4 of 4 server(s) to upgrade" in dry.plan_text and "fabflows-demo" in dry.plan_text
    plan = _plan(cfg)
    assert plan.digest() == dry.plan_digest
    assert [h.role for h in plan.hosts] == ["db-primary", "worker", "web", "web"]
    db_plan, worker_plan, web_plan, _ = plan.hosts
    assert {c.package: (c.current, c.new) for c in db_plan.changes} == {
        "fabflows-broken": ("1.0", "2.0"),
        "fabflows-demo": ("1.0", "2.0"),
        "fabflows-reboot": ("1.0", "2.0"),
        "fabflows-slow": ("1.0", "2.0"),
    }
    assert db_plan.reboot == "expected (fabflows-reboot)"
    assert {c.package: c.action for c in web_plan.changes if c.current is None} == {
        "fabflows-app-lib": "install (dependency)",
        "fabflows-app-tools": "install (app-server package)",
    }
    assert _version(db, "fabflows-demo") == "1.0" and _suspended(aws) == before
    assert all(_http(h.ip) == 200 for h in lab.web)

    state = upgrade_packages(environment="staging", config=cfg, dry_run=False, return_state=True)
    assert state.is_failed()
    assert "fabflows-broken could not be configured" in state.message
    worker_id = next(s.instance_id for s in lab.servers if s.role == "worker")
    assert f"NOT upgraded: myproject_staging_worker ({worker_id}) ({worker.ip})" in state.message
    (entry,) = _journal(cfg).open_entries()
    steps = {s.name: s for s in entry.steps}
    db_step, worker_step, *web_steps = (b.step for b in plan.upgrade_batches)
    assert steps["upgrade-mode-on"].state == "undone"  # the window was closed at once
    assert steps[db_step].state == "done" and steps[worker_step].state == "failed"
    assert not set(web_steps) & set(steps)  # never started
    [db_out] = steps[db_step].data["hosts"]
    assert db_out["result"] == "upgraded" and db_out["reboot_packages"] == ["fabflows-reboot"]
    assert _version(db, "fabflows-demo") == "2.0"
    assert all(_version(h, "fabflows-demo") == "1.0" for h in lab.web)  # never started
    _assert_restored(lab, aws, before)

    # the rest, tolerating the broken worker: the web servers are upgraded, two at a time
    # (it fails at the end, naming the server it could not upgrade)
    second = _plan(cfg, max_errors=1, max_concurrency="100%")
    assert [(h.address, h.status) for h in second.hosts] == [
        (db.ip, "up to date"),
        (worker.ip, "cannot plan"),  # half-configured fabflows-broken: not touched again
        *((h.ip, "would upgrade") for h in lab.web),
    ]
    assert [b.step for b in second.upgrade_batches] == ["upgrade web 1/1"]  # both at once
    state = upgrade_packages(
        environment="staging",
        config=cfg,
        dry_run=False,
        max_errors=1,
        max_concurrency="100%",
        return_state=True,
    )
    assert state.is_failed()
    assert "dpkg reports broken packages: fabflows-broken" in state.message
    assert "NOT upgraded: myproject_staging_worker" in state.message
    for h in lab.web:
        assert _version(h, "fabflows-demo") == "2.0" and _version(h, "fabflows-app-tools") == "1.0"
    _assert_restored(lab, aws, before)


def _resume_when_paused(run_input: dict, timeout: float = 60):
    """Like an approver in the UI: wait for the paused run, then resume it with a decision."""
    return resume_when_paused(run_input, timeout)[0]


@pytest.mark.hosts
@pytest.mark.flow
def test_production_waits_for_approval_reject_timeout_approve(
    prefect_server, aws, test_network, make_hosts, repo, tmp_path: Path
) -> None:
    lab = make_lab(
        tmp_path,
        aws.endpoint,
        test_network,
        make_hosts,
        repo,
        web_count=1,
        roles=("db-primary", "web"),
        production=True,
        approval={"timeout_minutes": 0.05},  # 3 s
    )
    cfg = str(lab.config_path)
    [db] = lab.by_role("db-primary")
    before = _suspended(aws)

    # rejected: nothing applied, upgrade mode never entered
    t = _resume_when_paused({"approve": False, "approver": "bob", "reason": "not tonight"})
    state = upgrade_packages(environment="staging", config=cfg, dry_run=False, return_state=True)
    t.join(5)
    assert state.is_cancelled() and "rejected by bob: not tonight" in state.message
    assert _version(db, "fabflows-demo") == "1.0" and _suspended(aws) == before

    # nobody answers within the timeout: rejected
    state = upgrade_packages(environment="staging", config=cfg, dry_run=False, return_state=True)
    assert state.is_cancelled() and "no approval" in state.message
    assert _version(db, "fabflows-demo") == "1.0" and _suspended(aws) == before

    # approved: applied, then nothing left to do
    t = _resume_when_paused({"approve": True, "approver": "alice", "reason": "window agreed"})
    report = upgrade_packages(environment="staging", config=cfg, dry_run=False)
    t.join(5)
    assert [s.state for s in report.steps] == ["done"] * 4  # on, db, web, off
    assert report.details["Approved by"].startswith("alice")
    assert report.details["Not upgraded"] == "none"
    assert _version(db, "fabflows-demo") == "2.0"
    _assert_restored(lab, aws, before)
    again = upgrade_packages(environment="staging", config=cfg, dry_run=False)
    assert again.outcome == "nothing to change" and not again.steps  # no window either


@pytest.mark.hosts
@pytest.mark.flow
def test_sigkill_during_apply_is_recovered_by_end_upgrade(
    prefect_server, aws, test_network, make_hosts, repo, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    lab = make_lab(
        tmp_path,
        aws.endpoint,
        test_network,
        make_hosts,
        repo,
        web_count=2,
        roles=("db-primary", "web"),
    )
    cfg = str(lab.config_path)
    [db] = lab.by_role("db-primary")
    db.exec(["sh", "-c", "echo 60 > /etc/fabflows-slow"])  # its upgrade hangs in a postinst
    boto_client(aws, "autoscaling").suspend_processes(
        AutoScalingGroupName=GROUP, ScalingProcesses=["AZRebalance"]
    )
    before = _suspended(aws)

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), FABFLOWS_PROGRESS_BAR="0")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fabflows.cli",
            "run",
            "upgrade-packages",
            "-e",
            "staging",
            "-c",
            cfg,
            "--apply",
        ],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while db.exec(["test", "-e", "/tmp/fabflows-slow-started"], check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(
                    f"the run never reached the apply (exit {proc.returncode}):\n{out[-3000:]}"
                )
            time.sleep(0.2)
        assert UPGRADE_MODE_TAG in _tag_keys(aws)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    # the killed run left the site in upgrade mode and the group suspended ...
    assert all(_http(h.ip) == 503 for h in lab.web)
    assert "Launch" in _suspended(aws) and UPGRADE_MODE_TAG in _tag_keys(aws)
    status = upgrade_status(environment="staging", config=cfg)
    assert status.holder.flow == "upgrade-packages"

    # ... and end-upgrade, run next, knows that run is dead and restores everything
    report = end_upgrade(environment="staging", config=cfg, dry_run=False)
    assert "is no longer running" in report.plan_text
    _assert_restored(lab, aws, before)


@pytest.mark.hosts
@pytest.mark.flow
def test_reboot_after_the_upgrades_one_server_at_a_time_inside_the_window(
    prefect_server, aws, test_network, make_hosts, repo, tmp_path: Path
) -> None:
    """reboot=True: every server the upgrade left needing a reboot is rebooted through EC2
    (RebootInstances: the test host really restarts, fresh /run and PID 1), in role order, and is
    back in a new boot before the window closes; the site answers 200 afterwards."""
    lab = make_lab(
        tmp_path,
        aws.endpoint,
        test_network,
        make_hosts,
        repo,
        web_count=1,
        roles=("db-primary", "web"),
        upgrade={"reboot_poll_seconds": 0.5, "reboot_timeout_seconds": 120},
    )
    cfg = str(lab.config_path)
    before = _suspended(aws)
    mirror = Ec2HostMirror(test_network, aws.endpoint, test_network.subnet, name_prefix="urb")
    for iid, host in lab.hosts.items():
        mirror.adopt(iid, host)
    mirror.attach(aws)
    try:
        dry = upgrade_packages(environment="staging", config=cfg, reboot=True)
        assert "rebooted by this run, one at a time" in dry.plan_text
        pid1 = {h.name: h.pid for h in lab.hosts.values()}

        report = mirror.run(
            upgrade_packages, environment="staging", config=cfg, dry_run=False, reboot=True
        )
    finally:
        mirror.detach()
    assert [s.name for s in report.steps][-2:] == ["reboot", "upgrade-mode-off"]
    assert report.details["Not upgraded"] == "none"
    assert report.details["Reboot required"] == "none"  # both rebooted, not required any more
    reboots = _journal(cfg).entry(report.run_id).step("reboot").data["reboots"]
    assert [r["ok"] and not r["still_required"] for r in reboots] == [True, True]
    # EC2 rebooted them, the database server first, one after the other
    by_id = {iid: s.role for iid, s in ((s.instance_id, s) for s in lab.servers)}
    rebooted = [by_id[iid] for _, iid, what in mirror.events if what == "rebooted"]
    assert rebooted == ["db-primary", "web"]
    for host in lab.hosts.values():
        assert host.pid != pid1[host.name]  # a new PID 1: it really restarted
        assert host.exec(["test", "-e", "/var/run/reboot-required"], check=False).returncode == 1
        assert _version(host, "fabflows-reboot") == "2.0"
    # inside the window: the reboots ended before upgrade mode did, and everything is restored
    assert report.downtime_seconds > sum(s.seconds for s in report.steps[1:-1])
    _assert_restored(lab, aws, before)
