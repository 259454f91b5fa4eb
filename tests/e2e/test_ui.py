"""End to end on a real stack: `prefect server start` (SQLite), a process worker, `fabflows deploy`,
and headless Chromium driving the Prefect UI. Screenshots go to tests/output/e2e/.

Also here, because they need the same real stack: schedules survive worker and server restarts, and
the environment lock is released when a worker dies mid-run and is not leaked by a server restart.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.settings import PREFECT_API_URL, temporary_settings

from config import load_config
from fabflows import audit
from fabflows.lock import EnvironmentBusy, environment_lock
from fabflows.registry import FLOWS
from fabflows.testing.configs import moto_section, write_config
from sandbox.aws_seed import seed

from .stack import FLOWS_UNDER_TEST, REPO, Stack

OUTPUT = REPO / "tests" / "output" / "e2e"
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def stack(moto_server, tmp_path_factory) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("e2e")
    moto_server.reset()
    config_path = write_config(
        base,
        fabflows=moto_section(
            moto_server.endpoint,
            staging={
                "time_zone": "Europe/Amsterdam",
                "schedules": {"describe-environment": {"cron": "0 20 * * 1-5"}},
            },
        )
        | {"state_dir": str(base / "state")},
    )
    seed(
        moto_server.endpoint,
        load_config(config_path),
        ["staging"],
        "10.217.0.0/24",
        (f"10.217.0.{i}" for i in itertools.count(10)),
    )
    s = Stack(base)
    try:
        s.start_server()
        result = s.deploy(config_path, {**FLOWS, **FLOWS_UNDER_TEST})
        s.start_worker("w1")
        yield {"stack": s, "config": config_path, "deployed": result, "base": base}
    finally:
        s.close()


def _client(s: Stack):
    return temporary_settings({PREFECT_API_URL: s.api})


def _click(page, locator, name: str) -> None:
    """Click ``locator``; if the UI's error toast covers it (a request of the page failed: the
    server is slow to answer under load), keep its text and a screenshot, then click through it
    (the operator would close the toast and press again)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.click(timeout=10000)
    except PlaywrightTimeout:
        page.screenshot(path=OUTPUT / f"{name}-blocked.png", full_page=True)
        toast = page.locator("#prefect-design-toast-app")
        print(f"{name}: covered by the UI's toast: {toast.inner_text(timeout=2000)!r}")
        locator.dispatch_event("click")


def _until(check, click, attempts: int = 3, wait: float = 10.0):
    """Click, then poll ``check`` (the API, not the page); click again if the UI dropped it."""
    for _ in range(attempts):
        click()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            time.sleep(0.3)
    raise AssertionError("the UI did not do it")


def _wait_state(s: Stack, run_id, states: set[str], timeout: float = 60):
    with _client(s), get_client(sync_client=True) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state and run.state.type.value in states:
                return run
            time.sleep(0.5)
    raise AssertionError(f"run {run_id} never reached {states}: {run.state}")


def test_every_registered_flow_is_deployed_per_environment(stack: dict) -> None:
    names = stack["deployed"]["deployments"]
    for flow_name in FLOWS:
        for env in ("staging", "production", "testing"):
            assert f"{flow_name}/myproject-{env}" in names


