"""Deployments generated from the config and the flow registry (pure: no server).

Every registered flow (``fabflows/registry.py``) becomes one deployment per deployment/environment
of the config, named ``<flow-name>/<deployment>-<environment>`` (e.g.
``reload-production-db/myproject-staging``), so a flow that lands later is picked up by the next
``fabflows deploy`` without any change here.

The parameter form of each deployment is the flow's own schema, tightened:

- ``environment`` and ``deployment`` are enums holding this deployment's values (defaults set), so the
  UI shows a fixed choice and a typo gets HTTP 409 before any run starts;
- ``config`` is not in the form: the worker reads ``$FABFLOWS_CONFIG`` (set in the job variables);
- unknown top-level keys are refused (``additionalProperties: false``): Prefect would accept them
  and the run would then crash with ``SignatureMismatchError``. Pydantic parameter models of the
  flows are strict (``extra="forbid"``), which gives the same for nested keys.

Schedules come from ``fabflows.environments.<env>.schedules`` (flow name -> cron + parameters) in
the environment's IANA time zone; their parameters are validated against the same form here, at
deploy time. A schedule that fires outside the environment's maintenance windows gets a warning
(the run would refuse to start there unless the flow does not need a window).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

from config import FabulawsConfig, resolve_environment
from config.models import EnvironmentSettings, ScheduleSpec, slug

REPO = Path(__file__).resolve().parents[1]
LOGGING_CONFIG = "deployments/logging.yml"
"""Prefect's logging config plus the secret-redacting filter (regenerate: fabflows.logfilter)."""

HIDDEN_PARAMETERS = ("config",)
DEPLOYMENT_TAG = "fabflows"
WATCHDOG_FLOW = "watchdog"
"""Scheduled in every environment by default (``fabflows.environments.<env>.watchdog_cron``)."""


class ScheduleEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    cron: str
    timezone: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    slug: str


class DeploymentSpec(BaseModel):
    """One deployment to register."""

    model_config = ConfigDict(frozen=True)

    flow_name: str
    import_path: str = Field(description="module:function")
    entrypoint: str = Field(description="path/to/module.py:function, relative to source_dir")
    name: str = Field(description="<deployment>-<environment>")
    deployment: str
    environment: str
    description: str
    tags: list[str]
    parameters: dict[str, Any]
    parameter_schema: dict[str, Any]
    schedules: list[ScheduleEntry]
    job_variables: dict[str, Any]
    work_pool: str

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"


class DeploymentPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    work_pool: str
    max_parallel_runs: int
    deployments: list[DeploymentSpec]
    warnings: list[str]


class DeployConfigError(ValueError):
    """The config asks for something that cannot be deployed (each problem names its key)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def load_flow(import_path: str) -> Any:
    module_name, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def entrypoint_of(import_path: str, source_dir: Path) -> str:
    """``flows/x.py:fn`` for ``flows.x:fn`` (the worker loads it from source_dir)."""
    module_name, _, attr = import_path.partition(":")
    module = importlib.import_module(module_name)
    path = Path(inspect.getfile(module)).resolve()
    try:
        rel = path.relative_to(source_dir.resolve())
    except ValueError:
        rel = Path(*module_name.split(".")).with_suffix(".py")
    return f"{rel.as_posix()}:{attr}"


def form_schema(flow: Any, deployment: str, environment: str) -> dict[str, Any]:
    """The flow's parameter schema with fixed environment/deployment enums and no unknown keys."""
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(flow.fn).model_dump(mode="json", by_alias=True, exclude_none=True)
    schema = copy.deepcopy(schema)
    props: dict[str, Any] = schema.setdefault("properties", {})
    for hidden in HIDDEN_PARAMETERS:
        props.pop(hidden, None)
        if hidden in schema.get("required", []):
            schema["required"].remove(hidden)
    for key, value in (("environment", environment), ("deployment", deployment)):
        if key in props:
            prop = props[key]
            for drop in ("anyOf", "type"):
                prop.pop(drop, None)
            prop.update({"type": "string", "enum": [value], "default": value})
    schema["additionalProperties"] = False
    return schema


def _validate_parameters(
    schema: dict[str, Any], parameters: dict[str, Any], where: str
) -> str | None:
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    try:
        validate(parameters, schema, raise_on_error=True, ignore_required=True)
    except ValidationError as exc:
        return f"{where}: {exc}"
    except jsonschema.SchemaError as exc:  # pragma: no cover - a broken flow signature
        return f"{where}: schema error {exc.message}"
    return None


def fires_outside_windows(
    cron: str,
    config: FabulawsConfig,
    environment: str,
    deployment: str,
    count: int = 10,
    now: datetime | None = None,
) -> list[datetime]:
    """The next ``count`` fire times of ``cron`` that fall outside every window of the environment."""
    from prefect.server.schemas.schedules import CronSchedule

    env = resolve_environment(config, environment, deployment)
    if not env.windows:
        return []
    schedule = CronSchedule(cron=cron, timezone=env.time_zone)
    moments = sorted(schedule._get_dates_generator(n=count, start=now or datetime.now(UTC)))
    return [m for m in moments if env.window_at(m + timedelta(seconds=1)) is None]


