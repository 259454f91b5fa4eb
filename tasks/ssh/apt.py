"""apt on servers: what an upgrade would change, and applying exactly an approved plan.

Reading (:func:`gather_apt_facts`, runs in dry runs too): ``apt-get update`` (tried
``update_attempts`` times: a transient mirror failure once wrecked a whole FabulAWS environment,
issue #40), then ``apt-get -s upgrade`` (what would change, what is kept back), the configured
app-server packages missing on the host with what installing them would pull in (``apt-get -s
install``), and whether ``/var/run/reboot-required`` is already there.

Writing (:func:`apply_apt_plan`): ``apt-get install -y PKG=VERSION ...`` with exactly the planned
versions, so what runs is what was approved even if the mirror moved on in between; non-interactive
(``DEBIAN_FRONTEND=noninteractive``, existing config files kept: ``--force-confdef
--force-confold``), waiting for the dpkg lock instead of failing on it. Packages that were installed
automatically stay marked automatic. Then each host is checked: planned versions installed, nothing
broken (``dpkg --audit``), what is still pending, and ``/var/run/reboot-required``.

Upgrading packages has no compensation (apt cannot downgrade reliably): it comes after the last
point where a run can back out, inside the upgrade window.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from tasks.ssh.connection import ConnectionPool
from tasks.ssh.fleet import FleetHost, FleetResult, HostResult, RateControl, run_fleet
from tasks.ssh.remote import CommandError, Remote, sh_argv

APT_ENV = ["env", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C.UTF-8"]
APT_OPTIONS = [
    "-o",
    "Dpkg::Options::=--force-confdef",
    "-o",
    "Dpkg::Options::=--force-confold",
    "-o",
    "DPkg::Lock::Timeout=300",
]
REBOOT_SCRIPT = (
    "if [ -e /var/run/reboot-required ]; then echo required; "
    "cat /var/run/reboot-required.pkgs 2>/dev/null || true; fi"
)

_INST = re.compile(r"^Inst (\S+) (?:\[([^\]]+)\] )?\((\S+)(?: ([^)]*))?\)")
_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?$")


# --------------------------------------------------------------------------- models


class PackageVersion(BaseModel):
    """One package apt would install or upgrade."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    current: str | None = Field(description="Installed version (None: not installed).")
    new: str
    origin: str = Field(default="", description="Where the new version comes from.")
    mark_auto: bool = Field(
        default=False,
        description="Mark as automatically installed after the apply (a new dependency).",
    )


class AptFacts(BaseModel):
    """What apt says about one host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    upgrades: list[PackageVersion] = Field(description="What apt-get upgrade would change.")
    kept_back: list[str] = Field(description="Upgradable but kept back (need new packages).")
    app_packages_missing: list[str] = Field(
        description="Configured app-server packages not installed."
    )
    installs: list[PackageVersion] = Field(
        description="What installing the missing app-server packages would install."
    )
    reboot_required: bool = Field(description="/var/run/reboot-required is already there.")
    reboot_packages: list[str] = Field(description="Packages that asked for the reboot.")
    update_attempts: int = Field(description="apt-get update tries it took.")
    broken: list[str] = Field(
        default_factory=list,
        description="Packages dpkg --audit reports half-installed or unconfigured.",
    )


class AptOutcome(BaseModel):
    """How one host looks after the apply."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    installed: dict[str, str | None] = Field(description="Planned package -> installed version.")
    not_as_planned: list[str] = Field(description="Planned packages not at the planned version.")
    still_pending: list[PackageVersion] = Field(
        description="What apt-get upgrade would still change (published after the plan?)."
    )
    audit: str = Field(description="dpkg --audit output (empty: no broken package).")
    reboot_required: bool
    reboot_packages: list[str]
    failed_packages: list[str] = Field(
        default_factory=list, description="Packages dpkg could not configure."
    )


# --------------------------------------------------------------------------- pure parsers


