"""How runs are coordinated: the lock, deployments, approvals, chatops, the state directory."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from config.models.base import _NAME, Strict


def default_state_dir() -> str:
    """``$FABFLOWS_STATE_DIR`` or ``~/.local/state/fabflows``: where locks and journals live when
    the config does not say."""
    return os.environ.get("FABFLOWS_STATE_DIR") or "~/.local/state/fabflows"


class LockSettings(Strict):
    """How one maintenance at a time per environment is enforced (fabflows.lock)."""

    backend: Literal["file", "postgres"] = Field(
        default="file",
        description=(
            "file: an flock under state_dir/locks, released by the kernel when the holder dies; right when "
            "every worker runs on one machine. postgres: a PostgreSQL advisory lock, released when the "
            "holder's session ends; needed as soon as workers run on more than one machine."
        ),
    )
    postgres_url: str | None = Field(
        default=None,
        pattern=r"^postgres(ql)?://[^:@/]*(@|/)",
        description="libpq URL of the lock database WITHOUT a password (trust, peer or ~/.pgpass).",
    )
    postgres_url_block: str | None = Field(
        default=None,
        pattern=_NAME,
        description="Name of a Prefect Secret block holding the lock database URL (with its password).",
    )
    wait_timeout_minutes: float = Field(
        default=120,
        gt=0,
        le=24 * 60,
        description="A run waiting longer than this for its environment fails, naming the holder.",
    )
    poll_seconds: float = Field(
        default=2, gt=0, le=60, description="How often a waiting run tries again."
    )
    dead_session_seconds: int = Field(
        default=60,
        ge=10,
        le=600,
        description="postgres: a holder session silent this long is ended by the server (lock released).",
    )

    @model_validator(mode="after")
    def _postgres_needs_url(self) -> LockSettings:
        if self.backend == "postgres" and not (self.postgres_url or self.postgres_url_block):
            raise ValueError("backend postgres needs postgres_url or postgres_url_block")
        return self


class DeploySettings(Strict):
    """How ``fabflows deploy`` registers the runbooks with a Prefect server (fabflows.deploy)."""

    work_pool: str = Field(
        default="fabflows", pattern=_NAME, description="Process work pool the workers poll."
    )
    ui_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="Prefect UI base URL used in links (Slack answers). Default: derived from PREFECT_API_URL.",
    )
    source_dir: str | None = Field(
        default=None,
        description="Directory holding fabflows' code on the worker machines. Default: this checkout.",
    )
    heartbeat_seconds: int = Field(
        default=30,
        ge=30,
        le=600,
        description="Flow-run heartbeat interval (PREFECT_FLOWS_HEARTBEAT_FREQUENCY).",
    )
    max_parallel_runs: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="Work pool concurrency limit: runs in flight across all workers.",
    )
    zombie_after_seconds: int = Field(
        default=120,
        ge=60,
        le=3600,
        description="A run with no heartbeat for this long is marked CRASHED by the deployed automation.",
    )


class ApprovalSettings(Strict):
    """Approvals of destructive runs in protected environments (fabflows.approval)."""

    timeout_minutes: float = Field(
        default=60,
        gt=0,
        le=7 * 24 * 60,
        description="No decision within this time rejects the run.",
    )
    poll_seconds: float = Field(
        default=5, gt=0, le=60, description="How often a paused run checks for a decision."
    )


class ChatopsPermission(Strict):
    """Who may do what from Slack in one environment."""

    run: list[str] = Field(
        default_factory=list, description="Slack user ids allowed to start runs here."
    )
    flows: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Flow names (kebab-case) they may start; '*' means every registered flow.",
    )
    approve: list[str] = Field(
        default_factory=list, description="Slack user ids allowed to approve or reject runs here."
    )


class ChatopsSettings(Strict):
    """The Slack chatops service (fabflows.chatops)."""

    signing_secret_block: str | None = Field(
        default=None,
        pattern=_NAME,
        description="Prefect Secret block holding the Slack signing secret.",
    )
    webhook_block: str | None = Field(
        default=None,
        pattern=_NAME,
        description="prefect-slack SlackWebhook block (incoming webhook) for results and approval requests.",
    )
    users: dict[str, str] = Field(
        default_factory=dict,
        description="Known Slack user ids -> name. Requests from anyone else are refused.",
    )
    permissions: dict[str, ChatopsPermission] = Field(
        default_factory=dict,
        description="Environment name -> who may run and approve there. No entry: nobody.",
    )
    aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Extra command words -> flow names (describe and reload-db are built in).",
    )
    four_eyes: bool = Field(
        default=True,
        description="In protected environments, the Slack user who started a run may not approve it.",
    )
