"""update-sysadmin-users: the sysadmin accounts and keys of every server, from a users directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from config import EnvironmentConfig, FabulawsConfig
from fabflows import approval, audit
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
from tasks.aws.autoscaling import AutoScalingGroup, describe_auto_scaling_group
from tasks.aws.ec2 import Server, describe_servers
from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import (
    FleetHost,
    FleetResult,
    RateControl,
    hosts_from_servers,
    publish_fleet_result,
    server_label,
)
from tasks.ssh.remote import display
from tasks.ssh.users import (
    Change,
    HostFacts,
    SysadminUsersSpec,
    build_spec,
    list_sysadmin_accounts,
    load_users_dir,
    plan_host_users,
    public_key_of,
    update_sysadmin_accounts,
)

FLOW_NAME = "update-sysadmin-users"
DESTRUCTIVE_ACTIONS = ("lock-account", "remove-account", "leave-group", "remove-keys")


class UpdateSysadminUsersParams(BaseModel):
    """The run's own parameters, validated before anything is read or changed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    users_dir: Path = Field(description="Directory with one public-key file per user.")
    remove_unlisted: bool = Field(
        default=False, description="Remove managed accounts no longer listed (default: lock)."
    )
    rate: RateControl = Field(default_factory=RateControl)


class HostPlan(BaseModel):
    """What one server needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    address: str
    role: str
    status: str = Field(description="would change / unchanged / unreachable / refused.")
    changes: list[Change] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    message: str = ""


class UpdateSysadminUsersPlan(BaseModel):
    """The plan over the environment, as published before anything changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    users: list[str]
    user_keys: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per listed user, each key as type, size and SHA256 digest (never the key).",
    )
    deploy_user: str
    connect_user: str
    remove_unlisted: bool
    hosts: list[HostPlan]
    not_reached: list[str] = Field(
        default_factory=list, description="Servers not running: not updated (stale when started)."
    )
    image_note: str | None = Field(default=None, description="Autoscaling image staleness.")

    @property
    def changing(self) -> list[HostPlan]:
        return [h for h in self.hosts if h.changes]

    @property
    def blocked(self) -> list[HostPlan]:
        return [h for h in self.hosts if h.status in ("unreachable", "refused", "not read")]

    @property
    def destructive(self) -> bool:
        """Locks or removes accounts (needs approval in protected environments)."""
        return any(c.action in DESTRUCTIVE_ACTIONS for h in self.hosts for c in h.changes)

    def approved(self) -> dict[str, list[str]]:
        """Address -> change summaries: the apply step refuses hosts that drifted from this."""
        return {h.address: [c.summary for c in h.changes] for h in self.hosts}

    def rows(self) -> list[dict[str, object]]:
        return [
            {
                "host": h.host,
                "role": h.role,
                "address": h.address,
                "status": h.status,
                "changes": len(h.changes),
                "what": h.message,
            }
            for h in self.hosts
        ]


class UpdateSysadminUsersReport(BaseModel):
    """The outcome of one run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    dry_run: bool
    outcome: str
    plan: UpdateSysadminUsersPlan
    applied: FleetResult | None = None
    verified: bool | None = Field(default=None, description="A re-read found nothing left to do.")
    image_note: str | None = None

    def render_text(self) -> str:
        """The terminal's view: the outcome, then the plan as the UI artifact shows it."""
        out = [self.outcome]
        if self.verified is not None:
            out.append(f"verified: {'yes' if self.verified else 'no'}")
        out += ["", render_plan(self.plan, markdown=False)]
        if self.applied is not None:
            out += ["", self.applied.summary(), self.applied.text_report()]
        return "\n".join(out)


# --------------------------------------------------------------------------- pure parts


def image_note(
    env: EnvironmentConfig,
    servers: Sequence[Server],
    group: AutoScalingGroup | None,
    changing: bool,
) -> str | None:
    """Web servers the autoscaling group launches later come from an image that lacks this change."""
    if not env.auto_scaling_group or not changing:
        return None
    images = sorted({s.image_id for s in servers if s.auto_scaling_group and s.image_id})
    template = (
        f"launch template {group.launch_template} (version {group.launch_template_version})"
        if group and group.launch_template
        else "its launch template"
    )
    return (
        f"Web servers launched later by autoscaling group {env.auto_scaling_group} start from "
        f"{template}, image {', '.join(images) or 'unknown'}, which still has the old sysadmin "
        "users: the image is STALE and needs a refresh (run deploy-serial). "
        "Until then, run this flow again after every scale-out."
    )


