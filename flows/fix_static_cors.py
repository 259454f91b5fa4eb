"""fix-static-cors: put the configured CORS rules on the static-files bucket, and prove they work."""

from __future__ import annotations

import difflib
from urllib.parse import urlsplit

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig, FabulawsConfig
from config.models import DEFAULT_STATIC_CORS_RULES, CorsRule
from fabflows import approval, audit, lock
from fabflows.errors import BadInput
from fabflows.report import artifact_key, markdown_table, publish_markdown
from fabflows.runbook import load_context
from tasks.aws.s3 import (
    CorsDecision,
    CorsRequest,
    CorsResult,
    PreflightResult,
    evaluate_cors,
    get_bucket_cors,
    preflight_bucket_cors,
    put_bucket_cors,
    render_rules,
    restore_bucket_cors,
    rules_equal,
)

FLOW_NAME = "fix-static-cors"


class FixStaticCorsPlan(BaseModel):
    """What fix-static-cors would change on the bucket, and what the rules would allow."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str
    current_rules: list[CorsRule] | None = Field(description="None: no CORS configuration.")
    wanted_rules: list[CorsRule]
    changed: bool = Field(description="PutBucketCors is needed.")
    replaces_rules: bool = Field(
        description="The bucket has other rules, which the put overwrites (approval in protected envs)."
    )
    diff: list[str] = Field(description="Unified diff, current -> wanted.")
    checks_now: list[CorsDecision] = Field(description="The site's requests, current rules.")
    checks_after: list[CorsDecision] = Field(description="The site's requests, wanted rules.")
    problems: list[str] = Field(
        description="Why the wanted rules cannot be applied (refused before any change)."
    )


class FixStaticCorsReport(BaseModel):
    """The result of fix-static-cors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: str
    environment: str
    dry_run: bool
    outcome: str
    plan: FixStaticCorsPlan
    applied: CorsResult | None = None
    verification: list[CorsDecision] = Field(default_factory=list)
    preflight: PreflightResult | None = None

    def render_text(self) -> str:
        p = self.plan
        out = [f"{self.deployment}/{self.environment}: bucket {p.bucket}: {self.outcome}"]
        out += ["", *(p.diff or ["(no change)"]), ""]
        for d in self.verification or p.checks_after:
            out.append(
                f"{'allowed' if d.allowed else 'REFUSED'}: {d.request.describe()} ({d.reason})"
            )
        if self.preflight:
            pf = self.preflight
            out.append(
                f"preflight {pf.url}: {pf.status} Access-Control-Allow-Origin={pf.allow_origin}"
            )
        return "\n".join(out)


def site_origins(config: FabulawsConfig, env: EnvironmentConfig) -> list[str]:
    """The origins the site's pages are served from: the site URL, site_domains_map's domains
    (Django's wildcard entries are skipped) and the configured extra ones, without duplicates."""
    origins: list[str] = []
    if env.site_url:
        parts = urlsplit(env.site_url)
        origins.append(f"{parts.scheme}://{parts.netloc}")
    for domain in config.site_domains_map.get(env.environment) or []:
        if domain and "*" not in domain and not domain.startswith("."):
            origins.append(f"https://{domain}")
    settings = config.fabflows.environments.get(env.environment)
    if settings:
        origins += settings.static_cors_check_origins
    return list(dict.fromkeys(origins))


def wanted_rules(config: FabulawsConfig, env: EnvironmentConfig) -> list[CorsRule]:
    settings = config.fabflows.environments.get(env.environment)
    if settings and settings.static_cors_rules is not None:
        return list(settings.static_cors_rules)
    return list(DEFAULT_STATIC_CORS_RULES)


def check_requests(origins: list[str], headers: list[str]) -> list[CorsRequest]:
    """The requests the site's pages make: a GET preflight per origin with the checked headers."""
    return [CorsRequest(origin=o, method="GET", headers=list(headers)) for o in origins]


def plan_fix_static_cors(
    bucket: str,
    current: list[CorsRule] | None,
    wanted: list[CorsRule],
    checks: list[CorsRequest],
) -> FixStaticCorsPlan:
    """Pure: the diff between the bucket's rules and the wanted ones, and what each set allows."""
    problems = []
    if not wanted:
        problems.append("no CORS rules configured (static_cors_rules is an empty list)")
    if len(wanted) > 100:
        problems.append(f"{len(wanted)} rules: S3 allows at most 100")
    after = [evaluate_cors(wanted, c) for c in checks]
    for d in after:
        if not d.allowed:
            problems.append(f"the configured rules would refuse the site: {d.request.describe()}")
    changed = not rules_equal(current, wanted)
    diff = (
        list(
            difflib.unified_diff(
                render_rules(current), render_rules(wanted), "current", "wanted", lineterm="", n=20
            )
        )
        if changed
        else []
    )
    return FixStaticCorsPlan(
        bucket=bucket,
        current_rules=current,
        wanted_rules=wanted,
        changed=changed,
        replaces_rules=changed and bool(current),
        diff=diff,
        checks_now=[evaluate_cors(current, c) for c in checks],
        checks_after=after,
        problems=problems,
    )