def parse_simulation(text: str) -> list[PackageVersion]:
    """``apt-get -s`` output -> the packages it would install or upgrade (``Inst`` lines)."""
    out = []
    for line in text.splitlines():
        m = _INST.match(line.strip())
        if m:
            out.append(
                PackageVersion(
                    name=m.group(1), current=m.group(2), new=m.group(3), origin=m.group(4) or ""
                )
            )
    return out


def _listed_after(text: str, header: str) -> list[str]:
    """The words of the indented lines that follow each line starting with ``header``."""
    names: list[str] = []
    collecting = False
    for line in text.splitlines():
        if line.startswith(header):
            collecting = True
        elif collecting and line.startswith(" "):
            names.extend(line.split())
        else:
            collecting = False
    return names


def parse_kept_back(text: str) -> list[str]:
    """Names listed under "The following packages have been kept back:"."""
    return sorted(_listed_after(text, "The following packages have been kept back"))


def parse_dpkg_query(text: str) -> dict[str, str | None]:
    """``dpkg-query -W -f '${Package}\\t${db:Status-Abbrev}\\t${Version}\\n'`` -> name -> installed version."""
    out: dict[str, str | None] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        name, status, version = parts
        out[name.split(":")[0]] = version if status.startswith("ii") else None
    return out


def parse_reboot(text: str) -> tuple[bool, list[str]]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != "required":
        return False, []
    return True, sorted(set(lines[1:]))


def failed_packages(output: str) -> list[str]:
    """Packages listed after dpkg's "Errors were encountered while processing:"."""
    return sorted(set(_listed_after(output, "Errors were encountered while processing")))


def parse_audit(text: str) -> list[str]:
    """Package names in ``dpkg --audit`` output (its indented ``name  description`` lines)."""
    return sorted(
        {line.split()[0] for line in text.splitlines() if line.startswith(" ") and line.split()}
    )


def expected_reboots(changes: Sequence[PackageVersion], patterns: Sequence[str]) -> list[str]:
    """Changed packages whose names match a reboot pattern (``linux-image-*``, ``libc6``...)."""
    return sorted(
        {c.name for c in changes if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)}
    )


def check_package_names(names: Sequence[str], what: str) -> None:
    """Refuse anything that is not a Debian package name (they end up in apt command lines)."""
    bad = [n for n in names if not _PACKAGE_NAME.match(n)]
    if bad:
        raise ValueError(f"{what}: not Debian package names: {', '.join(bad)}")


# --------------------------------------------------------------------------- steps


def _dpkg_query(remote: Remote, names: Sequence[str]) -> dict[str, str | None]:
    if not names:
        return {}
    result = remote.read(
        ["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Abbrev}\t${Version}\n", *names],
        ok_codes=(0, 1),  # 1: some package unknown to dpkg (not installed)
    )
    found = parse_dpkg_query(result.stdout)
    return {n: found.get(n) for n in names}


def update_failures(output: str) -> list[str]:
    """apt-get update's complaints: older apt exits 0 when an index could not be fetched."""
    return [
        line.strip()
        for line in output.splitlines()
        if line.startswith(("E:", "Err:")) or "Failed to fetch" in line
    ]


def _apt_update(remote: Remote, attempts: int, delay: float) -> int:
    # apt's own retries off: this loop retries (with a delay), so "N tries" means N
    argv = [
        *APT_ENV,
        "apt-get",
        "-q",
        "-o",
        "Acquire::Retries=0",
        "-o",
        "DPkg::Lock::Timeout=300",
        "update",
    ]
    for attempt in range(1, attempts + 1):
        result = remote.read(argv, sudo=True, ok_codes=(0, 100))
        problems = update_failures(result.stdout + "\n" + result.stderr)
        if result.exit_code == 0 and not problems:
            return attempt
        if attempt == attempts:
            raise CommandError(
                remote.host,
                result.command,
                result.exit_code,
                f"failed {attempts} time(s): " + (problems[-1] if problems else result.stderr),
            )
        time.sleep(delay * attempt)
    return attempts


