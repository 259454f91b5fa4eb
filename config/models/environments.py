"""fabflows' settings for one environment (``fabflows.environments.<name>``)."""

from __future__ import annotations

from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from config.models.base import _NAME, Strict
from config.models.cors import CorsRule
from config.models.notifications import NotificationSettings
from config.models.windows import MaintenanceWindow, ScheduleSpec


class EnvironmentSettings(Strict):
    """fabflows settings for one environment (all optional: an unset option means the default)."""

    time_zone: str = Field(
        default="UTC", description="IANA time zone of the windows and schedules."
    )
    windows: list[MaintenanceWindow] = Field(
        default_factory=list,
        description="Weekly maintenance windows. Empty: no window is enforced.",
    )
    protected: bool | None = Field(
        default=None,
        description="Destructive runs need approval. Default: true for production_environments.",
    )
    static_bucket: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        description="Static files bucket. Default: <deployment>-<environment>-static-files.",
    )
    database_name: str | None = Field(
        default=None, pattern=_NAME, description="Database name. Default: <project>_<environment>."
    )
    target_groups: list[str] = Field(
        default_factory=list, description="ELBv2 target group names or ARNs of the web tier."
    )
    site_url: str | None = Field(
        default=None,
        description="URL users reach the site at (checked after maintenance). Default: the first site_domains_map entry.",
    )
    allow_stop: bool = Field(
        default=False, description="stop-environment may stop this environment even if protected."
    )
    schedules: dict[str, ScheduleSpec] = Field(
        default_factory=dict,
        description="Flow name (kebab-case) -> schedule for that flow's deployment in this environment.",
    )
    static_cors_rules: list[CorsRule] | None = Field(
        default=None,
        max_length=100,
        description="CORS rules fix-static-cors puts on the static bucket, in order (S3 uses the "
        "first that matches). Default: origin *, GET, header Authorization, max age 3000.",
    )
    static_cors_check_origins: list[
        Annotated[str, Field(pattern=r"^[a-z][a-z0-9+.-]*://[^/\s?#*]+$")]
    ] = Field(
        default_factory=list,
        description="Origins fix-static-cors verifies besides the site URL's and site_domains_map's.",
    )
    static_cors_check_headers: list[str] = Field(
        default_factory=lambda: ["Authorization"],
        description="Request headers the verification's GET preflight asks for.",
    )
    cache_strategy: Literal["stop", "terminate-and-recreate"] = Field(
        default="stop",
        description="stop-environment's cache server: 'stop' (in a VPC a stopped instance keeps "
        "its private address, so RabbitMQ, Redis and memcached survive) or 'terminate-and-recreate' "
        "(the original's way, for a broker reached by an address a stop changes: EC2-Classic, "
        "public DNS): terminated at stop, launched from cache_launch_template at start.",
    )
    cache_launch_template: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9().\-/_]{3,128}$",
        description="Launch template that builds a cache server (terminate-and-recreate only).",
    )
    undo_on_failure: bool = Field(
        default=True,
        description="When a run fails after applying steps, undo at once the steps that hold "
        "maintenance state (upgrade page, suspended processes, stopped programs). Data-changing "
        "steps are always left for `fabflows recover` / `fabflows resume`.",
    )
    recover_on_crash: bool = Field(
        default=True,
        description="When a run that applied steps ends CRASHED (SIGKILL, lost worker: the zombie "
        "automation), start recover-environment with maintenance_only at once: it undoes the steps "
        "that hold maintenance state (upgrade page off only if the site verifies, autoscaling "
        "processes restored exactly, side databases and staged files removed) and publishes the "
        "plan of the data-changing steps it leaves for `fabflows recover` / `fabflows resume`. "
        "Needs `fabflows deploy` (its automation and the recover-environment deployment).",
    )
    notifications: NotificationSettings = Field(
        default_factory=NotificationSettings,
        description="Run notifications for this environment (which events, which block).",
    )
    watchdog_recover: bool = Field(
        default=False,
        description="The watchdog starts the recovery of what it finds (otherwise it only "
        "reports and notifies).",
    )
    watchdog_cron: str | None = Field(
        default="*/5 * * * *",
        description="Schedule of the watchdog runbook in this environment (None: not scheduled).",
    )
    luks_passphrase_block: str | None = Field(
        default=None,
        pattern=_NAME,
        description="Prefect Secret block holding the LUKS passphrase of the servers' data volume "
        "(instance_settings.fs_encrypt); start-environment feeds it to cryptsetup on stdin.",
    )

    @model_validator(mode="after")
    def _cache_recreate_needs_template(self) -> EnvironmentSettings:
        if self.cache_strategy == "terminate-and-recreate" and not self.cache_launch_template:
            raise ValueError("cache_strategy terminate-and-recreate needs cache_launch_template")
        return self

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not an IANA time zone (e.g. America/New_York)") from None
        return v
