"""Messages to Slack through the configured incoming webhook (a prefect-slack SlackWebhook block)."""

from __future__ import annotations

from typing import Any

from config import EnvironmentConfig, FabulawsConfig

APPROVE_ACTION = "fabflows-approve"
REJECT_ACTION = "fabflows-reject"


def webhook_url(config: FabulawsConfig) -> str:
    """The webhook URL from the SlackWebhook block named in ``fabflows.chatops.webhook_block``."""
    from prefect_slack import SlackWebhook

    name = config.fabflows.chatops.webhook_block
    if not name:
        raise ValueError("fabflows.chatops.webhook_block is not set")
    block = SlackWebhook.load(name)
    from fabflows import logfilter

    logfilter.register_block_secrets(block)
    return block.url.get_secret_value()


def send(url: str, payload: dict[str, Any], timeout: float = 10) -> None:
    """POST a Slack message payload to an incoming webhook (or a response_url)."""
    from slack_sdk.webhook import WebhookClient

    response = WebhookClient(url, timeout=int(timeout)).send_dict(payload)
    if response.status_code >= 300:
        raise RuntimeError(f"Slack answered {response.status_code}: {response.body[:200]}")


def ui_link(config: FabulawsConfig | None, flow_run_id: Any) -> str:
    """The Prefect UI page of a flow run."""
    return f"{ui_base(config)}/runs/flow-run/{flow_run_id}"


def ui_base(config: FabulawsConfig | None) -> str:
    if config is not None and config.fabflows.deploy.ui_url:
        return config.fabflows.deploy.ui_url.rstrip("/")
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    if ui:
        return str(ui).rstrip("/")
    api = str(PREFECT_API_URL.value() or "http://127.0.0.1:4200/api")
    return api.rstrip("/").removesuffix("/api")


def approval_blocks(
    env: EnvironmentConfig,
    flow_run_id: Any,
    flow_run_name: str,
    flow_name: str,
    text: str,
    link: str,
) -> list[dict[str, Any]]:
    """Block Kit: the plan (shortened) and Approve / Reject buttons carrying the run id."""
    body = text if len(text) < 2800 else text[:2800] + "\n… (full plan in the run's artifacts)"
    return [
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": f"*Approval needed:* {flow_name} on *{env.label}* (<{link}|{flow_run_name}>)",
            },
        },
        {"type": "section", "text": {"type": "mrkdwn", "text": body}},
        {
            "type": "actions",
            "block_id": f"approval:{flow_run_id}",
            "elements": [
                {
                    "type": "button",
                    "style": "primary",
                    "text": {"type": "plain_text", "text": "Approve"},
                    "action_id": APPROVE_ACTION,
                    "value": f"{flow_run_id}",
                },
                {
                    "type": "button",
                    "style": "danger",
                    "text": {"type": "plain_text", "text": "Reject"},
                    "action_id": REJECT_ACTION,
                    "value": f"{flow_run_id}",
                },
            ],
        },
    ]


def post_approval_request(
    config: FabulawsConfig, env: EnvironmentConfig, flow_run: Any, flow_name: str, text: str
) -> None:
    """Post the approval request with buttons to the configured webhook."""
    link = ui_link(config, flow_run.id)
    send(
        webhook_url(config),
        {
            "text": f"Approval needed: {flow_name} on {env.label}: {link}",
            "blocks": approval_blocks(env, flow_run.id, flow_run.name, flow_name, text, link),
        },
    )
