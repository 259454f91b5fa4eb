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


SMTP = "/home/deploy/smtp_password"
UPLOAD = "/home/deploy/.fabflows-stage-0123abcd"
STAGED_VALUE = "staged-value-7f3a"
LEFT_STAGED = {"web": [SMTP + ".fabflows-next", UPLOAD], "worker": [SMTP + ".fabflows-absent"]}
"""What a secret rollout killed with no journal leaves: a staged file, the mark of a swap never
committed, an upload whose install never ran."""


def _leave_staged_secret_files(stack: Stack, cfg: str) -> None:
    """Staged on the web server, staged and swapped in on the worker, with the rollout's own code."""
    from pydantic import SecretBytes

    from fabflows.upgrade_mode import ssh_options
    from tasks.ssh.connection import ConnectionPool
    from tasks.ssh.remote import Remote
    from tasks.ssh.secrets import StagedFile, secret_path, stage_files, swap_in

    rc = load_context("staging", config=cfg)
    assert secret_path(rc.env.home, "smtp_password") == SMTP
    staged = StagedFile(
        path=SMTP, owner="deploy", mode=0o600, content=SecretBytes(STAGED_VALUE.encode())
    )
    with ConnectionPool(ssh_options(rc)) as pool:
        remotes = {
            name: Remote(conn=pool.get(stack.hosts[name].ip), host=name, dry_run=False)
            for name in LEFT_STAGED
        }
        for remote in remotes.values():
            stage_files(remote, [staged])
        swap_in(remotes["worker"], [SMTP])
    stack.web.exec(["sh", "-c", f"mkdir -m 700 {UPLOAD} && printf x > {UPLOAD}/0"])
    stack.web.exec(["chown", "-R", "deploy:deploy", UPLOAD])


def _staged_present(stack: Stack) -> dict[str, list[str]]:
    out = {}
    for name, paths in LEFT_STAGED.items():
        ls = stack.hosts[name].exec(["ls", "-d", *paths], check=False).stdout.split()
        out[name] = [p for p in paths if p in ls]
    return out


def test_left_state_is_found_notified_once_and_recovered_when_allowed(stack: Stack) -> None:
    from prefect_slack import SlackWebhook

    receiver = FakeSlack().start()
    try:
        SlackWebhook(url=receiver.url("/watchdog")).save("watchdog-test", overwrite=True)
        _configure(stack.config, recover=False)
        cfg = str(stack.config)
        root = load_context("staging", config=cfg).env.nginx_root
        side = side_name(stack.live)
        # left behind by nobody: the upgrade page, a process suspended by hand, a side database,
        # staged secret files
        stack.web.exec(["sh", "-c", f"echo down > {root}/503.html"])
        stack.asg_client().suspend_processes(
            AutoScalingGroupName=stack.asg, ScalingProcesses=["Launch"]
        )
        from sandbox.seed_db import psql

        psql(stack.hosts["db"], f'CREATE DATABASE "{side}";')
        assert side in stack.databases()
        _leave_staged_secret_files(stack, cfg)

        first = watchdog(environment="staging", config=cfg)
        assert _kinds(first) == {
            "upgrade-page",
            "autoscaling-suspended",
            "reload-leftovers",
            "staged-secret-files",
        }, first.details
        texts = [data["text"] for path, data in receiver.posts if path == "/watchdog"]
        assert len(texts) == 4, texts
        joined = "\n".join(texts)
        assert "upgrade page on" in joined and "with no holder" in joined
        assert "Launch" in joined and side in joined
        assert "Action: end-upgrade" in joined  # what would recover it (not started: not allowed)
        (staged,) = [f for f in first.details["findings"] if f["kind"] == "staged-secret-files"]
        assert staged["recovery"] == "recover-environment"
        assert all(p in staged["what"] for paths in LEFT_STAGED.values() for p in paths), staged
        assert "staged-secret-files" in joined and STAGED_VALUE not in joined
        assert first.details["recovered"] == []
        assert stack.site().status_code == 503
        assert "Launch" in stack.suspended()
        assert _staged_present(stack) == LEFT_STAGED

        again = watchdog(environment="staging", config=cfg)  # five minutes later: said already
        assert _kinds(again) == _kinds(first)
        assert again.details["notified"] == []
        assert len(receiver.posts) == 4

        _configure(stack.config, recover=True)
        recovering = watchdog(environment="staging", config=cfg)
        assert recovering.details["notified"] == []
        # end-upgrade, the processes resumed, one recover-environment (side database, staged files)
        assert len(recovering.details["recovered"]) == 3, recovering.details["recovered"]
        assert stack.site().status_code == 200
        assert stack.suspended() == []
        assert side not in stack.databases()
        assert _staged_present(stack) == {"web": [], "worker": []}
        # the live files stay what the servers had: none on the web, the swapped-in one on the worker
        assert stack.web.exec(["test", "-e", SMTP], check=False).returncode == 1
        assert stack.hosts["worker"].exec(["cat", SMTP]).stdout == STAGED_VALUE

        after = watchdog(environment="staging", config=cfg)
        assert after.details["findings"] == [], after.details
        assert len(receiver.posts) == 4
        # the hand-suspended processes were part of the finding; nothing else is suspended now
        assert not set(PRE_SUSPENDED) & set(stack.suspended())
    finally:
        stack.hosts["worker"].exec(["rm", "-f", SMTP], check=False)
        receiver.stop()
