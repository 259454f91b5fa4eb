"""upgrade-packages: Debian/Ubuntu package upgrades on every server, inside an upgrade window."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from config import EnvironmentConfig
from config.models import ROLES, UpgradeSettings, normalize_role
from fabflows import approval, audit, guard
from fabflows.errors import BadInput
from fabflows.lock import environment_lock
from fabflows.report import (
    artifact_key,
    markdown_table,
    publish_markdown,
    publish_table,
    text_table,
)
from fabflows.runbook import RunContext, load_context
from fabflows.upgrade_mode import (
    UpgradeWindowReport,
    load_upgrade_pages,
    ssh_options,
    upgrade_window,
)
from tasks.aws.ec2 import Server, describe_servers
from tasks.aws.ec2_writes import reboot_instance
from tasks.ssh.apt import (
    AptFacts,
    AptOutcome,
    PackageVersion,
    apply_apt_plan,
    check_package_names,
    expected_reboots,
    gather_apt_facts,
)
from tasks.ssh.boot import read_boot, wait_for_reboot
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.fleet import (
    FleetHost,
    FleetResult,
    RateControl,
    error_budget_for,
    hosts_from_servers,
    publish_fleet_result,
)

FLOW_NAME = "upgrade-packages"
APP_SERVER_ROLES = ("web", "worker")
"""Roles that get ``app_server_packages`` (as in FabulAWS)."""


# --------------------------------------------------------------------------- models


class PackageChange(BaseModel):
    """One package on one host: current -> new."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    package: str
    current: str | None
    new: str
    action: str = Field(
        description="upgrade, or install (a missing app-server package or a dependency)."
    )


class HostPackagePlan(BaseModel):
    """What one server would get."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    address: str
    role: str
    status: str = Field(description="would upgrade / up to date / cannot plan.")
    changes: list[PackageChange] = Field(default_factory=list)
    kept_back: list[str] = Field(default_factory=list)
    reboot_required_now: bool = False
    reboot_expected: list[str] = Field(
        default_factory=list, description="Changed packages that usually need a reboot."
    )
    message: str = ""

    @property
    def reboot(self) -> str:
        if self.reboot_required_now:
            return "already required"
        if self.reboot_expected:
            return "expected (" + ", ".join(self.reboot_expected) + ")"
        return "no"

    def packages(self) -> list[PackageVersion]:
        return [
            PackageVersion(
                name=c.package,
                current=c.current,
                new=c.new,
                mark_auto=c.action == "install (dependency)",
            )
            for c in self.changes
        ]


class UpgradePackagesPlan(BaseModel):
    """The plan as published (and approved) before anything changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    order: list[str] = Field(description="Roles in the order they are upgraded.")
    max_concurrency: int | str
    error_budget: int = Field(description="Failed hosts tolerated before no new host starts.")
    hosts: list[HostPackagePlan]
    not_running: list[str] = Field(default_factory=list)
    image_note: str | None = None
    reboot: bool = Field(
        default=False,
        description="Servers that need it are rebooted, one at a time, in the window.",
    )

    @property
    def changing(self) -> list[HostPackagePlan]:
        return [h for h in self.hosts if h.changes]

    @property
    def blocked(self) -> list[HostPackagePlan]:
        return [h for h in self.hosts if h.status == "cannot plan"]

    def rows(self) -> list[dict[str, object]]:
        return [
            {
                "host": h.host,
                "role": h.role,
                "address": h.address,
                "status": h.status,
                "packages": len(h.changes),
                "reboot": h.reboot,
                "kept_back": ", ".join(h.kept_back),
                "note": h.message,
            }
            for h in self.hosts
        ]

    def package_rows(self) -> list[dict[str, object]]:
        return [
            {
                "host": h.host,
                "role": h.role,
                "package": c.package,
                "current": c.current or "(not installed)",
                "new": c.new,
                "action": c.action,
            }
            for h in self.hosts
            for c in h.changes
        ]

    def render_markdown(self) -> str:
        n_pkgs = sum(len(h.changes) for h in self.hosts)
        out = [
            f"# upgrade-packages on {self.environment}",
            "",
            f"**{len(self.changing)} of {len(self.hosts)} server(s) to upgrade, {n_pkgs} package "
            f"change(s)**; order: {' → '.join(self.order)}; {self.max_concurrency} host(s) of a role at "
            f"a time; {self.error_budget} failure(s) tolerated. The site is in upgrade mode (503) "
            "for the whole apply. Upgrades cannot be rolled back.",
            "",
            markdown_table(self.rows()),
        ]
        if self.changing:
            out += ["", "## Packages", "", markdown_table(self.package_rows())]
        reboots = [h.host for h in self.hosts if h.reboot != "no"]
        if reboots:
            how = (
                "rebooted by this run, one at a time, after the upgrades and inside the window"
                if self.reboot
                else "not done by this run: run it with `reboot` to do it"
            )
            out += ["", f"**Reboot will be required on:** {', '.join(reboots)} ({how})"]
        elif self.reboot:
            out += ["", "Reboot asked for: servers that need one after the upgrades are rebooted."]
        if self.not_running:
            out += ["", f"Not running, not upgraded: {', '.join(self.not_running)}"]
        if self.image_note:
            out += ["", f"**{self.image_note}**"]
        return "\n".join(out)