def plan_update_sysadmin_users(
    env: EnvironmentConfig,
    spec: SysadminUsersSpec,
    servers: Sequence[Server],
    hosts: Sequence[FleetHost],
    gathered: FleetResult,
    group: AutoScalingGroup | None,
) -> UpdateSysadminUsersPlan:
    """Pure: per server, the changes that bring it to ``spec`` (from the facts read on it)."""
    by_address = {r.address: r for r in gathered.results}
    rows: list[HostPlan] = []
    for host in hosts:
        read = by_address.get(host.address)
        base = {"host": host.label, "address": host.address, "role": host.role}
        if read is None or not isinstance(read.output, HostFacts):
            why = read.message if read is not None else "not read"
            status = "unreachable" if read is None or read.status != "skipped" else "not read"
            rows.append(HostPlan(**base, status=status, message=why))
            continue
        plan = plan_host_users(read.output, spec)
        if plan.errors:
            rows.append(
                HostPlan(**base, status="refused", notes=plan.notes, message="; ".join(plan.errors))
            )
            continue
        rows.append(
            HostPlan(
                **base,
                status="would change" if plan.changes else "unchanged",
                changes=plan.changes,
                notes=plan.notes,
                message="; ".join(plan.summaries()) or "already as listed",
            )
        )
    not_reached = [
        f"{server_label(s.name, s.instance_id)} ({s.state})"
        for s in servers
        if s.state != "running"
    ]
    changing = any(r.changes for r in rows)
    return UpdateSysadminUsersPlan(
        environment=env.label,
        users=[u.name for u in spec.users],
        user_keys={u.name: [k.describe() for k in u.public_keys] for u in spec.users},
        deploy_user=spec.deploy_user,
        connect_user=spec.connect_user,
        remove_unlisted=spec.remove_unlisted,
        hosts=rows,
        not_reached=not_reached,
        image_note=image_note(env, servers, group, changing),
    )


def render_plan(plan: UpdateSysadminUsersPlan, *, markdown: bool = True) -> str:
    """The users and their keys (type, size, digest), then the changes grouped by hosts that need
    the same ones, with commands. Markdown for the UI artifact, plain text for the terminal."""

    def heading(text: str, level: int) -> list[str]:
        if markdown:
            return ["#" * level + " " + text]
        return [text, ("=" if level == 1 else "-") * min(len(text), 80)]

    def bold(text: str) -> str:
        return f"**{text}**" if markdown else text

    def code(text: str) -> str:
        return f"`{text}`" if markdown else text

    out = [
        *heading(f"update-sysadmin-users on {plan.environment}", 1),
        "",
        f"{bold(f'Listed users ({len(plan.users)}):')} {', '.join(plan.users)}",
    ]
    for user in plan.users:
        for key in plan.user_keys.get(user, []):
            out.append(f"- {user}: {code(key)}")
    out += [
        f"{bold('Deploy user')} {code(plan.deploy_user)}: authorized_keys rebuilt from the listed "
        "keys" + (" plus fabflows' own key" if plan.connect_user == plan.deploy_user else ""),
        f"{bold('Accounts no longer listed:')} {'REMOVED' if plan.remove_unlisted else 'locked'} "
        "(only accounts fabflows manages)",
        "",
        markdown_table(plan.rows())
        if markdown
        else text_table(  # a terminal line per server: its changes are listed below
            [r | {"what": "listed below"} if r["changes"] else r for r in plan.rows()]
        ),
    ]
    groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = {}
    for h in plan.changing:
        key = (
            tuple(c.summary for c in h.changes),
            tuple(
                display(
                    ["sudo", "-n", "--", *c.argv], c.stdin.encode() if c.stdin is not None else None
                )
                for c in h.changes
            ),
        )
        groups.setdefault(key, []).append(h.host)
    for (summaries, commands), names in groups.items():
        out += ["", *heading(f"{', '.join(names)} ({len(names)} host(s))", 2), ""]
        out += [f"- {s}" for s in summaries]
        out += [
            "",
            f"Exact commands, run in this order as one {code('sudo -n -- sh -c')} batch per server "
            "that stops at the first failure (keys travel on stdin, shown by size and digest):",
            "",
        ]
        out += ["```sh", *commands, "```"] if markdown else [f"  {c}" for c in commands]
    notes = sorted({n for h in plan.hosts for n in h.notes})
    if notes or plan.not_reached or plan.image_note:
        out += ["", *heading("Notes", 2), ""]
        out += [f"- {n}" for n in notes]
        out += [f"- not updated (not running): {s}" for s in plan.not_reached]
        if plan.image_note:
            out.append(f"- {bold(plan.image_note)}")
    return "\n".join(out)


