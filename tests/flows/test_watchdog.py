"""watchdog on a real stack (moto, test hosts with nginx and PostgreSQL, Prefect harness, a local
HTTP receiver as the notification webhook): state left behind with no run holding it is found,
notified once, and recovered only where the config allows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fabflows.runbook import load_context
from fabflows.testing.fake_slack import FakeSlack
from flows.watchdog import watchdog
from tasks.postgres.names import side_name

from .reload_stack import PRE_SUSPENDED, Stack, build_stack, destroy_stack

pytestmark = [pytest.mark.hosts, pytest.mark.flow]


@pytest.fixture(scope="module")
def stack(moto_server, test_network, tmp_path_factory, prefect_server) -> Iterator[Stack]:
    moto_server.reset()
    s = build_stack(tmp_path_factory.mktemp("watchdog"), moto_server.endpoint, test_network)
    try:
        yield s
    finally:
        destroy_stack(s)


def _configure(path: Path, recover: bool) -> None:
    data = yaml.safe_load(path.read_text())
    envs = data.setdefault("fabflows", {}).setdefault("environments", {})
    staging = envs.setdefault("staging", {})
    staging["notifications"] = {"block": "watchdog-test"}
    staging["watchdog_recover"] = recover
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _kinds(report) -> set[str]:  # noqa: ANN001
    return {f["kind"] for f in report.details["findings"]}


def test_left_state_is_found_notified_once_and_recovered_when_allowed(stack: Stack) -> None:
    from prefect_slack import SlackWebhook

    receiver = FakeSlack().start()
    try:
        SlackWebhook(url=receiver.url("/watchdog")).save("watchdog-test", overwrite=True)
        _configure(stack.config, recover=False)
        cfg = str(stack.config)
        root = load_context("staging", config=cfg).env.nginx_root
        side = side_name(stack.live)
        # left behind by nobody: the upgrade page, a process suspended by hand, a side database
        stack.web.exec(["sh", "-c", f"echo down > {root}/503.html"])
        stack.asg_client().suspend_processes(
            AutoScalingGroupName=stack.asg, ScalingProcesses=["Launch"]
        )
        from sandbox.seed_db import psql

        psql(stack.hosts["db"], f'CREATE DATABASE "{side}";')
        assert side in stack.databases()

        first = watchdog(environment="staging", config=cfg)
        assert _kinds(first) == {"upgrade-page", "autoscaling-suspended", "reload-leftovers"}, (
            first.details
        )
        texts = [data["text"] for path, data in receiver.posts if path == "/watchdog"]
        assert len(texts) == 3, texts
        joined = "\n".join(texts)
        assert "upgrade page on" in joined and "with no holder" in joined
        assert "Launch" in joined and side in joined
        assert "Action: end-upgrade" in joined  # what would recover it (not started: not allowed)
        assert first.details["recovered"] == []
        assert stack.site().status_code == 503
        assert "Launch" in stack.suspended()

        again = watchdog(environment="staging", config=cfg)  # five minutes later: said already
        assert _kinds(again) == _kinds(first)
        assert again.details["notified"] == []
        assert len(receiver.posts) == 3

        _configure(stack.config, recover=True)
        recovering = watchdog(environment="staging", config=cfg)
        assert recovering.details["notified"] == []
        assert len(recovering.details["recovered"]) == 3, recovering.details["recovered"]
        assert stack.site().status_code == 200
        assert stack.suspended() == []
        assert side not in stack.databases()

        after = watchdog(environment="staging", config=cfg)
        assert after.details["findings"] == [], after.details
        assert len(receiver.posts) == 3
        # the hand-suspended processes were part of the finding; nothing else is suspended now
        assert not set(PRE_SUSPENDED) & set(stack.suspended())
    finally:
        receiver.stop()
