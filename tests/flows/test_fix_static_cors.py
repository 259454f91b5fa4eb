"""fix-static-cors: the plan table-tested without peers; the flow against moto under Prefect."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import load_config, resolve_environment
from config.loader import ConfigError
from config.models import DEFAULT_STATIC_CORS_RULES, CorsRule
from fabflows.errors import BadInput
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.configs import moto_section, write_config
from flows.fix_static_cors import (
    check_requests,
    fix_static_cors,
    plan_fix_static_cors,
    site_origins,
)
from tasks.aws.s3 import cors_rule_to_aws

BUCKET = "myproject-staging-static-files"
SITE = "https://dualstack.myproject-staging-1-12345.us-east-1.elb.amazonaws.com"
DOC = list(DEFAULT_STATIC_CORS_RULES)
CHECKS = check_requests([SITE], ["Authorization"])
OTHER = CorsRule(allowed_origins=["https://shop.example"], allowed_methods=["PUT"])


def _rule(**kw) -> CorsRule:
    return CorsRule(**({"allowed_origins": ["*"], "allowed_methods": ["GET"]} | kw))


PLANS = [
    # name, current, wanted, changed, replaces, problems
    ("no configuration yet", None, DOC, True, False, []),
    ("already equal", DOC, DOC, False, False, []),
    (
        "equal up to header case",
        [_rule(allowed_headers=["authorization"], max_age_seconds=3000)],
        DOC,
        False,
        False,
        [],
    ),
    ("someone else's rules are replaced", [OTHER], DOC, True, True, []),
    (
        "max age differs",
        [_rule(allowed_headers=["Authorization"], max_age_seconds=60)],
        DOC,
        True,
        True,
        [],
    ),
    (
        "wanted rules refuse the site",
        None,
        [_rule(allowed_origins=["https://other.example"])],
        True,
        False,
        ["would refuse the site"],
    ),
    ("wanted rules lack the header", None, [_rule()], True, False, ["would refuse the site"]),
]


@pytest.mark.parametrize(
    ("current", "wanted", "changed", "replaces", "problems"),
    [p[1:] for p in PLANS],
    ids=[p[0] for p in PLANS],
)
def test_plan(current, wanted, changed, replaces, problems) -> None:
    plan = plan_fix_static_cors(BUCKET, current, wanted, CHECKS)
    assert plan.changed is changed
    assert plan.replaces_rules is replaces
    assert bool(plan.diff) is changed
    assert len(plan.problems) == len(problems)
    for want, got in zip(problems, plan.problems, strict=True):
        assert want in got


def test_plan_shows_now_and_after() -> None:
    plan = plan_fix_static_cors(BUCKET, [OTHER], DOC, CHECKS)
    assert [d.allowed for d in plan.checks_now] == [False]
    assert [d.allowed for d in plan.checks_after] == [True]
    assert any(line.startswith("-  AllowedOrigins: https://shop.example") for line in plan.diff)
    assert any(line.startswith("+  AllowedOrigins: *") for line in plan.diff)


def test_site_origins(tmp_path: Path) -> None:
    cfg = load_config(
        write_config(
            tmp_path,
            fabflows={
                "environments": {
                    "staging": {
                        "site_url": "https://www.example.com/app/",
                        "static_cors_check_origins": ["https://admin.example.com"],
                    }
                }
            },
            site_domains_map={"staging": ["www.example.com", ".example.com", "b.example.com"]},
        )
    )
    env = resolve_environment(cfg, "staging")
    assert site_origins(cfg, env) == [
        "https://www.example.com",
        "https://b.example.com",
        "https://admin.example.com",
    ]


@pytest.mark.parametrize(
    ("section", "key"),
    [
        (
            {"static_cors_rules": [{"allowed_origins": ["*"], "allowed_methods": ["GOT"]}]},
            "static_cors_rules[0].allowed_methods[0]",
        ),
        ({"static_cors_rules": [{"allowed_origins": ["*"]}]}, "allowed_methods"),
        (
            {
                "static_cors_rules": [
                    {"allowed_origins": ["*"], "allowed_methods": ["GET"], "max_age": 5}
                ]
            },
            "max_age",
        ),
        ({"static_cors_check_origins": ["example.com"]}, "static_cors_check_origins"),
    ],
)
def test_malformed_rules_in_config_are_refused_at_load(tmp_path: Path, section, key) -> None:
    path = write_config(tmp_path, fabflows={"environments": {"staging": section}})
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert key in str(exc.value)


# --------------------------------------------------------------------------- the flow, for real


def _section(aws, tmp_path: Path, **environments) -> dict:
    """moto, and a state_dir of the test's own (the environment lock is not shared with others)."""
    return moto_section(aws.endpoint, **environments) | {"state_dir": str(tmp_path / "state")}


