"""S3: the static bucket's CORS configuration, and a pure evaluator of S3's CORS rule matching.

- :func:`get_bucket_cors` (read) returns the bucket's rules, or ``None`` when it has none.
- :func:`put_bucket_cors` (write) puts rules unless they already equal what is there; its result
  records the previous rules, which :func:`restore_bucket_cors` (the compensation) puts back, or
  deletes the configuration if there was none.
- :func:`evaluate_cors` (pure) answers a request as S3 does: the *first* rule whose origin, method
  and (for a preflight) every requested header match is used; no match is a 403 for a preflight and
  a plain answer without CORS headers for an actual request. moto's own preflight handling does not
  follow this (it checks every rule and fails on the first mismatch, and lets any method through),
  so verification runs this evaluator on what
  GetBucketCors returns, plus one real preflight for the simple case.
- :func:`preflight_bucket_cors` sends that real ``OPTIONS`` request to the bucket's URL.

Matching rules implemented (from the PutBucketCors documentation):

- an ``AllowedOrigin`` may hold one ``*`` wildcard, which matches any run of characters; origins are
  compared case-sensitively (browsers send them lower-case);
- the method (``Access-Control-Request-Method`` for a preflight) must be one of ``AllowedMethods``;
- for a preflight, every header named in ``Access-Control-Request-Headers`` must match an
  ``AllowedHeader`` (case-insensitively; one ``*`` wildcard each);
- the answer to a match: ``Access-Control-Allow-Origin`` is ``*`` when the matching origin is ``*``
  and the request's origin otherwise (then with ``Access-Control-Allow-Credentials: true``), the
  rule's methods, the requested headers, ``Access-Control-Max-Age`` and (actual requests)
  ``Access-Control-Expose-Headers``.
"""

from __future__ import annotations

from typing import Any

import requests
from botocore.exceptions import ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict, Field

from config.models import CorsRule
from tasks.aws.session import aws_client
from tasks.plan import StepResult

NO_CORS_CODES = ("NoSuchCORSConfiguration",)


class BucketMissing(RuntimeError):
    """The bucket does not exist (or this account cannot see it)."""


# --------------------------------------------------------------------------- conversions


def cors_rule_to_aws(rule: CorsRule) -> dict[str, Any]:
    """The PutBucketCors form of a rule (only the keys that are set)."""
    out: dict[str, Any] = {
        "AllowedOrigins": list(rule.allowed_origins),
        "AllowedMethods": list(rule.allowed_methods),
    }
    if rule.id is not None:
        out["ID"] = rule.id
    if rule.allowed_headers:
        out["AllowedHeaders"] = list(rule.allowed_headers)
    if rule.expose_headers:
        out["ExposeHeaders"] = list(rule.expose_headers)
    if rule.max_age_seconds is not None:
        out["MaxAgeSeconds"] = rule.max_age_seconds
    return out


def cors_rule_from_aws(data: dict[str, Any]) -> CorsRule:
    """A rule as GetBucketCors returns it, as a :class:`CorsRule`.

    Rules someone clicked into the console may not pass fabflows' stricter origin check; those are
    kept as they are (``model_construct``) so the plan can show and replace them.
    """
    values = dict(
        id=data.get("ID"),
        allowed_origins=list(data.get("AllowedOrigins", [])),
        allowed_methods=list(data.get("AllowedMethods", [])),
        allowed_headers=list(data.get("AllowedHeaders", [])),
        expose_headers=list(data.get("ExposeHeaders", [])),
        max_age_seconds=data.get("MaxAgeSeconds"),
    )
    try:
        return CorsRule(**values)
    except ValueError:
        return CorsRule.model_construct(**values)


def canonical_rule(rule: CorsRule, with_id: bool = True) -> tuple[Any, ...]:
    """What matters for matching: list order inside a rule and header case do not."""
    return (
        rule.id if with_id else None,
        tuple(sorted(set(rule.allowed_origins))),
        tuple(sorted(set(rule.allowed_methods))),
        tuple(sorted({h.lower() for h in rule.allowed_headers})),
        tuple(sorted({h.lower() for h in rule.expose_headers})),
        rule.max_age_seconds,
    )


