"""Configuration models.

A fabflows config is an existing FabulAWS ``fabulaws-config.yaml`` (read as is) plus an optional
``fabflows:`` section for what the original never had (AWS endpoint and credentials block, SSH identity,
maintenance windows, ...). The legacy part is typed where fabflows uses a key and tolerant elsewhere:
keys the original defined but fabflows does not use are listed in ``LEGACY_UNUSED_KEYS`` and kept;
keys neither knows are kept too and reported by ``fabflows config check``. The ``fabflows:`` section is
strict (``extra="forbid"``): a typo there is an error naming the key path.
"""

from __future__ import annotations

import os
import re
from datetime import time
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

ROLES: tuple[str, ...] = ("cache", "db-primary", "db-replica", "web", "worker")
"""The roles fabflows knows, in the order a describe lists them."""

LEGACY_ROLE_NAMES: dict[str, str] = {"db-master": "db-primary", "db-slave": "db-replica"}
"""Role names FabulAWS used before 2019 (58e7b7a), mapped onto today's."""

LEGACY_UNUSED_KEYS: frozenset[str] = frozenset(
    {
        # Read by the original only, or not even by it.
        "run_upgrade",
        "database_host",
        "logstash_config",
        "less_version",
        "secure_root",
        "secure_home",
        "wsgi_app",
        "requirements_file",
        "settings_managepy",
        "localsettings_template",
        "local_settings_py_relative_path",
        "gelf_log_host",
        "syslog_server",
        "awslogs_access_key_id",
        "extra_log_files",
        "backup_key_fingerprint",
        "vcs_cmd",
        "latest_changeset_cmd",
        "repo",
        "branches",
        "gunicorn_worker_multiplier",
        "use_basic_auth",
        "cloudfront_distribution_ids",
        "avail_zones",
        "subnets",
        "security_groups",
        "volume_sizes",
        "volume_types",
        "db_settings",
        "webserver_user",
        "python",
        "celery_application",
    }
)

_ROLE_KEYED = ("security_groups", "volume_types")
_ENV_ROLE_KEYED = ("instance_types", "volume_sizes")

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]

_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


def normalize_role(role: str) -> str:
    """Map a legacy role name (``db-master``) onto today's (``db-primary``); others unchanged."""
    return LEGACY_ROLE_NAMES.get(role, role)


def _rename_roles(mapping: Any) -> Any:
    if isinstance(mapping, dict):
        return {normalize_role(k) if isinstance(k, str) else k: v for k, v in mapping.items()}
    return mapping


class Strict(BaseModel):
    """Base for fabflows' own sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Legacy(BaseModel):
    """Base for sections of the FabulAWS file: unknown keys are kept (and reported), not rejected."""

    model_config = ConfigDict(extra="allow", frozen=True)


# --------------------------------------------------------------------------- fabflows section


class MaintenanceWindow(Strict):
    """A weekly window in the environment's time zone, e.g. weeknights 20:00 to 23:30."""

    days: list[Weekday] = Field(
        default_factory=lambda: list(WEEKDAYS),
        min_length=1,
        description="Days the window opens on (mon..sun).",
    )
    start: time = Field(description="Local time the window opens (HH:MM).")
    end: time = Field(
        description="Local time the window closes (HH:MM); earlier than start means it ends the next day."
    )

    @model_validator(mode="after")
    def _not_empty(self) -> MaintenanceWindow:
        if self.start == self.end:
            raise ValueError("start and end are equal: the window would be empty")
        return self


class ScheduleSpec(Strict):
    """A cron schedule for one flow's deployment in one environment."""

    cron: str = Field(description="Five-field cron expression, in the environment's time zone.")
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Parameters for the scheduled runs."
    )

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"{v!r} is not a five-field cron expression")
        return v


CORS_METHODS: tuple[str, ...] = ("GET", "PUT", "POST", "DELETE", "HEAD")
"""HTTP methods an S3 CORS rule may allow."""

_CORS_ORIGIN = re.compile(r"^(\*|[a-z][a-z0-9+.-]*://[^/\s?#]+)$")


