"""update-sysadmin-users: the sysadmin accounts and keys of every server, from a users directory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from config import EnvironmentConfig
from fabflows.errors import BadInput
from fabflows.procedures.sysadmin_users import (
    FLOW_NAME,
    Batch,
    HostPlan,
    UpdateSysadminUsersPlan,
    image_note,
    plan_update_sysadmin_users,
    render_plan,
    reserved_names,
    resolve_users_dir,
)
from fabflows.report import artifact_key
from fabflows.runbook import RunContext
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from tasks.aws.autoscaling import AutoScalingGroup, describe_auto_scaling_group
from tasks.aws.ec2 import Server, describe_servers
from tasks.ssh.connection import SshOptions
from tasks.ssh.fleet import (
    FleetHost,
    FleetResult,
    RateControl,
    hosts_from_servers,
    publish_fleet_result,
)
from tasks.ssh.users import (
    SysadminUsersSpec,
    build_spec,
    list_sysadmin_accounts,
    load_users_dir,
    public_key_of,
    update_sysadmin_accounts,
)

__all__ = [
    "HostPlan",
    "UpdateSysadminUsersPlan",
    "image_note",
    "plan_update_sysadmin_users",
    "render_plan",
    "update_sysadmin_users",
]


class UpdateSysadminUsersParams(BaseModel):
    """The run's own parameters, validated before anything is read or changed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    users_dir: str | None = Field(
        default=None, description="Directory with one public-key file per user."
    )
    remove_unlisted: bool = Field(
        default=False, description="Remove managed accounts no longer listed (default: lock)."
    )
    max_concurrency: str = "25%"
    max_errors: str = "0"

    @field_validator("max_concurrency", "max_errors", mode="before")
    @classmethod
    def _text(cls, v: Any) -> str:
        return str(v)

    @property
    def rate(self) -> RateControl:
        return RateControl(max_concurrency=self.max_concurrency, max_errors=self.max_errors)


class SysadminUsersFailed(RuntimeError):
    """Some servers failed or did not verify. The message lists them."""


def _spec(rc: RunContext, params: UpdateSysadminUsersParams) -> SysadminUsersSpec:
    """The wanted accounts, from the users directory (BadInput: a bad directory or no own key)."""
    env = rc.env
    users_dir = resolve_users_dir(params.users_dir, rc.config)
    users = load_users_dir(users_dir, extra_reserved=reserved_names(rc.config, env))
    opts = SshOptions.from_settings(rc.config.fabflows.ssh, env.deploy_user)
    own_key = public_key_of(opts)
    if own_key is None:
        raise BadInput(
            "no SSH key configured (fabflows.ssh.identity_block or identity_file): fabflows could "
            "not keep its own key in the deploy user's authorized_keys"
        )
    return build_spec(
        users,
        admin_groups=env.admin_groups,
        deploy_user=env.deploy_user,
        connect_user=opts.user,
        connect_key=own_key,
        remove_unlisted=params.remove_unlisted,
    )


@dataclass
class UsersFacts:
    spec: SysadminUsersSpec
    servers: list[Server]
    hosts: list[FleetHost]
    gathered: FleetResult
    group: AutoScalingGroup | None


def _failed_so_far(scope: Scope) -> list[str]:
    return [
        line
        for value in scope.results.values()
        if isinstance(value, dict)
        for line in value.get("failed", [])
    ]


