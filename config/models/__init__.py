"""Configuration models.

A fabflows config is an existing FabulAWS ``fabulaws-config.yaml`` (read as is) plus an optional
``fabflows:`` section for what the original never had (AWS endpoint and credentials block, SSH identity,
maintenance windows, ...). The legacy part is typed where fabflows uses a key and tolerant elsewhere:
keys the original defined but fabflows does not use are listed in ``LEGACY_UNUSED_KEYS`` and kept;
keys neither knows are kept too and reported by ``fabflows config check``. The ``fabflows:`` section is
strict (``extra="forbid"``): a typo there is an error naming the key path.

The models live in modules along the file's seams (``base``, ``windows``, ``cors``,
``notifications``, ``environments``, ``access``, ``control``, ``upgrade``, ``secrets``,
``runbooks``, ``section``, ``fabulaws``); every name is importable from ``config.models`` as before.
"""

from __future__ import annotations

from config.models.access import AwsSettings, SshSettings
from config.models.base import (
    LEGACY_ROLE_NAMES,
    ROLES,
    Legacy,
    Strict,
    normalize_role,
    slug,
)
from config.models.control import (
    ApprovalSettings,
    ChatopsPermission,
    ChatopsSettings,
    DeploySettings,
    LockSettings,
    default_state_dir,
)
from config.models.cors import CORS_METHODS, DEFAULT_STATIC_CORS_RULES, CorsRule
from config.models.environments import EnvironmentSettings
from config.models.fabulaws import (
    LEGACY_UNUSED_KEYS,
    CrossReferenceError,
    FabulawsConfig,
    InstanceSettings,
    StaticHtml,
)
from config.models.notifications import NotificationEvent, NotificationSettings
from config.models.runbooks import (
    RESIZE_MINIMUM_MEMORY_MIB,
    ROLE_SERVICES_DEFAULT,
    MaskingSettings,
    RefreshSettings,
    ReloadProductionDbSettings,
    ResizeSettings,
    SdistsSettings,
    StopStartSettings,
)
from config.models.secrets import (
    SECRET_NAME_PATTERN,
    NewRelicSettings,
    SecretFileSettings,
    SecretsSettings,
)
from config.models.section import FabflowsSection
from config.models.upgrade import (
    AUTO_SCALING_PROCESSES,
    AutoScalingProcess,
    UpgradeSettings,
)
from config.models.windows import WEEKDAYS, MaintenanceWindow, ScheduleSpec, Weekday

__all__ = [
    "AUTO_SCALING_PROCESSES",
    "CORS_METHODS",
    "DEFAULT_STATIC_CORS_RULES",
    "LEGACY_ROLE_NAMES",
    "LEGACY_UNUSED_KEYS",
    "RESIZE_MINIMUM_MEMORY_MIB",
    "ROLES",
    "ROLE_SERVICES_DEFAULT",
    "SECRET_NAME_PATTERN",
    "WEEKDAYS",
    "ApprovalSettings",
    "AutoScalingProcess",
    "AwsSettings",
    "ChatopsPermission",
    "ChatopsSettings",
    "CorsRule",
    "CrossReferenceError",
    "DeploySettings",
    "EnvironmentSettings",
    "FabflowsSection",
    "FabulawsConfig",
    "InstanceSettings",
    "Legacy",
    "LockSettings",
    "MaintenanceWindow",
    "MaskingSettings",
    "NewRelicSettings",
    "NotificationEvent",
    "NotificationSettings",
    "RefreshSettings",
    "ReloadProductionDbSettings",
    "ResizeSettings",
    "ScheduleSpec",
    "SdistsSettings",
    "SecretFileSettings",
    "SecretsSettings",
    "SshSettings",
    "StaticHtml",
    "StopStartSettings",
    "Strict",
    "UpgradeSettings",
    "Weekday",
    "default_state_dir",
    "normalize_role",
    "slug",
]