class CorsRule(Strict):
    """One S3 CORS rule (PutBucketCors' CORSRule), validated as S3 validates it."""

    id: str | None = Field(default=None, max_length=255, description="Rule ID (informational).")
    allowed_origins: list[str] = Field(
        min_length=1,
        description="Origins allowed (scheme://host[:port], or *); each may hold one * wildcard.",
    )
    allowed_methods: list[Literal["GET", "PUT", "POST", "DELETE", "HEAD"]] = Field(
        min_length=1, description="Methods allowed (GET, PUT, POST, DELETE, HEAD)."
    )
    allowed_headers: list[str] = Field(
        default_factory=list,
        description="Headers a preflight may ask for (Access-Control-Request-Headers); one * each.",
    )
    expose_headers: list[str] = Field(
        default_factory=list, description="Response headers scripts may read."
    )
    max_age_seconds: int | None = Field(
        default=None, ge=0, description="How long browsers may cache the preflight answer."
    )

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin.count("*") > 1:
                raise ValueError(f"origin {origin!r} has more than one * wildcard (S3 allows one)")
            if not _CORS_ORIGIN.match(origin):
                raise ValueError(
                    f"origin {origin!r} is not * or scheme://host[:port] (no path, no spaces)"
                )
        return v

    @field_validator("allowed_headers")
    @classmethod
    def _headers(cls, v: list[str]) -> list[str]:
        for header in v:
            if header.count("*") > 1 or not re.match(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", header):
                raise ValueError(f"allowed header {header!r} is not a header name (one * allowed)")
        return v

    @field_validator("expose_headers")
    @classmethod
    def _expose(cls, v: list[str]) -> list[str]:
        for header in v:
            if not re.match(r"^[A-Za-z0-9!#$%&'+.^_`|~-]+$", header):
                raise ValueError(f"expose header {header!r} is not a header name (no wildcards)")
        return v


DEFAULT_STATIC_CORS_RULES: tuple[CorsRule, ...] = (
    CorsRule(
        allowed_origins=["*"],
        allowed_methods=["GET"],
        allowed_headers=["Authorization"],
        max_age_seconds=3000,
    ),
)
"""The rule the maintenance doc has operators click into the console."""


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


class AwsSettings(Strict):
    """Where and as whom fabflows talks to AWS."""

    credentials_block: str | None = Field(
        default=None,
        pattern=_NAME,
        description="Name of a prefect-aws AwsCredentials block. Unset: boto3's default chain.",
    )
    region: str | None = Field(
        default=None,
        pattern=r"^[a-z]{2}(-[a-z]+)+-\d$",
        description="AWS region. Default: the top-level region.",
    )
    endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="Override the AWS endpoint (a moto server in tests and the sandbox).",
    )
    max_attempts: int = Field(
        default=8,
        ge=1,
        le=20,
        description="botocore total attempts for each call (throttling and 5xx are retried with backoff).",
    )
    access_key_id: str | None = Field(
        default=None,
        description="Only for the local sandbox's fake AWS: an access key id used when no block is set.",
    )
    secret_access_key: SecretStr | None = Field(
        default=None,
        description="Only for the local sandbox's fake AWS (moto accepts any key).",
    )


class SshSettings(Strict):
    """How fabflows reaches servers over SSH. Host keys are always checked."""

    user: str | None = Field(
        default=None, pattern=r"^[a-z_][a-z0-9_-]{0,31}$", description="Default: deploy_user."
    )
    port: int = Field(default=22, ge=1, le=65535)
    identity_block: str | None = Field(
        default=None, pattern=_NAME, description="Name of an SshIdentity block holding the key."
    )
    identity_file: str | None = Field(
        default=None, description="Path of a private key file, if no block is used."
    )
    known_hosts_file: str = Field(
        default="~/.ssh/known_hosts",
        description="known_hosts checked for every connection; unknown or changed keys are refused.",
    )
    address_attribute: (
        Literal["public_dns_name", "public_ip_address", "private_ip_address", "private_dns_name"]
        | None
    ) = Field(
        default=None, description="Instance attribute to connect to. Default: ec2_attr_for_ssh."
    )
    connect_timeout: float = Field(default=10, gt=0, le=300)
    command_timeout: float = Field(default=900, gt=0, le=86400)


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


# --------------------------------------------------------------------------- secrets, New Relic, refresh

SECRET_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
"""Secret names are file names under ``home`` on the servers: no path separators, no dots."""

_MODE = r"^0?[0-7]{3}$"