def _update(batch: Batch, plan: UpdateSysadminUsersPlan, params: UpdateSysadminUsersParams):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, Any]:
        spec = _spec(scope.rc, params)
        before = len(plan.blocked) + len(_failed_so_far(scope))
        left = max(0, plan.error_budget - before)
        result = update_sysadmin_accounts(
            batch.hosts,
            spec,
            scope.pool,
            RateControl(max_concurrency="100%", max_errors=left),
            plan.approved(),
            dry_run=False,
        )
        env = scope.env
        publish_fleet_result(
            result, artifact_key(FLOW_NAME, env.deployment, env.environment) + "-" + batch.step
        )
        scope.log("%s", result.summary())
        failed = [
            f"{r.host} ({r.address}): {r.status}: {r.message}"
            for r in result.results
            if r.status in ("failed", "skipped")
        ]
        if before + len(failed) > plan.error_budget:
            raise SysadminUsersFailed(
                f"{env.label}: {len(failed)} server(s) failed in {batch.step}, more than the "
                f"{plan.error_budget} tolerated; no further server starts:\n  "
                + "\n  ".join(plan.blocked_lines() + _failed_so_far(scope) + failed)
            )
        return {
            "summary": "; ".join(f"{r.host}: {r.status}" for r in result.results),
            "changed": [r.address for r in result.results if r.status == "changed"],
            "failed": failed,
            "not_done": [r.address for r in result.results if r.status in ("failed", "skipped")],
        }

    return apply


class UpdateSysadminUsers(Runbook[UpdateSysadminUsersParams, UsersFacts, UpdateSysadminUsersPlan]):
    name = FLOW_NAME
    Params = UpdateSysadminUsersParams
    plan_type = UpdateSysadminUsersPlan

    def validate(self, rc: RunContext, params: UpdateSysadminUsersParams) -> None:
        try:
            params.rate.error_budget(1)
        except ValidationError as exc:
            raise BadInput(f"{FLOW_NAME}: {exc.errors()[0]['msg']}") from None
        except ValueError as exc:
            raise BadInput(f"{FLOW_NAME}: {exc}") from None
        _spec(rc, params)  # the users directory and fabflows' own key, before any server

    def gather(self, scope: Scope, params: UpdateSysadminUsersParams) -> UsersFacts:
        rc, env = scope.rc, scope.env
        spec = _spec(rc, params)
        servers = describe_servers(rc.creds, env.deployment, env.environment)
        running = [s for s in servers if s.state == "running"]
        hosts = hosts_from_servers(running, env.address_attribute)
        gathered = list_sysadmin_accounts(hosts, spec, scope.pool, params.rate)
        group = (
            describe_auto_scaling_group(rc.creds, env.auto_scaling_group)
            if env.auto_scaling_group
            else None
        )
        return UsersFacts(spec, servers, hosts, gathered, group)

    def plan(
        self, facts: UsersFacts, params: UpdateSysadminUsersParams, env: EnvironmentConfig
    ) -> UpdateSysadminUsersPlan:
        return plan_update_sysadmin_users(
            env, facts.spec, facts.servers, facts.hosts, facts.gathered, facts.group, params.rate
        )

    def steps(self, plan: UpdateSysadminUsersPlan, params: UpdateSysadminUsersParams) -> list[Step]:
        removes = plan.remove_unlisted and plan.destructive
        return [
            Step(
                b.step,
                _update(b, plan, params),
                no_undo=(
                    "accounts and keys are data: run again with the users directory as it was "
                    "(a locked account put back in the directory is unlocked)"
                    + (
                        "; accounts REMOVED with remove_unlisted cannot be brought back"
                        if removes
                        else ""
                    )
                ),
                auto_undo=False,
                summary=", ".join(h.label for h in b.hosts),
            )
            for b in plan.batches
        ]

    def verify(
        self, scope: Scope, plan: UpdateSysadminUsersPlan, params: UpdateSysadminUsersParams
    ) -> list[str]:
        """Read again every server that is not known to have failed: nothing may be left to do.
        (fabflows' own login was already checked on every server whose keys for it changed.)"""
        failed = _failed_so_far(scope)
        skip = {h.address for h in plan.blocked} | {
            a for v in scope.results.values() if isinstance(v, dict) for a in v.get("not_done", [])
        }
        facts = self.gather(scope, params)  # a fresh read of every running server
        hosts = [h for h in facts.hosts if h.address not in skip]
        check = plan_update_sysadmin_users(
            scope.env, facts.spec, facts.servers, hosts, facts.gathered, facts.group, params.rate
        )
        leftovers = [
            f"{h.host} ({h.address}): verify: {h.status}: {h.message}"
            for h in check.hosts
            if h.status != "unchanged"
        ]
        scope.details["Verified"] = "yes" if not leftovers else f"no: {len(leftovers)} server(s)"
        scope.details["Autoscaling image"] = plan.image_note or "not affected"
        return plan.blocked_lines() + failed + leftovers


