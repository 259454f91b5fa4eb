"""SIGKILL reload-production-db at every step boundary (and in the middle of the copy), run
recover-environment, and check that nothing is left broken: the web group's suspended processes
exactly as before, no upgrade page, the app running, the live database the old one or the complete
new one, the site answering 200."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from fabflows.testing import faults
from flows.recover_environment import recover_environment
from tests.flows.reload_stack import Stack, build_stack, destroy_stack
from tests.flows.test_reload_production_db import _generation, _invariants, _live_is

pytestmark = [pytest.mark.hosts, pytest.mark.flow]

KILL_AT = [
    "create-side",
    "copy",
    "copy-running",
    "verify-copy",
    "mask",
    "analyze",
    "upgrade-mode-on",
    "stop-app",
    "swap",
    "migrate",
    "start-app",
    "upgrade-mode-off",
    "verify",
    "cleanup",
]
"""Every step boundary of the apply phase ("copy-running": the copy started, not yet finished)."""

MASKING = {
    "statements": ["UPDATE auth_user SET email = 'user' || id || '@example.invalid'"],
    "checks": ["SELECT count(*) FROM auth_user WHERE email NOT LIKE '%@example.invalid'"],
}


@pytest.fixture(scope="module")
def stack(moto_server, test_network, tmp_path_factory, prefect_server) -> Iterator[Stack]:
    moto_server.reset()
    s = build_stack(
        tmp_path_factory.mktemp("crash"),
        moto_server.endpoint,
        test_network,
        masking=MASKING,  # so that the mask step (and its boundary) is part of every run
    )
    try:
        yield s
    finally:
        destroy_stack(s)


def _run_until(stack: Stack, step: str, marker: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        FABFLOWS_TEST_PAUSE_AT=f"reload-production-db/{step}",
        FABFLOWS_TEST_PAUSE_MARKER=str(marker),
        FABFLOWS_PROGRESS_BAR="0",
    )
    argv = [sys.executable, "-c", faults.CLI_CODE, "run", "reload-production-db", "-e", "staging"]
    argv += ["-c", str(stack.config), "--apply"]
    return subprocess.Popen(
        argv,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


@pytest.mark.parametrize(
    "step",
    [s if s == "swap" else pytest.param(s, marks=pytest.mark.crash_matrix) for s in KILL_AT],
)
def test_sigkill_then_recover(stack: Stack, tmp_path: Path, step: str) -> None:
    generation = KILL_AT.index(step) + 100
    _generation(stack, generation)
    marker = tmp_path / "paused"
    proc = _run_until(stack, step, marker)
    deadline = time.monotonic() + 180
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before {step}: {proc.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the run never reached {step}")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group, started above
        proc.wait()
    if step == "copy-running":  # the copy outlives the flow on the target: recovery must end it
        running = stack.hosts["db"].exec(["pgrep", "-f", "fabflows-reload"], check=False).stdout
        assert running.strip(), "the copy had already ended: this case did not kill mid-copy"
    report = recover_environment(environment="staging", config=str(stack.config), dry_run=False)
    assert not report.left and not report.problems, report.render_text()
    undone = [s.name for s in report.steps if s.state == "done"]
    if step != "create-side":  # from the dead run's journal, not only from the markers
        assert any(n.startswith("undo-") and n.endswith("-create-side") for n in undone), undone
    # nothing is left for a second recover to do
    again = recover_environment(environment="staging", config=str(stack.config))
    assert again.outcome == "dry run: nothing to change", again.render_text()
    # no copy left running on the target database server
    copies = stack.hosts["db"].exec(["pgrep", "-f", "fabflows-reload"], check=False).stdout
    assert copies.strip() == ""
    _invariants(stack)
    live = _live_is(stack)
    assert live in (f"old:{generation}", "new"), live
    # and the next run works
    if step == "swap":
        from flows.reload_production_db import reload_production_db

        again = reload_production_db(environment="staging", config=str(stack.config), dry_run=False)
        assert again.outcome.startswith("applied"), again.outcome
        _invariants(stack)