class SecretFileSettings(Strict):
    """A config file on the servers that embeds secrets, re-rendered from the secrets block.

    ``path`` and each ``restart`` entry may use ``{home}``, ``{environment}``, ``{deployment}`` and
    ``{project}``. The template is Jinja2 (undefined names are errors) with every secret name, plus
    ``deployment``, ``environment``, ``project``, ``home``, ``database_name``, ``database_user``,
    ``deploy_user``, ``host`` (the server's name) and ``role``.
    """

    path: str = Field(description="Absolute path on the server (placeholders allowed).")
    template: str | None = Field(default=None, description="Jinja2 template text.")
    template_file: str | None = Field(
        default=None,
        description="Jinja2 template file, relative to the config file (instead of template).",
    )
    roles: list[str] = Field(
        min_length=1, description="Roles whose servers get the file (e.g. [web, worker])."
    )
    owner: str | None = Field(
        default=None,
        pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
        description="File owner. Default: deploy_user.",
    )
    mode: str = Field(default="0600", pattern=_MODE, description="Octal file mode.")
    restart: list[str] = Field(
        default_factory=list,
        description="Supervisor programs or groups restarted when the file changes "
        "(e.g. {environment}-pgbouncer).",
    )
    kind: Literal["app", "newrelic"] = Field(
        default="app",
        description="newrelic: also rendered by update-newrelic-keys; app: only by "
        "push-server-secrets.",
    )

    @model_validator(mode="after")
    def _one_template(self) -> SecretFileSettings:
        if (self.template is None) == (self.template_file is None):
            raise ValueError("give exactly one of template and template_file")
        if not self.path.startswith("/") and not self.path.startswith("{home}"):
            raise ValueError(f"path {self.path!r} is not absolute (nor under {{home}})")
        unknown = [r for r in self.roles if normalize_role(r) not in ROLES]
        if unknown:
            raise ValueError(f"unknown role(s) {unknown}; fabflows knows {list(ROLES)}")
        return self


class SecretsSettings(Strict):
    """Server secrets (blocks/secrets.py): pull-server-secrets and push-server-secrets."""

    block: str | None = Field(
        default=None,
        pattern=_NAME,
        description="Secrets block document. Default: <deployment>-<environment>-secrets.",
    )
    pull_from_role: str = Field(
        default="worker",
        description="pull-server-secrets reads the servers' files from the first server of this "
        "role (the original read the first worker), and compares the others with it.",
    )
    files: list[SecretFileSettings] | None = Field(
        default=None,
        description="Config files that embed secrets. Default: the pgbouncer userlist, the New "
        "Relic agent files and the New Relic infrastructure agent config (see tasks/ssh/secrets.py).",
    )
    app_programs: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "web": ["{environment}-web"],
            "worker": ["{environment}-celery"],
        },
        description="Role -> supervisor groups restarted on a server whose secrets changed (the "
        "app reads them when it starts).",
    )
    broker_user: str | None = Field(
        default=None,
        description="RabbitMQ user whose password is broker_password. Default: deploy_user (as "
        "FabulAWS sets it up).",
    )
    database_port: int = Field(
        default=5432, ge=1, le=65535, description="PostgreSQL port on the db-primary server."
    )
    window_for: list[str] = Field(
        default_factory=lambda: ["database_password", "broker_password"],
        description="Secrets whose change is applied inside an upgrade window (the password "
        "checked by the database or the broker changes with the files).",
    )


class NewRelicSettings(Strict):
    """update-newrelic-keys."""

    restart_timeout_seconds: float = Field(
        default=120,
        gt=0,
        le=3600,
        description="Longest a restart of one server's programs may take.",
    )
    healthy_timeout_seconds: float = Field(
        default=120,
        gt=0,
        le=3600,
        description="Rolling mode: how long a restarted web server has to answer 200 again.",
    )
    drain_seconds: float = Field(
        default=5,
        ge=0,
        le=600,
        description="Rolling mode: wait after taking a server out of the load balancers before "
        "restarting it (in-flight requests finish).",
    )


