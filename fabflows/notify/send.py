"""Send a notice through the environment's notification block, once per notice key.

The block is any Prefect notification block (it has ``notify(body, subject)``), named in
``fabflows.environments.<env>.notifications.block`` as ``<block-type-slug>/<name>`` or, for the
prefect-slack ``SlackWebhook`` chatops already uses, just its name. What was sent is remembered in
``<state_dir>/notify/sent/`` (one empty file per notice key), so an automation firing twice, a
retried notifier or a watchdog every five minutes says each thing once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from config import FabulawsConfig
from config.models import EnvironmentSettings, NotificationSettings, slug
from fabflows.notify.messages import Notice

DEFAULT_BLOCK_TYPE = "slack-incoming-webhook"
"""The block type slug of prefect-slack's ``SlackWebhook``."""


def settings_for(config: FabulawsConfig, environment: str) -> NotificationSettings:
    env = config.fabflows.environments.get(environment) or EnvironmentSettings()
    return env.notifications


def wanted(config: FabulawsConfig, environment: str, event: str) -> bool:
    """Does this environment notify ``event``? (approval-timeout goes with approval/cancelled)."""
    settings = settings_for(config, environment)
    if not settings.block:
        return False
    if event == "approval-timeout":
        return "approval" in settings.events or "cancelled" in settings.events
    return event in settings.events


def load_block(name: str) -> Any:
    """The notification block ``type-slug/name`` (a bare name: a slack-webhook block)."""
    from prefect.blocks.core import Block

    from fabflows import logfilter

    full = name if "/" in name else f"{DEFAULT_BLOCK_TYPE}/{name}"
    if full.startswith(f"{DEFAULT_BLOCK_TYPE}/"):
        import prefect_slack  # noqa: F401 - registers the block class for Block.load

    block = Block.load(full)
    logfilter.register_block_secrets(block)
    if not callable(getattr(block, "notify", None)):
        raise ValueError(f"block {full!r} is not a notification block (no notify method)")
    return block


def _sent_dir(config: FabulawsConfig) -> Path:
    path = Path(config.fabflows.state_dir).expanduser() / "notify" / "sent"
    path.mkdir(parents=True, exist_ok=True)
    return path


def already_sent(config: FabulawsConfig, key: str) -> bool:
    return (_sent_dir(config) / slug(key)[:200]).exists()


def claim(config: FabulawsConfig, key: str) -> Path | None:
    """Create the key's file; None if it was there (sent, or being sent, by someone else)."""
    path = _sent_dir(config) / slug(key)[:200]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    os.close(fd)
    return path


def send_notice(config: FabulawsConfig, environment: str, notice: Notice) -> bool:
    """Send ``notice`` unless the environment does not want its event or it was sent before.

    Returns True if it was sent now. A failed send forgets the key (the next try sends it).
    """
    from fabflows.logfilter import redact

    if not wanted(config, environment, notice.event):
        return False
    claimed = claim(config, notice.key)
    if claimed is None:
        return False
    settings = settings_for(config, environment)
    assert settings.block is not None
    try:
        block = load_block(settings.block)
        block.notify(redact(notice.render()), redact(notice.subject))
    except BaseException:
        claimed.unlink(missing_ok=True)
        raise
    return True
