"""One deployment/environment with every name the runbooks need resolved (pure, no I/O)."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

from config.loader import ConfigError, ConfigProblem
from config.models import ROLES, WEEKDAYS, FabulawsConfig, MaintenanceWindow


class EnvironmentConfig(BaseModel):
    """Everything a runbook needs to know about one deployment/environment."""

    model_config = ConfigDict(frozen=True)

    deployment: str
    environment: str
    project: str
    region: str
    is_production: bool = Field(description="Listed in production_environments.")
    protected: bool = Field(description="Destructive runs need approval.")
    allow_stop: bool
    roles: list[str]
    instance_types: dict[str, str]
    load_balancers: list[str]
    target_groups: list[str]
    auto_scaling_group: str | None
    static_bucket: str
    database_name: str
    database_user: str
    deploy_user: str
    home: str
    site_url: str | None
    time_zone: str
    windows: list[MaintenanceWindow]
    admin_groups: list[str]
    address_attribute: str

    @property
    def label(self) -> str:
        """``myproject/staging``: how logs, artifacts and tags name the environment."""
        return f"{self.deployment}/{self.environment}"

    @property
    def supervisor_groups(self) -> dict[str, str]:
        """Supervisor groups the original's templates create (names derived from the environment's)."""
        env = self.environment
        return {"web": f"{env}-web", "celery": f"{env}-celery", "pgbouncer": f"{env}-pgbouncer"}

    @property
    def nginx_root(self) -> str:
        return f"{self.home.rstrip('/')}/services/nginx/html"

    def window_at(self, moment: datetime) -> tuple[datetime, datetime] | None:
        """The window open at ``moment`` (aware datetime) as (start, end), or None."""
        return window_at(self.windows, ZoneInfo(self.time_zone), moment)


def window_at(
    windows: list[MaintenanceWindow], zone: ZoneInfo, moment: datetime
) -> tuple[datetime, datetime] | None:
    """The weekly window open at ``moment``; windows ending before their start run past midnight."""
    local = moment.astimezone(zone)
    for window in windows:
        for days_back in (0, 1):
            day = local.date() - timedelta(days=days_back)
            if WEEKDAYS[day.weekday()] not in window.days:
                continue
            start = datetime.combine(day, window.start, zone)
            end_day = day if window.end > window.start else day + timedelta(days=1)
            end = datetime.combine(end_day, window.end, zone)
            if start <= local < end:
                return start, end
    return None


def resolve_environment(
    config: FabulawsConfig, environment: str, deployment: str | None = None
) -> EnvironmentConfig:
    """Resolve ``deployment``/``environment`` against ``config``.

    Raises:
        ConfigError: the deployment or environment is not in the config.
    """
    file = "(config)"
    if environment not in config.environments:
        raise ConfigError(
            [
                ConfigProblem(
                    file,
                    "environments",
                    f"unknown environment {environment!r}; known: {', '.join(config.environments)}",
                )
            ]
        )
    dep = deployment or config.default_deployment or config.deployments[0]
    if dep not in config.deployments:
        raise ConfigError(
            [
                ConfigProblem(
                    file,
                    "deployments",
                    f"unknown deployment {dep!r}; known: {', '.join(config.deployments)}",
                )
            ]
        )
    settings = config.fabflows.environments.get(environment)
    is_production = environment in config.production_environments
    protected = settings.protected if settings and settings.protected is not None else is_production
    site_url = settings.site_url if settings else None
    if site_url is None:
        domains = config.site_domains_map.get(environment) or []
        site_url = f"https://{domains[0]}/" if domains else None
    roles = [r for r in ROLES if r in config.valid_roles]
    return EnvironmentConfig(
        deployment=dep,
        environment=environment,
        project=config.project,
        region=config.fabflows.aws.region or config.region,
        is_production=is_production,
        protected=protected,
        allow_stop=bool(settings and settings.allow_stop),
        roles=roles,
        instance_types=dict(config.instance_types.get(environment, {})),
        load_balancers=list(config.load_balancers.get(dep, {}).get(environment, [])),
        target_groups=list(settings.target_groups) if settings else [],
        auto_scaling_group=config.auto_scaling_groups.get(dep, {}).get(environment),
        static_bucket=(settings.static_bucket if settings and settings.static_bucket else None)
        or f"{dep}-{environment}-static-files",
        database_name=(settings.database_name if settings and settings.database_name else None)
        or f"{config.project}_{environment}",
        database_user=config.database_user,
        deploy_user=config.deploy_user,
        home=config.home,
        site_url=site_url,
        time_zone=settings.time_zone if settings else "UTC",
        windows=list(settings.windows) if settings else [],
        admin_groups=list(config.instance_settings.admin_groups),
        address_attribute=config.fabflows.ssh.address_attribute or config.ec2_attr_for_ssh,
    )