class RefreshSettings(Strict):
    """deploy-serial: the rolling web refresh onto a new image."""

    keep_images: int = Field(
        default=3,
        ge=1,
        le=50,
        description="Images (and launch template versions) kept per environment; older ones made "
        "by fabflows are pruned after a successful refresh.",
    )
    image_timeout_seconds: float = Field(
        default=3600, gt=0, le=6 * 3600, description="Longest wait for CreateImage to be available."
    )
    instance_timeout_seconds: float = Field(
        default=900,
        gt=0,
        le=3600,
        description="Longest wait for a new instance to be InService and answer 200.",
    )
    drain_seconds: float = Field(
        default=10,
        ge=0,
        le=900,
        description="Wait between taking an old instance out of the load balancers and "
        "terminating it (connection draining).",
    )
    poll_seconds: float = Field(
        default=5, gt=0, le=60, description="How often the waits ask AWS and the servers."
    )
    reboot_for_image: bool = Field(
        default=False,
        description="Let CreateImage reboot the source server (consistent disk; it leaves the "
        "load balancers meanwhile). Default: NoReboot.",
    )


class SdistsSettings(Strict):
    """refresh-sdists: the app repository's vendored source distributions (fabflows.sdists)."""

    app_repo: str | None = Field(
        default=None,
        description="Path of the app repository checkout on the machine that runs refresh-sdists.",
    )
    requirements_file: str = Field(
        default="requirements/apps.txt",
        description="Pinned requirements (name==version), relative to app_repo.",
    )
    sdists_dir: str | None = Field(
        default=None,
        description="Directory of the vendored sdists, relative to app_repo. Default: the "
        "top-level requirements_sdists, else requirements/sdists.",
    )
    index_url: str | None = Field(
        default=None,
        pattern=r"^(https?|file)://",
        description="Package index (PEP 503 simple API) pip downloads from. Default: pip's own.",
    )
    parallel_downloads: int = Field(
        default=4, ge=1, le=16, description="pip downloads run at once."
    )
    download_timeout_seconds: float = Field(
        default=600, gt=0, le=3600, description="Longest one pip download may take."
    )
    branch_prefix: str = Field(
        default="fabflows/refresh-sdists",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,100}$",
        description="Branch name prefix for the optional commit (a timestamp is appended).",
    )


ROLE_SERVICES_DEFAULT: dict[str, list[str]] = {
    "db-primary": ["postgresql"],
    "db-replica": ["postgresql"],
    "cache": ["rabbitmq-server", "redis-server", "memcached"],
    "worker": ["{environment}-pgbouncer", "{environment}-celery"],
    "web": ["{environment}-pgbouncer", "{environment}-web"],
}