def render_plan(plan: FixStaticCorsPlan) -> str:
    rows = [
        {
            "request": now.request.describe(),
            "now": "allowed" if now.allowed else "refused",
            "after": "allowed" if after.allowed else "refused",
            "why (after)": after.reason,
        }
        for now, after in zip(plan.checks_now, plan.checks_after, strict=True)
    ]
    head = (
        "PutBucketCors (replaces the bucket's other rules)"
        if plan.replaces_rules
        else "PutBucketCors"
        if plan.changed
        else "nothing to change: the rules are already as configured"
    )
    out = [f"# fix-static-cors: `{plan.bucket}`", "", f"**Change:** {head}", ""]
    if plan.diff:
        out += ["```diff", *plan.diff, "```", ""]
    out += ["**The site's requests:**", "", markdown_table(rows)]
    if not rows:
        out.append("\n_No site origin known: set site_url or static_cors_check_origins._")
    if plan.problems:
        out += ["", "**Refused:**", *[f"- {p}" for p in plan.problems]]
    out += [
        "",
        "Rollback: the previous rules are shown above; a failed verification puts them back.",
    ]
    return "\n".join(out)


def verify_rules(
    rules: list[CorsRule] | None, wanted: list[CorsRule], checks: list[CorsRequest]
) -> tuple[list[CorsDecision], list[str]]:
    """Pure: S3's decisions for the site's requests on the rules read back, and what is wrong."""
    decisions = [evaluate_cors(rules, c) for c in checks]
    problems = []
    if not rules_equal(rules, wanted):
        problems.append("GetBucketCors does not return the rules that were put")
    problems += [
        f"refused: {d.request.describe()} ({d.reason})" for d in decisions if not d.allowed
    ]
    return decisions, problems


@flow(name=FLOW_NAME, log_prints=False)
def fix_static_cors(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
) -> FixStaticCorsReport:
    """Put the configured CORS rules on the static-files bucket (the maintenance doc's S3 CORS fix).

    **When to run:** after the static bucket is (re)created, when fonts or scripts from the bucket
    are blocked by browsers ("No 'Access-Control-Allow-Origin' header"), or after changing
    `fabflows.environments.<env>.static_cors_rules`. Safe to run any time and repeatedly: equal rules
    are not written.

    **What it does:** reads the bucket's rules (GetBucketCors), compares them with config's
    (default: the maintenance doc's rule: origin `*`, method GET, header Authorization, max age
    3000), and puts the configured rules (PutBucketCors) if they differ. It then reads them back and
    evaluates S3's rule matching (first rule matching origin, method and headers) for a GET
    preflight from each of the site's origins, and sends one real preflight to the bucket.

    **Blast radius:** the one bucket's CORS configuration; PutBucketCors replaces all its rules.
    Rules someone else added are overwritten: the plan says so, and protected environments then
    need approval. No downtime.

    **Dry run shows:** the diff current -> wanted, and for each site origin whether its requests are
    allowed now and would be after.

    **Refused before any change:** a malformed rule (config validation), rules that would refuse the
    site's own origins, a missing bucket.

    **Rollback:** the previous rules are in the plan artifact; if the verification fails, they are
    put back (or the configuration deleted if there was none) before the run fails.

    Args:
        environment: Environment whose static bucket to fix (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Untick to apply.
    """
    logger = get_run_logger()
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    audit.record_start(env)
    settings = ctx.config.fabflows.environments.get(env.environment)
    headers = settings.static_cors_check_headers if settings else ["Authorization"]
    checks = check_requests(site_origins(ctx.config, env), headers)
    wanted = wanted_rules(ctx.config, env)

    current = get_bucket_cors(ctx.creds, env.static_bucket)
    plan = plan_fix_static_cors(env.static_bucket, current, wanted, checks)
    plan_md = render_plan(plan)
    key = artifact_key(FLOW_NAME, env.deployment, env.environment)
    publish_markdown(key + "-plan", plan_md, f"CORS plan for {env.static_bucket}")
    if plan.problems:
        raise BadInput(f"{env.static_bucket}: " + "; ".join(plan.problems))

    def report(outcome: str, **kw) -> FixStaticCorsReport:
        audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, flow_name=FLOW_NAME)
        return FixStaticCorsReport(
            deployment=env.deployment,
            environment=env.environment,
            dry_run=dry_run,
            outcome=outcome,
            plan=plan,
            **kw,
        )

    if dry_run:
        return report("dry run: " + ("would put the rules" if plan.changed else "no change"))
    if plan.changed and approval.approval_required(env, destructive=plan.replaces_rules):
        try:
            approval.request_approval(
                env, ctx.config, plan_markdown=plan_md, expected_downtime=None, flow_name=FLOW_NAME
            )
        except approval.ApprovalRejected as exc:
            report(f"rejected: {exc}")
            return exc.as_state()

    with lock.environment_lock(env, ctx.config):
        applied = put_bucket_cors(ctx.creds, env.static_bucket, wanted, dry_run=False)
        try:
            after = get_bucket_cors(ctx.creds, env.static_bucket)
            decisions, problems = verify_rules(after, wanted, checks)
            preflight = None
            if checks:
                preflight = preflight_bucket_cors(ctx.creds, env.static_bucket, checks[0])
                if not preflight.allowed:
                    problems.append(
                        f"the bucket refused a real preflight ({checks[0].describe()}): HTTP "
                        f"{preflight.status or preflight.error}, Access-Control-Allow-Origin "
                        f"{preflight.allow_origin!r}"
                    )
            if problems:
                raise RuntimeError(
                    f"{env.static_bucket}: verification failed: " + "; ".join(problems)
                )
        except BaseException:
            if applied.changed:
                logger.error("verification failed: restoring the previous CORS rules")
                restore_bucket_cors(
                    ctx.creds, env.static_bucket, applied.previous_rules, dry_run=False
                )
            raise
    outcome = "applied" if applied.changed else "no change (rules already as configured)"
    logger.info("%s: %s", env.static_bucket, outcome)
    return report(outcome, applied=applied, verification=decisions, preflight=preflight)
