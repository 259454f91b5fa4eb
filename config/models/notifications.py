"""Run notifications: which events go where."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from config.models.base import Strict

NotificationEvent = Literal[
    "failed", "crashed", "cancelled", "approval", "window", "slow", "success", "watchdog"
]


class NotificationSettings(Strict):
    """Where and which run notifications go (registered by fabflows deploy as automations)."""

    block: str | None = Field(
        default=None,
        description="Prefect notification block that sends them: '<block-type-slug>/<name>' "
        "(e.g. slack-incoming-webhook/ops-alerts) or just the name of a prefect-slack "
        "SlackWebhook block. "
        "Unset: no notifications for this environment.",
    )
    events: list[NotificationEvent] = Field(
        default_factory=lambda: [
            "failed",
            "crashed",
            "cancelled",
            "approval",
            "window",
            "slow",
            "watchdog",
        ],
        description="What to notify: failed/crashed/cancelled runs, approvals pending (with a "
        "reminder and the timeout), a run holding the environment near its window's end, a slow "
        "run, watchdog findings, and 'success' of scheduled runs (off by default).",
    )
    window_warning_minutes: float = Field(
        default=10, gt=0, le=240, description="Warn this long before the window closes."
    )
    slow_factor: float = Field(
        default=1.5, gt=1, le=20, description="A run taking this many times its usual duration."
    )
    slow_minimum_seconds: float = Field(
        default=60,
        ge=0,
        le=86400,
        description="... and at least this much longer than usual (short runs vary a lot).",
    )
