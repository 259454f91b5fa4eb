"""upgrade-packages: Debian/Ubuntu package upgrades on every server, inside an upgrade window."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from config.models import UpgradeSettings
from fabflows.errors import BadInput
from fabflows.procedures.package_upgrade import (
    FLOW_NAME,
    Batch,
    HostOutcome,
    RebootOutcome,
    UpgradePackagesFailed,
    UpgradePackagesPlan,
    app_packages_by_role,
    apply_outcomes,
    check_params,
    combine_outcomes,
    outcome_text,
    plan_upgrade_packages,
    reboot_candidates,
)
from fabflows.procedures.upgrade_steps import OFF_STEP, ON_STEP, mode_off, mode_on, mode_undo
from fabflows.procedures.upgrade_steps import step_data as _data
from fabflows.procedures.upgrade_window import ssh_options
from fabflows.report import artifact_key, publish_table
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from tasks.aws.ec2 import Server, describe_servers
from tasks.aws.ec2_writes import reboot_instance
from tasks.ssh.apt import apply_apt_plan, check_package_names, gather_apt_facts
from tasks.ssh.boot import read_boot, wait_for_reboot
from tasks.ssh.fleet import (
    FleetHost,
    FleetResult,
    RateControl,
    hosts_from_servers,
    publish_fleet_result,
)

REBOOT_STEP = "reboot"
NO_UNDO = "package upgrades cannot be rolled back (a resume finishes the servers not done)"


class UpgradePackagesParams(BaseModel):
    """The flow's own options (the common ones are the engine's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    roles: list[str] | None = Field(default=None, description="Only these roles (default: all).")
    max_concurrency: int | str | None = Field(default=None, description="Hosts of a role at once.")
    max_errors: int | str | None = Field(default=None, description="Failures tolerated.")
    wait_for_approval: bool = Field(default=False, description="Ask for approval anyway.")
    reboot: bool = Field(default=False, description="Reboot the servers that need it.")


@dataclass(frozen=True)
class PackageFacts:
    settings: UpgradeSettings
    rate: RateControl
    servers: list[Server]
    hosts: list[FleetHost]
    gathered: FleetResult


def _key(scope: Scope) -> str:
    return artifact_key(FLOW_NAME, scope.env.deployment, scope.env.environment)


def current_outcomes(scope: Scope, plan: UpgradePackagesPlan) -> list[HostOutcome]:
    """Per planned server, what the batches did so far (this run, and the run it resumes)."""
    applied: dict[str, HostOutcome] = {}
    for batch in plan.batches:
        for row in _data(scope, batch.step).get("hosts", []):
            out = HostOutcome.model_validate(row)
            applied[out.address] = out
    reboots = None
    if plan.reboot:
        reboots = [
            RebootOutcome.model_validate(r) for r in _data(scope, REBOOT_STEP).get("reboots", [])
        ]
    return combine_outcomes(plan, applied, reboots)


def _upgrade(plan: UpgradePackagesPlan, batch: Batch):  # noqa: ANN202
    """The step for one batch: exactly the planned versions on its servers, at once."""

    def apply(scope: Scope) -> dict[str, Any]:
        settings = scope.rc.config.fabflows.upgrade
        targets = plan.batch_hosts(batch)
        earlier = [b.step for b in plan.batches[: plan.batches.index(batch)]]
        errors = len(plan.blocked) + sum(_data(scope, s).get("failed", 0) for s in earlier)
        result = apply_apt_plan(
            [h.fleet_host() for h in targets],
            scope.pool,
            {h.address: h.packages() for h in targets},
            RateControl(
                max_concurrency=len(targets), max_errors=max(0, plan.error_budget - errors)
            ),
            timeout=settings.apt_timeout_seconds,
            name=f"upgrade-packages-{batch.role}",
            dry_run=False,
        )
        publish_fleet_result(result, f"{_key(scope)}-{batch.role}")
        mine = {h.address for h in targets}
        outs = [o for o in apply_outcomes(plan, [result]) if o.address in mine]
        failed = [o for o in outs if o.result == "failed"]
        if errors + len(failed) > plan.error_budget:
            text = outcome_text(scope.env.label, outs)
            scope.details["Not upgraded"] = "; ".join(f"{o.host}: {o.message}" for o in failed)
            raise UpgradePackagesFailed(
                f"{text}; {errors + len(failed)} failure(s), more than the {plan.error_budget} "
                "tolerated: no further server is upgraded",
                outs,
            )
        return {
            "hosts": [o.model_dump(mode="json") for o in outs],
            "failed": len(failed),
            "summary": result.summary(),
        }

    return apply


