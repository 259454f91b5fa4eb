"""SIGKILL push-server-secrets (rolling and fast) and update-newrelic-keys (rolling and fast) at
every step boundary, run recover-environment, and check the servers: every one holds exactly the
old files or every one exactly the new ones, no staged or kept file is left, every program runs,
no upgrade page, both web servers back in the load balancer, no autoscaling process suspended. The
journal files never hold a secret value (paths and servers only).

One app stack for the module (moto, a forwarding load balancer, web/worker/db/cache test hosts);
each case sets a new value in the block, so the next case starts from whatever the last one left.
"""

from __future__ import annotations

import itertools
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prefect.settings import PREFECT_API_URL

from blocks.secrets import ServerSecrets
from fabflows.testing import faults
from fabflows.testing.app_env import AppEnv, build_app_env
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.elb_proxy import ElbProxy
from fabflows.testing.moto_server import MotoServer
from flows.recover_environment import recover_environment

pytestmark = [pytest.mark.hosts, pytest.mark.flow]

BLOCK = "myproject-staging-secrets"
HOME = "/home/deploy"
PUSH = "push-server-secrets"
NEWRELIC = "update-newrelic-keys"
COUNTER = itertools.count(1)

ROLLING = ["stage", "apply-other-servers", "web0", "web1", "check-files", "commit", "commit:after"]
FAST = [
    "stage",
    "apply-other-servers",
    "upgrade-on",
    "apply-web-servers",
    "upgrade-off",
    "check-files",
    "commit",
    "commit:after",
]
"""Every step boundary: before each step, and after the last one (before the run closes its
journal). ``web0``/``web1``: before ``apply-web-<address>`` of each web server."""

