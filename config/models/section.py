"""The ``fabflows:`` section of the config file: every part of fabflows' own settings."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from config.models.access import AwsSettings, SshSettings
from config.models.base import Strict
from config.models.control import (
    ApprovalSettings,
    ChatopsSettings,
    DeploySettings,
    LockSettings,
    default_state_dir,
)
from config.models.environments import EnvironmentSettings
from config.models.runbooks import (
    RefreshSettings,
    ReloadProductionDbSettings,
    ResizeSettings,
    SdistsSettings,
    StopStartSettings,
)
from config.models.secrets import NewRelicSettings, SecretsSettings
from config.models.upgrade import UpgradeSettings


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
