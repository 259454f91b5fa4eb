"""S3 CORS: the evaluator table-tested against S3's documented matching, config validation of rules,
and the write tasks against a moto server (amazon.aws rhythm, compensation, a real preflight)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.logging import disable_run_logger
from pydantic import ValidationError

from config import load_config
from config.models import DEFAULT_STATIC_CORS_RULES, CorsRule
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.configs import moto_section, write_config
from tasks.aws.s3 import (
    BucketMissing,
    CorsRequest,
    bucket_url,
    cors_rule_from_aws,
    cors_rule_to_aws,
    evaluate_cors,
    get_bucket_cors,
    preflight_bucket_cors,
    put_bucket_cors,
    restore_bucket_cors,
    rules_equal,
    wildcard_match,
)
from tasks.aws.session import make_credentials

BUCKET = "myproject-staging-static-files"
DOC_RULE = list(DEFAULT_STATIC_CORS_RULES)


def rule(**kw) -> CorsRule:
    return CorsRule(**({"allowed_origins": ["*"], "allowed_methods": ["GET"]} | kw))


SITE = "https://www.example.com"
SITE_GET = CorsRequest(origin=SITE, method="GET", headers=["Authorization"])

# (name, rules, request, allowed, rule_index, headers expected in the answer)
CASES = [
    ("no configuration", None, SITE_GET, False, None, {}),
    (
        "doc rule: any origin, GET with Authorization",
        DOC_RULE,
        SITE_GET,
        True,
        0,
        {
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Methods": "GET",
            "Access-Control-Allow-Headers": "authorization",
            "Access-Control-Max-Age": "3000",
        },
    ),
    (
        "header names are case-insensitive",
        DOC_RULE,
        CorsRequest(origin=SITE, method="GET", headers=["AUTHORIZATION"]),
        True,
        0,
        {},
    ),
    (
        "method not allowed",
        DOC_RULE,
        CorsRequest(origin=SITE, method="PUT"),
        False,
        None,
        {},
    ),
    (
        "header not allowed",
        DOC_RULE,
        CorsRequest(origin=SITE, method="GET", headers=["X-Custom"]),
        False,
        None,
        {},
    ),
    (
        "actual request ignores request headers and exposes headers",
        [rule(expose_headers=["ETag"])],
        CorsRequest(origin=SITE, method="GET", headers=["X-Custom"], preflight=False),
        True,
        0,
        {"Access-Control-Expose-Headers": "ETag"},
    ),
    (
        "wildcard subdomain origin; origin echoed with credentials",
        [rule(allowed_origins=["https://*.example.com"])],
        SITE_GET.model_copy(update={"headers": []}),
        True,
        0,
        {"Access-Control-Allow-Origin": SITE, "Access-Control-Allow-Credentials": "true"},
    ),
    (
        "wildcard does not cross the scheme",
        [rule(allowed_origins=["https://*.example.com"])],
        CorsRequest(origin="http://www.example.com", method="GET"),
        False,
        None,
        {},
    ),
    (
        "origins are case-sensitive",
        [rule(allowed_origins=["https://WWW.example.com"])],
        CorsRequest(origin=SITE, method="GET"),
        False,
        None,
        {},
    ),
    (
        # moto refuses this one (it checks every rule and fails on the first mismatch): S3 uses the
        # FIRST matching rule, so the second rule answers.
        "first matching rule wins, later rules still considered",
        [
            rule(allowed_origins=["https://other.example"], allowed_methods=["PUT"]),
            rule(allowed_origins=[SITE], allowed_methods=["GET", "HEAD"], max_age_seconds=60),
        ],
        CorsRequest(origin=SITE, method="GET"),
        True,
        1,
        {"Access-Control-Allow-Methods": "GET, HEAD", "Access-Control-Max-Age": "60"},
    ),
    (
        "earlier matching rule shadows a later one",
        [rule(max_age_seconds=10), rule(max_age_seconds=99)],
        CorsRequest(origin=SITE, method="GET"),
        True,
        0,
        {"Access-Control-Max-Age": "10"},
    ),
    (
        "header wildcard",
        [rule(allowed_headers=["x-amz-*"])],
        CorsRequest(origin=SITE, method="GET", headers=["X-Amz-Date", "x-amz-content-sha256"]),
        True,
        0,
        {},
    ),
    (
        "one of several headers refused refuses the rule",
        [rule(allowed_headers=["x-amz-*"])],
        CorsRequest(origin=SITE, method="GET", headers=["X-Amz-Date", "Authorization"]),
        False,
        None,
        {},
    ),
]


@pytest.mark.parametrize(
    ("rules", "request_", "allowed", "index", "headers"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_evaluate_cors(rules, request_, allowed, index, headers) -> None:
    decision = evaluate_cors(rules, request_)
    assert decision.allowed is allowed, decision.reason
    assert decision.rule_index == index
    if request_.preflight:
        assert decision.status == (200 if allowed else 403)
    for name, value in headers.items():
        assert decision.response_headers.get(name) == value


def test_refusal_names_why_each_rule_missed() -> None:
    d = evaluate_cors(
        [rule(allowed_origins=["https://a.example"]), rule(allowed_methods=["PUT"])],
        CorsRequest(origin=SITE, method="GET"),
    )
    assert "rule 1: origin not allowed" in d.reason and "rule 2: method GET" in d.reason


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("*", "", True),
        ("a*", "a", True),
        ("*b", "ab", True),
        ("ab*ba", "aba", False),  # prefix and suffix may not overlap
        ("ab*ba", "abba", True),
    ],
)
def test_wildcard_match(pattern: str, value: str, expected: bool) -> None:
    assert wildcard_match(pattern, value, case_sensitive=True) is expected


BAD_RULES = [
    ({"allowed_origins": ["*"], "allowed_methods": ["FETCH"]}, "allowed_methods"),
    ({"allowed_origins": [], "allowed_methods": ["GET"]}, "allowed_origins"),
    ({"allowed_origins": ["*"], "allowed_methods": []}, "allowed_methods"),
    ({"allowed_origins": ["https://*.*.example.com"], "allowed_methods": ["GET"]}, "one * wild"),
    ({"allowed_origins": ["www.example.com"], "allowed_methods": ["GET"]}, "scheme://host"),
    ({"allowed_origins": ["https://example.com/path"], "allowed_methods": ["GET"]}, "no path"),
    (
        {"allowed_origins": ["*"], "allowed_methods": ["GET"], "allowed_headers": ["a b"]},
        "header",
    ),
    (
        {"allowed_origins": ["*"], "allowed_methods": ["GET"], "expose_headers": ["x-*"]},
        "no wildcards",
    ),
    ({"allowed_origins": ["*"], "allowed_methods": ["GET"], "max_age_seconds": -1}, "max_age"),
    ({"allowed_origins": ["*"], "allowed_methods": ["GET"], "origins": ["*"]}, "origins"),
]


@pytest.mark.parametrize(("data", "message"), BAD_RULES, ids=[m for _, m in BAD_RULES])
def test_malformed_rules_are_refused(data: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("*", r"\*")):
        CorsRule(**data)


def test_aws_round_trip_and_equality() -> None:
    r = rule(id="static", allowed_headers=["Authorization"], max_age_seconds=3000)
    assert cors_rule_from_aws(cors_rule_to_aws(r)) == r
    # list order inside a rule and header case do not matter; rule order does
    same = rule(allowed_headers=["authorization"], max_age_seconds=3000)
    assert rules_equal([same], [rule(allowed_headers=["Authorization"], max_age_seconds=3000)])
    assert not rules_equal([rule(), same], [same, rule()])
    assert not rules_equal(None, [rule()])
    # a console rule fabflows would not accept is still read (and replaced)
    odd = cors_rule_from_aws({"AllowedOrigins": ["example.com"], "AllowedMethods": ["GET"]})
    assert odd.allowed_origins == ["example.com"]


# --------------------------------------------------------------------------- against moto


@pytest.fixture
def creds(tmp_path: Path, aws):
    cfg = load_config(write_config(tmp_path, fabflows=moto_section(aws.endpoint)))
    boto_client(aws, "s3").create_bucket(Bucket=BUCKET)
    return make_credentials(cfg.fabflows.aws, cfg.region)


def _live(aws) -> list | None:
    s3 = boto_client(aws, "s3")
    try:
        return s3.get_bucket_cors(Bucket=BUCKET)["CORSRules"]
    except s3.exceptions.ClientError:
        return None


def test_put_rhythm_and_compensation(creds, aws) -> None:
    other = [rule(allowed_origins=["https://shop.example"], allowed_methods=["GET", "PUT"])]
    boto_client(aws, "s3").put_bucket_cors(
        Bucket=BUCKET, CORSConfiguration={"CORSRules": [cors_rule_to_aws(other[0])]}
    )
    before = _live(aws)
    with disable_run_logger():
        dry = put_bucket_cors.fn(creds, BUCKET, DOC_RULE, dry_run=True)
        assert dry.changed and dry.summary.startswith("Would put")
        assert _live(aws) == before
        real = put_bucket_cors.fn(creds, BUCKET, DOC_RULE, dry_run=False)
        assert real.changed and real.previous_rules == other
        assert get_bucket_cors.fn(creds, BUCKET) == DOC_RULE
        assert not put_bucket_cors.fn(creds, BUCKET, DOC_RULE, dry_run=True).changed
        again = put_bucket_cors.fn(creds, BUCKET, DOC_RULE, dry_run=False)
        assert not again.changed and "nothing written" in again.summary

        # compensation: back to exactly what was there
        assert restore_bucket_cors.fn(creds, BUCKET, real.previous_rules, dry_run=True).changed
        assert get_bucket_cors.fn(creds, BUCKET) == DOC_RULE
        assert restore_bucket_cors.fn(creds, BUCKET, real.previous_rules, dry_run=False).changed
        assert _live(aws) == before
        assert not restore_bucket_cors.fn(creds, BUCKET, real.previous_rules, dry_run=False).changed


def test_restore_without_previous_deletes_the_configuration(creds, aws) -> None:
    with disable_run_logger():
        real = put_bucket_cors.fn(creds, BUCKET, DOC_RULE, dry_run=False)
        assert real.previous_rules is None
        restore_bucket_cors.fn(creds, BUCKET, None, dry_run=False)
        assert get_bucket_cors.fn(creds, BUCKET) is None
        assert not restore_bucket_cors.fn(creds, BUCKET, None, dry_run=False).changed


def test_missing_bucket_is_named(creds) -> None:
    with disable_run_logger(), pytest.raises(BucketMissing, match="no-such-bucket"):
        get_bucket_cors.fn(creds, "no-such-bucket")


def test_real_preflight_agrees_with_the_evaluator_in_the_simple_case(creds, aws) -> None:
    with disable_run_logger():
        refused = preflight_bucket_cors.fn(creds, BUCKET, SITE_GET)
        put_bucket_cors.fn(creds, BUCKET, DOC_RULE, dry_run=False)
        allowed = preflight_bucket_cors.fn(creds, BUCKET, SITE_GET)
        wrong_origin_rules = [rule(allowed_origins=["https://elsewhere.example"])]
        put_bucket_cors.fn(creds, BUCKET, wrong_origin_rules, dry_run=False)
        wrong = preflight_bucket_cors.fn(creds, BUCKET, SITE_GET.model_copy(update={"headers": []}))
    assert bucket_url(creds, BUCKET) == f"{aws.endpoint}/{BUCKET}/"
    assert allowed.allowed and evaluate_cors(DOC_RULE, SITE_GET).allowed
    assert allowed.allow_methods == "GET"
    assert not wrong.allowed and wrong.status == 403
    # moto answers 200 without Allow-Origin when there is no configuration (S3: 403); both refuse
    assert not refused.allowed


def test_bucket_url_on_aws() -> None:
    from prefect_aws import AwsCredentials

    assert (
        bucket_url(AwsCredentials(region_name="eu-west-1"), "b-static")
        == "https://b-static.s3.eu-west-1.amazonaws.com/"
    )