def _gather_step(app_packages: dict[str, list[str]], attempts: int, retry_delay: float):
    def step(remote: Remote, host: FleetHost) -> HostResult:
        tries = _apt_update(remote, attempts, retry_delay)
        sim = remote.read([*APT_ENV, "apt-get", "-s", "-q", "upgrade"], sudo=True)
        upgrades = parse_simulation(sim.stdout)
        kept_back = parse_kept_back(sim.stdout)
        wanted = app_packages.get(host.role, [])
        installed = _dpkg_query(remote, wanted)
        missing = [n for n in wanted if installed.get(n) is None]
        installs: list[PackageVersion] = []
        if missing:
            res = remote.read(
                [*APT_ENV, "apt-get", "-s", "-q", "install", *missing], sudo=True, ok_codes=(0, 100)
            )
            if res.exit_code != 0:
                detail = next(
                    (line for line in res.stderr.splitlines() if line.startswith("E:")),
                    res.stderr.strip(),
                )
                return HostResult(
                    status="failed",
                    message=f"app-server packages {', '.join(missing)} cannot be installed: {detail}",
                )
            installs = parse_simulation(res.stdout)
        reboot, reboot_pkgs = parse_reboot(remote.read(sh_argv(REBOOT_SCRIPT)).stdout)
        broken = parse_audit(remote.read(["dpkg", "--audit"], sudo=True, ok_codes=(0, 1)).stdout)
        facts = AptFacts(
            upgrades=upgrades,
            kept_back=kept_back,
            app_packages_missing=missing,
            installs=installs,
            reboot_required=reboot,
            reboot_packages=reboot_pkgs,
            update_attempts=tries,
            broken=broken,
        )
        n = len({p.name for p in upgrades} | {p.name for p in installs})
        message = f"{n} package(s) to change" if n else "up to date"
        if broken:
            message += f"; BROKEN (dpkg --audit): {', '.join(broken)}"
        if tries > 1:
            message += f" (apt-get update took {tries} tries)"
        return HostResult(status="unchanged", message=message, output=facts)

    return step


def _apply_step(changes: dict[str, list[PackageVersion]], timeout: float):
    def step(remote: Remote, host: FleetHost) -> HostResult:
        planned = changes.get(host.address, [])
        if not planned:
            return HostResult(status="unchanged", message="nothing to upgrade")
        names = [p.name for p in planned]
        auto = set(remote.read(["apt-mark", "showauto", *names]).stdout.split())
        install = [
            *APT_ENV,
            "apt-get",
            "install",
            "-y",
            "-q",
            *APT_OPTIONS,
            *[f"{p.name}={p.new}" for p in planned],
        ]
        failure = ""
        broken: list[str] = []
        try:
            remote.write(install, sudo=True, timeout=timeout)
        except CommandError as exc:
            if exc.timed_out:
                raise
            broken = failed_packages(exc.stderr)
            detail = next(
                (line for line in reversed(exc.stderr.splitlines()) if line.startswith("E:")), ""
            )
            failure = (
                f"apt-get install failed (exit {exc.exit_code})"
                + (f": {', '.join(broken)} could not be configured" if broken else "")
                + (f" [{detail}]" if detail and not broken else "")
            )
        if remote.dry_run:
            return HostResult(status="changed", message=f"would install {len(planned)} package(s)")
        keep_auto = sorted(
            {n for n in names if n in auto} | {p.name for p in planned if p.mark_auto}
        )
        if keep_auto:
            remote.write(["apt-mark", "auto", *keep_auto], sudo=True)
        outcome = _outcome(remote, planned, broken)
        if failure and not broken and outcome.failed_packages:
            failure = (
                f"apt-get install failed: {', '.join(outcome.failed_packages)} could not be "
                "configured (dpkg --audit)"
            )
        if failure:
            return HostResult(status="failed", message=failure, output=outcome)
        if outcome.not_as_planned or outcome.audit:
            message = "not as planned: " + ", ".join(outcome.not_as_planned)
            if outcome.audit:
                message += "; dpkg --audit reports broken packages"
            return HostResult(status="failed", message=message, output=outcome)
        message = f"upgraded {len(planned)} package(s)"
        if outcome.still_pending:
            message += f"; {len(outcome.still_pending)} newer update(s) published since the plan"
        if outcome.reboot_required:
            message += "; REBOOT REQUIRED" + (
                f" ({', '.join(outcome.reboot_packages)})" if outcome.reboot_packages else ""
            )
        return HostResult(status="changed", message=message, output=outcome)

    return step


