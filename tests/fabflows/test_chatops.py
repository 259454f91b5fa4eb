"""The chatops service over real HTTP (uvicorn) against a real Prefect server; Slack's servers are a
local HTTP recorder and requests are signed with a test signing secret."""

from __future__ import annotations

import contextvars
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from prefect import flow, tags
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

from config import load_config, resolve_environment
from fabflows import approval
from fabflows.chatops import commands
from fabflows.chatops.app import create_app
from fabflows.chatops.commands import CommandError
from fabflows.testing.configs import SAMPLE, write_config
from fabflows.testing.fake_slack import FakeSlack, signed

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
CHATOPS = {
    "users": {"U1": "alice", "U2": "bob", "U3": "carol"},
    "permissions": {
        "staging": {"run": ["U1", "U2"], "approve": ["U1"]},
        "production": {"run": ["U2"], "flows": ["describe-environment"], "approve": ["U2", "U3"]},
    },
}


@pytest.fixture(scope="module")
def service(prefect_server, tmp_path_factory) -> Iterator[dict]:
    from deployments.apply import apply_plan
    from deployments.generate import plan_deployments
    from fabflows.registry import FLOWS

    base = tmp_path_factory.mktemp("chatops")
    path = write_config(base, fabflows={"chatops": CHATOPS, "state_dir": str(base / "state")})
    config = load_config(path)
    import asyncio

    plan = plan_deployments(config, {"describe-environment": FLOWS["describe-environment"]}, path)
    asyncio.run(apply_plan(plan, 30, 120, do_prune=False))
    slack = FakeSlack().start()
    app = create_app(
        config,
        SECRET,
        webhook_url=slack.url("/webhook"),
        watch_interval=0.3,
        state_dir=base / "state",
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(server.run,), daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "chatops service did not start"
    try:
        yield {"url": f"http://127.0.0.1:{port}", "slack": slack, "config": config}
    finally:
        server.should_exit = True
        thread.join(10)
        slack.stop()


def post(service: dict, path: str, form: dict, timestamp: int | None = None, secret: str = SECRET):
    body, headers = signed(secret, form, timestamp)
    return httpx.post(service["url"] + path, content=body, headers=headers, timeout=20)


def command(service: dict, text: str, user: str = "U1", trigger: str | None = None, **kw):
    form = {
        "command": "/fabflows",
        "text": text,
        "user_id": user,
        "team_id": "T1",
        "channel_id": "C1",
        "trigger_id": trigger or f"trig-{time.monotonic_ns()}",
        "response_url": service["slack"].url("/response"),
    }
    return post(service, "/slack/commands", form, **kw)


def run_id_of(text: str) -> str:
    return text.split("/runs/flow-run/")[1].split("|")[0]


def test_describe_starts_one_run_even_when_slack_retries(service: dict) -> None:
    first = command(service, "describe myproject staging", trigger="trig-retry")
    assert first.status_code == 200
    answer = first.json()
    assert answer["response_type"] == "in_channel"
    assert "alice started describe-environment on myproject/staging (dry run)" in answer["text"]
    run_id = run_id_of(answer["text"])
    time.sleep(1.1)  # a retry is a new request: new timestamp, new signature, same trigger_id
    again = command(service, "describe myproject staging", trigger="trig-retry")
    assert run_id_of(again.json()["text"]) == run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        assert {"started-by:slack:U1", "chatops"} <= set(run.tags)
        assert "approval:required" not in run.tags
        # the result is posted when the run ends (no worker here: end it through the API)
        from prefect.states import Completed

        client.set_flow_run_state(run_id, Completed(message="3 servers"), force=True)
    posted = service["slack"].wait_for("/webhook")
    assert "describe-environment on myproject/staging (alice): *Completed*" in posted["text"]


def test_replayed_stale_and_forged_requests_are_refused(service: dict) -> None:
    form = {"text": "status", "user_id": "U1", "trigger_id": "t-replay"}
    body, headers = signed(SECRET, form)
    url = service["url"] + "/slack/commands"
    assert httpx.post(url, content=body, headers=headers).status_code == 200
    replay = httpx.post(url, content=body, headers=headers)
    assert replay.status_code == 401 and "replayed" in replay.text
    stale = post(service, "/slack/commands", form, timestamp=int(time.time()) - 301)
    assert stale.status_code == 401 and "older than 5 minutes" in stale.text
    forged = post(service, "/slack/commands", form, secret="not-the-secret")
    assert forged.status_code == 401 and "bad signature" in forged.text
    unsigned = httpx.post(url, content=body)
    assert unsigned.status_code == 401


REFUSALS = [
    ("unknown user", "describe myproject staging", "U9", "not known to fabflows"),
    (
        "no rights in production",
        "describe myproject production",
        "U1",
        "alice may not start runs in production",
    ),
    (
        "flow not allowed",
        "reload-db myproject production",
        "U2",
        "bob may not start reload-production-db",
    ),
    ("unknown environment", "describe myproject qa", "U1", "unknown environment 'qa'"),
    ("unknown parameter", "describe myproject staging bogus=1", "U1", "has no parameter(s) bogus"),
    ("config by hand", "describe myproject staging config=/etc/passwd", "U1", "given by position"),
]


@pytest.mark.parametrize(
    ("what", "text", "user", "message"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
def test_refusals_start_nothing(service: dict, what, text, user, message) -> None:
    with get_client(sync_client=True) as client:
        before = len(client.read_flow_runs())
        answer = command(service, text, user=user)
        assert answer.status_code == 200
        assert answer.json()["response_type"] == "ephemeral"
        assert message in answer.json()["text"]
        assert len(client.read_flow_runs()) == before


def test_production_runs_always_need_approval_and_status_lists_them(service: dict) -> None:
    answer = command(service, "describe myproject production", user="U2").json()
    assert "wait for approval" in answer["text"]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id_of(answer["text"]))
    assert approval.APPROVAL_REQUIRED_TAG in run.tags
    assert (
        "help" in command(service, "help").json()["text"].lower()
        or "Usage" in command(service, "help").json()["text"]
    )


@flow(name="approval-probe-slack")
def probe(environment: str):
    env = resolve_environment(load_config(SAMPLE), environment)
    try:
        return approval.request_approval(
            env, plan_markdown="stop everything", expected_downtime=timedelta(seconds=30),
            timeout=timedelta(seconds=60), poll=timedelta(seconds=1),
        )  # fmt: skip
    except approval.ApprovalRejected as exc:
        return exc.as_state()


def test_approve_button_resumes_with_the_verified_slack_user(service: dict) -> None:
    out: dict = {}

    def target() -> None:
        with tags("started-by:slack:U2"):
            out["state"] = probe.with_options(flow_run_name="slack-approval")(
                environment="production", return_state=True
            )

    thread = threading.Thread(target=target)
    thread.start()
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["slack-approval"]))
            )
            if runs and runs[0].state.is_paused():
                break
            time.sleep(0.2)
        run_id = str(runs[0].id)

    def click(user: str, action: str):
        payload = {
            "type": "block_actions",
            "user": {"id": user},
            "actions": [{"action_id": action, "value": run_id}],
            "response_url": service["slack"].url("/response"),
        }
        return post(service, "/slack/interactions", {"payload": json.dumps(payload)}).json()

    assert "may not approve runs in production" in click("U1", "fabflows-approve")["text"]
    assert "four eyes" in click("U2", "fabflows-approve")["text"]  # U2 started it
    answer = click("U3", "fabflows-approve")
    assert answer == {
        "replace_original": True,
        "text": "slack-approval on myproject/production: approved by carol",
    }
    thread.join(60)
    decision = out["state"].result()
    assert decision.approved and decision.approver == "slack:carol (U3)"