def rules_equal(current: list[CorsRule] | None, wanted: list[CorsRule]) -> bool:
    """True when putting ``wanted`` would change nothing S3 does (rule order matters: first match)."""
    if not current:
        return not wanted
    if len(current) != len(wanted):
        return False
    return all(
        canonical_rule(c, with_id=w.id is not None) == canonical_rule(w)
        for c, w in zip(current, wanted, strict=True)
    )


def render_rules(rules: list[CorsRule] | None) -> list[str]:
    """One line per field, for diffs in plans (stable across runs)."""
    if not rules:
        return ["(no CORS configuration)"]
    lines = []
    for i, r in enumerate(rules, 1):
        lines.append(f"rule {i}" + (f" (id {r.id})" if r.id else ""))
        lines.append(f"  AllowedOrigins: {', '.join(r.allowed_origins)}")
        lines.append(f"  AllowedMethods: {', '.join(r.allowed_methods)}")
        if r.allowed_headers:
            lines.append(f"  AllowedHeaders: {', '.join(r.allowed_headers)}")
        if r.expose_headers:
            lines.append(f"  ExposeHeaders: {', '.join(r.expose_headers)}")
        if r.max_age_seconds is not None:
            lines.append(f"  MaxAgeSeconds: {r.max_age_seconds}")
    return lines


# --------------------------------------------------------------------------- the evaluator (pure)


class CorsRequest(BaseModel):
    """A browser's cross-origin request to the bucket, as S3 sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    origin: str = Field(description="The Origin header.")
    method: str = Field(
        description="The method (Access-Control-Request-Method for a preflight), e.g. GET."
    )
    headers: list[str] = Field(
        default_factory=list,
        description="Access-Control-Request-Headers of a preflight (ignored for actual requests).",
    )
    preflight: bool = Field(default=True, description="An OPTIONS preflight, else the request.")

    def describe(self) -> str:
        hdrs = f" with {', '.join(self.headers)}" if self.headers and self.preflight else ""
        kind = "preflight" if self.preflight else "request"
        return f"{kind} {self.method} from {self.origin}{hdrs}"


class CorsDecision(BaseModel):
    """S3's answer to a :class:`CorsRequest`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request: CorsRequest
    allowed: bool
    rule_index: int | None = Field(description="0-based index of the rule that matched.")
    status: int = Field(description="HTTP status of a preflight (200 or 403); 200 for requests.")
    reason: str
    response_headers: dict[str, str] = Field(default_factory=dict)


def wildcard_match(pattern: str, value: str, *, case_sensitive: bool) -> bool:
    """S3's single-``*`` wildcard: ``*`` matches any run of characters (also an empty one)."""
    if not case_sensitive:
        pattern, value = pattern.lower(), value.lower()
    if "*" not in pattern:
        return pattern == value
    prefix, _, suffix = pattern.partition("*")
    return (
        len(value) >= len(prefix) + len(suffix)
        and value.startswith(prefix)
        and value.endswith(suffix)
    )


def _origin_pattern(rule: CorsRule, origin: str) -> str | None:
    for pattern in rule.allowed_origins:
        if wildcard_match(pattern, origin, case_sensitive=True):
            return pattern
    return None


def _header_allowed(rule: CorsRule, header: str) -> bool:
    return any(wildcard_match(p, header, case_sensitive=False) for p in rule.allowed_headers)