class HostOutcome(BaseModel):
    """What happened on one server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    address: str
    role: str
    result: str = Field(description="upgraded / failed / skipped / up to date / not reached.")
    message: str = ""
    packages: int = 0
    reboot_required: bool = False
    reboot_packages: list[str] = Field(default_factory=list)
    still_pending: list[str] = Field(default_factory=list)
    duration_s: float = 0.0
    reboot: str = Field(
        default="",
        description="What reboot did here: '' (none asked or needed), 'rebooted in N s', "
        "'FAILED: ...' or 'not reached'.",
    )


class RebootOutcome(BaseModel):
    """One server's reboot."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    address: str
    ok: bool
    seconds: float = 0.0
    message: str = ""
    still_required: bool = False


class UpgradePackagesReport(BaseModel):
    """The outcome of upgrade-packages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    dry_run: bool
    outcome: str
    plan: UpgradePackagesPlan
    hosts: list[HostOutcome] = Field(default_factory=list)
    window: UpgradeWindowReport | None = None
    seconds_upgrading: float | None = Field(
        default=None, description="Wall time of the apply (inside the window)."
    )

    @property
    def upgraded(self) -> list[str]:
        return [h.host for h in self.hosts if h.result == "upgraded"]

    @property
    def not_upgraded(self) -> list[str]:
        return [h.host for h in self.hosts if h.result in ("failed", "skipped", "not reached")]

    def rows(self) -> list[dict[str, object]]:
        return [
            {
                "host": h.host,
                "role": h.role,
                "address": h.address,
                "result": h.result,
                "packages": h.packages,
                "reboot_required": (", ".join(h.reboot_packages) or "yes")
                if h.reboot_required
                else "no",
                "seconds": round(h.duration_s, 1),
                "reboot": h.reboot,
                "message": h.message,
            }
            for h in self.hosts
        ]

    @property
    def reboot_failed(self) -> list[str]:
        return [h.host for h in self.hosts if h.reboot.startswith("FAILED")]

    def render_text(self) -> str:
        out = [self.outcome]
        if self.hosts:
            out += ["", text_table(self.rows())]
        else:
            out += ["", text_table(self.plan.rows())]
        if self.window:
            out += ["", self.window.describe()]
        return "\n".join(out)


class UpgradePackagesFailed(RuntimeError):
    """Some servers were not upgraded (failed, skipped, not reachable). ``report`` has them all."""

    def __init__(self, message: str, report: UpgradePackagesReport | None = None):
        self.report = report
        super().__init__(message)


# --------------------------------------------------------------------------- pure parts


def role_order(roles: Sequence[str], settings: UpgradeSettings) -> list[str]:
    """Configured order first (databases before app servers), then the other roles."""
    present = list(dict.fromkeys(roles))
    first = [r for r in settings.role_order if r in present]
    return first + sorted(r for r in present if r not in first)


def app_packages_by_role(packages: Sequence[str]) -> dict[str, list[str]]:
    return {role: list(packages) for role in APP_SERVER_ROLES} if packages else {}


def plan_host(host: FleetHost, facts: AptFacts, settings: UpgradeSettings) -> HostPackagePlan:
    """Pure: one host's changes from its apt facts (upgrades and installs merged by package).

    A host where dpkg reports broken packages (a failed post-install left half-configured) cannot
    be planned: apt would refuse or finish them in ways nobody approved; someone fixes it first.
    """
    if facts.broken:
        return HostPackagePlan(
            host=host.label,
            address=host.address,
            role=host.role,
            status="cannot plan",
            reboot_required_now=facts.reboot_required,
            message=f"dpkg reports broken packages: {', '.join(facts.broken)}; fix them first "
            "(sudo dpkg --configure -a, or remove the package)",
        )
    changes: dict[str, PackageChange] = {}
    for p in facts.upgrades:
        changes[p.name] = PackageChange(
            package=p.name, current=p.current, new=p.new, action="upgrade"
        )
    for p in facts.installs:
        action = (
            "install (app-server package)"
            if p.name in facts.app_packages_missing
            else ("install (dependency)" if p.current is None else "upgrade")
        )
        changes[p.name] = PackageChange(package=p.name, current=p.current, new=p.new, action=action)
    ordered = sorted(changes.values(), key=lambda c: c.package)
    reboot = expected_reboots(
        [PackageVersion(name=c.package, current=c.current, new=c.new) for c in ordered],
        settings.reboot_packages,
    )
    message = f"{len(ordered)} package(s)" if ordered else "nothing to upgrade"
    if facts.kept_back:
        message += f"; kept back (not upgraded): {', '.join(facts.kept_back)}"
    return HostPackagePlan(
        host=host.label,
        address=host.address,
        role=host.role,
        status="would upgrade" if ordered else "up to date",
        changes=ordered,
        kept_back=facts.kept_back,
        reboot_required_now=facts.reboot_required,
        reboot_expected=reboot,
        message=message,
    )


def plan_upgrade_packages(
    env: EnvironmentConfig,
    settings: UpgradeSettings,
    servers: Sequence[Server],
    hosts: Sequence[FleetHost],
    gathered: FleetResult,
    rate: RateControl,
    *,
    reboot: bool = False,
) -> UpgradePackagesPlan:
    """Pure: per server, what would change, in the order it will be applied."""
    by_address = {r.address: r for r in gathered.results}
    order = role_order([h.role for h in hosts], settings)
    rank = {role: i for i, role in enumerate(order)}
    plans: list[HostPackagePlan] = []
    for host in sorted(hosts, key=lambda h: (rank[h.role], h.name)):
        read = by_address.get(host.address)
        if read is None or not isinstance(read.output, AptFacts):
            why = read.message if read is not None else "not read"
            plans.append(
                HostPackagePlan(
                    host=host.label,
                    address=host.address,
                    role=host.role,
                    status="cannot plan",
                    message=why,
                )
            )
            continue
        plans.append(plan_host(host, read.output, settings))
    not_running = [
        f"{s.name or s.instance_id} ({s.role}, {s.state})" for s in servers if s.state != "running"
    ]
    image_note = None
    if env.auto_scaling_group and any(p.changes for p in plans if p.role == "web"):
        image_note = (
            f"Web servers launched later by {env.auto_scaling_group} start from its launch "
            "template's image, without these upgrades: rebuild the image (deploy) to keep them."
        )
    return UpgradePackagesPlan(
        environment=env.label,
        order=order,
        max_concurrency=rate.max_concurrency,
        error_budget=rate.error_budget(len(hosts)),
        hosts=plans,
        not_running=not_running,
        image_note=image_note,
        reboot=reboot,
    )


def expected_downtime(plan: UpgradePackagesPlan, concurrency: int) -> timedelta:
    """A rough estimate for the approval form: 20 s per host plus 3 s per package, per wave
    (plus 90 s per server expected to need a reboot, when reboots are asked for)."""
    seconds = 0.0
    for role in plan.order:
        hosts = [h for h in plan.changing if h.role == role]
        if not hosts:
            continue
        per_host = max(20 + 3 * len(h.changes) for h in hosts)
        waves = -(-len(hosts) // max(1, concurrency))
        seconds += waves * per_host
    if plan.reboot:  # one server at a time: about a minute and a half each on EC2
        seconds += 90 * len([h for h in plan.hosts if h.reboot != "no"])
    return timedelta(seconds=seconds + 30)


def outcomes(
    plan: UpgradePackagesPlan,
    results: Sequence[FleetResult],
    reboots: Sequence[RebootOutcome] | None = None,
) -> list[HostOutcome]:
    """Pure: per planned host, what the apply did (hosts never started are ``skipped``), and
    what the reboots did (``reboots``: None when none were asked for)."""
    out = _apply_outcomes(plan, results)
    if reboots is None:
        return out
    done = {r.address: r for r in reboots}
    wanted = {h.address for h in reboot_candidates(out)}
    merged = []
    for h in out:
        r = done.get(h.address)
        if r is not None and r.ok:
            h = h.model_copy(
                update={
                    "reboot": f"rebooted in {r.seconds:.1f} s",
                    "reboot_required": r.still_required,
                    "reboot_packages": h.reboot_packages if r.still_required else [],
                }
            )
        elif r is not None:
            h = h.model_copy(update={"reboot": f"FAILED: {r.message}"})
        elif h.address in wanted:
            h = h.model_copy(update={"reboot": "not reached"})
        merged.append(h)
    return merged


def reboot_candidates(hosts: Sequence[HostOutcome]) -> list[HostOutcome]:
    """Pure: the servers a reboot is for (upgraded or up to date, and needing one), in order."""
    return [h for h in hosts if h.reboot_required and h.result in ("upgraded", "up to date")]


def _apply_outcomes(plan: UpgradePackagesPlan, results: Sequence[FleetResult]) -> list[HostOutcome]:
    by_address = {r.address: r for fr in results for r in fr.results}
    out = []
    for h in plan.hosts:
        base = {"host": h.host, "address": h.address, "role": h.role}
        if h.status == "cannot plan":
            out.append(HostOutcome(**base, result="not reached", message=h.message))
            continue
        if not h.changes:
            out.append(
                HostOutcome(
                    **base,
                    result="up to date",
                    reboot_required=h.reboot_required_now,
                    message="nothing to upgrade",
                )
            )
            continue
        r = by_address.get(h.address)
        if r is None:
            out.append(
                HostOutcome(
                    **base,
                    result="skipped",
                    packages=len(h.changes),
                    message="not started: the rollout stopped before this host",
                )
            )
            continue
        outcome = r.output if isinstance(r.output, AptOutcome) else None
        result = {"changed": "upgraded", "unchanged": "up to date"}.get(r.status, r.status)
        out.append(
            HostOutcome(
                **base,
                result=result,
                message=r.message,
                packages=len(h.changes),
                reboot_required=bool(outcome and outcome.reboot_required),
                reboot_packages=outcome.reboot_packages if outcome else [],
                still_pending=[p.name for p in outcome.still_pending] if outcome else [],
                duration_s=r.duration_s,
            )
        )
    return out


def _params(
    roles: list[str] | None,
    max_concurrency: int | str | None,
    max_errors: int | str | None,
    settings: UpgradeSettings,
    env: EnvironmentConfig,
) -> tuple[list[str], RateControl]:
    wanted = [normalize_role(r) for r in (roles or env.roles)]
    unknown = [r for r in wanted if r not in ROLES]
    if unknown:
        raise BadInput(f"roles: unknown {unknown}; known: {', '.join(ROLES)}")
    not_here = [r for r in wanted if r not in env.roles]
    if not_here:
        raise BadInput(
            f"roles: {not_here} not in {env.label}'s valid_roles ({', '.join(env.roles)})"
        )
    try:
        rate = RateControl(
            max_concurrency=settings.max_concurrency
            if max_concurrency is None
            else max_concurrency,
            max_errors=settings.max_errors if max_errors is None else max_errors,
        )
    except ValidationError as exc:
        raise BadInput(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None
    return wanted, rate


# --------------------------------------------------------------------------- the flow


@flow(name=FLOW_NAME, log_prints=False)
def upgrade_packages(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    roles: list[str] | None = None,
    max_concurrency: int | str | None = None,
    max_errors: int | str | None = None,
    wait_for_approval: bool = False,
    window_override_reason: str | None = None,
    reboot: bool = False,
) -> UpgradePackagesReport:
    """Upgrade the Debian/Ubuntu packages of every server, with a published plan and in upgrade mode.

    **Purpose:** the original's `begin_upgrade` / `upgrade_packages` / `end_upgrade`, with a plan,
    an approval and a report. On every running server of the selected roles (all by default):
    `apt-get update` (retried), then what `apt-get -s upgrade` would change and which configured
    `app_server_packages` are missing on web and worker servers (with what installing them pulls
    in). The plan lists per server each package, current → new version, what is kept back, and
    whether a reboot will be required (`/var/run/reboot-required` already there, or a package
    matching `fabflows.upgrade.reboot_packages`).

    **Approval:** in protected environments (production by default) the run pauses with the plan
    until someone approves or rejects it (UI, API or Slack); no decision in time rejects it. Other
    environments go straight on unless `wait_for_approval` is set.

    **Apply:** inside an upgrade window (see begin-upgrade: autoscaling processes suspended and
    recorded, 503 page on every web server, checked from outside), roles in
    `fabflows.upgrade.role_order` (databases before app servers), `max_concurrency` hosts of a
    role at a time (default 1): `apt-get install -y PKG=VERSION ...` with exactly the planned
    versions, `DEBIAN_FRONTEND=noninteractive`, existing config files kept (confdef/confold).
    Each server is then checked: planned versions installed, `dpkg --audit` clean, what is still
    pending, `/var/run/reboot-required`. When failures exceed `max_errors` no new server starts.

    **Whatever happens** (failure, threshold, cancellation) the window is closed: pages off,
    exactly the recorded processes resumed, the site checked for 200. A run killed outright is
    undone by end-upgrade or by this flow's next run. The report says which servers were upgraded
    and which were not, and where a reboot is now required.

    **Reboots** only with `reboot` (off by default): after the upgrades, still inside the window,
    every server that needs one (`/var/run/reboot-required`) is rebooted through EC2
    (RebootInstances), one at a time in role order, and waited for: SSH answering (host key
    checked) in a new boot, the marker gone. A server not back within
    `fabflows.upgrade.reboot_timeout_seconds` stops the reboots and fails the run (after the window
    is closed and the site checked). A reboot cannot be rolled back.

    **Blast radius:** the site is down (503) during the apply; services restart as packages
    upgrade. Upgrades cannot be rolled back. Web servers launched later by the autoscaling group
    come from its image, without these upgrades.

    **Dry run** (default): gather and plan only (`apt-get update` refreshes package lists; no
    package changes, no upgrade mode).

    Args:
        environment: Environment to upgrade (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only plan (default). Pass false (CLI: --apply) to upgrade.
        roles: Only these roles (default: every role of the environment).
        max_concurrency: Hosts of one role upgraded at once: a number or a percentage
            (default: fabflows.upgrade.max_concurrency, 1).
        max_errors: Failed hosts tolerated before no new host starts: a number or a percentage of
            all hosts (default: fabflows.upgrade.max_errors, 0).
        wait_for_approval: Ask for approval even where it is not required.
        window_override_reason: Start outside the environment's maintenance window anyway; why.
        reboot: Reboot the servers that need it after the upgrades, one at a time, inside the
            window (default: no reboot; the report says where one is required).
    """
    logger = get_run_logger()
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    settings = ctx.config.fabflows.upgrade
    wanted_roles, rate = _params(roles, max_concurrency, max_errors, settings, env)
    try:
        check_package_names(ctx.config.app_server_packages, "app_server_packages")
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    pages = load_upgrade_pages(ctx.config, config)
    starter = audit.record_start(env)
    key = artifact_key(FLOW_NAME, env.deployment, env.environment)

    # ---- gather: the servers (AWS), then what apt says on each (SSH; apt-get update)
    servers = describe_servers(ctx.creds, env.deployment, env.environment, roles=wanted_roles)
    hosts = hosts_from_servers([s for s in servers if s.state == "running"], env.address_attribute)
    with ConnectionPool(ssh_options(ctx)) as pool:
        gathered = gather_apt_facts(
            hosts,
            pool,
            app_packages_by_role(ctx.config.app_server_packages),
            update_attempts=settings.apt_update_attempts,
        )
        # ---- plan (pure) and publish
        plan = plan_upgrade_packages(env, settings, servers, hosts, gathered, rate, reboot=reboot)
        plan_md = plan.render_markdown()
        publish_markdown(key + "-plan", plan_md, f"upgrade-packages plan for {env.label}")
        publish_table(key + "-plan-packages", plan.package_rows() or plan.rows(), "Per package")
        logger.info("%s\n%s", env.label, text_table(plan.rows()))
        if plan.image_note:
            logger.warning("%s", plan.image_note)
        blocked = "; ".join(f"{h.host} ({h.address}): {h.message}" for h in plan.blocked)
        if dry_run:
            outcome = (
                f"dry run: {len(plan.changing)} of {len(plan.hosts)} server(s) would be upgraded"
            )
            if plan.blocked:
                outcome += f"; {len(plan.blocked)} could not be planned: {blocked}"
            audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, starter=starter)
            if plan.blocked:
                raise UpgradePackagesFailed(outcome)
            return UpgradePackagesReport(
                environment=env.label, dry_run=True, outcome=outcome, plan=plan
            )
        if len(plan.blocked) > plan.error_budget:
            outcome = (
                f"stopped before any change: {len(plan.blocked)} server(s) could not be planned, "
                f"more than the {plan.error_budget} failure(s) tolerated: {blocked}"
            )
            audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, starter=starter)
            raise UpgradePackagesFailed(outcome)
        if not plan.changing:
            outcome = f"nothing to upgrade on {len(plan.hosts)} server(s); upgrade mode not entered"
            waiting = [h.host for h in plan.hosts if h.reboot_required_now]
            if reboot and waiting:
                outcome += (
                    f"; not rebooted (reboots follow upgrades): {', '.join(waiting)} still "
                    "require one"
                )
            audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, starter=starter)
            if plan.blocked:
                raise UpgradePackagesFailed(f"{outcome}; could not be planned: {blocked}")
            return UpgradePackagesReport(
                environment=env.label,
                dry_run=False,
                outcome=outcome,
                plan=plan,
                hosts=outcomes(plan, []),
            )

        # ---- approve (protected environments, or when asked)
        guard.require_window(env, override_reason=window_override_reason, flow_name=FLOW_NAME)
        if wait_for_approval or approval.approval_required(env, destructive=True):
            try:
                approval.request_approval(
                    env,
                    ctx.config,
                    plan_markdown=plan_md,
                    expected_downtime=expected_downtime(plan, rate.concurrency(len(hosts))),
                )
            except approval.ApprovalRejected as exc:
                audit.record_summary(
                    env, outcome=f"rejected: {exc}", plan_markdown=plan_md, starter=starter
                )
                return exc.as_state()

        # ---- apply, inside the upgrade window (always closed again)
        results: list[FleetResult] = []
        reboots: list[RebootOutcome] | None = [] if reboot else None
        seconds_upgrading = None
        window = None
        try:
            with environment_lock(env, ctx.config):
                with upgrade_window(ctx, pool=pool, pages=pages, config_path=config) as window:
                    started = time.monotonic()
                    results = _apply(plan, hosts, pool, rate, settings, key)
                    seconds_upgrading = round(time.monotonic() - started, 3)
                    if reboots is not None:
                        _reboot(ctx, plan, results, hosts, pool, settings, reboots)
        finally:
            report = UpgradePackagesReport(
                environment=env.label,
                dry_run=False,
                outcome="",
                plan=plan,
                hosts=outcomes(plan, results, reboots),
                window=window.report if window else None,
                seconds_upgrading=seconds_upgrading,
            )
            report = report.model_copy(update={"outcome": _outcome_text(report)})
            publish_table(key + "-result", report.rows(), report.outcome)
            audit.record_summary(
                env,
                outcome=report.outcome,
                plan_markdown=plan_md,
                starter=starter,
                downtime=timedelta(seconds=report.window.seconds_in_upgrade_mode)
                if report.window and report.window.seconds_in_upgrade_mode
                else None,
                details={
                    "upgraded": ", ".join(report.upgraded) or "none",
                    "not upgraded": ", ".join(report.not_upgraded) or "none",
                    "reboot required": ", ".join(h.host for h in report.hosts if h.reboot_required)
                    or "none",
                    "seconds upgrading": seconds_upgrading,
                },
            )
    logger.info("%s", report.outcome)
    if report.not_upgraded or report.reboot_failed:
        raise UpgradePackagesFailed(report.outcome + "\n" + text_table(report.rows()), report)
    return report


def _reboot(
    ctx: RunContext,
    plan: UpgradePackagesPlan,
    results: Sequence[FleetResult],
    hosts: Sequence[FleetHost],
    pool: ConnectionPool,
    settings: UpgradeSettings,
    done: list[RebootOutcome],
) -> None:
    """One server at a time, in plan order: note its boot, reboot it through EC2, wait for a new
    boot. Appends to ``done`` as it goes; the first server not back stops the reboots."""
    logger = get_run_logger()
    by_address = {h.address: h for h in hosts}
    opts = ssh_options(ctx)
    for target in reboot_candidates(outcomes(plan, results)):
        host = by_address[target.address]
        started = time.monotonic()
        try:
            if not host.instance_id:
                raise ValueError("no EC2 instance id known for it")
            before = read_boot(host, opts)
            reboot_instance(ctx.creds, host.instance_id, dry_run=False)
            pool.discard(host.address)  # that connection dies with the old boot
            after = wait_for_reboot(
                host,
                opts,
                before.boot,
                timeout=settings.reboot_timeout_seconds,
                poll=settings.reboot_poll_seconds,
            )
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            logger.error("%s: reboot failed, no further server is rebooted: %s", host.name, message)
            done.append(
                RebootOutcome(host=host.name, address=host.address, ok=False, message=message)
            )
            return
        seconds = round(time.monotonic() - started, 1)
        if after.reboot_required:
            logger.warning("%s: rebooted, but still says a reboot is required", host.name)
        done.append(
            RebootOutcome(
                host=host.name,
                address=host.address,
                ok=True,
                seconds=seconds,
                still_required=after.reboot_required,
            )
        )


def _apply(
    plan: UpgradePackagesPlan,
    hosts: Sequence[FleetHost],
    pool: ConnectionPool,
    rate: RateControl,
    settings: UpgradeSettings,
    key: str,
) -> list[FleetResult]:
    """Role by role, in plan order; the error budget is shared by all roles."""
    logger = get_run_logger()
    by_address = {h.address: h for h in hosts}
    budget = error_budget_for(rate.max_errors, len(hosts))
    errors = len(plan.blocked)  # servers that could not be planned count against the budget
    results: list[FleetResult] = []
    for role in plan.order:
        changing = [h for h in plan.changing if h.role == role]
        if not changing:
            continue
        result = apply_apt_plan(
            [by_address[h.address] for h in changing],
            pool,
            {h.address: h.packages() for h in changing},
            RateControl(max_concurrency=rate.max_concurrency, max_errors=max(0, budget - errors)),
            timeout=settings.apt_timeout_seconds,
            name=f"upgrade-packages-{role}",
            dry_run=False,
        )
        publish_fleet_result(result, f"{key}-{role}")
        logger.info("%s", result.summary())
        results.append(result)
        errors += len(result.failed)
        if errors > budget:
            logger.error(
                "%d failure(s), more than the %d tolerated: no further server is upgraded",
                errors,
                budget,
            )
            break
    return results


def _label(h: HostOutcome) -> str:
    return f"{h.host} ({h.address})"


def _outcome_text(report: UpgradePackagesReport) -> str:
    upgraded = [h for h in report.hosts if h.result == "upgraded"]
    not_upgraded = [h for h in report.hosts if h.result in ("failed", "skipped", "not reached")]
    text = f"{report.environment}: {len(upgraded)} server(s) upgraded"
    if upgraded:
        text += f" ({', '.join(_label(h) for h in upgraded)})"
    if not_upgraded:
        text += f", NOT upgraded: {', '.join(_label(h) for h in not_upgraded)}"
    failed = [h for h in report.hosts if h.result == "failed"]
    if failed:
        text += " (failed: " + "; ".join(f"{_label(h)}: {h.message}" for h in failed) + ")"
    rebooted = [_label(h) for h in report.hosts if h.reboot.startswith("rebooted")]
    if rebooted:
        text += f"; rebooted {', '.join(rebooted)}"
    failed_reboots = [
        f"{_label(h)} ({h.reboot})" for h in report.hosts if h.reboot.startswith("FAILED")
    ]
    if failed_reboots:
        text += f"; REBOOT FAILED on {', '.join(failed_reboots)}"
    reboots = [_label(h) for h in report.hosts if h.reboot_required]
    if reboots:
        text += f"; reboot required on {', '.join(reboots)}"
    if report.window:
        text += f"; {report.window.seconds_in_upgrade_mode or 0:.1f} s in upgrade mode"
        if report.window.left_on:
            text += (
                " (STILL IN UPGRADE MODE: "
                + "; ".join(report.window.problems or [report.window.note])
                + ")"
            )
    if report.seconds_upgrading is not None:
        text += f", {report.seconds_upgrading:.1f} s upgrading"
    return text