def _reboot(plan: UpgradePackagesPlan):  # noqa: ANN202
    """One server at a time, in plan order: note its boot, reboot it through EC2, wait for a new
    boot. The first server not back stops the reboots and fails the run (the window is closed)."""

    def apply(scope: Scope) -> dict[str, Any]:
        settings = scope.rc.config.fabflows.upgrade
        by_address = {h.address: h for h in plan.hosts}
        opts = ssh_options(scope.rc)
        done: list[RebootOutcome] = []
        failure = None
        for target in reboot_candidates(current_outcomes(scope, plan)):
            host = by_address[target.address].fleet_host()
            started = time.monotonic()
            try:
                if not host.instance_id:
                    raise ValueError("no EC2 instance id known for it")
                before = read_boot(host, opts)
                reboot_instance(scope.rc.creds, host.instance_id, dry_run=False)
                scope.pool.discard(host.address)  # that connection dies with the old boot
                after = wait_for_reboot(
                    host,
                    opts,
                    before.boot,
                    timeout=settings.reboot_timeout_seconds,
                    poll=settings.reboot_poll_seconds,
                )
            except Exception as exc:  # noqa: BLE001 - recorded, then the run fails below
                failure = f"{type(exc).__name__}: {exc}"
                scope.log(
                    "%s: reboot failed, no further server is rebooted: %s",
                    host.name,
                    failure,
                    level="error",
                )
                done.append(
                    RebootOutcome(host=target.host, address=host.address, ok=False, message=failure)
                )
                break
            if after.reboot_required:
                scope.log(
                    "%s: rebooted, still says a reboot is required", host.name, level="warning"
                )
            done.append(
                RebootOutcome(
                    host=target.host,
                    address=host.address,
                    ok=True,
                    seconds=round(time.monotonic() - started, 1),
                    still_required=after.reboot_required,
                )
            )
        data = {"reboots": [r.model_dump(mode="json") for r in done]}
        scope.results[REBOOT_STEP] = data  # the outcomes see them even when this step fails
        if failure is not None:
            scope.details["Reboot failed"] = f"{done[-1].host}: {failure}"
            raise RuntimeError(f"reboot of {done[-1].host} failed: {failure}")
        return {**data, "summary": f"rebooted {len(done)} server(s)"}

    return apply