class StopStartSettings(Strict):
    """stop-environment / start-environment (fabflows.stop_start)."""

    instance_wait_seconds: float = Field(
        default=900, gt=0, le=7200, description="Longest wait for instances to stop or start."
    )
    reachable_wait_seconds: float = Field(
        default=600, gt=0, le=7200, description="Longest wait for a started server's SSH to answer."
    )
    site_wait_seconds: float = Field(
        default=900,
        gt=0,
        le=7200,
        description="Longest wait for the web servers (and the site) to answer 200 after start.",
    )
    poll_seconds: float = Field(
        default=5, gt=0, le=60, description="How often instance and group states are polled."
    )
    role_services: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in ROLE_SERVICES_DEFAULT.items()},
        description="Services start-environment makes sure run after a role's servers start "
        "(after the encrypted volume is mounted): supervisor groups/programs, else init services. "
        "{environment} is replaced. Names missing on a server are reported, not failed.",
    )
    quiet_services: dict[str, list[str]] = Field(
        default_factory=lambda: {"worker": ["{environment}-celery"]},
        description="Services stop-environment stops before stopping any instance (the app goes "
        "quiet: no task runs when the databases stop).",
    )
    encrypted_device: str = Field(
        default="/dev/xvdf",
        pattern=r"^/dev/[A-Za-z0-9/_-]+$",
        description="The LUKS data volume (fs_encrypt). FabulAWS: /dev/sdf, seen as /dev/xvdf.",
    )
    encrypted_mapper_name: str = Field(
        default="crypt-xvdf",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Its /dev/mapper name once unlocked.",
    )
    mount_command: list[str] = Field(
        default_factory=lambda: ["/mount-deferred.sh"],
        min_length=1,
        description="Mounts the unlocked volume (and its bind mounts); FabulAWS: /mount-deferred.sh.",
    )

    @field_validator("role_services", "quiet_services")
    @classmethod
    def _services(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        out = {}
        for role, names in v.items():
            if normalize_role(role) not in ROLES:
                raise ValueError(f"unknown role {role!r}; fabflows knows {list(ROLES)}")
            for name in names:
                if not re.match(r"^[A-Za-z0-9_.@{}-]+$", name):
                    raise ValueError(f"{name!r} is not a service name")
            out[normalize_role(role)] = names
        return out


class MaskingSettings(Strict):
    """SQL that scrubs a production copy before it goes live (reload-production-db)."""

    statements: list[str] = Field(
        default_factory=list,
        description="SQL statements run in one transaction on the copy, as the database user "
        "(e.g. UPDATE auth_user SET email = 'user' || id || '@example.invalid'). Empty: no masking.",
    )
    checks: list[str] = Field(
        default_factory=list,
        description="Queries returning one number each, the rows still unmasked; each must return 0 "
        "before the copy goes live.",
    )


class ReloadProductionDbSettings(Strict):
    """reload-production-db: copy a production database into staging or testing."""

    source_environment: str = Field(
        default="production", pattern=_NAME, description="Environment copied from by default."
    )
    migrate_command: list[str] = Field(
        default_factory=lambda: ["python3", "manage.py", "migrate", "--noinput"],
        min_length=1,
        description="Migration command (argv) run on the first worker as the deploy user, in the "
        "code directory, after the copy goes live.",
    )
    code_root: str | None = Field(
        default=None,
        pattern=r"^/",
        description="Directory the migration command runs in. Default: "
        "<home>/www/<environment>/code_root (FabulAWS's layout).",
    )
    migrate_timeout_minutes: float = Field(
        default=30, gt=0, le=24 * 60, description="Longest the migrations may take."
    )
    copy_timeout_minutes: float = Field(
        default=240, gt=0, le=48 * 60, description="Longest the copy may take."
    )
    keep_previous: int = Field(
        default=0,
        ge=0,
        le=10,
        description="Previous databases kept after a successful reload (named "
        "<database>__prev_<UTC time>); 0 drops the one just replaced.",
    )
    verify_tables: int = Field(
        default=5,
        ge=1,
        le=40,
        description="Largest tables whose row counts must match the copy's snapshot.",
    )
    room_factor: float = Field(
        default=1.2,
        ge=1.0,
        le=10.0,
        description="Free space needed on the target's data directory, as a multiple of the "
        "source database's size.",
    )
    source_password_block: str | None = Field(
        default=None,
        pattern=_NAME,
        description="Prefect Secret block holding the source database user's password. Unset: "
        "read from the source db-primary's secret file (see source_password_file).",
    )
    source_password_file: str = Field(
        default="database_password",
        pattern=r"^[A-Za-z0-9_./-]+$",
        description="The source database password's file on the source db-primary, relative to "
        "home (FabulAWS keeps one file per secret there).",
    )
    masking: MaskingSettings = Field(default_factory=MaskingSettings)


RESIZE_MINIMUM_MEMORY_MIB: dict[str, int] = {
    "cache": 1740,
    "db-primary": 1740,
    "db-replica": 1740,
    "web": 1740,
    "worker": 3840,
}
"""The original's documented minimum sizes: m1.small (1.7 GiB) everywhere, m1.medium (3.75 GiB)
for workers."""


class ResizeSettings(Strict):
    """resize-environment (fabflows.resize)."""

    minimum_memory_mib: dict[str, int] = Field(
        default_factory=lambda: dict(RESIZE_MINIMUM_MEMORY_MIB),
        description="Smallest memory (MiB) a role may be resized to. Default: the original's "
        "documented minimums (m1.small everywhere, m1.medium for workers).",
    )
    downtime_goal_seconds: float = Field(
        default=120,
        gt=0,
        le=3600,
        description="Longest acceptable measured downtime of the primary's window (reported).",
    )

    @field_validator("minimum_memory_mib")
    @classmethod
    def _roles(cls, v: dict[str, int]) -> dict[str, int]:
        out = {}
        for role, mib in v.items():
            if normalize_role(role) not in ROLES:
                raise ValueError(f"unknown role {role!r}; fabflows knows {list(ROLES)}")
            if mib < 0:
                raise ValueError(f"{role}: {mib} MiB is negative")
            out[normalize_role(role)] = mib
        return out


def default_state_dir() -> str:
    """``$FABFLOWS_STATE_DIR`` or ``~/.local/state/fabflows``: where locks and journals live when
    the config does not say."""
    return os.environ.get("FABFLOWS_STATE_DIR") or "~/.local/state/fabflows"


class FabflowsSection(Strict):
    """The ``fabflows:`` section of the config file."""

    aws: AwsSettings = Field(default_factory=AwsSettings)
    ssh: SshSettings = Field(default_factory=SshSettings)
    environments: dict[str, EnvironmentSettings] = Field(default_factory=dict)
    state_dir: str = Field(
        default_factory=lambda: default_state_dir(),
        description="Where runs record local state (locks, journals); default "
        "$FABFLOWS_STATE_DIR or ~/.local/state/fabflows.",
    )
    lock: LockSettings = Field(default_factory=LockSettings)
    deploy: DeploySettings = Field(default_factory=DeploySettings)
    approval: ApprovalSettings = Field(default_factory=ApprovalSettings)
    chatops: ChatopsSettings = Field(default_factory=ChatopsSettings)
    upgrade: UpgradeSettings = Field(default_factory=UpgradeSettings)
    reload_production_db: ReloadProductionDbSettings = Field(
        default_factory=ReloadProductionDbSettings
    )
    sdists: SdistsSettings = Field(default_factory=SdistsSettings)
    stop_start: StopStartSettings = Field(default_factory=StopStartSettings)
    resize: ResizeSettings = Field(default_factory=ResizeSettings)
    prices: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description="On-demand USD per hour by instance type, over fabflows' built-in table "
        "(us-east-1 Linux list prices) for the stop-environment savings report.",
    )
    secrets: SecretsSettings = Field(default_factory=SecretsSettings)
    newrelic: NewRelicSettings = Field(default_factory=NewRelicSettings)
    refresh: RefreshSettings = Field(default_factory=RefreshSettings)