def _live(aws):
    s3 = boto_client(aws, "s3")
    try:
        return s3.get_bucket_cors(Bucket=BUCKET)["CORSRules"]
    except s3.exceptions.ClientError:
        return None


@pytest.fixture
def bucket(aws):
    boto_client(aws, "s3").create_bucket(Bucket=BUCKET)
    boto_client(aws, "s3").put_bucket_cors(
        Bucket=BUCKET, CORSConfiguration={"CORSRules": [cors_rule_to_aws(OTHER)]}
    )
    return BUCKET


@pytest.mark.flow
def test_dry_run_apply_and_apply_again(prefect_server, aws, bucket, tmp_path: Path) -> None:
    config = str(write_config(tmp_path, fabflows=_section(aws, tmp_path)))
    before = _live(aws)
    dry = fix_static_cors("staging", config=config)
    assert dry.dry_run and dry.changed and "would apply 2 step(s)" in dry.outcome
    assert "-  AllowedOrigins: https://shop.example" in dry.plan_text
    assert _live(aws) == before  # the dry run wrote nothing

    applied = fix_static_cors("staging", config=config, dry_run=False)
    assert [(s.name, s.state) for s in applied.steps] == [
        ("put-bucket-cors", "done"),
        ("check-cors", "done"),
    ]
    assert _live(aws) == [cors_rule_to_aws(r) for r in DOC]
    assert applied.details["Verification"].startswith("allowed: ")
    assert " 200 " in applied.details["Preflight"]
    # the journal kept the previous rules for the undo (someone else's rule, as it was)
    from config import load_config
    from fabflows.runtime.journal import Journal

    (entry,) = Journal.for_environment("myproject/staging", load_config(config)).entries()
    previous = entry.step("put-bucket-cors").data["previous_rules"]
    assert [CorsRule.model_validate(r) for r in previous] == [OTHER]

    again = fix_static_cors("staging", config=config, dry_run=False)
    assert not again.changed and again.outcome == "nothing to change"


@pytest.mark.flow
def test_failed_verification_puts_the_previous_rules_back(
    prefect_server, aws, bucket, tmp_path: Path
) -> None:
    config = str(write_config(tmp_path, fabflows=_section(aws, tmp_path)))
    before = _live(aws)
    # the real preflight is unsigned (no SigV4 scope): fail it with a 503
    aws.queue_fault("", "*", code="ServiceUnavailable", status=503)
    with pytest.raises(RuntimeError, match="refused a real preflight"):
        fix_static_cors("staging", config=config, dry_run=False)
    assert _live(aws) == before


@pytest.mark.flow
def test_rules_refusing_the_site_are_refused_before_any_change(
    prefect_server, aws, bucket, tmp_path: Path
) -> None:
    section = _section(
        aws,
        tmp_path,
        staging={
            "static_cors_rules": [
                {"allowed_origins": ["https://x.example"], "allowed_methods": ["GET"]}
            ]
        },
    )
    config = str(write_config(tmp_path, fabflows=section))
    before = _live(aws)
    with pytest.raises(BadInput, match="would refuse the site"):
        fix_static_cors("staging", config=config, dry_run=False)
    assert _live(aws) == before


@pytest.mark.flow
def test_sigkill_after_the_put_then_recover_puts_the_rules_back(
    prefect_server, aws, bucket, tmp_path: Path
) -> None:
    """Kill point: the rules are put, the check has not run; recover puts the previous ones back."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    from fabflows.testing import faults
    from flows.recover_environment import recover_environment

    config = str(write_config(tmp_path, fabflows=_section(aws, tmp_path)))
    before = _live(aws)
    marker = tmp_path / "paused"
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        FABFLOWS_TEST_PAUSE_AT="fix-static-cors/check-cors",
        FABFLOWS_TEST_PAUSE_MARKER=str(marker),
    )
    argv = [sys.executable, "-c", faults.CLI_CODE, "run", "fix-static-cors", "-e", "staging"]
    proc = subprocess.Popen(
        [*argv, "-c", config, "--apply"],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(proc.stderr.read().decode()[-3000:])
            assert time.monotonic() < deadline, "never reached check-cors"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group, started above
        proc.wait()
    assert _live(aws) == [cors_rule_to_aws(r) for r in DOC]  # what the dead run left
    report = recover_environment(environment="staging", config=config, dry_run=False)
    assert not report.problems, report.render_text()
    assert _live(aws) == before