class UpgradePackages(Runbook[UpgradePackagesParams, PackageFacts, UpgradePackagesPlan]):
    name = FLOW_NAME
    Params = UpgradePackagesParams
    plan_type = UpgradePackagesPlan
    may_take_site_down = True

    def validate(self, rc, params: UpgradePackagesParams) -> None:  # noqa: ANN001
        settings = rc.config.fabflows.upgrade
        check_params(params.roles, params.max_concurrency, params.max_errors, settings, rc.env)
        try:
            check_package_names(rc.config.app_server_packages, "app_server_packages")
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        from fabflows.procedures.upgrade_window import load_upgrade_pages

        load_upgrade_pages(rc.config, rc.config_path)

    def approval_required(
        self, env: EnvironmentConfig, params: UpgradePackagesParams, plan: UpgradePackagesPlan
    ) -> bool:
        return params.wait_for_approval or super().approval_required(env, params, plan)

    def gather(self, scope: Scope, params: UpgradePackagesParams) -> PackageFacts:
        rc, env = scope.rc, scope.env
        settings = rc.config.fabflows.upgrade
        roles, rate = check_params(
            params.roles, params.max_concurrency, params.max_errors, settings, env
        )
        servers = describe_servers(rc.creds, env.deployment, env.environment, roles=roles)
        running = [s for s in servers if s.state == "running"]
        hosts = hosts_from_servers(running, env.address_attribute)
        gathered = gather_apt_facts(
            hosts,
            scope.pool,
            app_packages_by_role(rc.config.app_server_packages),
            update_attempts=settings.apt_update_attempts,
        )
        return PackageFacts(settings, rate, servers, hosts, gathered)

    def plan(
        self, facts: PackageFacts, params: UpgradePackagesParams, env: EnvironmentConfig
    ) -> UpgradePackagesPlan:
        return plan_upgrade_packages(
            env,
            facts.settings,
            facts.servers,
            facts.hosts,
            facts.gathered,
            facts.rate,
            reboot=params.reboot,
        )

    def steps(self, plan: UpgradePackagesPlan, params: UpgradePackagesParams) -> list[Step]:
        batches = plan.upgrade_batches
        if not batches:
            return []
        out = [
            Step(
                ON_STEP,
                lambda s: mode_on(s, FLOW_NAME, s.rc.config_path, probe=True),
                mode_undo,
                site_down=True,
            )
        ]
        out += [
            Step(b.step, _upgrade(plan, b), no_undo=NO_UNDO, site_down=True, auto_undo=False)
            for b in batches
        ]
        if plan.reboot:
            out.append(
                Step(
                    REBOOT_STEP,
                    _reboot(plan),
                    no_undo="a reboot cannot be rolled back",
                    site_down=True,
                    auto_undo=False,
                )
            )
        out.append(Step(OFF_STEP, mode_off, no_undo="it ends the window", site_down=True))
        return out

    def verify(
        self, scope: Scope, plan: UpgradePackagesPlan, params: UpgradePackagesParams
    ) -> list[str]:
        hosts = current_outcomes(scope, plan)
        text = outcome_text(scope.env.label, hosts)
        scope.details["Upgraded"] = (
            ", ".join(h.host for h in hosts if h.result == "upgraded") or "none"
        )
        not_upgraded = [h for h in hosts if h.result in ("failed", "skipped", "not reached")]
        scope.details["Not upgraded"] = ", ".join(h.host for h in not_upgraded) or "none"
        scope.details["Reboot required"] = (
            ", ".join(h.host for h in hosts if h.reboot_required) or "none"
        )
        publish_table(_key(scope) + "-result", [h.model_dump() for h in hosts], text)
        scope.log("%s", text)
        if not_upgraded or any(h.reboot.startswith("FAILED") for h in hosts):
            return [text]
        return []


RUNBOOK = UpgradePackages()


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
) -> RunbookReport:
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

    **Steps** (the engine's: window, approval, lock, plan made again under it, journal, summary):
    `upgrade-mode-on` (as begin-upgrade: autoscaling processes suspended and recorded, 503 page on
    every web server, checked from outside), one `upgrade ...` step per batch of servers, `reboot`
    (only with `reboot`), `upgrade-mode-off`. Roles in
    `fabflows.upgrade.role_order` (databases before app servers), `max_concurrency` hosts of a
    role at a time (default 1): `apt-get install -y PKG=VERSION ...` with exactly the planned
    versions, `DEBIAN_FRONTEND=noninteractive`, existing config files kept (confdef/confold).
    Each server is then checked: planned versions installed, `dpkg --audit` clean, what is still
    pending, `/var/run/reboot-required`. When failures exceed `max_errors` no new server starts and
    the run fails; failures within `max_errors` let it go on, and it fails at the end naming them.

    **Whatever happens** (failure, threshold, cancellation) the window is closed at once: pages
    off, exactly the recorded processes resumed, the site checked for 200. A run killed outright is
    journaled: `fabflows recover` (recover-environment) closes the window it left open (end-upgrade
    does too). The report says which servers were upgraded and which were not, and where a reboot
    is now required.

    **Resume:** once the cause of a failure is fixed (a broken package replaced in the repository,
    a host repaired), `fabflows resume RUN_ID` (or Prefect's Retry of a deployment run) plans again
    and goes on: the batches already upgraded are done steps and are not touched again.

    **Reboots** only with `reboot` (off by default): after the upgrades, still inside the window,
    every server that needs one (`/var/run/reboot-required`) is rebooted through EC2
    (RebootInstances), one at a time in role order, and waited for: SSH answering (host key
    checked) in a new boot, the marker gone. A server not back within
    `fabflows.upgrade.reboot_timeout_seconds` stops the reboots and fails the run (after the window
    is closed and the site checked). A reboot cannot be rolled back.

    **Blast radius:** the site is down (503) during the apply; services restart as packages
    upgrade. Upgrades cannot be rolled back. Web servers launched later by the autoscaling group
    come from its image, without these upgrades.

    **Rolls back:** upgrade mode only; package upgrades and reboots cannot be rolled back.

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
    return execute(RUNBOOK, locals())
