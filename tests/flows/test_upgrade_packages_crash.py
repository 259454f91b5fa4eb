"""begin-upgrade, upgrade-packages and end-upgrade killed (SIGKILL) at every step boundary, then
recover-environment: upgrade mode off and the autoscaling processes exactly as before, every
server's packages either as before or as planned (as the journal says); and upgrade-packages
resumed after one server's upgrade failed on a broken package in the apt repository, without
touching the servers already upgraded.

One stack for the module (moto, a database server and a web server as isolated test hosts, the
local apt repository); each case puts the version-1 packages back first. One kill point per flow
runs in ``make test``; the rest carry the ``crash_matrix`` marker (``make crash-matrix``)."""

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
from prefect.settings import PREFECT_API_URL

from config import load_config
from fabflows.runbook import load_context
from fabflows.runtime.engine import Scope
from fabflows.runtime.journal import Journal
from fabflows.testing import faults
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.upgrade_lab import Lab, install_image_packages, make_lab, serve_test_repo
from flows.begin_upgrade import begin_upgrade
from flows.recover_environment import recover_environment
from flows.resume_run import resume_run
from flows.upgrade_packages import RUNBOOK, upgrade_packages
from tasks.aws.autoscaling import UPGRADE_MODE_TAG

pytestmark = [pytest.mark.hosts, pytest.mark.flow]

GROUP = "myproject-staging-ag"
LABEL = "myproject/staging"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def repo(test_network, tmp_path_factory) -> Iterator:
    r = serve_test_repo(tmp_path_factory.mktemp("apt-repo"), test_network)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def lab(moto_server, test_network, repo, tmp_path_factory, prefect_server) -> Iterator[Lab]:
    moto_server.reset()
    made: list[str] = []

    def start(specs):  # noqa: ANN001, ANN202
        hosts = test_network.start(specs)
        made.extend(h.name for h in hosts)
        return hosts

    lab = make_lab(
        tmp_path_factory.mktemp("lab"),
        moto_server.endpoint,
        test_network,
        start,
        repo,
        web_count=1,
        roles=("db-primary", "web"),
    )
    boto_client(moto_server, "autoscaling").suspend_processes(
        AutoScalingGroupName=GROUP, ScalingProcesses=["AZRebalance"]
    )
    try:
        yield lab
    finally:
        for name in reversed(made):
            if name in test_network.hosts:
                test_network.destroy(name)


# --------------------------------------------------------------------------- helpers


def _suspended(aws) -> list[str]:  # noqa: ANN001
    group = boto_client(aws, "autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[GROUP]
    )["AutoScalingGroups"][0]
    return sorted(p["ProcessName"] for p in group["SuspendedProcesses"])


def _tags(aws) -> set[str]:  # noqa: ANN001
    group = boto_client(aws, "autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[GROUP]
    )["AutoScalingGroups"][0]
    return {t["Key"] for t in group["Tags"]}


def _http(ip: str, path: str = "/") -> int:
    return requests.get(f"http://{ip}{path}", timeout=5, allow_redirects=False).status_code


def _version(host, package: str = "fabflows-demo") -> str:  # noqa: ANN001
    r = host.exec(["cat", f"/usr/share/fabflows-test/{package}.version"], check=False)
    return r.stdout.strip() if r.returncode == 0 else "-"


def _upgrade_mode_off_as_before(lab: Lab, aws) -> None:  # noqa: ANN001
    assert _suspended(aws) == ["AZRebalance"]  # exactly as before: ours resumed, theirs kept
    assert UPGRADE_MODE_TAG not in _tags(aws)
    for h in lab.web:
        assert _http(h.ip) == 200 and _http(h.ip, "/healthcheck.html") == 200
        marker = "/home/deploy/services/nginx/fabflows-upgrade-mode.json"
        assert h.exec(["test", "-e", marker], check=False).returncode == 1


def _in_upgrade_mode(lab: Lab, aws) -> None:  # noqa: ANN001
    assert "Launch" in _suspended(aws) and UPGRADE_MODE_TAG in _tags(aws)
    assert all(_http(h.ip) == 503 for h in lab.web)