_ALL = (
    [(PUSH, "rolling", b) for b in ROLLING]
    + [(PUSH, "fast", b) for b in FAST]
    + [(NEWRELIC, "rolling", b) for b in ROLLING]
    + [(NEWRELIC, "fast", b) for b in FAST]
)
_IN_MAKE_TEST = {
    (PUSH, "rolling", ROLLING[len(ROLLING) // 2]),
    (NEWRELIC, "fast", FAST[len(FAST) // 2]),
}
CASES = [
    c if c in _IN_MAKE_TEST else pytest.param(*c, marks=pytest.mark.crash_matrix) for c in _ALL
]
"""make test runs one kill point per flow (mid-rollout); make crash-matrix runs them all."""

FILES = {
    PUSH: [f"{HOME}/smtp_password"],
    NEWRELIC: [
        f"{HOME}/newrelic_license_key",
        "/etc/newrelic-infra.yml",
    ],
}
"""The files each case changes (their contents are compared before and after)."""


@pytest.fixture(scope="module")
def stack(test_network, tmp_path_factory, prefect_server) -> Iterator[tuple]:
    moto = MotoServer().start()
    proxy = ElbProxy(moto.endpoint, "myproject-staging-lb")
    extra = {"newrelic": {"drain_seconds": 0.3, "healthy_timeout_seconds": 30}}
    env = build_app_env(
        moto.endpoint,
        test_network,
        tmp_path_factory.mktemp("secrets-crash"),
        site_url=proxy.url,
        rabbitmq=False,
        replicas=False,
        fabflows_extra=extra,
        prefix="sc",
    )
    proxy.start()
    try:
        yield env, proxy, moto
    finally:
        proxy.stop()
        env.destroy()
        moto.stop()


def _save(values: dict[str, str]) -> None:
    block = ServerSecrets()
    for name, value in values.items():
        block.set(name, value)
    block.save(BLOCK, overwrite=True)


def _snapshot(env: AppEnv, paths: list[str]) -> dict[str, dict[str, str]]:
    return {
        h.name: {p: h.exec(["cat", p], check=False).stdout for p in paths}
        for h in env.hosts.values()
    }


def _leftovers(env: AppEnv) -> list[str]:
    out = []
    for h in env.hosts.values():
        found = h.exec(
            ["sh", "-c", f"ls -a {HOME} {HOME}/services {HOME}/services/pgbouncer /etc"],
            check=False,
        )
        out += [f"{h.name}:{x}" for x in found.stdout.split() if "fabflows" in x]
    return out


def _not_running(env: AppEnv) -> list[str]:
    out = []
    for h in env.hosts.values():
        status = h.exec(["supervisorctl", "status"], check=False).stdout
        out += [f"{h.name}: {line}" for line in status.splitlines() if "RUNNING" not in line]
    return out


def _run_until(env: AppEnv, flow: str, mode: str, boundary: str, marker: Path) -> subprocess.Popen:
    penv = dict(os.environ)
    penv.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        FABFLOWS_TEST_PAUSE_AT=f"{flow}/{boundary}",
        FABFLOWS_TEST_PAUSE_MARKER=str(marker),
        FABFLOWS_PROGRESS_BAR="0",
    )
    option = "--restart-mode" if flow == PUSH else "--mode"
    argv = [sys.executable, "-c", faults.CLI_CODE, "run", flow, "-e", "staging"]
    argv += ["-c", str(env.config_path), option, mode, "--apply"]
    return subprocess.Popen(
        argv,
        env=penv,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _kill_at(env: AppEnv, flow: str, mode: str, boundary: str, marker: Path) -> None:
    proc = _run_until(env, flow, mode, boundary, marker)
    deadline = time.monotonic() + 240
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended before {boundary}: {proc.stderr.read().decode()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"the run never reached {boundary}")
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group, started above
        proc.wait()


def _journal_text(env: AppEnv) -> str:
    root = Path(env.config_path).parent / "state" / "journal"
    return "\n".join(p.read_text() for p in sorted(root.rglob("*")) if p.is_file())


def _maintenance_state(env: AppEnv, proxy: ElbProxy, moto: MotoServer) -> list[str]:
    """What is still in maintenance: page, suspended processes, Standby, a server out of the LB."""
    problems = []
    asg = boto_client(moto, "autoscaling")
    (group,) = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[env.auto_scaling_group])[
        "AutoScalingGroups"
    ]
    if group["SuspendedProcesses"]:
        problems.append(f"suspended: {group['SuspendedProcesses']}")
    problems += [
        f"{i['InstanceId']} is {i['LifecycleState']}"
        for i in group["Instances"]
        if i["LifecycleState"] != "InService"
    ]
    deadline = time.monotonic() + 20
    while len(proxy.refresh_backends()) != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    if len(proxy.backends) != 2:
        problems.append(f"load balancer backends: {proxy.backends}")
    page = requests.get(proxy.url, timeout=5)
    if page.status_code != 200:
        problems.append(f"site: {page.status_code}")
    return problems


@pytest.mark.parametrize(
    ("flow", "mode", "boundary"), CASES, ids=[f"{f}-{m}-{b}" for f, m, b in _ALL]
)
def test_sigkill_then_recover(stack, tmp_path: Path, flow: str, mode: str, boundary: str) -> None:
    env, proxy, moto = stack
    n = next(COUNTER)
    old_values = dict(env.secrets)
    new_values = dict(env.secrets)
    if flow == PUSH:
        new_values["smtp_password"] = f"smtp '{n}' $x`y` {os.urandom(3).hex()}"
    else:
        new_values["newrelic_license_key"] = (f"{n:02d}" + os.urandom(20).hex())[:40]
    _save(new_values)
    paths = FILES[flow]
    before = _snapshot(env, paths)
    if boundary.startswith("web"):
        webs = sorted(h.ip for h in env.by_role("web"))
        boundary = f"apply-web-{webs[int(boundary[3:])]}"

    _kill_at(env, flow, mode, boundary, tmp_path / "paused")

    report = recover_environment(environment="staging", config=str(env.config_path), dry_run=False)
    assert not report.problems, report.render_text()
    after = _snapshot(env, paths)
    key = "smtp_password" if flow == PUSH else "newrelic_license_key"
    holds_new = [h for h, files in after.items() if files[f"{HOME}/{key}"] == new_values[key]]
    if after == before:
        outcome = "old"
    else:
        assert sorted(holds_new) == sorted(after), f"mixed: new on {holds_new} only"
        if flow == NEWRELIC:
            assert all(new_values[key] in f["/etc/newrelic-infra.yml"] for f in after.values())
        outcome = "new"
        env.secrets.update(new_values)
    # the kill after commit must end new; before the first swap, old
    if boundary == "commit:after":
        assert outcome == "new"
    if boundary in ("stage", "apply-other-servers"):
        assert outcome == "old"
    assert _leftovers(env) == []
    assert _not_running(env) == []
    assert _maintenance_state(env, proxy, moto) == []
    journal = _journal_text(env)
    assert "apply" in journal or "stage" in journal  # the journal was really read
    leaks = [
        name
        for values in (old_values, new_values)
        for name, value in values.items()
        for form in {value, shlex.quote(value), value.replace('"', '\\"')}
        if form in journal
    ]
    assert leaks == []
    # nothing left for a second recover
    again = recover_environment(environment="staging", config=str(env.config_path), dry_run=False)
    assert again.outcome == "nothing to change", again.render_text()
