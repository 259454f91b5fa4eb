"""Config loading: the FabulAWS sample loads unchanged; each kind of bad config names file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from config import ConfigError, load_config, resolve_environment
from fabflows.testing.configs import SAMPLE, write_config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fabulaws-config.sample.yaml"


def test_sample_loads_unchanged() -> None:
    assert FIXTURE.read_bytes() == SAMPLE.read_bytes()
    cfg = load_config(FIXTURE)
    assert cfg.project == "myproject"
    assert cfg.environments == ["staging", "production", "testing"]
    assert cfg.instance_types["production"]["db-primary"] == "m3.xlarge"
    assert cfg.auto_scaling_groups["myproject"]["staging"] == "myproject-staging-ag"
    # known quirks of the sample are kept and reported, not rejected
    warnings = "\n".join(cfg.warnings())
    assert "celery_workers.celery_application" in warnings
    assert "disable_known_hosts" in warnings
    assert "secure_root" in warnings
    assert cfg.unknown_keys() == []


def test_resolved_names_follow_fabulaws() -> None:
    env = resolve_environment(load_config(FIXTURE), "staging")
    assert env.static_bucket == "myproject-staging-static-files"
    assert env.database_name == "myproject_staging"
    assert env.load_balancers == ["myproject-staging-lb"]
    assert env.auto_scaling_group == "myproject-staging-ag"
    assert not env.is_production and not env.protected
    prod = resolve_environment(load_config(FIXTURE), "production")
    assert prod.is_production and prod.protected


def test_legacy_role_names_are_mapped(tmp_path: Path) -> None:
    data = yaml.safe_load(SAMPLE.read_text())
    data["valid_roles"] = ["cache", "db-master", "db-slave", "web", "worker"]
    data["instance_types"]["staging"]["db-master"] = data["instance_types"]["staging"].pop(
        "db-primary"
    )
    path = tmp_path / "legacy.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    assert "db-primary" in cfg.valid_roles and "db-master" not in cfg.valid_roles
    assert cfg.instance_types["staging"]["db-primary"] == "m1.small"


def test_unknown_top_level_key_is_kept_and_reported(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, shiny_new_option=3))
    assert cfg.unknown_keys() == ["shiny_new_option"]
    assert any("shiny_new_option" in w for w in cfg.warnings())


def test_overlay_keeps_original_file_and_adds_windows(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        fabflows={
            "environments": {
                "staging": {
                    "time_zone": "America/New_York",
                    "windows": [{"days": ["mon", "tue"], "start": "20:00", "end": "02:00"}],
                }
            }
        },
    )
    env = resolve_environment(load_config(path), "staging")
    assert env.time_zone == "America/New_York"
    assert env.windows[0].days == ["mon", "tue"]


BAD = [
    # (description, overrides, expected key path, expected words)
    ("null project", {"project": None}, "project", "valid string"),
    ("bad region", {"region": "mars"}, "region", "pattern"),
    ("wrong type", {"pgbouncer_port": "five"}, "pgbouncer_port", "integer"),
    ("port out of range", {"pgbouncer_port": 70000}, "pgbouncer_port", "65535"),
    ("unknown role", {"valid_roles": ["web", "mainframe"]}, "valid_roles", "mainframe"),
    ("env not listed", {"production_environments": ["prod"]}, "production_environments", "'prod'"),
    (
        "instance type for unknown env",
        {"instance_types": {"qa": {"web": "t3.small"}}},
        "instance_types.qa",
        "not in environments",
    ),
    (
        "asg for unknown deployment",
        {"auto_scaling_groups": {"other": {"staging": "x"}}},
        "auto_scaling_groups.other",
        "not in deployments",
    ),
    ("bad static_hosting", {"static_hosting": "cdn"}, "static_hosting", "local"),
    (
        "typo in fabflows section",
        {"fabflows": {"awss": {}}},
        "fabflows.awss",
        "unknown key",
    ),
    (
        "bad time zone",
        {"fabflows": {"environments": {"staging": {"time_zone": "Mars/Olympus"}}}},
        "fabflows.environments.staging.time_zone",
        "IANA",
    ),
    (
        "empty window",
        {
            "fabflows": {
                "environments": {"staging": {"windows": [{"start": "20:00", "end": "20:00"}]}}
            }
        },
        "fabflows.environments.staging.windows[0]",
        "empty",
    ),
    (
        "bad weekday",
        {
            "fabflows": {
                "environments": {
                    "staging": {"windows": [{"days": ["funday"], "start": "1:00", "end": "2:00"}]}
                }
            }
        },
        "fabflows.environments.staging.windows[0].days[0]",
        "mon",
    ),
    (
        "window for unknown env",
        {"fabflows": {"environments": {"qa": {}}}},
        "fabflows.environments.qa",
        "not in environments",
    ),
    (
        "bad endpoint",
        {"fabflows": {"aws": {"endpoint_url": "localhost:5000"}}},
        "fabflows.aws.endpoint_url",
        "pattern",
    ),
    (
        "bad cron",
        {
            "fabflows": {
                "environments": {
                    "staging": {"schedules": {"stop-environment": {"cron": "nightly"}}}
                }
            }
        },
        "fabflows.environments.staging.schedules.stop-environment.cron",
        "cron",
    ),
]


@pytest.mark.parametrize(("what", "overrides", "key", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_file_and_key(
    tmp_path: Path, what: str, overrides: dict, key: str, words: str
) -> None:
    fabflows = overrides.pop("fabflows", None)
    path = write_config(tmp_path, fabflows=fabflows, **overrides)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert any(p.key == key for p in problems), [str(p) for p in problems]
    problem = next(p for p in problems if p.key == key)
    assert words in problem.message, str(problem)
    assert problem.file.endswith((".yaml", ".yml")), str(problem)
    assert key in str(info.value)


def test_secret_values_never_echoed(tmp_path: Path) -> None:
    path = write_config(tmp_path, fabflows={"aws": {"secret_access_key": {"nested": "hunter2"}}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "hunter2" not in str(info.value)
    assert "fabflows.aws.secret_access_key" in str(info.value)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("", "empty"),
        ("- a\n- b\n", "mapping"),
        ("project: [unclosed\n", "line 2, column 1: not valid YAML"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=words):
        load_config(path)


def test_missing_required_key(tmp_path: Path) -> None:
    data = yaml.safe_load(SAMPLE.read_text())
    del data["deploy_user"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="c.yaml: deploy_user: required key is missing"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_environment_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown environment 'prod'; known: staging, production"):
        resolve_environment(load_config(FIXTURE), "prod")


@pytest.mark.parametrize(
    ("key", "warning"),
    [
        ("instance_typs", "unknown key instance_typs: did you mean instance_types? (kept"),
        ("autoscaling_groups", "did you mean auto_scaling_groups?"),
        ("shiny_new_option", "unknown key shiny_new_option (kept and ignored)"),
    ],
)
def test_a_misspelt_key_gets_the_known_key_it_resembles(tmp_path: Path, key, warning) -> None:
    cfg = load_config(write_config(tmp_path, **{key: {}}))
    assert any(warning in w for w in cfg.warnings()), cfg.warnings()


def test_environments_without_instance_types_or_group_are_warned_about(tmp_path: Path) -> None:
    data = yaml.safe_load(SAMPLE.read_text())
    data["instance_types"].pop("testing")
    data["auto_scaling_groups"]["myproject"].pop("production")
    path = tmp_path / "fabulaws-config.yaml"
    path.write_text(yaml.safe_dump(data))
    warnings = [w for w in load_config(path).warnings() if "missing" in w]
    assert warnings == [
        "auto_scaling_groups.myproject.production: missing (no web group to manage)",
        "instance_types.testing: missing (no instance type for any role)",
    ]
    assert not [w for w in load_config(SAMPLE).warnings() if "missing" in w]


def test_no_config_names_the_lookup(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FABFLOWS_CONFIG", raising=False)
    with pytest.raises(ConfigError) as err:
        load_config()
    assert "$FABFLOWS_CONFIG" in str(err.value)
    assert "./fabflows.yaml, ./fabulaws-config.yml, ./fabulaws-config.yaml" in str(err.value)