def _outcome(remote: Remote, planned: Sequence[PackageVersion], broken: list[str]) -> AptOutcome:
    installed = _dpkg_query(remote, [p.name for p in planned])
    not_as_planned = [
        f"{p.name} (wanted {p.new}, has {installed.get(p.name) or 'nothing'})"
        for p in planned
        if installed.get(p.name) != p.new
    ]
    pending = parse_simulation(
        remote.read(
            [*APT_ENV, "apt-get", "-s", "-q", "upgrade"], sudo=True, ok_codes=(0, 100)
        ).stdout
    )
    audit = remote.read(["dpkg", "--audit"], sudo=True, ok_codes=(0, 1)).stdout.strip()
    reboot, reboot_pkgs = parse_reboot(remote.read(sh_argv(REBOOT_SCRIPT)).stdout)
    return AptOutcome(
        installed=installed,
        not_as_planned=not_as_planned,
        still_pending=pending,
        audit=audit,
        reboot_required=reboot,
        reboot_packages=reboot_pkgs,
        failed_packages=sorted(set(broken) | set(parse_audit(audit))),
    )


# --------------------------------------------------------------------------- tasks


@task(name="gather-apt-facts", cache_policy=NO_CACHE, retries=0)
def gather_apt_facts(
    hosts: list[FleetHost],
    pool: ConnectionPool,
    app_packages: dict[str, list[str]],
    *,
    update_attempts: int = 3,
    retry_delay: float = 2.0,
    max_concurrency: int | str = 10,
) -> FleetResult:
    """Read on every host what an upgrade would change (``HostResult.output`` is :class:`AptFacts`).

    ``apt-get update`` refreshes the package lists (it changes no package); every host is tried,
    a failure on one does not stop the others. ``app_packages`` maps a role to the packages it
    must have (FabulAWS's ``app_server_packages`` on web and worker).
    """
    for role, names in app_packages.items():
        check_package_names(names, f"app-server packages for {role}")
    return run_fleet(
        hosts,
        _gather_step(app_packages, update_attempts, retry_delay),
        pool=pool,
        rate=RateControl(max_concurrency=max_concurrency, max_errors="100%"),
        dry_run=True,
        name="gather-apt-facts",
        command_timeout=600,
    )


@task(name="apply-apt-plan", cache_policy=NO_CACHE, retries=0, tags=["non-idempotent"])
def apply_apt_plan(
    hosts: list[FleetHost],
    pool: ConnectionPool,
    changes: dict[str, list[PackageVersion]],
    rate: RateControl,
    *,
    timeout: float = 1800.0,
    name: str = "apply-apt-plan",
    dry_run: bool,
) -> FleetResult:
    """Install exactly the planned versions on ``hosts`` (``changes`` is keyed by address).

    No compensation: packages are not downgraded. Hosts start in order, ``rate`` at a time; once
    failures exceed ``rate.max_errors`` no new host starts. ``HostResult.output`` is
    :class:`AptOutcome` for every host that was tried.
    """
    for address, planned in changes.items():
        check_package_names([p.name for p in planned], f"planned packages for {address}")
    return run_fleet(
        hosts,
        _apply_step(changes, timeout),
        pool=pool,
        rate=rate,
        dry_run=dry_run,
        name=name,
        command_timeout=timeout,
    )
