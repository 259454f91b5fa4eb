"""Deployments generated from config + registry (pure: no server)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from config import load_config
from deployments.generate import DeployConfigError, fires_outside_windows, plan_deployments
from fabflows.registry import FLOWS
from fabflows.testing.configs import write_config

WINDOWS = [{"days": ["sat"], "start": "22:00", "end": "02:00"}]


def _config(tmp_path: Path, **environments):
    return load_config(write_config(tmp_path, fabflows={"environments": environments}))


def test_every_registered_flow_for_every_environment(tmp_path: Path) -> None:
    config = _config(tmp_path)
    plan = plan_deployments(config, FLOWS, tmp_path / "fabflows.yaml")
    names = {d.full_name for d in plan.deployments}
    assert len(names) == len(FLOWS) * len(config.deployments) * len(config.environments)
    assert "describe-environment/myproject-staging" in names
    spec = next(
        d for d in plan.deployments if d.full_name == "describe-environment/myproject-production"
    )
    props = spec.parameter_schema["properties"]
    assert props["environment"]["enum"] == ["production"]
    assert props["deployment"]["enum"] == ["myproject"]
    assert "config" not in props
    assert spec.parameter_schema["additionalProperties"] is False
    assert spec.parameters == {"environment": "production", "deployment": "myproject"}
    assert "production" in spec.tags and "env:myproject/production" in spec.tags
    assert spec.job_variables["env"]["FABFLOWS_CONFIG"].endswith("fabflows.yaml")
    assert spec.job_variables["env"]["PREFECT_LOGGING_SETTINGS_PATH"].endswith(
        "deployments/logging.yml"
    )
    assert spec.entrypoint == "flows/describe_environment.py:describe_environment"


def test_schedules_in_the_environment_time_zone(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        staging={
            "time_zone": "Europe/Amsterdam",
            "schedules": {"describe-environment": {"cron": "0 20 * * 1-5"}},
        },
    )
    plan = plan_deployments(config, FLOWS, "x.yaml", only=["describe-environment"])
    staging = next(d for d in plan.deployments if d.environment == "staging")
    assert [(s.cron, s.timezone) for s in staging.schedules] == [
        ("0 20 * * 1-5", "Europe/Amsterdam")
    ]
    assert all(not d.schedules for d in plan.deployments if d.environment != "staging")


BAD = [
    (
        "unknown flow",
        {"schedules": {"frobnicate": {"cron": "0 1 * * *"}}},
        "schedules.frobnicate: no such flow",
    ),
    (
        "unknown parameter",
        {
            "schedules": {
                "describe-environment": {"cron": "0 1 * * *", "parameters": {"dryrun": False}}
            }
        },
        "'dryrun' was unexpected",
    ),
    (
        "wrong environment",
        {
            "schedules": {
                "describe-environment": {
                    "cron": "0 1 * * *",
                    "parameters": {"environment": "production"},
                }
            }
        },
        "is not one of ['staging']",
    ),
]


@pytest.mark.parametrize(("what", "settings", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_schedules_fail_the_deploy_naming_the_key(
    tmp_path: Path, what, settings, message
) -> None:
    config = _config(tmp_path, staging=settings)
    with pytest.raises(DeployConfigError) as err:
        plan_deployments(config, FLOWS, "x.yaml")
    assert message in str(err.value)


def test_unknown_flow_filter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DeployConfigError, match="unknown flow"):
        plan_deployments(_config(tmp_path), FLOWS, "x.yaml", only=["nope"])


def test_schedule_outside_the_window_is_a_warning(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        production={"time_zone": "America/New_York", "windows": WINDOWS,
                    "schedules": {"describe-environment": {"cron": "0 12 * * 6"}}},
    )  # fmt: skip
    plan = plan_deployments(config, FLOWS, "x.yaml", only=["describe-environment"])
    assert any("fires outside the maintenance windows" in w for w in plan.warnings)
    now = datetime(2026, 11, 26, tzinfo=UTC)
    assert not fires_outside_windows("30 22 * * 6", config, "production", "myproject", now=now)
    assert fires_outside_windows("0 12 * * 6", config, "production", "myproject", now=now)