def evaluate_cors(rules: list[CorsRule] | None, request: CorsRequest) -> CorsDecision:
    """Pure: how S3 answers ``request`` given the bucket's ``rules`` (first matching rule wins)."""
    if not rules:
        return CorsDecision(
            request=request,
            allowed=False,
            rule_index=None,
            status=403 if request.preflight else 200,
            reason="CORS is not enabled for this bucket (no configuration)",
        )
    headers = [h.strip() for h in request.headers if h.strip()]
    misses: list[str] = []
    for index, rule in enumerate(rules):
        pattern = _origin_pattern(rule, request.origin)
        if pattern is None:
            misses.append(f"rule {index + 1}: origin not allowed")
            continue
        if request.method not in rule.allowed_methods:
            misses.append(f"rule {index + 1}: method {request.method} not allowed")
            continue
        if request.preflight:
            refused = [h for h in headers if not _header_allowed(rule, h)]
            if refused:
                misses.append(f"rule {index + 1}: header(s) {', '.join(refused)} not allowed")
                continue
        out = {
            "Access-Control-Allow-Origin": "*" if pattern == "*" else request.origin,
            "Access-Control-Allow-Methods": ", ".join(rule.allowed_methods),
            "Vary": "Origin, Access-Control-Request-Headers, Access-Control-Request-Method",
        }
        if pattern != "*":
            out["Access-Control-Allow-Credentials"] = "true"
        if request.preflight:
            if headers:
                out["Access-Control-Allow-Headers"] = ", ".join(h.lower() for h in headers)
            if rule.max_age_seconds is not None:
                out["Access-Control-Max-Age"] = str(rule.max_age_seconds)
        elif rule.expose_headers:
            out["Access-Control-Expose-Headers"] = ", ".join(rule.expose_headers)
        return CorsDecision(
            request=request,
            allowed=True,
            rule_index=index,
            status=200,
            reason=f"rule {index + 1} matches",
            response_headers=out,
        )
    return CorsDecision(
        request=request,
        allowed=False,
        rule_index=None,
        status=403 if request.preflight else 200,
        reason="no rule matches (" + "; ".join(misses) + ")",
    )


# --------------------------------------------------------------------------- tasks


def _missing_bucket(exc: ClientError, bucket: str) -> BucketMissing | None:
    if exc.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404"):
        return BucketMissing(f"bucket {bucket} does not exist")
    return None