# --------------------------------------------------------------------------- legacy (FabulAWS) part


class InstanceSettings(Legacy):
    ami: str | None = None
    key_prefix: str | None = None
    admin_groups: list[str] = Field(default_factory=lambda: ["admin", "sudo"])
    app_root: str | None = None
    fs_type: str | None = "ext4"
    fs_encrypt: bool = False
    ebs_encrypt: bool = False
    ubuntu_mirror: str | None = None
    swap_multiplier: float | None = None


class StaticHtml(Legacy):
    upgrade_message: str | None = None
    healthcheck_override: str | None = None


class FabulawsConfig(Legacy):
    """The FabulAWS file, plus the ``fabflows`` section."""

    # environments and roles
    project: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    default_deployment: str | None = None
    deployments: list[str] = Field(min_length=1)
    environments: list[str] = Field(min_length=1)
    production_environments: list[str] = Field(default_factory=lambda: ["production"])
    valid_roles: list[str] = Field(default_factory=lambda: list(ROLES))

    # users and paths
    deploy_user: str = Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    database_user: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    home: str = "/home/deploy"
    instance_settings: InstanceSettings = Field(default_factory=InstanceSettings)
    ssh_keys: str | None = None
    disable_known_hosts: bool = False
    password_names: list[str] = Field(
        default_factory=lambda: [
            "database_password",
            "broker_password",
            "smtp_password",
            "newrelic_license_key",
            "newrelic_api_key",
            "s3_secret",
            "secret_key",
        ]
    )
    static_html: StaticHtml = Field(default_factory=StaticHtml)
    requirements_sdists: str | None = None
    app_server_packages: list[str] = Field(default_factory=list)

    # app servers
    pgbouncer_port: int = Field(default=5432, ge=1, le=65535)
    server_ports: dict[str, int] = Field(default_factory=dict)
    static_hosting: Literal["local", "remote"] = "remote"
    celery_workers: dict[str, str] = Field(default_factory=dict)
    site_domains_map: dict[str, list[str] | None] = Field(default_factory=dict)

    # AWS
    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")
    ec2_attr_for_ssh: str = "public_dns_name"
    instance_types: dict[str, dict[str, str]] = Field(default_factory=dict)
    load_balancers: dict[str, dict[str, list[str]]] = Field(default_factory=dict)
    auto_scaling_groups: dict[str, dict[str, str]] = Field(default_factory=dict)

    fabflows: FabflowsSection = Field(default_factory=FabflowsSection)

    @model_validator(mode="before")
    @classmethod
    def _legacy_roles(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("valid_roles"), list):
            data["valid_roles"] = [
                normalize_role(r) if isinstance(r, str) else r for r in data["valid_roles"]
            ]
        for key in _ROLE_KEYED:
            if key in data:
                data[key] = _rename_roles(data[key])
        for key in _ENV_ROLE_KEYED:
            if isinstance(data.get(key), dict):
                data[key] = {env: _rename_roles(roles) for env, roles in data[key].items()}
        return data

    @field_validator("valid_roles")
    @classmethod
    def _known_roles(cls, v: list[str]) -> list[str]:
        unknown = [r for r in v if r not in ROLES and r != "combo"]
        if unknown:
            raise ValueError(f"unknown role(s) {unknown}; fabflows knows {list(ROLES) + ['combo']}")
        return v

    @model_validator(mode="after")
    def _cross_references(self) -> FabulawsConfig:
        envs = set(self.environments)
        deps = set(self.deployments)
        problems: list[tuple[str, str]] = []
        if self.default_deployment is not None and self.default_deployment not in deps:
            problems.append(
                ("default_deployment", f"{self.default_deployment!r} is not in deployments")
            )
        for env in self.production_environments:
            if env not in envs:
                problems.append(("production_environments", f"{env!r} is not in environments"))
        for env, roles in self.instance_types.items():
            if env not in envs:
                problems.append((f"instance_types.{env}", f"{env!r} is not in environments"))
                continue
            for role in roles:
                if role not in self.valid_roles:
                    problems.append(
                        (f"instance_types.{env}.{role}", f"{role!r} is not in valid_roles")
                    )
        for key in ("load_balancers", "auto_scaling_groups"):
            for dep, per_env in getattr(self, key).items():
                if dep not in deps:
                    problems.append((f"{key}.{dep}", f"{dep!r} is not in deployments"))
                    continue
                for env in per_env:
                    if env not in envs:
                        problems.append((f"{key}.{dep}.{env}", f"{env!r} is not in environments"))
        for env in self.fabflows.environments:
            if env not in envs:
                problems.append((f"fabflows.environments.{env}", f"{env!r} is not in environments"))
        if problems:
            raise CrossReferenceError(problems)
        return self

    # ----------------------------------------------------------------- what the original left implicit

    def unknown_keys(self) -> list[str]:
        """Top-level keys neither fabflows nor the original defines (kept, reported by config check)."""
        return sorted(k for k in (self.model_extra or {}) if k not in LEGACY_UNUSED_KEYS)

    def warnings(self) -> list[str]:
        """Things in the file that are legal but probably not what the author meant."""
        import difflib

        out = []
        known = [*type(self).model_fields, *LEGACY_UNUSED_KEYS]
        for key in self.unknown_keys():
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            hint = f": did you mean {close[0]}?" if close else ""
            out.append(f"unknown key {key}{hint} (kept and ignored)")
        for env in self.environments:
            if not self.instance_types.get(env):
                out.append(f"instance_types.{env}: missing (no instance type for any role)")
            for dep in self.deployments:
                if not (self.auto_scaling_groups.get(dep) or {}).get(env):
                    out.append(f"auto_scaling_groups.{dep}.{env}: missing (no web group to manage)")
        if self.disable_known_hosts:
            out.append("disable_known_hosts: ignored; fabflows always checks SSH host keys")
        if "celery_application" in self.celery_workers:
            out.append(
                "celery_workers.celery_application: looks misindented (as in FabulAWS's sample); "
                "it is read as a worker named 'celery_application'"
            )
        if (
            "secure_root" in (self.instance_settings.model_extra or {})
            and self.instance_settings.app_root is None
        ):
            out.append(
                "instance_settings: uses secure_root/secure_home (pre-app_root FabulAWS) and has no app_root"
            )
        return out


class CrossReferenceError(ValueError):
    """Several keys refer to names that do not exist; each problem carries its key path."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))


_SLUG = re.compile(r"[^a-z0-9-]+")


def slug(text: str) -> str:
    """Lower-case, dash-separated form used in Prefect names and artifact keys."""
    return _SLUG.sub("-", text.lower()).strip("-")