def resolve_users_dir(users_dir: str | None, config: FabulawsConfig) -> Path:
    """The parameter, else the config's ``ssh_keys`` (FabulAWS's ``deployment/users/``)."""
    if users_dir:
        return Path(users_dir).expanduser()
    if config.ssh_keys:
        return Path(config.ssh_keys).expanduser()
    raise BadInput("no users directory: pass --users-dir DIR (or set ssh_keys in the config)")


def _reserved(config: FabulawsConfig, env: EnvironmentConfig) -> list[str]:
    extra = config.model_extra or {}
    names = [env.deploy_user, *env.admin_groups]
    if isinstance(extra.get("webserver_user"), str):
        names.append(extra["webserver_user"])
    return names


# --------------------------------------------------------------------------- the flow


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
) -> UpdateSysadminUsersReport:
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

    **Rollback:** there is no maintenance state to undo. Each server is re-read before it is
    changed (a server that changed since the plan is left alone); if fabflows' own login fails
    after its keys were rewritten, the previous keys are put back at once. To undo an addition,
    remove the file and run again (the account is locked). Web servers launched later by the
    autoscaling group come from its image, which is reported as stale.

    Args:
        environment: Environment whose servers to update (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show what would change (default). Untick to apply.
        users_dir: Directory with one public-key file per user (default: the config's ssh_keys).
        remove_unlisted: Remove accounts no longer listed instead of locking them.
        max_concurrency: Servers updated at once: a number (5) or a percentage (25%).
        max_errors: Failed servers tolerated before no new server starts: a number or a percentage.
    """
    logger = get_run_logger()
    # ---- load: config, parameters, users directory, SSH identity (nothing contacted yet)
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    try:
        params = UpdateSysadminUsersParams(
            users_dir=resolve_users_dir(users_dir, ctx.config),
            remove_unlisted=remove_unlisted,
            rate=RateControl(max_concurrency=max_concurrency, max_errors=max_errors),
        )
    except ValidationError as exc:
        raise BadInput(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None
    users = load_users_dir(params.users_dir, extra_reserved=_reserved(ctx.config, env))
    opts = SshOptions.from_settings(ctx.config.fabflows.ssh, env.deploy_user)
    own_key = public_key_of(opts)
    if own_key is None:
        raise BadInput(
            "no SSH key configured (fabflows.ssh.identity_block or identity_file): fabflows could "
            "not keep its own key in the deploy user's authorized_keys"
        )
    spec = build_spec(
        users,
        admin_groups=env.admin_groups,
        deploy_user=env.deploy_user,
        connect_user=opts.user,
        connect_key=own_key,
        remove_unlisted=params.remove_unlisted,
    )
    starter = audit.record_start(env)
    logger.info(
        "%s: %d user(s) from %s: %s",
        env.label,
        len(users),
        params.users_dir,
        ", ".join(u.name for u in users),
    )
    if dry_run:
        return _run(env, ctx, spec, opts, params, dry_run=True, starter=starter)
    with environment_lock(env, ctx.config):
        return _run(env, ctx, spec, opts, params, dry_run=False, starter=starter)


class SysadminUsersFailed(RuntimeError):
    """Some servers could not be read, were refused, failed or did not verify. The message lists them."""


def _failure_report(title: str, rows: Sequence[tuple[str, str, str]]) -> SysadminUsersFailed:
    lines = [f"  {host} ({address}): {why}" for host, address, why in rows]
    return SysadminUsersFailed(title + "\n" + "\n".join(lines))


def _run(
    env: EnvironmentConfig,
    ctx: RunContext,
    spec: SysadminUsersSpec,
    opts: SshOptions,
    params: UpdateSysadminUsersParams,
    *,
    dry_run: bool,
    starter: audit.Starter,
) -> UpdateSysadminUsersReport:
    logger = get_run_logger()
    key = artifact_key(FLOW_NAME, env.deployment, env.environment)
    # ---- gather: the servers (AWS), then each server's accounts (SSH, read only)
    group_future = (  # only feeds the stale-image note: read while the servers are being read
        describe_auto_scaling_group.submit(ctx.creds, env.auto_scaling_group)
        if env.auto_scaling_group
        else None
    )
    servers = describe_servers(ctx.creds, env.deployment, env.environment)
    hosts = hosts_from_servers([s for s in servers if s.state == "running"], env.address_attribute)
    budget = params.rate.error_budget(len(hosts))
    with ConnectionPool(opts) as pool:
        gathered = list_sysadmin_accounts(hosts, spec, pool, params.rate)
        group = group_future.result() if group_future is not None else None
        # ---- plan (pure) and publish it
        plan = plan_update_sysadmin_users(env, spec, servers, hosts, gathered, group)
        plan_md = render_plan(plan)
        publish_markdown(key + "-plan", plan_md, f"Sysadmin users plan for {env.label}")
        publish_table(key + "-plan-hosts", plan.rows(), f"Per server, {env.label}")
        for h in plan.hosts:
            logger.info("%s (%s): %s: %s", h.host, h.address, h.status, h.message)
        if plan.image_note:
            logger.warning("%s", plan.image_note)
        blocked = [
            (
                h.host,
                h.address,
                h.message if h.message.startswith(h.status) else f"{h.status}: {h.message}",
            )
            for h in plan.blocked
        ]
        if dry_run:
            outcome = (
                f"dry run: {len(plan.changing)} of {len(plan.hosts)} server(s) would change"
                if plan.changing
                else f"dry run: nothing to change on {len(plan.hosts)} server(s)"
            ) + (f", {len(blocked)} could not be planned" if blocked else "")
            audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, starter=starter)
            logger.info("%s", outcome)
            if blocked:
                raise _failure_report(f"{env.label}: {outcome}", blocked)
            return UpdateSysadminUsersReport(
                environment=env.label,
                dry_run=True,
                outcome=outcome,
                plan=plan,
                image_note=plan.image_note,
            )
        if len(blocked) > budget:
            not_read = sum(1 for h in plan.blocked if h.status == "not read")
            outcome = (
                f"stopped before any change: {len(blocked) - not_read} server(s) unreachable or "
                f"refused, more than the {budget} tolerated"
                + (f" ({not_read} not read after that)" if not_read else "")
            )
            audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, starter=starter)
            raise _failure_report(f"{env.label}: {outcome}", blocked)
        if not plan.changing:
            outcome = f"nothing to change: {len(plan.hosts)} server(s) already as listed"
            logger.info("%s", outcome)
            audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, starter=starter)
            if blocked:
                raise _failure_report(f"{env.label}: {outcome}", blocked)
            return UpdateSysadminUsersReport(
                environment=env.label, dry_run=False, outcome=outcome, plan=plan, verified=True
            )
        # ---- approve: locking or removing accounts in a protected environment
        if approval.approval_required(env, destructive=plan.destructive):
            try:
                approval.request_approval(
                    env, ctx.config, plan_markdown=plan_md, expected_downtime=None
                )
            except approval.ApprovalRejected as exc:
                audit.record_summary(
                    env, outcome=f"rejected: {exc}", plan_markdown=plan_md, starter=starter
                )
                return exc.as_state()
        # ---- apply: the servers that need changes, each re-read and checked against the plan
        changing = {h.address for h in plan.changing}
        applied = update_sysadmin_accounts(
            [h for h in hosts if h.address in changing],
            spec,
            pool,
            params.rate.model_copy(update={"max_errors": max(0, budget - len(blocked))}),
            plan.approved(),
            dry_run=False,
        )
        publish_fleet_result(applied, key + "-applied")
        logger.info("%s", applied.summary())
        # ---- verify: read again; nothing may be left to do. (fabflows' own login was already
        # checked with a fresh connection on every server whose keys for it changed.)
        ok = {h.address for h in plan.hosts if h.status == "unchanged"}
        ok |= {r.address for r in applied.results if r.status == "changed"}
        checked_hosts = [h for h in hosts if h.address in ok]
        after = list_sysadmin_accounts(
            checked_hosts, spec, pool, params.rate.model_copy(update={"max_errors": "100%"})
        )
    check = plan_update_sysadmin_users(env, spec, servers, checked_hosts, after, group)
    leftovers = [
        (h.host, h.address, f"verify: {h.status}: {h.message}")
        for h in check.hosts
        if h.status != "unchanged"
    ]
    failed = blocked + [
        (r.host, r.address, f"{r.status}: {r.message}")
        for r in applied.results
        if r.status in ("failed", "skipped")
    ]
    outcome = (
        f"{len(applied.changed)} server(s) changed, {len(plan.hosts) - len(plan.changing) - len(blocked)} "
        f"already as listed, {len(failed)} failed" + ("; VERIFY FAILED" if leftovers else "")
    )
    audit.record_summary(
        env,
        outcome=outcome,
        plan_markdown=plan_md,
        starter=starter,
        details={
            "Verified": "yes" if not leftovers else f"no: {len(leftovers)} server(s)",
            "Autoscaling image": plan.image_note or "not affected",
        },
    )
    if failed or leftovers:
        raise _failure_report(f"{env.label}: {outcome}", failed + leftovers)
    logger.info("%s", outcome)
    return UpdateSysadminUsersReport(
        environment=env.label,
        dry_run=False,
        outcome=outcome,
        plan=plan,
        applied=applied,
        verified=True,
        image_note=plan.image_note,
    )
