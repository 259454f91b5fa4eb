"""fix-static-cors: put the configured CORS rules on the static-files bucket, and prove they work."""

from __future__ import annotations

import difflib
from urllib.parse import urlsplit

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig, FabulawsConfig
from config.models import DEFAULT_STATIC_CORS_RULES, CorsRule
from fabflows.report import markdown_table
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from fabflows.runtime.plan import Change, RunbookPlan
from tasks.aws.s3 import (
    CorsDecision,
    CorsRequest,
    evaluate_cors,
    get_bucket_cors,
    preflight_bucket_cors,
    put_bucket_cors,
    render_rules,
    restore_bucket_cors,
    rules_equal,
)

FLOW_NAME = "fix-static-cors"


class FixStaticCorsPlan(RunbookPlan):
    """What fix-static-cors would change on the bucket, and what the rules would allow."""

    bucket: str
    current_rules: list[CorsRule] | None = Field(description="None: no CORS configuration.")
    wanted_rules: list[CorsRule]
    replaces_rules: bool = Field(
        description="The bucket has other rules, which the put overwrites (approval in protected envs)."
    )
    diff: list[str] = Field(description="Unified diff, current -> wanted.")
    checks: list[CorsRequest] = Field(default_factory=list, description="The site's requests.")
    checks_now: list[CorsDecision] = Field(description="The site's requests, current rules.")
    checks_after: list[CorsDecision] = Field(description="The site's requests, wanted rules.")

    def render_markdown(self) -> str:
        return render_plan(self)

    def render_text(self) -> str:
        out = [f"{self.title}: bucket {self.bucket}", f"digest {self.digest()}"]
        out += ["", *(self.diff or ["(no change)"]), ""]
        for d in self.checks_after:
            out.append(
                f"{'allowed' if d.allowed else 'REFUSED'}: {d.request.describe()} ({d.reason})"
            )
        out += [f"PROBLEM: {p}" for p in self.problems]
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
    environment: str = "",
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
        title=f"{FLOW_NAME} on {environment or bucket}",
        environment=environment,
        changes=[
            Change(
                target=f"bucket {bucket}",
                action="PutBucketCors" + (" (replaces its other rules)" if current else ""),
                detail=f"{len(current or [])} rule(s) -> {len(wanted)} rule(s)",
                step="put-bucket-cors",
            )
        ]
        if changed
        else [],
        noops=[] if changed else [f"bucket {bucket}: the rules are already as configured"],
        destructive=changed and bool(current),
        bucket=bucket,
        current_rules=current,
        wanted_rules=wanted,
        replaces_rules=changed and bool(current),
        diff=diff,
        checks=list(checks),
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
    out += [f"- **Plan digest:** `{plan.digest()}`", ""]
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


class FixStaticCorsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CorsFacts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bucket: str
    current: list[CorsRule] | None
    wanted: list[CorsRule]
    checks: list[CorsRequest]


def _put_step(plan: FixStaticCorsPlan) -> Step:
    def apply(scope: Scope) -> dict:
        creds = scope.rc.creds
        before = get_bucket_cors(scope.rc.creds, plan.bucket)
        scope.record(
            previous_rules=None if before is None else [r.model_dump(mode="json") for r in before]
        )
        applied = put_bucket_cors(creds, plan.bucket, plan.wanted_rules, dry_run=False)
        return {"summary": applied.summary}

    def undo(scope: Scope, data: dict) -> None:
        if "previous_rules" not in data:
            return  # stopped before it wrote anything
        previous = data["previous_rules"]
        rules = None if previous is None else [CorsRule.model_validate(r) for r in previous]
        restore_bucket_cors(scope.rc.creds, plan.bucket, rules, dry_run=False)

    return Step("put-bucket-cors", apply, undo)


def _check_step(plan: FixStaticCorsPlan) -> Step:
    def apply(scope: Scope) -> dict:
        creds = scope.rc.creds
        after = get_bucket_cors(creds, plan.bucket)
        decisions, problems = verify_rules(after, plan.wanted_rules, plan.checks)
        details = getattr(scope, "details", {})
        details["Verification"] = "; ".join(
            f"{'allowed' if d.allowed else 'REFUSED'}: {d.request.describe()}" for d in decisions
        )
        if plan.checks:
            pf = preflight_bucket_cors(creds, plan.bucket, plan.checks[0])
            details["Preflight"] = (
                f"{pf.url}: {pf.status} Access-Control-Allow-Origin={pf.allow_origin}"
            )
            if not pf.allowed:
                problems.append(
                    f"the bucket refused a real preflight ({plan.checks[0].describe()}): HTTP "
                    f"{pf.status or pf.error}, Access-Control-Allow-Origin {pf.allow_origin!r}"
                )
        if problems:
            raise RuntimeError(f"{plan.bucket}: verification failed: " + "; ".join(problems))
        return {"summary": details.get("Preflight", "rules read back as put")}

    return Step("check-cors", apply, no_undo="reads only (its failure undoes put-bucket-cors)")


class FixStaticCors(Runbook[FixStaticCorsParams, CorsFacts, FixStaticCorsPlan]):
    name = FLOW_NAME
    Params = FixStaticCorsParams
    plan_type = FixStaticCorsPlan

    def gather(self, scope: Scope, params: FixStaticCorsParams) -> CorsFacts:
        rc = scope.rc
        env = rc.env
        settings = rc.config.fabflows.environments.get(env.environment)
        headers = settings.static_cors_check_headers if settings else ["Authorization"]
        return CorsFacts(
            bucket=env.static_bucket,
            current=get_bucket_cors(rc.creds, env.static_bucket),
            wanted=wanted_rules(rc.config, env),
            checks=check_requests(site_origins(rc.config, env), headers),
        )

    def plan(
        self, facts: CorsFacts, params: FixStaticCorsParams, env: EnvironmentConfig
    ) -> FixStaticCorsPlan:
        plan = plan_fix_static_cors(
            facts.bucket, facts.current, facts.wanted, facts.checks, environment=env.label
        )
        if plan.problems:
            problems = [f"{facts.bucket}: {p}" for p in plan.problems]
            return plan.model_copy(update={"problems": problems})
        return plan

    def steps(self, plan: FixStaticCorsPlan, params: FixStaticCorsParams) -> list[Step]:
        return [_put_step(plan), _check_step(plan)] if plan.changed else []


RUNBOOK = FixStaticCors()


@flow(name=FLOW_NAME, log_prints=False)
def fix_static_cors(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    window_override_reason: str | None = None,
) -> RunbookReport:
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

    **Steps** (journaled): `put-bucket-cors` (records the previous rules first), `check-cors`
    (reads them back, evaluates the site's requests, one real preflight).

    **Rollback:** the previous rules are in the plan artifact and the run's journal; if the
    verification fails, they are put back (or the configuration deleted if there was none) before
    the run fails. A run killed outright is undone the same way by `fabflows recover`.

    Args:
        environment: Environment whose static bucket to fix (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Untick to apply.
        window_override_reason: Apply outside the maintenance window (protected environments),
            for this recorded reason.
    """
    return execute(RUNBOOK, locals())
