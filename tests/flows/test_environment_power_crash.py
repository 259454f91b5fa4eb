"""SIGKILL stop-environment, start-environment and resize-environment at every step boundary, run
recover-environment, and check the environment is exactly as before the run (or exactly as
planned) on the real peers: EC2 states and types in moto, the test hosts up or down with them,
the web group's sizes, instances and records, celery in service, the database's rows, no upgrade
page and no suspended process.

One power lab serves the whole module. The cases run in order: the stop cases start from a
running environment and recover puts it back; then the environment is stopped for the start
cases (recover puts it back to stopped); then started again for the resize cases. One kill point
per flow runs in ``make test``; the rest carry the ``crash_matrix`` marker (``make crash-matrix``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from fabflows.testing import faults
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.power_lab import PowerLab, build_power_lab, celery_state, psql
from flows.recover_environment import recover_environment
from flows.start_environment import start_environment
from flows.stop_environment import stop_environment
from tasks.aws.ec2_writes import RESIZE_TAG, STOPPED_TAG
from tasks.aws.group_sizes import SIZES_TAG

pytestmark = [pytest.mark.hosts, pytest.mark.flow]

GROUP = "myproject-staging-ag"
ROLES = ("cache", "db-primary", "db-replica", "worker")
OLD_TYPES = {
    "cache": "t1.micro",
    "db-primary": "m1.small",
    "db-replica": "m1.small",
    "worker": "m3.large",
}
NEW_TYPES = {
    "cache": "t3.small",
    "db-primary": "m5.large",
    "db-replica": "m5.large",
    "worker": "m5.xlarge",
    "web": "m5.large",
}
ROWS = 200
matrix = pytest.mark.crash_matrix

STOP_AT = [
    pytest.param("scale-web-group-to-zero", marks=matrix),
    pytest.param("quiet-workers", marks=matrix),
    pytest.param("stop-worker", marks=matrix),
    "stop-db-replica",
    pytest.param("stop-db-primary", marks=matrix),
    pytest.param("stop-cache", marks=matrix),
    pytest.param("stop-cache:after", marks=matrix),
]
START_AT = [
    pytest.param("start-cache", marks=matrix),
    pytest.param("start-db-primary", marks=matrix),
    pytest.param("start-db-replica", marks=matrix),
    "start-worker",
    pytest.param("restore-web-group", marks=matrix),
    pytest.param("check-site", marks=matrix),
    pytest.param("clear-records", marks=matrix),
    pytest.param("clear-records:after", marks=matrix),
]
RESIZE_AT = [
    pytest.param("resize-worker", marks=matrix),
    pytest.param("resize-db-replica", marks=matrix),
    pytest.param("upgrade-mode-on", marks=matrix),
    "resize-window",
    pytest.param("upgrade-mode-off", marks=matrix),
    pytest.param("new-launch-template-version", marks=matrix),
    pytest.param("new-launch-template-version:after", marks=matrix),
]
"""Every step boundary: before each step, and after the last one (the journal not yet closed)."""


@pytest.fixture(scope="module")
def lab(moto_server, test_network, tmp_path_factory, prefect_server) -> Iterator[PowerLab]:
    moto_server.reset()
    built = build_power_lab(
        test_network,
        moto_server,
        tmp_path_factory.mktemp("power-crash"),
        rows=ROWS,
        instance_types=NEW_TYPES,
        name_prefix="pc",
    )
    built.moto = moto_server  # type: ignore[attr-defined]
    try:
        yield built
    finally:
        built.destroy()


# --------------------------------------------------------------------------- the real state


def _instances(lab: PowerLab) -> dict[str, dict]:
    ec2 = boto_client(lab.moto, "ec2")  # type: ignore[attr-defined]
    out = {}
    for r in ec2.describe_instances(InstanceIds=list(lab.ids.values()))["Reservations"]:
        for i in r["Instances"]:
            out[i["InstanceId"]] = i
    return {role: out[iid] for role, iid in lab.ids.items()}


def _group(lab: PowerLab) -> dict:
    return boto_client(lab.moto, "autoscaling").describe_auto_scaling_groups(  # type: ignore[attr-defined]
        AutoScalingGroupNames=[GROUP]
    )["AutoScalingGroups"][0]


def _tags(item: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in item.get("Tags", [])}


def _web_answers(lab: PowerLab) -> list[str]:
    """What each of the group's web servers answers (status per server)."""
    ec2 = boto_client(lab.moto, "ec2")  # type: ignore[attr-defined]
    ids = [i["InstanceId"] for i in _group(lab)["Instances"]]
    out = []
    for r in ec2.describe_instances(InstanceIds=ids)["Reservations"] if ids else []:
        for i in r["Instances"]:
            try:
                with urllib.request.urlopen(f"http://{i['PrivateIpAddress']}/", timeout=5) as resp:
                    out.append(str(resp.status))
            except Exception as exc:  # noqa: BLE001 - the answer is what is checked
                out.append(f"{type(exc).__name__}: {exc}")
    return out


