"""The chatops ASGI service: ``fabflows chatops serve [--config PATH] [--host H] [--port P]``.

Slack app settings: slash command ``/fabflows`` -> ``https://<host>/slack/commands``; interactivity
request URL -> ``https://<host>/slack/interactions``. Put it behind TLS on a network Slack reaches,
and give it ``PREFECT_API_URL`` (+ ``PREFECT_API_AUTH_STRING``) of the Prefect server.

Every request is checked before anything else:

1. the Slack signature (``slack_sdk`` ``SignatureVerifier``, secret from the Secret block named by
   ``fabflows.chatops.signing_secret_block``): a wrong or missing signature -> 401;
2. its timestamp: older (or newer) than 5 minutes -> 401;
3. replays: the same signature seen again within those 5 minutes -> 401;
4. the user: not in ``fabflows.chatops.users`` -> refused (ephemeral message, nothing done);
5. the permission map ``fabflows.chatops.permissions.<environment>``: who may run what, who may
   approve. In protected environments the run always goes through approval (tag
   ``approval:required``) and, with ``four_eyes``, its starter cannot approve it.

A run is created through the Prefect API with the idempotency key ``slack-<trigger_id>`` (a Slack retry
gets the same run back, never a second one), tagged ``started-by:slack:<user id>`` and ``chatops``;
the answer carries its UI link, and the result is posted (SlackWebhook block, else the command's
``response_url``) when the run ends. Runs being watched are kept in
``<state_dir>/chatops/watch.json``, so a restart of the service still reports them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from uuid import UUID

import httpx
from slack_sdk.signature import SignatureVerifier
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from config import FabulawsConfig, resolve_environment
from fabflows import audit
from fabflows.approval import APPROVAL_REQUIRED_TAG
from fabflows.chatops import commands, notify
from fabflows.chatops.commands import CommandError

MAX_AGE_SECONDS = 300
CHATOPS_TAG = "chatops"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}

log = logging.getLogger("fabflows.chatops")


class ReplayCache:
    """Signatures seen in the last ``MAX_AGE_SECONDS`` (older requests are refused anyway)."""

    def __init__(self, max_age: float = MAX_AGE_SECONDS):
        self.max_age = max_age
        self._seen: OrderedDict[str, float] = OrderedDict()

    def seen(self, signature: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        while self._seen and next(iter(self._seen.values())) < now - self.max_age:
            self._seen.popitem(last=False)
        if signature in self._seen:
            return True
        self._seen[signature] = now
        return False


def ephemeral(text: str) -> JSONResponse:
    return JSONResponse({"response_type": "ephemeral", "text": text})


class Watcher:
    """Posts a run's outcome to Slack when it ends; survives restarts through a JSON file."""

    def __init__(
        self, path: Path, webhook_url: str | None, config: FabulawsConfig, interval: float
    ):
        self.path = path
        self.webhook_url = webhook_url
        self.config = config
        self.interval = interval
        self.runs: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(OSError, ValueError):
            self.runs = json.loads(path.read_text())

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.runs))
        tmp.replace(self.path)

    def add(self, run_id: str, info: dict[str, Any]) -> None:
        self.runs[run_id] = info
        self._save()

    async def post(self, info: dict[str, Any], payload: dict[str, Any]) -> None:
        url = self.webhook_url or info.get("response_url")
        if not url:
            return
        if url == info.get("response_url"):
            payload = {"response_type": "in_channel", **payload}
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(url, json=payload)
            response.raise_for_status()

    async def check_once(self) -> None:
        from prefect.client.orchestration import get_client

        if not self.runs:
            return
        async with get_client() as client:
            for run_id, info in list(self.runs.items()):
                try:
                    run = await client.read_flow_run(UUID(run_id))
                except Exception:  # noqa: BLE001 - server down: try again next round
                    log.warning("cannot read run %s", run_id, exc_info=True)
                    continue
                state = run.state.type.value if run.state else "UNKNOWN"
                if state not in TERMINAL:
                    continue
                message = (run.state.message or "").strip() if run.state else ""
                link = notify.ui_link(self.config, run_id)
                text = (
                    f"{info['flow']} on {info['label']} ({info['who']}): *{run.state.name}* "
                    f"<{link}|{run.name}>" + (f"\n{message}" if message else "")
                )
                try:
                    await self.post(info, {"text": text})
                except httpx.HTTPError:
                    log.warning("cannot post the result of %s to Slack", run_id, exc_info=True)
                    continue
                self.runs.pop(run_id, None)
                self._save()

    async def loop(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # noqa: BLE001 - the watcher must keep going
                log.exception("watcher round failed")
            await asyncio.sleep(self.interval)


def create_app(
    config: FabulawsConfig,
    signing_secret: str,
    *,
    webhook_url: str | None = None,
    flows: dict[str, str] | None = None,
    watch_interval: float = 5.0,
    state_dir: str | Path | None = None,
) -> Starlette:
    """The ASGI app (tests pass the secret and webhook URL; ``serve`` loads them from blocks)."""
    from fabflows import logfilter
    from fabflows.registry import FLOWS

    logfilter.register_secret(signing_secret)
    if webhook_url:
        logfilter.register_secret(webhook_url)
    flows = flows or FLOWS
    settings = config.fabflows.chatops
    verifier = SignatureVerifier(signing_secret)
    replays = ReplayCache()
    base = Path(state_dir or config.fabflows.state_dir).expanduser()
    watcher = Watcher(base / "chatops" / "watch.json", webhook_url, config, watch_interval)

    def verify(body: bytes, headers: Any) -> Response | None:
        timestamp = headers.get("x-slack-request-timestamp")
        signature = headers.get("x-slack-signature")
        try:
            age = abs(time.time() - int(timestamp or ""))
        except ValueError:
            return JSONResponse({"error": "missing or bad X-Slack-Request-Timestamp"}, 401)
        if age > MAX_AGE_SECONDS:
            return JSONResponse({"error": "request older than 5 minutes"}, 401)
        if not verifier.is_valid(body, timestamp, signature):
            return JSONResponse({"error": "bad signature"}, 401)
        if replays.seen(f"{timestamp}:{signature}"):
            return JSONResponse({"error": "replayed request"}, 401)
        return None

    async def slash_command(request: Request) -> Response:
        body = await request.body()
        refused = verify(body, request.headers)
        if refused is not None:
            return refused
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        user_id = form.get("user_id", "")
        try:
            name = commands.user_name(settings, user_id)
            command = commands.parse_command(form.get("text", ""), config, flows)
            if command.action == "help":
                return ephemeral(commands.USAGE)
            if command.action == "status":
                return ephemeral(await status_text())
            return await start_run(command, user_id, name, form)
        except CommandError as exc:
            return ephemeral(str(exc))

    async def start_run(
        command: commands.Command, user_id: str, name: str, form: dict[str, str]
    ) -> Response:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

        assert command.flow and command.environment and command.deployment
        commands.may_run(settings, user_id, command.environment, command.flow)
        env = resolve_environment(config, command.environment, command.deployment)
        deployment_name = f"{command.flow}/{command.deployment}-{command.environment}"
        async with get_client() as client:
            try:
                deployment = await client.read_deployment_by_name(deployment_name)
            except ObjectNotFound:
                raise CommandError(
                    f"{deployment_name} is not deployed (run fabflows deploy)"
                ) from None
            known = set((deployment.parameter_openapi_schema or {}).get("properties", {}))
            unknown = sorted(set(command.parameters) - known)
            if unknown:
                raise CommandError(
                    f"{command.flow} has no parameter(s) {', '.join(unknown)}; it takes: "
                    f"{', '.join(sorted(known - {'environment', 'deployment'}))}"
                )
            tags = [*audit.started_by_tags("slack", user_id), CHATOPS_TAG]
            if env.protected:
                tags.append(APPROVAL_REQUIRED_TAG)
            key = (
                form.get("trigger_id")
                or hashlib.sha256(
                    f"{form.get('team_id')}:{form.get('channel_id')}:{user_id}:{form.get('text')}".encode()
                ).hexdigest()
            )
            try:
                run = await client.create_flow_run_from_deployment(
                    deployment.id,
                    parameters=command.parameters,
                    tags=tags,
                    idempotency_key=f"slack-{key}",
                )
            except PrefectHTTPStatusError as exc:
                detail = exc.response.json().get("detail", str(exc)) if exc.response else str(exc)
                raise CommandError(f"Prefect refused the run: {detail}") from None
        run_id = str(run.id)
        if run_id not in watcher.runs:
            watcher.add(
                run_id,
                {
                    "flow": command.flow,
                    "label": env.label,
                    "who": name,
                    "response_url": form.get("response_url"),
                },
            )
        link = notify.ui_link(config, run.id)
        mode = "apply" if command.parameters.get("dry_run") is False else "dry run"
        approval = " It will wait for approval before changing anything." if env.protected else ""
        return JSONResponse(
            {
                "response_type": "in_channel",
                "text": f"{name} started {command.flow} on {env.label} ({mode}): "
                f"<{link}|{run.name}>.{approval}",
            }
        )

    async def status_text() -> str:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            FlowRunFilterTags,
        )
        from prefect.client.schemas.objects import StateType

        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=["fabflows"]),
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(
                            any_=[StateType.RUNNING, StateType.PAUSED, StateType.PENDING]
                        )
                    ),
                ),
                limit=20,
            )
            flows_by_id = {f.id: f.name for f in await client.read_flows()}
        if not runs:
            return "No fabflows run in progress."
        lines = ["Runs in progress:"]
        for run in runs:
            env = next((t[4:] for t in run.tags if t.startswith("env:")), "?")
            who = next(
                (s.label for s in map(audit.parse_tag, run.tags) if s is not None), "unknown"
            )
            lines.append(
                f"- {flows_by_id.get(run.flow_id, '?')} on {env}: {run.state.name if run.state else '?'}"
                f", started by {who}: <{notify.ui_link(config, run.id)}|{run.name}>"
            )
        return "\n".join(lines)

    async def interaction(request: Request) -> Response:
        body = await request.body()
        refused = verify(body, request.headers)
        if refused is not None:
            return refused
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        try:
            payload = json.loads(form.get("payload", ""))
        except ValueError:
            return JSONResponse({"error": "no payload"}, 400)
        user_id = (payload.get("user") or {}).get("id", "")
        actions = payload.get("actions") or []
        if payload.get("type") != "block_actions" or not actions:
            return Response(status_code=200)
        action = actions[0]
        if action.get("action_id") not in (notify.APPROVE_ACTION, notify.REJECT_ACTION):
            return Response(status_code=200)
        approve = action["action_id"] == notify.APPROVE_ACTION
        try:
            text = await decide(action.get("value", ""), user_id, approve)
        except CommandError as exc:
            return ephemeral(str(exc))
        return JSONResponse({"replace_original": True, "text": text})

    async def decide(run_id_text: str, user_id: str, approve: bool) -> str:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            run_id = UUID(run_id_text)
        except ValueError:
            raise CommandError("the button does not name a run") from None
        commands.user_name(settings, user_id)
        async with get_client() as client:
            try:
                run = await client.read_flow_run(run_id)
            except ObjectNotFound:
                raise CommandError(f"run {run_id} does not exist") from None
            environment = str(run.parameters.get("environment", ""))
            deployment = run.parameters.get("deployment")
            if environment not in config.environments:
                raise CommandError(f"run {run.name} is not a fabflows run")
            env = resolve_environment(config, environment, deployment)
            starter = next((s for s in map(audit.parse_tag, run.tags) if s is not None), None)
            name = commands.may_approve(
                settings, user_id, environment, starter.label if starter else None, env.protected
            )
            if not (run.state and run.state.is_paused()):
                raise CommandError(
                    f"run {run.name} is not waiting for approval (it is {run.state.name if run.state else '?'})"
                )
            result = None
            for attempt in range(3):
                try:
                    result = await client.resume_flow_run(
                        run_id,
                        run_input={
                            "approve": approve,
                            "approver": f"slack:{name} ({user_id})",
                            "reason": "decided in Slack",
                        },
                    )
                    break
                except httpx.HTTPStatusError:
                    if attempt == 2:
                        raise
                    await asyncio.sleep(1)
            status = getattr(result.status, "value", str(result.status)) if result else "?"
            if status != "ACCEPT":
                reason = getattr(result.details, "reason", "") if result else ""
                raise CommandError(f"Prefect did not accept the decision: {status} {reason}")
        verdict = "approved" if approve else "rejected"
        return f"{run.name} on {env.label}: {verdict} by {name}"

    async def health(_: Request) -> Response:
        return JSONResponse({"ok": True, "watching": len(watcher.runs)})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):  # noqa: ANN202
        task = asyncio.create_task(watcher.loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = Starlette(
        routes=[
            Route("/slack/commands", slash_command, methods=["POST"]),
            Route("/slack/interactions", interaction, methods=["POST"]),
            Route("/healthz", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.watcher = watcher
    return app


def load_app(config_path: str | None) -> Starlette:
    """The app with its secrets loaded from the configured blocks."""
    from prefect.blocks.system import Secret

    from config import load_config
    from fabflows import logfilter

    config = load_config(config_path)
    settings = config.fabflows.chatops
    if not settings.signing_secret_block:
        raise SystemExit("fabflows.chatops.signing_secret_block is not set")
    secret = str(Secret.load(settings.signing_secret_block).get())
    webhook = notify.webhook_url(config) if settings.webhook_block else None
    logfilter.install()
    return create_app(config, secret, webhook_url=webhook)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fabflows chatops serve`` arguments, for the CLI to register."""
    sub = parser.add_subparsers(dest="chatops_command", required=True)
    serve = sub.add_parser("serve", help="run the Slack chatops service")
    serve.add_argument("--config", default=None)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8790)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    app = load_app(args.config)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def main_chatops(argv: list[str] | None = None) -> int:
    """Entry point: ``main_chatops(["serve", "--port", "8790"])``."""
    parser = argparse.ArgumentParser(prog="fabflows chatops")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main_chatops())
