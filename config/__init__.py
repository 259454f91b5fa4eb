"""Configuration: the FabulAWS file as is, plus fabflows' own strict section."""

from config.environment import EnvironmentConfig, resolve_environment
from config.loader import ConfigError, ConfigProblem, load_config
from config.models import ROLES, FabulawsConfig

__all__ = [
    "ROLES",
    "ConfigError",
    "ConfigProblem",
    "EnvironmentConfig",
    "FabulawsConfig",
    "load_config",
    "resolve_environment",
]