@task(
    cache_policy=NO_CACHE,
    name="get-bucket-cors",
    task_run_name="get-bucket-cors-{bucket}",
    retries=2,
    retry_delay_seconds=1,
)
def get_bucket_cors(creds: AwsCredentials, bucket: str) -> list[CorsRule] | None:
    """The bucket's CORS rules in order, or ``None`` when it has no CORS configuration.

    Raises:
        BucketMissing: the bucket does not exist.
    """
    s3 = aws_client(creds, "s3")
    try:
        rules = s3.get_bucket_cors(Bucket=bucket)["CORSRules"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in NO_CORS_CODES:
            return None
        missing = _missing_bucket(exc, bucket)
        if missing:
            raise missing from None
        raise
    return [cors_rule_from_aws(r) for r in rules]


class CorsResult(StepResult):
    """What put_bucket_cors / restore_bucket_cors did, with the configuration they found."""

    bucket: str
    previous_rules: list[CorsRule] | None = Field(
        description="The rules before the task (None: no CORS configuration): what to restore."
    )
    rules: list[CorsRule] | None = Field(description="The rules after the task (or would be).")


@task(
    cache_policy=NO_CACHE,
    name="put-bucket-cors",
    task_run_name="put-bucket-cors-{bucket}",
    retries=0,
)
def put_bucket_cors(
    creds: AwsCredentials, bucket: str, rules: list[CorsRule], *, dry_run: bool
) -> CorsResult:
    """Put ``rules`` on the bucket, replacing its CORS configuration, unless it already equals them.

    Idempotent: equal rules (same order; list order inside a rule and header case aside) are not
    written. The result's ``previous_rules`` is what :func:`restore_bucket_cors` puts back.
    """
    if not rules:
        raise ValueError("put_bucket_cors needs at least one rule (S3 refuses an empty list)")
    previous = get_bucket_cors.fn(creds, bucket)
    logger = get_run_logger()
    if rules_equal(previous, rules):
        summary = f"{bucket}: CORS rules already as wanted; nothing written"
        changed = False
    elif dry_run:
        summary = f"Would put {len(rules)} CORS rule(s) on {bucket} (now: {len(previous or [])})"
        changed = True
    else:
        aws_client(creds, "s3").put_bucket_cors(
            Bucket=bucket, CORSConfiguration={"CORSRules": [cors_rule_to_aws(r) for r in rules]}
        )
        summary = f"Put {len(rules)} CORS rule(s) on {bucket} (was: {len(previous or [])})"
        changed = True
    logger.info("%s", summary)
    return CorsResult(
        changed=changed,
        dry_run=dry_run,
        summary=summary,
        bucket=bucket,
        previous_rules=previous,
        rules=list(rules) if changed else previous,
    )


@task(
    cache_policy=NO_CACHE,
    name="restore-bucket-cors",
    task_run_name="restore-bucket-cors-{bucket}",
    retries=0,
)
def restore_bucket_cors(
    creds: AwsCredentials, bucket: str, previous_rules: list[CorsRule] | None, *, dry_run: bool
) -> CorsResult:
    """The compensation of :func:`put_bucket_cors`: put the recorded rules back, or delete the
    configuration when there was none. A no-op when the bucket already has them."""
    current = get_bucket_cors.fn(creds, bucket)
    if (not previous_rules and not current) or (
        previous_rules and rules_equal(current, previous_rules)
    ):
        summary = f"{bucket}: CORS configuration already as recorded; nothing to restore"
        changed = False
    elif dry_run:
        summary = f"Would restore {bucket}'s previous CORS configuration"
        changed = True
    else:
        s3 = aws_client(creds, "s3")
        if previous_rules:
            s3.put_bucket_cors(
                Bucket=bucket,
                CORSConfiguration={"CORSRules": [cors_rule_to_aws(r) for r in previous_rules]},
            )
            summary = f"Restored {len(previous_rules)} previous CORS rule(s) on {bucket}"
        else:
            s3.delete_bucket_cors(Bucket=bucket)
            summary = f"Deleted the CORS configuration of {bucket} (it had none before)"
        changed = True
    get_run_logger().info("%s", summary)
    return CorsResult(
        changed=changed,
        dry_run=dry_run,
        summary=summary,
        bucket=bucket,
        previous_rules=current,
        rules=previous_rules if changed else current,
    )


class PreflightResult(BaseModel):
    """A real preflight's answer, and whether it agrees with the evaluator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    request: CorsRequest
    status: int | None = Field(description="HTTP status (None: no answer).")
    allow_origin: str | None = Field(description="Access-Control-Allow-Origin, if any.")
    allow_methods: str | None = None
    error: str = ""

    @property
    def allowed(self) -> bool:
        """The server allowed the request: 200 with an Allow-Origin of the origin or ``*``."""
        return self.status == 200 and self.allow_origin in (self.request.origin, "*")


def bucket_url(creds: AwsCredentials, bucket: str, region: str | None = None) -> str:
    """The bucket's URL as browsers reach it: path style on a custom endpoint (moto), else the
    virtual-hosted style on the regional S3 endpoint."""
    params = creds.aws_client_parameters
    endpoint = params.endpoint_url if params else None
    if endpoint:
        return f"{str(endpoint).rstrip('/')}/{bucket}/"
    region = region or creds.region_name or "us-east-1"
    return f"https://{bucket}.s3.{region}.amazonaws.com/"


@task(
    cache_policy=NO_CACHE,
    name="preflight-bucket-cors",
    task_run_name="preflight-bucket-cors-{bucket}",
    retries=2,
    retry_delay_seconds=1,
)
def preflight_bucket_cors(
    creds: AwsCredentials, bucket: str, request: CorsRequest, timeout: float = 10.0
) -> PreflightResult:
    """Send a real ``OPTIONS`` preflight for ``request`` to the bucket (read-only)."""
    url = bucket_url(creds, bucket)
    headers = {"Origin": request.origin, "Access-Control-Request-Method": request.method}
    if request.headers:
        headers["Access-Control-Request-Headers"] = ", ".join(request.headers)
    try:
        answer = requests.options(url, headers=headers, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        return PreflightResult(
            url=url, request=request, status=None, allow_origin=None, error=type(exc).__name__
        )
    return PreflightResult(
        url=url,
        request=request,
        status=answer.status_code,
        allow_origin=answer.headers.get("Access-Control-Allow-Origin"),
        allow_methods=answer.headers.get("Access-Control-Allow-Methods"),
    )