def plan_deployments(
    config: FabulawsConfig,
    flows: dict[str, str],
    config_path: str | Path,
    source_dir: str | Path | None = None,
    only: list[str] | None = None,
) -> DeploymentPlan:
    """Every registered flow x every deployment/environment of the config.

    Args:
        config: The loaded config.
        flows: ``fabflows.registry.FLOWS`` (flow name -> module:function).
        config_path: Path of the config file as the workers see it (FABFLOWS_CONFIG).
        source_dir: Code directory on the workers. Default: ``fabflows.deploy.source_dir`` or this checkout.
        only: Restrict to these flow names.
    Raises:
        DeployConfigError: schedules name unknown flows or give parameters the flow refuses.
    """
    settings = config.fabflows.deploy
    source = Path(source_dir or settings.source_dir or REPO).expanduser().resolve()
    problems: list[str] = []
    warnings: list[str] = []
    wanted = dict(flows)
    if only:
        unknown = [f for f in only if f not in flows]
        if unknown:
            problems.append(f"unknown flow(s) {unknown}; registered: {sorted(flows)}")
        wanted = {k: v for k, v in flows.items() if k in only}
    for env_name, env_settings in config.fabflows.environments.items():
        for flow_name in env_settings.schedules:
            if flow_name not in flows:
                problems.append(
                    f"fabflows.environments.{env_name}.schedules.{flow_name}: no such flow; "
                    f"registered: {', '.join(sorted(flows))}"
                )
    specs: list[DeploymentSpec] = []
    job_env_base = {
        "FABFLOWS_CONFIG": str(Path(config_path).expanduser().resolve()),
        "PREFECT_LOGGING_SETTINGS_PATH": str(source / LOGGING_CONFIG),
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(settings.heartbeat_seconds),
        "PYTHONPATH": str(source),
    }
    for flow_name, import_path in sorted(wanted.items()):
        flow = load_flow(import_path)
        if flow.name != flow_name:
            problems.append(
                f"fabflows/registry.py: {flow_name!r} points at a flow named {flow.name!r}"
            )
            continue
        entrypoint = entrypoint_of(import_path, source)
        description = inspect.getdoc(flow.fn) or flow_name
        for deployment in config.deployments:
            for environment in config.environments:
                schema = form_schema(flow, deployment, environment)
                defaults = {
                    k: v
                    for k, v in (("environment", environment), ("deployment", deployment))
                    if k in schema["properties"]
                }
                schedules = []
                env_settings = config.fabflows.environments.get(environment)
                spec_sched = env_settings.schedules.get(flow_name) if env_settings else None
                if spec_sched is None and flow_name == WATCHDOG_FLOW:
                    env_settings = env_settings or EnvironmentSettings()
                    if env_settings.watchdog_cron:
                        spec_sched = ScheduleSpec(cron=env_settings.watchdog_cron)
                if spec_sched is not None:
                    where = f"fabflows.environments.{environment}.schedules.{flow_name}.parameters"
                    params = {**defaults, **spec_sched.parameters}
                    error = _validate_parameters(schema, params, where)
                    if error:
                        problems.append(error)
                    schedules.append(
                        ScheduleEntry(
                            cron=spec_sched.cron,
                            timezone=env_settings.time_zone,
                            parameters=spec_sched.parameters,
                            slug=slug(f"{flow_name}-{environment}-schedule"),
                        )
                    )
                    outside = (
                        []  # read-only: it needs no window
                        if flow_name == WATCHDOG_FLOW
                        else fires_outside_windows(spec_sched.cron, config, environment, deployment)
                    )
                    if outside:
                        warnings.append(
                            f"{flow_name}/{deployment}-{environment}: schedule {spec_sched.cron!r} "
                            f"({env_settings.time_zone}) fires outside the maintenance windows, e.g. "
                            f"{outside[0].strftime('%a %Y-%m-%d %H:%M %Z')}; flows that need a window "
                            "will refuse those runs"
                        )
                specs.append(
                    DeploymentSpec(
                        flow_name=flow_name,
                        import_path=import_path,
                        entrypoint=entrypoint,
                        name=f"{deployment}-{environment}",
                        deployment=deployment,
                        environment=environment,
                        description=description,
                        tags=[
                            DEPLOYMENT_TAG,
                            f"env:{deployment}/{environment}",
                            f"environment:{environment}",
                        ]
                        + (["production"] if environment in config.production_environments else []),
                        parameters=defaults,
                        parameter_schema=schema,
                        schedules=schedules,
                        job_variables={"env": dict(job_env_base), "working_dir": str(source)},
                        work_pool=settings.work_pool,
                    )
                )
    if problems:
        raise DeployConfigError(problems)
    return DeploymentPlan(
        work_pool=settings.work_pool,
        max_parallel_runs=settings.max_parallel_runs,
        deployments=specs,
        warnings=warnings,
    )
