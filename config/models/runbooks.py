"""Settings of single runbooks: deploy-serial, refresh-sdists, stop/start-environment,
reload-production-db, resize-environment."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from config.models.base import _NAME, ROLES, Strict, normalize_role


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
    swap: Literal["auto", "upgrade-page"] = Field(
        default="auto",
        description="How the copy goes live. auto: under pgbouncer PAUSE/RESUME on the app servers "
        "(requests held, not refused) when no migration is pending and every pgbouncer can be "
        "paused, else behind the upgrade page. upgrade-page: always behind the upgrade page.",
    )
    pause_wait_seconds: float = Field(
        default=5,
        gt=0,
        le=60,
        description="Longest a pgbouncer PAUSE may take to complete (running transactions end); "
        "longer: RESUME at once and the run fails before the swap.",
    )
    pause_hold_seconds: float = Field(
        default=30,
        gt=0,
        le=600,
        description="Each app server's pgbouncer RESUMEs by itself this long after its PAUSE, "
        "whatever happens to the run (the bound of a pause).",
    )


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