def _back_to_version_1(lab: Lab, repo) -> None:  # noqa: ANN001
    for host in lab.all_hosts():
        host.exec(["dpkg", "--purge", "fabflows-app-tools", "fabflows-app-lib"], check=False)
        install_image_packages(host, repo)
        host.exec(["rm", "-f", "/var/run/reboot-required", "/var/run/reboot-required.pkgs"])


def _journal(lab: Lab) -> Journal:
    return Journal.for_environment(LABEL, load_config(lab.config_path))


def _step_names(lab: Lab) -> list[str]:
    """upgrade-packages' steps as planned now (the batch steps are named after the servers)."""
    rc = load_context("staging", config=str(lab.config_path))
    scope = Scope(rc, runbook=RUNBOOK.name, run_id="test-plan")
    try:
        params = RUNBOOK.Params()
        plan = RUNBOOK.plan(RUNBOOK.gather(scope, params), params, rc.env)
        return [s.name for s in RUNBOOK.steps(plan, params)]
    finally:
        scope.close()


def _kill_at(lab: Lab, flow: str, boundary: str, marker: Path) -> None:
    """Run ``flow --apply`` through the CLI until it reaches ``boundary``, then SIGKILL it."""
    env = dict(
        os.environ,
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        FABFLOWS_PROGRESS_BAR="0",
        FABFLOWS_TEST_PAUSE_AT=f"{flow}/{boundary}",
        FABFLOWS_TEST_PAUSE_MARKER=str(marker),
    )
    argv = [sys.executable, "-c", faults.CLI_CODE, "run", flow, "-e", "staging"]
    argv += ["-c", str(lab.config_path), "--apply"]
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(
                    f"{flow} ended before {boundary}: {proc.stderr.read().decode()[-3000:]}"
                )
            assert time.monotonic() < deadline, f"{flow} never reached {boundary}"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _recover(lab: Lab) -> None:
    report = recover_environment(environment="staging", config=str(lab.config_path), dry_run=False)
    assert not report.problems, report.render_text()
    # maintenance state undone; only steps without an undo (upgrades done, upgrade mode ended)
    # stay journaled, for a resume to finish
    for entry in _journal(lab).open_entries():
        assert "upgrade-mode-on" not in {s.name for s in entry.applied}, report.render_text()


# --------------------------------------------------------------------------- the matrix

matrix = pytest.mark.crash_matrix
PACKAGE_BOUNDARIES = [
    (step, when) if (step, when) == ("web", "before") else pytest.param(step, when, marks=matrix)
    for step in ("upgrade-mode-on", "db", "web", "upgrade-mode-off")
    for when in ("before", "after")
]


@pytest.mark.parametrize(("step", "when"), PACKAGE_BOUNDARIES, ids=lambda v: v)
def test_upgrade_packages_killed_then_recovered(
    lab: Lab, repo, moto_server, tmp_path: Path, step: str, when: str
) -> None:
    _back_to_version_1(lab, repo)
    [db], [web] = lab.by_role("db-primary"), lab.web
    names = _step_names(lab)
    assert names[0] == "upgrade-mode-on" and names[-1] == "upgrade-mode-off" and len(names) == 4
    real = {"db": names[1], "web": names[2]}.get(step, step)
    boundary = real if when == "before" else f"{real}:after"
    _kill_at(lab, "upgrade-packages", boundary, tmp_path / "paused")

    done = {"before": 0, "after": 1}[when] + names.index(real)  # steps done when killed
    if 1 <= done < 4:
        _in_upgrade_mode(lab, moto_server)  # what the dead run left
    _recover(lab)
    _upgrade_mode_off_as_before(lab, moto_server)
    # packages: as before, or as planned on the servers whose step was done (as journaled)
    assert _version(db) == ("2.0" if done >= 2 else "1.0")
    assert _version(web) == ("2.0" if done >= 3 else "1.0")
    assert _version(web, "fabflows-app-tools") == ("1.0" if done >= 3 else "-")


