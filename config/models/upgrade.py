"""Upgrade mode and upgrade-packages."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from config.models.base import ROLES, Strict, normalize_role

AUTO_SCALING_PROCESSES: tuple[str, ...] = (
    "Launch",
    "Terminate",
    "AddToLoadBalancer",
    "AlarmNotification",
    "AZRebalance",
    "HealthCheck",
    "InstanceRefresh",
    "ReplaceUnhealthy",
    "ScheduledActions",
)
"""Auto Scaling process names SuspendProcesses accepts."""

AutoScalingProcess = Literal[
    "Launch",
    "Terminate",
    "AddToLoadBalancer",
    "AlarmNotification",
    "AZRebalance",
    "HealthCheck",
    "InstanceRefresh",
    "ReplaceUnhealthy",
    "ScheduledActions",
]

_LIMIT = r"^(\d{1,6}|\d{1,3}%)$"


class UpgradeSettings(Strict):
    """Upgrade mode (begin-upgrade / end-upgrade, and every runbook with a window) and upgrade-packages."""

    suspend_processes: list[AutoScalingProcess] = Field(
        default_factory=lambda: [
            "Launch",
            "Terminate",
            "HealthCheck",
            "ReplaceUnhealthy",
            "AZRebalance",
            "AlarmNotification",
            "ScheduledActions",
            "InstanceRefresh",
        ],
        min_length=1,
        description="Web autoscaling group processes suspended while in upgrade mode (no instance "
        "is added, replaced or removed). Those already suspended are left as they are.",
    )
    web_server_url: str = Field(
        default="http://{address}/",
        pattern=r"^https?://\{address\}(:\d+)?/$",
        description="How to reach one web server as the load balancer does; {address} is its address.",
    )
    healthcheck_path: str = Field(
        default="/healthcheck.html",
        pattern=r"^/[A-Za-z0-9._/-]*$",
        description="The load balancer's health-check path (FabulAWS: /healthcheck.html).",
    )
    check_timeout_seconds: float = Field(
        default=30,
        gt=0,
        le=600,
        description="How long the HTTP checks wait for the expected answers (503 and 200 in upgrade "
        "mode, 200 after it).",
    )
    role_order: list[str] = Field(
        default_factory=lambda: ["db-replica", "db-primary", "cache", "worker", "web"],
        description="upgrade-packages upgrades roles in this order (databases before app servers); "
        "roles not listed come last.",
    )
    max_concurrency: int | str = Field(
        default=1,
        description="upgrade-packages: hosts of one role upgraded at once (a number or a percentage).",
    )
    max_errors: int | str = Field(
        default=0,
        description="upgrade-packages: failed hosts tolerated before no new host starts (a number, or "
        "a percentage of all hosts). 0: the first failure stops the rollout.",
    )
    reboot_packages: list[str] = Field(
        default_factory=lambda: ["linux-image-*", "linux-modules-*", "libc6", "systemd", "dbus"],
        description="Package name patterns (shell globs) whose upgrade is expected to need a reboot.",
    )
    apt_update_attempts: int = Field(
        default=3, ge=1, le=10, description="Tries of apt-get update per host before it fails."
    )
    apt_timeout_seconds: float = Field(
        default=1800,
        gt=0,
        le=6 * 3600,
        description="Longest one apt-get install/upgrade may take on a host.",
    )
    reboot_timeout_seconds: float = Field(
        default=600,
        gt=0,
        le=3600,
        description="upgrade-packages with reboot: longest a server may take to come back (SSH "
        "answering in a new boot) before the run stops rebooting and fails.",
    )
    reboot_poll_seconds: float = Field(
        default=2, gt=0, le=60, description="How often a rebooting server is tried over SSH."
    )

    @field_validator("max_concurrency", "max_errors", mode="before")
    @classmethod
    def _limit(cls, v: Any) -> Any:
        if isinstance(v, bool) or not re.match(_LIMIT, str(v).strip()):
            raise ValueError(f"{v!r} is not a number (1) or a percentage (25%)")
        if str(v).strip().endswith("%") and int(str(v).strip()[:-1]) > 100:
            raise ValueError(f"{v!r} is more than 100%")
        return v

    @field_validator("role_order")
    @classmethod
    def _roles(cls, v: list[str]) -> list[str]:
        unknown = [r for r in v if normalize_role(r) not in ROLES]
        if unknown:
            raise ValueError(f"unknown role(s) {unknown}; fabflows knows {list(ROLES)}")
        return [normalize_role(r) for r in v]
