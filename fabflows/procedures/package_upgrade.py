"""upgrade-packages' plan and outcomes, pure: what apt would change on each server, in which order
and batches (one runbook step per batch, so a resumed run skips the servers already upgraded),
and what the apply did per server.

A batch is a fixed slice of the running servers of one role, in plan order, as many as run at once
(``max_concurrency``). Its membership does not depend on which servers still need upgrades, so a
plan made again (under the lock, or by a resume after some servers were upgraded) has the same
step names; a batch whose servers are all up to date has no step.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from config import EnvironmentConfig
from config.models import ROLES, UpgradeSettings, normalize_role
from fabflows.errors import BadInput
from fabflows.report import markdown_table, text_table
from fabflows.runtime.plan import Change, RunbookPlan
from tasks.aws.ec2 import Server
from tasks.ssh.apt import AptFacts, AptOutcome, PackageVersion, expected_reboots
from tasks.ssh.fleet import FleetHost, FleetResult, RateControl, concurrency_for

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

    host: str = Field(description="The server's name with its instance id.")
    address: str
    role: str
    name: str = Field(default="", description="The server's Name tag.")
    instance_id: str | None = None
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

    def fleet_host(self) -> FleetHost:
        return FleetHost(
            name=self.name or self.host,
            address=self.address,
            role=self.role,
            instance_id=self.instance_id,
        )

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


class Batch(BaseModel):
    """Servers of one role upgraded at once: one runbook step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: str = Field(description="The step's name: 'upgrade <server>' or 'upgrade <role> i/n'.")
    role: str
    addresses: list[str] = Field(description="Every running server of the slice, in plan order.")