def test_run_from_the_ui_form_completes_with_artifacts(stack: dict) -> None:
    from playwright.sync_api import sync_playwright

    s: Stack = stack["stack"]
    ui = s.api.removesuffix("/api")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{ui}/deployments", wait_until="networkidle")
            page.get_by_placeholder("Search deployments").fill("describe")
            row = page.locator("tr", has_text="describe-environment").filter(
                has_text="myproject-staging"
            )
            row.get_by_role("link", name="myproject-staging").click()
            page.wait_for_load_state("networkidle")
            page.screenshot(path=OUTPUT / "1-deployment.png")
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run", exact=True).click()
            page.wait_for_load_state("networkidle")
            # the form: environment and deployment are fixed choices from the config
            page.get_by_text("Environment to describe").wait_for(timeout=20000)
            page.wait_for_timeout(1000)  # the form fills its defaults asynchronously
            page.locator("input").first.fill("ui-e2e-describe")  # Run Name
            page.screenshot(path=OUTPUT / "2-form.png", full_page=True)

            def created():
                with _client(s), get_client(sync_client=True) as client:
                    return client.read_flow_runs(
                        flow_run_filter=FlowRunFilter(
                            name=FlowRunFilterName(any_=["ui-e2e-describe"])
                        )
                    )

            runs = _until(
                created, lambda: _click(page, page.get_by_role("button", name="Submit"), "submit")
            )
            run = runs[0]
            assert run.parameters == {
                "environment": "staging",
                "deployment": "myproject",
                "replication": True,  # the form sends the flow's defaults
            }
            done = _wait_state(s, run.id, {"COMPLETED", "FAILED", "CRASHED"}, timeout=90)
            assert done.state.type.value == "COMPLETED", done.state
            page.goto(f"{ui}/runs/flow-run/{run.id}", wait_until="networkidle")
            page.get_by_text("Completed").first.wait_for(timeout=20000)
            page.screenshot(path=OUTPUT / "3-run-completed.png")
            page.get_by_text("Artifacts", exact=True).click()
            page.get_by_text("describe-myproject-staging").first.wait_for(timeout=20000)
            page.screenshot(path=OUTPUT / "4-artifacts.png", full_page=True)
        finally:
            browser.close()
    with _client(s), get_client(sync_client=True) as client:
        fresh = client.read_flow_run(run.id)
        states = sorted(client.read_flow_run_states(run.id), key=lambda st: st.timestamp)
    assert "env:myproject/staging" in fresh.tags
    # the audit trail can tell a UI run from the state message the UI sets
    starter = audit.identify_starter(
        fresh.tags, fresh.auto_scheduled, fresh.deployment_id, states[0].message
    )
    assert starter.label == "ui:prefect-ui"


def test_schedules_survive_worker_and_server_restarts(stack: dict) -> None:
    s: Stack = stack["stack"]

    def scheduled() -> tuple[bool, int, str]:
        with _client(s), get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("describe-environment/myproject-staging")
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id={"any_": [dep.id]}, state={"type": {"any_": ["SCHEDULED"]}}
                )
            )
            auto = [r for r in runs if r.auto_scheduled]
            return dep.paused, len(auto), str(dep.schedules[0].schedule.timezone)

    paused, count, zone = scheduled()
    assert not paused and count >= 1 and zone == "Europe/Amsterdam"
    s.kill_worker("w1", signal.SIGTERM)
    s.start_worker("w1")
    assert scheduled()[:2] == (False, count)
    s.stop_server()
    s.start_server()
    paused, after, _ = scheduled()
    assert not paused and after >= 1


def _start_holder(s: Stack, base: Path, name: str, seconds: float, release: Path | None = None):
    marker = base / f"{name}.held"
    marker.unlink(missing_ok=True)
    with _client(s), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("hold-environment-lock/myproject-staging")
        run = client.create_flow_run_from_deployment(
            dep.id,
            parameters={
                "seconds": seconds,
                "marker": str(marker),
                "release": str(release or ""),
            },
            tags=["started-by:api:e2e"],
        )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline, "the holder run never got the lock"
        time.sleep(0.2)
    return run