@pytest.mark.parametrize("when", [pytest.param("before", marks=matrix), "after"])
def test_begin_upgrade_killed_then_recovered(
    lab: Lab, moto_server, tmp_path: Path, when: str
) -> None:
    boundary = "upgrade-mode-on" if when == "before" else "upgrade-mode-on:after"
    _kill_at(lab, "begin-upgrade", boundary, tmp_path / "paused")
    if when == "after":
        _in_upgrade_mode(lab, moto_server)
    _recover(lab)  # the dead run's upgrade mode is undone: as before
    _upgrade_mode_off_as_before(lab, moto_server)


@pytest.mark.parametrize("when", [pytest.param("before", marks=matrix), "after"])
def test_end_upgrade_killed_then_recovered(
    lab: Lab, moto_server, tmp_path: Path, when: str
) -> None:
    begin_upgrade(environment="staging", config=str(lab.config_path), dry_run=False)
    _in_upgrade_mode(lab, moto_server)
    boundary = "upgrade-mode-off" if when == "before" else "upgrade-mode-off:after"
    _kill_at(lab, "end-upgrade", boundary, tmp_path / "paused")
    _recover(lab)
    if when == "before":
        # nothing applied: as before (begin-upgrade's upgrade mode stays on, for end-upgrade)
        _in_upgrade_mode(lab, moto_server)
        from flows.end_upgrade import end_upgrade

        end_upgrade(environment="staging", config=str(lab.config_path), dry_run=False)
    _upgrade_mode_off_as_before(lab, moto_server)


# --------------------------------------------------------------------------- resume


def _dpkg_trace(host) -> tuple[str, str]:  # noqa: ANN001
    """What shows whether dpkg touched a server: its log's length and the version file's mtime."""
    log = host.exec(["wc", "-l", "/var/log/dpkg.log"]).stdout.split()[0]
    mtime = host.exec(["stat", "-c", "%Y.%Z", "/usr/share/fabflows-test/fabflows-demo.version"])
    return log, mtime.stdout.strip()


def test_resume_after_a_broken_package_skips_the_servers_already_upgraded(
    lab: Lab, repo, moto_server
) -> None:
    _back_to_version_1(lab, repo)
    cfg = str(lab.config_path)
    [db], [web] = lab.by_role("db-primary"), lab.web
    for host in lab.all_hosts():  # no good copy of it in apt's cache from an earlier case
        host.exec(["apt-get", "clean"])
    # a broken package in the repository: only the web server needs it (an app-server package)
    deb = repo.deb("fabflows-app-tools", "1.0")
    good = deb.read_bytes()
    deb.write_bytes(good[: len(good) // 2])
    try:
        failed = upgrade_packages(
            environment="staging", config=cfg, dry_run=False, return_state=True
        )
        assert failed.is_failed()
        assert "NOT upgraded" in failed.message and web.ip in failed.message
    finally:
        deb.write_bytes(good)  # the repository is fixed
    entry = _journal(lab).entry(str(failed.state_details.flow_run_id))
    assert entry is not None and entry.open
    names = [s.name for s in entry.steps]
    states = {s.name: s.state for s in entry.steps}
    db_step, web_step = names[1], names[2]
    assert states == {"upgrade-mode-on": "undone", db_step: "done", web_step: "failed"}
    assert _version(db) == "2.0" and _version(web) == "1.0"
    _upgrade_mode_off_as_before(lab, moto_server)  # the window was closed at once
    db_before = _dpkg_trace(db)
    web_before = _dpkg_trace(web)

    time.sleep(1.1)  # a touched file would get a later mtime
    report = resume_run(environment="staging", run_id=entry.run_id, config=cfg, dry_run=False)
    assert report.run_id != entry.run_id and report.details["Resumes"] == entry.run_id
    ran = [s.name for s in report.steps if s.state == "done"]
    assert ran == ["upgrade-mode-on", web_step, "upgrade-mode-off"], report.render_text()
    assert db_step not in ran
    # the database server was not touched again; the web server was upgraded
    assert _dpkg_trace(db) == db_before
    assert _dpkg_trace(web) != web_before
    assert _version(db) == "2.0" and _version(web) == "2.0"
    assert _version(web, "fabflows-app-tools") == "1.0"
    assert report.details["Not upgraded"] == "none"
    assert _journal(lab).entry(entry.run_id).state == "done"
    _upgrade_mode_off_as_before(lab, moto_server)