def assert_running(lab: PowerLab, types: dict[str, str] = OLD_TYPES) -> None:
    """Exactly as a running environment: every server running on its type with no record, the
    hosts up, celery in service, the rows there, the group at 1/2/4 with 2 InService instances
    answering 200, no record or suspended process on it."""
    inst = _instances(lab)
    assert {r: i["State"]["Name"] for r, i in inst.items()} == dict.fromkeys(ROLES, "running")
    assert {r: i["InstanceType"] for r, i in inst.items()} == types
    for role, i in inst.items():
        left = {STOPPED_TAG, RESIZE_TAG} & set(_tags(i))
        assert not left, f"{role} still carries {left}"
    assert all(h.running for h in lab.hosts.values())
    assert celery_state(lab.hosts["worker"]) == "RUNNING"
    assert psql(lab.hosts["db-primary"], "SELECT count(*) FROM shop_order") == str(ROWS)
    g = _group(lab)
    assert (g["MinSize"], g["DesiredCapacity"], g["MaxSize"]) == (1, 2, 4)
    assert [i["LifecycleState"] for i in g["Instances"]] == ["InService", "InService"]
    assert g["SuspendedProcesses"] == []
    assert SIZES_TAG not in _tags(g)
    assert _web_answers(lab) == ["200", "200"]


def assert_stopped(lab: PowerLab) -> None:
    """Exactly as stop-environment leaves it: every server stopped with its stop record, the
    hosts down, the group at 0/0/0 with no instance and its sizes recorded."""
    inst = _instances(lab)
    assert {r: i["State"]["Name"] for r, i in inst.items()} == dict.fromkeys(ROLES, "stopped")
    assert all(STOPPED_TAG in _tags(i) for i in inst.values())
    assert not any(h.running for h in lab.hosts.values())
    g = _group(lab)
    assert (g["MinSize"], g["DesiredCapacity"], g["MaxSize"], g["Instances"]) == (0, 0, 0, [])
    assert '"min":1,"desired":2,"max":4' in _tags(g)[SIZES_TAG]


def _state(lab: PowerLab) -> str:
    states = {i["State"]["Name"] for i in _instances(lab).values()}
    return "stopped" if states == {"stopped"} else "running" if states == {"running"} else "mixed"


def _ensure(lab: PowerLab, state: str) -> None:
    """Bring the shared lab to ``state`` with the flows themselves (between the groups)."""
    if _state(lab) != state:
        flow = stop_environment if state == "stopped" else start_environment
        report = lab.mirror.run(flow, "staging", config=str(lab.config), dry_run=False)
        assert report.outcome.startswith("applied"), report.render_text()


# --------------------------------------------------------------------------- kill and recover


def _wait_for(proc: subprocess.Popen, marker: Path, where: str) -> None:
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {where}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the run never reached {where}")
        time.sleep(0.05)


def kill_at(lab: PowerLab, flow: str, where: str, tmp_path: Path) -> None:
    """Run ``flow`` (applying) in a process of its own, SIGKILL it at ``where``."""
    marker = tmp_path / "paused"
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        FABFLOWS_TEST_PAUSE_AT=f"{flow}/{where}",
        FABFLOWS_TEST_PAUSE_MARKER=str(marker),
        FABFLOWS_PROGRESS_BAR="0",
    )
    argv = [sys.executable, "-c", faults.CLI_CODE, "run", flow, "-e", "staging"]
    argv += ["-c", str(lab.config), "--apply"]
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        lab.mirror.run(_wait_for, proc, marker, where)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group, started above
        proc.wait()


def recover(lab: PowerLab) -> None:
    report = lab.mirror.run(
        recover_environment, environment="staging", config=str(lab.config), dry_run=False
    )
    assert not report.left and not report.problems, report.render_text()
    again = lab.mirror.run(recover_environment, environment="staging", config=str(lab.config))
    assert again.outcome == "dry run: nothing to change", again.render_text()


# --------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("where", STOP_AT)
def test_stop_killed_then_recovered_is_running_again(
    lab: PowerLab, tmp_path: Path, where: str
) -> None:
    _ensure(lab, "running")
    kill_at(lab, "stop-environment", where, tmp_path)
    recover(lab)
    assert_running(lab)  # a stop's undo is the start: exactly as before


@pytest.mark.parametrize("where", START_AT)
def test_start_killed_then_recovered_is_stopped_again(
    lab: PowerLab, tmp_path: Path, where: str
) -> None:
    _ensure(lab, "stopped")
    kill_at(lab, "start-environment", where, tmp_path)
    recover(lab)
    assert_stopped(lab)  # what it started is stopped again, the records kept: as before


@pytest.mark.parametrize("where", RESIZE_AT)
def test_resize_killed_then_recovered_has_its_old_types(
    lab: PowerLab, tmp_path: Path, where: str
) -> None:
    _ensure(lab, "running")
    step, _, when = where.partition(":")
    for role in ("worker", "db-replica"):
        if step == f"resize-{role}":
            step = f"resize-{role}-{lab.ids[role]}"
    kill_at(lab, "resize-environment", step + (f":{when}" if when else ""), tmp_path)
    recover(lab)
    assert_running(lab, OLD_TYPES)  # every type as before, upgrade mode off
    latest = boto_client(lab.moto, "ec2").describe_launch_template_versions(  # type: ignore[attr-defined]
        LaunchTemplateName="myproject-staging-web", Versions=["$Latest"]
    )["LaunchTemplateVersions"][0]
    assert latest["LaunchTemplateData"]["InstanceType"] == "m1.small"