class UpgradePackagesPlan(RunbookPlan):
    """The plan as published (and approved) before anything changes."""

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
    batches: list[Batch] = Field(default_factory=list, description="In the order applied.")

    def batch_hosts(self, batch: Batch) -> list[HostPackagePlan]:
        """The batch's servers that have something to upgrade."""
        wanted = set(batch.addresses)
        return [h for h in self.changing if h.address in wanted]

    @property
    def upgrade_batches(self) -> list[Batch]:
        """The batches with something to upgrade (each is a step)."""
        return [b for b in self.batches if self.batch_hosts(b)]

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
            f"- **Plan digest:** `{self.digest()}`",
            f"- **Expected downtime:** {self._downtime_text()}",
        ]
        out += [f"- **Problem:** {p}" for p in self.problems]
        out += [
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
        if self._reboot_text():
            out += ["", self._reboot_text()]
        if self.not_running:
            out += ["", f"Not running, not upgraded: {', '.join(self.not_running)}"]
        if self.image_note:
            out += ["", f"**{self.image_note}**"]
        if self.upgrade_batches:
            steps = ", ".join(f"`{b.step}`" for b in self.upgrade_batches)
            out += ["", f"Steps (a resume skips those done): {steps}"]
        return "\n".join(out)

    def render_text(self) -> str:
        n_pkgs = sum(len(h.changes) for h in self.hosts)
        lines = [
            f"{self.title}: {len(self.changing)} of {len(self.hosts)} server(s) to upgrade, "
            f"{n_pkgs} package change(s); order {' -> '.join(self.order) or '-'}; "
            f"{self.max_concurrency} at a time; {self.error_budget} failure(s) tolerated",
            f"expected downtime: {self._downtime_text()}; digest {self.digest()}",
        ]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        lines += [f"note: {n}" for n in self.notes]
        lines += ["", text_table(self.rows())]
        if self.changing:
            lines += ["", text_table(self.package_rows())]
        reboot = self._reboot_text()
        if reboot:
            lines += ["", reboot]
        return "\n".join(lines)

    def _reboot_text(self) -> str:
        reboots = [h.host for h in self.hosts if h.reboot != "no"]
        if reboots:
            how = (
                "rebooted by this run, one at a time, after the upgrades and inside the window"
                if self.reboot
                else "not done by this run: run it with `reboot` to do it"
            )
            return f"**Reboot will be required on:** {', '.join(reboots)} ({how})"
        if self.reboot:
            return "Reboot asked for: servers that need one after the upgrades are rebooted."
        return ""


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


class UpgradePackagesFailed(RuntimeError):
    """Some servers were not upgraded (failed, skipped, not reachable); ``hosts`` names them."""

    def __init__(self, message: str, hosts: list[HostOutcome] | None = None):
        self.hosts = hosts or []
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
            name=host.name,
            instance_id=host.instance_id,
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
        name=host.name,
        instance_id=host.instance_id,
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
                    name=host.name,
                    instance_id=host.instance_id,
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
    draft = UpgradePackagesPlan(
        title=f"{FLOW_NAME} on {env.label}",
        environment=env.label,
        order=order,
        max_concurrency=rate.max_concurrency,
        error_budget=rate.error_budget(len(hosts)),
        hosts=plans,
        not_running=not_running,
        image_note=image_note,
        reboot=reboot,
        batches=plan_batches(plans, order, rate.max_concurrency),
    )
    changes = [
        Change(
            target=f"{h.host} ({h.address})",
            action=f"upgrade {len(h.changes)} package(s)",
            detail=", ".join(f"{c.package} {c.current or '-'} -> {c.new}" for c in h.changes),
            step=b.step,
        )
        for b in draft.upgrade_batches
        for h in draft.batch_hosts(b)
    ]
    problems = []
    if len(draft.blocked) > draft.error_budget:
        blocked = "; ".join(f"{h.host} ({h.address}): {h.message}" for h in draft.blocked)
        problems.append(
            f"{len(draft.blocked)} server(s) could not be planned, more than the "
            f"{draft.error_budget} failure(s) tolerated: {blocked}"
        )
    notes = [f"could not be planned (not upgraded): {h.host}: {h.message}" for h in draft.blocked]
    if image_note:
        notes.append(image_note)
    downtime = expected_downtime(draft, rate.concurrency(len(hosts))) if changes else None
    return draft.model_copy(
        update={
            "changes": changes,
            "problems": problems,
            "notes": notes,
            "destructive": True,  # upgrades cannot be rolled back
            "downtime_seconds": downtime.total_seconds() if downtime else None,
        }
    )


def plan_batches(
    hosts: Sequence[HostPackagePlan], order: Sequence[str], max_concurrency: int | str
) -> list[Batch]:
    """Pure: fixed slices of each role's servers (in plan order), ``max_concurrency`` at a time."""
    out: list[Batch] = []
    for role in order:
        members = [h for h in hosts if h.role == role]
        size = concurrency_for(max_concurrency, len(members))
        slices = [members[i : i + size] for i in range(0, len(members), size)]
        for i, part in enumerate(slices, 1):
            step = f"upgrade {part[0].host}" if size == 1 else f"upgrade {role} {i}/{len(slices)}"
            out.append(Batch(step=step, role=role, addresses=[h.address for h in part]))
    return out


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
    return merge_reboots(apply_outcomes(plan, results), reboots)


def combine_outcomes(
    plan: UpgradePackagesPlan,
    applied: dict[str, HostOutcome],
    reboots: Sequence[RebootOutcome] | None = None,
) -> list[HostOutcome]:
    """Pure: per planned host, what the batches did (``applied`` by address, from this run and
    from the journal of the run it resumes), else what the plan says; then the reboots."""
    out = [applied.get(h.address, h) for h in apply_outcomes(plan, [])]
    return merge_reboots(out, reboots)


def merge_reboots(
    out: list[HostOutcome], reboots: Sequence[RebootOutcome] | None
) -> list[HostOutcome]:
    """Pure: what the reboots did, merged into the outcomes (None: no reboot was asked for)."""
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


def apply_outcomes(plan: UpgradePackagesPlan, results: Sequence[FleetResult]) -> list[HostOutcome]:
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


def check_params(
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


def outcome_text(environment: str, hosts: Sequence[HostOutcome]) -> str:
    """One line: which servers were upgraded, which not (and why), reboots done and required."""

    def label(h: HostOutcome) -> str:
        return f"{h.host} ({h.address})"

    upgraded = [h for h in hosts if h.result == "upgraded"]
    not_upgraded = [h for h in hosts if h.result in ("failed", "skipped", "not reached")]
    text = f"{environment}: {len(upgraded)} server(s) upgraded"
    if upgraded:
        text += f" ({', '.join(label(h) for h in upgraded)})"
    if not_upgraded:
        text += f", NOT upgraded: {', '.join(label(h) for h in not_upgraded)}"
    failed = [h for h in hosts if h.result in ("failed", "not reached")]
    if failed:
        text += " (" + "; ".join(f"{label(h)}: {h.message}" for h in failed) + ")"
    rebooted = [label(h) for h in hosts if h.reboot.startswith("rebooted")]
    if rebooted:
        text += f"; rebooted {', '.join(rebooted)}"
    failed_reboots = [f"{label(h)} ({h.reboot})" for h in hosts if h.reboot.startswith("FAILED")]
    if failed_reboots:
        text += f"; REBOOT FAILED on {', '.join(failed_reboots)}"
    reboots = [label(h) for h in hosts if h.reboot_required]
    if reboots:
        text += f"; reboot required on {', '.join(reboots)}"
    return text
