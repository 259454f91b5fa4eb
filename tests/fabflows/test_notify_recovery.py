"""A crashed run's maintenance state is undone without a person (recover_on_crash), on the Prefect
test harness: the notifier, given a CRASHED run as the "run ended" automation gives it, starts the
environment's recover-environment deployment with maintenance_only, once, and says so in the crash
notice (a local HTTP receiver stands in for the Slack webhook). Off per environment, never for a
read-only flow or a recovery run, and a missing deployment is said with the command to run by hand.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.states import Crashed, Running

from config import load_config, resolve_environment
from fabflows.notify.notifier import RECOVERS_TAG, handle
from fabflows.registry import FLOWS
from fabflows.runtime.journal import Journal
from fabflows.testing.configs import write_config
from fabflows.testing.fake_slack import FakeSlack

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_server")]

BLOCK = "crash-recovery-test"
RECOVER = "recover-environment"
WORK_POOL = "fabflows-crash-recovery-test"


async def _register_recover(config: Any, path: Path, environments: set[str]) -> dict[str, Any]:
    from deployments.apply import ensure_work_pool, upsert_deployment
    from deployments.generate import plan_deployments

    plan = plan_deployments(config, {RECOVER: FLOWS[RECOVER]}, path)
    out = {}
    async with get_client() as client:
        await ensure_work_pool(client, WORK_POOL, 1)
        for spec in plan.deployments:
            if spec.environment in environments:
                spec = spec.model_copy(update={"work_pool": WORK_POOL})
                out[spec.environment] = await upsert_deployment(client, spec)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from prefect_slack import SlackWebhook

    base = tmp_path_factory.mktemp("crash-recovery")
    notify = {"notifications": {"block": BLOCK}}
    path = write_config(
        base,
        fabflows={
            "state_dir": str(base / "state"),
            "environments": {
                "staging": notify,
                "production": notify,  # no recover-environment deployment registered
                "testing": {**notify, "recover_on_crash": False},
            },
        },
    )
    config = load_config(path)
    receiver = FakeSlack().start()
    try:
        SlackWebhook(url=receiver.url("/crash")).save(BLOCK, overwrite=True)
        deployments = asyncio.run(_register_recover(config, path, {"staging", "testing"}))
        yield {"config": config, "receiver": receiver, "deployments": deployments}
    finally:
        receiver.stop()


def _crashed(config: Any, flow_name: str, environment: str, applied: bool = True) -> Any:
    """A run of ``flow_name`` that applied a step (journaled) and was then marked CRASHED."""
    from deployments.generate import load_flow

    env = resolve_environment(config, environment)
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(
            load_flow(FLOWS[flow_name]),
            parameters={"environment": environment, "dry_run": False},
            tags=[f"env:{env.label}"],
            state=Running(),
        )
        if applied:
            journal = Journal.for_environment(env.label, config)
            journal.open_run(str(run.id), flow_name, params={}, plan={}, plan_digest="d")
            journal.step(str(run.id), "begin-upgrade", "started")
            journal.step(str(run.id), "begin-upgrade", "done")
        client.set_flow_run_state(run.id, Crashed(message="No heartbeat"), force=True)
        return client.read_flow_run(run.id)


def _ended(world: dict[str, Any], run: Any) -> str:
    with get_client(sync_client=True) as client:
        return handle(client, world["config"], "ended", run.id, "", "")


def _recoveries(run_id: uuid.UUID) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"{RECOVERS_TAG}{run_id}"]))
        )


def _notice(world: dict[str, Any], run: Any) -> str:
    texts = [d["text"] for p, d in world["receiver"].posts if str(run.id) in d.get("text", "")]
    assert len(texts) == 1, texts
    return texts[0]


def test_crashed_applying_run_starts_a_maintenance_only_recovery(world: dict[str, Any]) -> None:
    run = _crashed(world["config"], "upgrade-packages", "staging")
    said = _ended(world, run)
    assert "recovery started" in said, said
    (recovery,) = _recoveries(run.id)
    assert recovery.deployment_id == world["deployments"]["staging"]
    assert recovery.parameters == {
        "environment": "staging",
        "deployment": "myproject",
        "maintenance_only": True,
        "dry_run": False,
    }
    assert "started-by:automation:recover-on-crash" in recovery.tags
    text = _notice(world, run)
    assert f"Recovery: started: {recovery.name} " in text and str(recovery.id) in text, text
    assert "Left behind: begin-upgrade (done)" in text
    assert "(recover-environment, maintenance state only)" in text

    again = _ended(world, run)  # the automation firing twice starts no second recovery
    assert "recovery started" in again
    assert [r.id for r in _recoveries(run.id)] == [recovery.id]
    _notice(world, run)  # still one message


def test_switched_off_per_environment(world: dict[str, Any]) -> None:
    run = _crashed(world["config"], "upgrade-packages", "testing")
    said = _ended(world, run)
    assert "no recovery: recover_on_crash is off for testing" in said
    assert _recoveries(run.id) == []
    text = _notice(world, run)
    assert "Recovery:" not in text and "To recover: fabflows recover -e testing" in text


@pytest.mark.parametrize(
    ("flow_name", "why"),
    [("watchdog", "watchdog is read-only"), (RECOVER, "a recover-environment run")],
)
def test_read_only_flows_and_recoveries_start_none(
    world: dict[str, Any], flow_name: str, why: str
) -> None:
    run = _crashed(world["config"], flow_name, "staging")  # even with an open journal
    said = _ended(world, run)
    assert f"no recovery: {why}" in said, said
    assert _recoveries(run.id) == []
    assert "Recovery:" not in _notice(world, run)


def test_a_crash_that_applied_nothing_starts_none(world: dict[str, Any]) -> None:
    run = _crashed(world["config"], "upgrade-packages", "staging", applied=False)
    said = _ended(world, run)
    assert "no recovery: its journal holds no applied step left open" in said, said
    assert _recoveries(run.id) == []


def test_without_the_deployment_the_notice_says_how_to_start_it(world: dict[str, Any]) -> None:
    run = _crashed(world["config"], "upgrade-packages", "production")
    said = _ended(world, run)
    assert "no recovery: deployment recover-environment/myproject-production not found" in said
    assert _recoveries(run.id) == []
    text = _notice(world, run)
    assert (
        "Recovery: not started: no deployment recover-environment/myproject-production "
        "(fabflows deploy registers it); start it by hand: "
        "fabflows recover -e production --maintenance-only --apply"
    ) in text, text
