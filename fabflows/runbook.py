"""What every runbook does first: load the config, resolve the environment, load the blocks."""

from __future__ import annotations

from dataclasses import dataclass

from prefect_aws import AwsCredentials

from config import EnvironmentConfig, FabulawsConfig, load_config, resolve_environment
from tasks.aws.session import make_credentials


@dataclass(frozen=True)
class RunContext:
    """Config, resolved environment and AWS credentials for one run."""

    config: FabulawsConfig
    env: EnvironmentConfig
    creds: AwsCredentials
    config_path: str | None = None
    """The config file as given (None: found by default); paths in it are relative to it."""


def load_context(
    environment: str, deployment: str | None = None, config: str | None = None
) -> RunContext:
    """Phase 1 of every flow. Raises ConfigError (naming file and key) before anything is touched."""
    cfg = load_config(config)
    env = resolve_environment(cfg, environment, deployment)
    creds = make_credentials(cfg.fabflows.aws, env.region)
    return RunContext(config=cfg, env=env, creds=creds, config_path=config)