RUNBOOK = UpdateSysadminUsers()


@flow(name=FLOW_NAME, log_prints=False)
def update_sysadmin_users(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    users_dir: str | None = None,
    remove_unlisted: bool = False,
    max_concurrency: str = "25%",
    max_errors: str = "0",
    window_override_reason: str | None = None,
) -> RunbookReport:
    """Make every server's sysadmin accounts match a users directory, and rebuild the deploy user's keys.

    **Purpose:** the original's `update_sysadmin_users`, done right. On every server of the
    environment (all roles): create missing sysadmin accounts in the admin groups from config
    (`instance_settings.admin_groups`), write `~/.ssh/authorized_keys` atomically (0600, owned by
    the user; `~/.ssh` 0700), set GECOS from `<user>.gecos`, and rebuild the deploy user's
    authorized_keys from all listed keys (plus fabflows' own key, so it never locks itself out).
    Accounts that fabflows manages but are no longer listed are **locked** (password locked,
    expired, no login shell, keys and admin groups removed, sessions ended), or **removed** with
    `remove_unlisted`. Managed accounts are recorded on each server in
    `/etc/fabflows/sysadmin-users`; accounts fabflows did not create or adopt are never touched.
    Legacy `authorized_keys2` files (FabulAWS) of managed users and the deploy user are removed.

    **When to run:** after adding, removing or rotating a key in the users directory; after
    scaling out the web tier until its image is refreshed.

    **Preconditions:** the users directory is valid (checked before any server is contacted: user
    names, keys parsed with ssh-keygen, no private keys, no duplicates); fabflows can reach every
    running server over SSH with a known host key and sudo.

    **Blast radius:** SSH logins of the listed people and of the deploy user on every server. No
    downtime. Servers are updated `max_concurrency` at a time; once more than `max_errors` fail,
    no further server starts and the run fails with a per-server report.

    **Dry run (default):** reads every server and publishes, per server, what would change and
    the exact commands (keys travel on stdin; only their size and digest are shown).

    **Steps:** one per batch of `max_concurrency` servers (the journal records each batch before
    and after it runs, so `fabflows resume RUN_ID` skips the batches already done and a killed run
    leaves every server either as it was or as planned: each server's changes run as one batch
    that stops at the first failure, and the marker of managed accounts is written first).

    **Rollback:** there is no maintenance state to undo. Accounts and keys are data: the steps
    are not undone automatically, nor by `fabflows recover` (it names them; `fabflows resume`
    finishes them). Each server is re-read before it is changed (a server that changed since
    the plan is left alone); if fabflows' own login fails after its keys were rewritten, the
    previous keys are put back at once. To undo an addition, remove the file and run again (the
    account is locked); to undo a lock, put the file back and run again (the account is
    unlocked). An account removed with `remove_unlisted` cannot be brought back (its home is
    gone). Web servers launched later by the autoscaling group come from its image, which is
    reported as stale.

    Args:
        environment: Environment whose servers to update (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show what would change (default). Untick to apply.
        users_dir: Directory with one public-key file per user (default: the config's ssh_keys).
        remove_unlisted: Remove accounts no longer listed instead of locking them.
        max_concurrency: Servers updated at once: a number (5) or a percentage (25%).
        max_errors: Failed servers tolerated before no new server starts: a number or a percentage.
        window_override_reason: Run outside the maintenance window (protected environments), for
            this recorded reason.
    """
    return execute(RUNBOOK, locals())