def test_command_parsing_catalogue() -> None:
    config = load_config(SAMPLE)
    flows = {"describe-environment": "x:y", "reload-production-db": "x:z"}
    cmd = commands.parse_command(
        'reload-db myproject staging apply jobs=4 tables=["a"]', config, flows
    )
    assert (cmd.flow, cmd.deployment, cmd.environment) == (
        "reload-production-db",
        "myproject",
        "staging",
    )
    assert cmd.parameters == {"dry_run": False, "jobs": 4, "tables": ["a"]}
    assert commands.parse_command("describe staging", config, flows).deployment == "myproject"
    for bad, message in [
        ("frobnicate staging", "unknown flow"),
        ("describe", "say which environment"),
        ("describe a b c", "say which environment"),
        ("describe other staging", "unknown deployment"),
        ("describe staging 1x=2", "not a parameter name"),
    ]:
        with pytest.raises(CommandError, match=message):
            commands.parse_command(bad, config, flows)


def test_watch_list_survives_a_restart(service: dict, tmp_path: Path) -> None:
    from fabflows.chatops.app import Watcher

    path = tmp_path / "watch.json"
    first = Watcher(path, None, service["config"], 1)
    first.add("00000000-0000-0000-0000-000000000001", {"flow": "f", "label": "l", "who": "w"})
    assert "00000000-0000-0000-0000-000000000001" in Watcher(path, None, service["config"], 1).runs


def test_serve_loads_its_secrets_from_blocks(service: dict, tmp_path: Path) -> None:
    from prefect.blocks.system import Secret
    from prefect_slack import SlackWebhook

    from fabflows import logfilter
    from fabflows.chatops.app import load_app

    Secret(value="Zx9-signing-secret-from-block").save("test-slack-signing", overwrite=True)
    SlackWebhook(url=service["slack"].url("/hook-from-block")).save(
        "test-slack-ops", overwrite=True
    )
    path = write_config(
        tmp_path,
        fabflows={
            "chatops": CHATOPS
            | {"signing_secret_block": "test-slack-signing", "webhook_block": "test-slack-ops"},
            "state_dir": str(tmp_path / "state"),
        },
    )
    app = load_app(str(path))
    assert app.state.watcher.webhook_url.endswith("/hook-from-block")
    assert "Zx9-signing-secret-from-block" not in logfilter.redact(
        "secret Zx9-signing-secret-from-block"
    )