def test_lock_released_when_the_worker_dies_and_kept_across_a_server_restart(stack: dict) -> None:
    s: Stack = stack["stack"]
    config = load_config(stack["config"])
    base: Path = stack["base"]

    # 1. the worker is SIGKILLed mid-run: its flow process lives on (the process worker starts it
    #    in its own session), so the lock stays with that live run: nobody else gets it
    _start_holder(s, base, "killed", seconds=300)
    seen = []
    with pytest.raises(EnvironmentBusy, match="hold-environment-lock run .* started by api:e2e"):
        with environment_lock(
            "myproject/staging", config, timeout=1, poll=0.1, on_wait=lambda *a: seen.append(a[1])
        ):
            pass
    s.kill_worker("w1", signal.SIGKILL)
    with pytest.raises(EnvironmentBusy):
        with environment_lock("myproject/staging", config, timeout=2, poll=0.1):
            pass
    # ... and when that flow process dies too (SIGKILL, as with the machine), it is free at once
    killed = time.monotonic()
    os.kill(seen[0].pid, signal.SIGKILL)
    with environment_lock("myproject/staging", config, timeout=120, poll=0.1):
        released = time.monotonic() - killed
    print(f"\nlock free {released:.2f} s after the orphaned flow process was SIGKILLed")
    assert released < 120

    # 2. a Prefect server restart while a run holds the lock: the holder keeps it (no second
    #    holder), and it is free as soon as the holder finishes (nothing leaked)
    s.start_worker("w2")
    release = base / "restart.release"
    release.unlink(missing_ok=True)
    run = _start_holder(s, base, "restart", seconds=120, release=release)
    restart = time.monotonic()
    s.stop_server()
    s.start_server()
    print(f"server restarted in {time.monotonic() - restart:.1f} s")
    seen.clear()
    with pytest.raises(EnvironmentBusy):
        with environment_lock(
            "myproject/staging", config, timeout=1, poll=0.1, on_wait=lambda *a: seen.append(a[1])
        ):
            pass
    assert seen[0].flow_run_id == str(run.id)  # the same run still holds it
    release.touch()  # the holder finishes now
    waiting = time.monotonic()
    with environment_lock("myproject/staging", config, timeout=120, poll=0.1):
        waited = time.monotonic() - waiting
    done = _wait_state(s, run.id, {"COMPLETED", "FAILED", "CRASHED"}, timeout=60)
    print(f"lock free {waited:.1f} s after the holder was told to finish ({done.state.name})")
    assert done.state.type.value == "COMPLETED"
    assert waited < 30, "the lock outlived its holder"


def test_approve_from_the_ui_resume_form(stack: dict) -> None:
    """A production run paused for approval shows the plan in the UI's Resume form; approving there
    resumes it and records the approver."""
    from playwright.sync_api import sync_playwright

    s: Stack = stack["stack"]
    ui = s.api.removesuffix("/api")
    with _client(s), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("approval-probe/myproject-production")
        run = client.create_flow_run_from_deployment(dep.id, tags=["started-by:api:e2e"])
    _wait_state(s, run.id, {"PAUSED"}, timeout=90)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{ui}/runs/flow-run/{run.id}", wait_until="load")
            page.get_by_role("button", name="Resume", exact=True).click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_text("drop table sessions").wait_for(timeout=20000)  # the plan
            dialog.get_by_text("Expected downtime:").wait_for()
            page.wait_for_timeout(1000)  # the form fills its defaults asynchronously
            toggle = dialog.locator("input[type=checkbox]").first
            toggle.evaluate("e => e.click()")  # the styled toggle hides its checkbox
            assert toggle.is_checked()
            dialog.locator("textarea").nth(0).fill("dana")
            dialog.locator("textarea").nth(1).fill("plan checked")
            page.screenshot(path=OUTPUT / "5-approval-form.png")

            def resumed():
                with _client(s), get_client(sync_client=True) as client:
                    return not client.read_flow_run(run.id).state.is_paused()

            _until(
                resumed,
                lambda: _click(page, dialog.get_by_role("button", name="Submit"), "resume-submit"),
            )
        finally:
            browser.close()
    done = _wait_state(s, run.id, {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}, timeout=60)
    assert done.state.type.value == "COMPLETED", done.state
    assert "approved-by:dana" in done.tags
