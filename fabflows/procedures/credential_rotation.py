"""rotate-credentials: the database and broker passwords rotated with alternating logins.

Each credential has two logins: the database's ``<database_user>`` (the group role that owns the
objects) and ``<database_user>_alt`` (a member acting as it), the broker's ``<broker_user>`` and
``<broker_user>_alt`` (same tags and vhost permissions), the replication ``replicator`` and
``replicator_alt`` (:mod:`tasks.postgres.replication_logins`). The app uses one of them, named on every
server by the file ``<home>/database_user`` (``broker_user``) beside ``<home>/database_password``
(``broker_password``); the secrets block holds the same pair. A rotation:

1. ``prepare``: a new password for each credential is generated and kept in the block as
   ``<secret>_pending`` (before anything uses it), then set on the login the app does **not**
   use (created the first time), and checked by logging in with it;
2. one ``switch-replica-<address>`` per replica (replication login: its ``.pgpass`` gets the new
   login's line beside the old one, ``primary_conninfo`` names it, reload, and the primary must
   serve it as the new login before the next one), then
   ``switch-other-servers`` then one ``switch-web-<address>`` per web server: the user and
   password files and the files rendered from them (pgbouncer's userlist) are swapped in (the
   old ones kept as ``.fabflows-prev``), pgbouncer reloads its userlist (SIGHUP), gunicorn
   reloads its workers gracefully (SIGHUP: new workers first, old ones finish their requests),
   the worker programs restart; each web server is out of the load balancers meanwhile and
   must answer its health check before it goes back and the next one starts;
3. ``promote``: the block's pair becomes the new login and password (pending dropped);
4. ``retire``: the login the app left gets a throwaway password nobody keeps, so the old secret
   is dead; 5. ``commit`` drops the kept old files.

At no point is a server's app pointed at a login whose password it does not have: the new
password works before any server is switched, and the old one is only killed once every server
has left it. Undo (a failed step, or ``fabflows recover`` after a killed run) puts the kept old
files back and reloads again until ``promote`` has started; from then on it finishes forward
(promote, retire, commit). Values come from the block and the servers' files: the journal holds
names, addresses and paths only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from prefect.types import SecretDict
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from blocks.secrets import LOGIN_NAMES, ServerSecrets, secrets_block_name
from config import EnvironmentConfig
from fabflows import logfilter
from fabflows.errors import BadInput
from fabflows.runbook import RunContext
from fabflows.runtime.engine import Runbook, Scope, Step
from fabflows.runtime.plan import Change, RunbookPlan
from tasks.ssh.fleet import FleetHost, HostResult, RateControl, hosts_from_servers, run_fleet
from tasks.ssh.remote import Remote

Credential = Literal["database", "broker", "replication"]
DB_ROLES = ("db-primary", "db-replica")
REPLICA_STEP = "switch-replica-"
PROMOTE = "promote"
PENDING_SUFFIX = "_pending"


# --------------------------------------------------------------------------- the plan


class CredentialPlan(BaseModel):
    """One credential's two logins and where its password is checked (names only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Credential
    secret: str = Field(description="database_password or broker_password")
    user_secret: str = Field(description="database_user or broker_user")
    base: str = Field(description="The original login (the group role for the database).")
    active: str = Field(description="The login the app uses now.")
    inactive: str = Field(description="The login that gets the new password.")
    checked_on: list[str] = Field(description="Addresses where the password is checked.")
    followers: list[str] = Field(
        default_factory=list,
        description="replication: the replicas' addresses (each one switches to the new login).",
    )


class SwitchBatch(BaseModel):
    """Servers switched in one step (names, roles and paths only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: str
    hosts: list[FleetHost]
    paths: dict[str, list[str]] = Field(description="address -> files swapped in")


class RotateCredentialsPlan(RunbookPlan):
    block_name: str
    database_name: str
    database_port: int = 5432
    credentials: list[CredentialPlan] = Field(default_factory=list)
    batches: list[SwitchBatch] = Field(default_factory=list)
    specs: list[str] = Field(default_factory=list, description="Rendered files rewritten.")
    replicas: list[FleetHost] = Field(
        default_factory=list, description="Replicas moved to the new replication login, in order."
    )


class RotationFacts(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    block_name: str
    hosts: list[FleetHost]
    active: dict[str, str]
    pending: list[str]
    spec_paths: dict[str, list[str]] = Field(description="role -> rendered files to rewrite")
    broker_user: str | None = Field(default=None, description="config secrets.broker_user")
    database_port: int = 5432
    replica_logins: dict[str, str | None] = Field(
        default_factory=dict,
        description="replica address -> the login its primary_conninfo names (None: unreadable)",
    )
    replica_status: dict[str, str] = Field(
        default_factory=dict, description="replica address -> its WAL receiver's status"
    )


SECRETS = {
    "database": ("database_password", "database_user"),
    "broker": ("broker_password", "broker_user"),
    "replication": ("replication_password", "replication_user"),
}


def base_user(kind: Credential, env: EnvironmentConfig, broker_user: str | None) -> str:
    from tasks.postgres.replication_logins import REPLICATION_ROLE

    if kind == "replication":
        return REPLICATION_ROLE
    return env.database_user if kind == "database" else (broker_user or env.deploy_user)


def default_credentials(hosts: list[FleetHost]) -> list[Credential]:
    """database and broker; and replication when a db-replica streams from the primary."""
    out: list[Credential] = ["database", "broker"]
    return out + (["replication"] if any(h.role == "db-replica" for h in hosts) else [])


def names_for(role: str, creds: list[CredentialPlan]) -> list[str]:
    """The secret and login names a server of ``role`` holds for the rotated credentials: the
    app's on every server, the replication pair on the database servers only (pure)."""
    return [
        n
        for c in creds
        if c.kind != "replication" or role in DB_ROLES
        for n in (c.secret, c.user_secret)
    ]


def plan_rotate_credentials(
    facts: RotationFacts,
    credentials: list[Credential],
    env: EnvironmentConfig,
) -> RotateCredentialsPlan:
    """Pure: which login gets the new password, which servers switch in which step."""
    from tasks.postgres.login_roles import alternate_of, shown_password_statement

    problems: list[str] = []
    changes: list[Change] = []
    creds: list[CredentialPlan] = []
    replicas: list[FleetHost] = []
    if facts.pending:
        problems.append(
            f"block {facts.block_name} holds {', '.join(facts.pending)} from an unfinished "
            "rotation: run `fabflows recover` first"
        )
    for kind in credentials:
        secret, user_secret = SECRETS[kind]
        base = base_user(kind, env, facts.broker_user)
        active = facts.active.get(user_secret, base)
        try:
            inactive = alternate_of(active, base)
        except ValueError as exc:
            problems.append(f"{user_secret} in the block: {exc}")
            continue
        role = "cache" if kind == "broker" else "db-primary"
        where = [h for h in facts.hosts if h.role == role]
        if not where:
            problems.append(f"{env.label} has no running {role} server for the {kind} login")
            continue
        followers = (
            [h for h in facts.hosts if h.role == "db-replica"] if kind == "replication" else []
        )
        if kind == "replication":
            if not followers:
                problems.append(
                    f"{env.label} has no running db-replica: no replication login to rotate"
                )
                continue
            wrong = [
                f"{h.label} streams as {facts.replica_logins.get(h.address) or 'an unreadable login'}"
                for h in followers
                if facts.replica_logins.get(h.address) != active
            ]
            stopped = [
                f"{h.label} is {facts.replica_status.get(h.address) or 'not streaming'}"
                for h in followers
                if facts.replica_status.get(h.address) != "streaming"
            ]
            if wrong or stopped:
                problems.append(
                    f"replication login {active} (the one in use): "
                    + "; ".join(wrong + stopped)
                    + " (reset-replicas first)"
                )
                continue
            replicas = followers
        creds.append(
            CredentialPlan(
                kind=kind,
                secret=secret,
                user_secret=user_secret,
                base=base,
                active=active,
                inactive=inactive,
                checked_on=[h.address for h in where],
                followers=[h.address for h in followers],
            )
        )
        what = (
            f"rabbitmqctl change_password {inactive} < stdin"
            if kind == "broker"
            else shown_password_statement(inactive)
        )
        unused = "no replica uses" if kind == "replication" else "the app does not use"
        for h in where:
            changes.append(
                Change(
                    target=h.label,
                    action=f"new password on {inactive} (the login {unused})",
                    detail=what
                    + ("" if inactive != base + "_alt" else " (created if missing)")
                    + (
                        "; pg_hba.conf allows it from " + ", ".join(h.address for h in followers)
                        if followers
                        else ""
                    ),
                    step="prepare",
                )
            )
    for h in replicas:
        c = next(c for c in creds if c.kind == "replication")
        changes.append(
            Change(
                target=h.label,
                action=f"stream as {c.inactive}",
                detail="a .pgpass line for it (beside the old one), primary_conninfo user="
                f"{c.inactive}, reload; wait until the primary serves it as {c.inactive}",
                step=REPLICA_STEP + h.address,
            )
        )
    web = [h for h in facts.hosts if h.role == "web"]
    others = [h for h in facts.hosts if h.role != "web"]
    home = env.home.rstrip("/")
    app_creds = any(c.kind != "replication" for c in creds)

    def paths(h: FleetHost) -> list[str]:
        specs = facts.spec_paths.get(h.role, []) if app_creds else []
        return [f"{home}/{n}" for n in names_for(h.role, creds)] + specs

    web = [h for h in web if paths(h)]
    others = [h for h in others if paths(h)]

    batches: list[SwitchBatch] = []
    if creds and others:
        batches.append(
            SwitchBatch(
                step="switch-other-servers",
                hosts=others,
                paths={h.address: paths(h) for h in others},
            )
        )
    for h in web:
        batches.append(
            SwitchBatch(step=f"switch-web-{h.address}", hosts=[h], paths={h.address: paths(h)})
        )
    if creds:
        for b in batches:
            for h in b.hosts:
                reload = {
                    "web": "reload pgbouncer and gunicorn (SIGHUP)",
                    "worker": "reload pgbouncer, restart the workers",
                }.get(h.role, "files only")
                changes.append(
                    Change(
                        target=h.label,
                        action="use "
                        + ", ".join(
                            c.inactive
                            for c in creds
                            if c.kind != "replication" or h.role in DB_ROLES
                        ),
                        detail=f"{len(b.paths[h.address])} file(s); {reload}",
                        step=b.step,
                    )
                )
        for c in creds:
            changes.append(
                Change(
                    target=f"block {facts.block_name}",
                    action=f"{c.user_secret}={c.inactive}, {c.secret}=the new password",
                    detail="the pending password becomes the current one",
                    step=PROMOTE,
                )
            )
            changes.append(
                Change(
                    target=", ".join(c.checked_on),
                    action=f"throwaway password on {c.active}",
                    detail="the old secret stops working"
                    + (" (no replica uses it any more)" if c.kind == "replication" else ""),
                    step="retire",
                )
            )
    return RotateCredentialsPlan(
        title=f"rotate-credentials on {env.label}",
        environment=env.label,
        changes=changes,
        problems=problems,
        notes=[
            "no downtime: each server moves to the other login while the old password still "
            "works; the old one is killed only once no server uses it"
        ],
        block_name=facts.block_name,
        database_name=env.database_name,
        database_port=facts.database_port,
        credentials=creds,
        batches=batches,
        specs=sorted({p for ps in facts.spec_paths.values() for p in ps}) if app_creds else [],
        replicas=replicas,
    )


# --------------------------------------------------------------------------- block access


def load_block(block_name: str) -> ServerSecrets:
    block = ServerSecrets.load(block_name)
    logfilter.register_block_secrets(block)
    return block


def drop_names(block: ServerSecrets, names: list[str]) -> None:
    plain = dict(block.extra.get_secret_value())
    for n in names:
        plain.pop(n, None)
    block.extra = SecretDict(plain)


def _pending(c: CredentialPlan) -> str:
    return c.secret + PENDING_SUFFIX


# --------------------------------------------------------------------------- helpers


def _remote(scope: Scope, address: str) -> Remote:
    return Remote(
        conn=scope.pool.get(address),
        host=address,
        dry_run=False,
        command_timeout=scope.pool.opts.command_timeout,
        channel_timeout=scope.pool.opts.connect_timeout,
    )


def _promoting(scope: Scope) -> bool:
    if scope.journal is None:
        return False
    entry = scope.journal.entry(scope.run_id)
    rec = entry.step(PROMOTE) if entry is not None else None
    return rec is not None and rec.state in ("started", "done", "failed")


def _contents(scope: Scope, plan: RotateCredentialsPlan, values: dict[str, SecretStr]):  # noqa: ANN202
    """address -> [StagedFile] for every switched server (in memory only)."""
    from fabflows.procedures.secret_files import desired_contents, resolve_specs, server_label
    from tasks.ssh.secrets import StagedFile

    env = scope.env
    specs = [s for s in resolve_specs(scope.rc, ("app", "newrelic")) if s.path in plan.specs]
    hosts = [h for b in plan.batches for h in b.hosts]
    labels = {h.address: server_label(h) for h in hosts}
    contents = {}
    for h in hosts:  # the replication pair only on the database servers
        names = names_for(h.role, plan.credentials)
        contents.update(desired_contents(env, [h], names, specs, values, labels))
    wanted = {h.address: set(b.paths[h.address]) for b in plan.batches for h in b.hosts}
    return {
        address: [
            StagedFile(
                path=path,
                owner=spec.owner if spec else env.deploy_user,
                mode=spec.mode if spec else 0o600,
                content=content,
            )
            for path, (spec, content) in files.items()
            if path in wanted[address]
        ]
        for address, files in contents.items()
    }


def _values(scope: Scope, plan: RotateCredentialsPlan, *, new: bool) -> dict[str, SecretStr]:
    """Every block value the rendered files use, with the pair overridden by the new login and
    the pending password (``new``) or left as the block has them."""
    block = load_block(plan.block_name)
    values: dict[str, SecretStr] = {}
    for name in block.names_set():
        v = block.get(name)
        if v is not None:
            values[name] = v
    for c in plan.credentials:
        values.setdefault(c.user_secret, SecretStr(c.active))
        if new:
            pending = block.get(_pending(c))
            if pending is None:
                # promoted already: the block's pair is the new one
                values[c.user_secret] = SecretStr(c.inactive)
                continue
            values[c.user_secret] = SecretStr(c.inactive)
            values[c.secret] = pending
    for name, v in values.items():
        if name not in LOGIN_NAMES:
            logfilter.register_secret(v)
    return values


def _reload(remote: Remote, host: FleetHost, groups: dict[str, str]) -> str:
    """Make the app read its new files without failing a request: pgbouncer and gunicorn reload
    on SIGHUP (gunicorn starts new workers, the old ones finish what they serve), the worker
    programs restart (no user request goes through them)."""
    from tasks.ssh.programs import read_programs, resolve_targets, restart_programs

    programs = read_programs(remote)
    done: list[str] = []
    hup = [groups.get("pgbouncer", "")]
    if host.role == "web":
        hup.append(groups.get("web", ""))
    targets, _ = resolve_targets(programs, [g for g in hup if g])
    if targets:
        remote.write(["supervisorctl", "signal", "HUP", *targets], sudo=True)
        done.append("SIGHUP " + ", ".join(targets))
    if host.role == "worker" and groups.get("celery"):
        done.append(restart_programs(remote, [groups["celery"]]).message)
    return "; ".join(done) or "files only"


def _switch(
    scope: Scope,
    plan: RotateCredentialsPlan,
    batch: SwitchBatch,
    *,
    undo: bool,
    data: dict | None = None,
) -> str:
    """Swap in (or restore) the batch's files and reload the app. A web server is out of the load
    balancers meanwhile (Standby for the group's instances, deregistered otherwise; where it was
    is journaled first), answers its health check, then goes back: no user request reaches a
    server whose gunicorn is reloading."""
    web = [h for h in batch.hosts if h.role == "web" and h.instance_id]
    if len(web) == 1 and len(batch.hosts) == 1:
        return _web_cycle(scope, plan, batch, web[0], undo=undo, data=data)
    return _switch_files(scope, plan, batch, undo=undo)


def _web_cycle(
    scope: Scope,
    plan: RotateCredentialsPlan,
    batch: SwitchBatch,
    host: FleetHost,
    *,
    undo: bool,
    data: dict | None,
) -> str:
    import time

    from fabflows.procedures.secret_rollout import _lb_targets
    from tasks.aws.instance_refresh import enter_standby, exit_standby
    from tasks.aws.load_balancers import (
        deregister_instance,
        health_of,
        register_instance,
        wait_for_load_balancers,
    )

    rc = scope.rc
    settings = rc.config.fabflows.newrelic
    iid = host.instance_id
    assert iid is not None
    targets, group, members = _lb_targets(rc)
    in_lb = not targets.empty
    in_group = bool(group and iid in members)
    if undo:
        registered = (data or {}).get("registered")
    else:
        registered = None
        if in_lb and not in_group:
            states = health_of(rc.creds, [iid], targets)
            registered = [where for (_, where), state in states.items() if state != "absent"]
        scope.record(
            servers=[host.address],
            paths=batch.paths,
            instance_id=iid,
            group=group if in_group else None,
            registered=registered,
        )
    timeout = settings.healthy_timeout_seconds
    if in_lb:
        if in_group:
            enter_standby(rc.creds, group, iid, dry_run=False)
        else:
            deregister_instance(rc.creds, iid, targets, dry_run=False)
        try:
            wait_for_load_balancers(rc.creds, [iid], targets, "out", timeout=timeout, poll=0.5)
        except Exception as exc:
            if not undo:
                raise
            scope.log("%s: %s; restoring it anyway", host.label, exc, level="error")
        time.sleep(settings.drain_seconds)
    back_in = False
    try:
        summary = _switch_files(scope, plan, batch, undo=undo)
        back_in = True
    finally:
        if in_lb and (back_in or undo):
            if in_group:
                exit_standby(rc.creds, group, iid, dry_run=False)
            else:
                register_instance(rc.creds, iid, targets, only=registered, dry_run=False)
            wait_for_load_balancers(rc.creds, [iid], targets, "in", timeout=timeout, poll=0.5)
        elif in_lb:
            scope.log(
                "%s stays out of the load balancers: it failed; its undo puts the previous "
                "files back and returns it",
                host.label,
                level="error",
            )
    return summary


def _switch_files(
    scope: Scope, plan: RotateCredentialsPlan, batch: SwitchBatch, *, undo: bool
) -> str:
    """Swap in (or restore) the batch's files, reload the app; web servers must answer after."""
    from tasks.http.probe import check_site_up
    from tasks.ssh.secrets import restore, stage_files, swap_in

    files = {} if undo else _contents(scope, plan, _values(scope, plan, new=True))
    groups = dict(scope.env.supervisor_groups)

    def step(remote: Remote, host: FleetHost) -> HostResult:
        paths = batch.paths[host.address]
        if undo:
            restore(remote, paths)
        else:
            stage_files(remote, files[host.address])
            swap_in(remote, paths)
        reloaded = _reload(remote, host, groups)
        return HostResult(status="changed", message=reloaded)

    result = run_fleet(
        batch.hosts,
        step,
        pool=scope.pool,
        rate=RateControl(max_concurrency="100%", max_errors="100%" if undo else 0),
        dry_run=False,
        name=batch.step,
    )
    result.raise_for_errors()
    upgrade = scope.rc.config.fabflows.upgrade
    web = [h for h in batch.hosts if h.role == "web"]
    if web:
        check_site_up(
            [upgrade.web_server_url.format(address=h.address) for h in web],
            upgrade.healthcheck_path,
            timeout=scope.rc.config.fabflows.newrelic.healthy_timeout_seconds,
        )
    verb = "back on the old login" if undo else "on the new login"
    return f"{len(batch.hosts)} server(s) {verb}"


REPLICA_TIMEOUT = 60.0
"""How long a replica may take to stream again as the login its primary_conninfo names."""


def _switch_replica(
    scope: Scope, plan: RotateCredentialsPlan, host: FleetHost, *, undo: bool
) -> str:
    """Move one replica to the new replication login (or back): its ``.pgpass`` gets the new
    login's line first, the old one kept (the old ``.pgpass`` kept as ``.fabflows-prev``), its
    ``primary_conninfo`` names the new login, PostgreSQL reloads, and this waits until the primary
    serves it as that login. Undo: ``primary_conninfo`` back first (the kept lines still hold the
    old password), then the old ``.pgpass``, then it must stream as the old login again."""
    from pydantic import SecretBytes

    from tasks.postgres.replication_logins import (
        PGPASS,
        pgpass_with,
        read_pgpass,
        set_conninfo_user,
        wait_streaming_as,
    )
    from tasks.ssh.secrets import StagedFile, restore, stage_files, swap_in

    c = next(c for c in plan.credentials if c.kind == "replication")
    replica = _remote(scope, host.address)
    primary = _remote(scope, c.checked_on[0])
    if undo:
        set_conninfo_user(replica, c.active)
        restore(replica, [PGPASS])
        waited = wait_streaming_as(primary, host.address, c.active, timeout=REPLICA_TIMEOUT)
        return f"{host.label} streams as {c.active} again ({waited:.1f} s)"
    scope.record(servers=[host.address], paths={host.address: [PGPASS]})
    pending = load_block(plan.block_name).get(_pending(c))
    if pending is None:
        raise RuntimeError(
            f"block {plan.block_name} holds no pending {c.secret}: the rotation was undone"
        )
    logfilter.register_secret(pending)
    content = pgpass_with(read_pgpass(replica).get_secret_value(), c.inactive, pending)
    staged = StagedFile(
        path=PGPASS,
        owner="postgres",
        mode=0o600,
        content=SecretBytes(content.get_secret_value().encode()),
    )
    stage_files(replica, [staged])
    swap_in(replica, [PGPASS])
    set_conninfo_user(replica, c.inactive)
    waited = wait_streaming_as(primary, host.address, c.inactive, timeout=REPLICA_TIMEOUT)
    return f"{host.label} streams as {c.inactive} ({waited:.1f} s)"


def _commit_files(scope: Scope, plan: RotateCredentialsPlan) -> None:
    from tasks.postgres.replication_logins import PGPASS
    from tasks.ssh.secrets import commit

    hosts = [h for b in plan.batches for h in b.hosts]
    paths = {a: list(p) for b in plan.batches for a, p in b.paths.items()}
    for h in plan.replicas:
        if h.address not in paths:
            hosts.append(h)
        paths.setdefault(h.address, []).append(PGPASS)
    run_fleet(
        hosts,
        lambda remote, host: (commit(remote, paths[host.address]), HostResult(status="changed"))[1],
        pool=scope.pool,
        rate=RateControl(max_concurrency="100%", max_errors=0),
        dry_run=False,
        name="commit",
    ).raise_for_errors()


def _set_password(scope: Scope, plan: RotateCredentialsPlan, c: CredentialPlan, login: str,
                  password: SecretStr, *, create: bool) -> None:  # fmt: skip
    from fabflows.upgrade_mode import ssh_options
    from tasks.postgres.login_roles import accepts, ensure_alternate_role, set_role_password
    from tasks.postgres.replication_logins import (
        allow_replication_login,
        ensure_replication_login,
    )
    from tasks.ssh.rabbitmq import change_password, ensure_user_like

    for address in c.checked_on:
        remote = _remote(scope, address)
        if c.kind == "replication":
            if create:
                ensure_replication_login(remote, login)
                allow_replication_login(remote, login, c.followers)
            set_role_password(remote, login, password)
        elif c.kind == "database":
            if create and login != c.base:
                ensure_alternate_role(remote, login, c.base)
            set_role_password(remote, login, password)
        elif create:
            ensure_user_like(remote, login, c.active, password)
        else:
            change_password(remote, login, password)
    if c.kind != "broker" and create:
        opts = ssh_options(scope.rc)
        database = plan.database_name if c.kind == "database" else "postgres"
        if not accepts(opts, c.checked_on[0], login, database, password, plan.database_port):
            raise RuntimeError(f"PostgreSQL refuses {login} with its new password")


def _finish(scope: Scope, plan: RotateCredentialsPlan) -> dict[str, str]:
    """Promote (if not yet), retire the old logins, drop the kept files: forward only."""
    _promote(scope, plan)
    _retire(scope, plan)
    _commit_files(scope, plan)
    return {"summary": "promote had started: finished forward (new logins kept, old ones retired)"}


def _promote(scope: Scope, plan: RotateCredentialsPlan) -> dict[str, str]:
    block = load_block(plan.block_name)
    changed = []
    for c in plan.credentials:
        pending = block.get(_pending(c))
        if pending is None:
            continue  # promoted already
        block.set(c.user_secret, c.inactive)
        block.set(c.secret, pending)
        changed.append(c.user_secret)
    drop_names(block, [_pending(c) for c in plan.credentials])
    block.save(plan.block_name, overwrite=True)
    return {"summary": f"block {plan.block_name}: " + (", ".join(changed) or "already promoted")}


def _retire(scope: Scope, plan: RotateCredentialsPlan) -> dict[str, str]:
    from tasks.postgres.login_roles import throwaway_password

    for c in plan.credentials:
        _set_password(scope, plan, c, c.active, throwaway_password(), create=False)
    return {"summary": "old password dead for " + ", ".join(c.active for c in plan.credentials)}


# --------------------------------------------------------------------------- the steps


def rotation_steps(plan: RotateCredentialsPlan) -> list[Step]:
    """The plan's steps (rebuilt the same from the journal: names, addresses and paths only)."""
    if not plan.credentials:
        return []

    def prepare(scope: Scope) -> dict[str, Any]:
        from tasks.postgres.login_roles import throwaway_password

        scope.record(logins=[c.inactive for c in plan.credentials])
        block = load_block(plan.block_name)
        for c in plan.credentials:
            if block.get(_pending(c)) is None:
                block.set(_pending(c), throwaway_password())
        block.save(plan.block_name, overwrite=True)  # kept before anything uses it
        logfilter.register_block_secrets(block)
        for c in plan.credentials:
            pending = block.get(_pending(c))
            assert pending is not None
            _set_password(scope, plan, c, c.inactive, pending, create=True)
        return {"summary": "new password on " + ", ".join(c.inactive for c in plan.credentials)}

    def unprepare(scope: Scope, data: dict) -> Any:
        from tasks.postgres.login_roles import throwaway_password

        if _promoting(scope):
            return _finish(scope, plan)
        block = load_block(plan.block_name)
        for c in plan.credentials:
            if block.get(_pending(c)) is not None:
                # the login nobody uses keeps no password anyone knows
                _set_password(scope, plan, c, c.inactive, throwaway_password(), create=False)
        drop_names(block, [_pending(c) for c in plan.credentials])
        block.save(plan.block_name, overwrite=True)
        return {"summary": "pending passwords dropped"}

    steps = [Step("prepare", prepare, unprepare)]

    def replica(host: FleetHost) -> Step:
        def apply(scope: Scope) -> dict[str, Any]:
            return {"summary": _switch_replica(scope, plan, host, undo=False)}

        def undo(scope: Scope, data: dict) -> Any:
            if _promoting(scope):
                return _finish(scope, plan)
            return {"summary": _switch_replica(scope, plan, host, undo=True)}

        return Step(REPLICA_STEP + host.address, apply, undo)

    steps += [replica(h) for h in plan.replicas]

    def switch(batch: SwitchBatch) -> Step:
        def apply(scope: Scope) -> dict[str, Any]:
            scope.record(servers=[h.address for h in batch.hosts], paths=batch.paths)
            return {"summary": _switch(scope, plan, batch, undo=False)}

        def undo(scope: Scope, data: dict) -> Any:
            if _promoting(scope):
                return _finish(scope, plan)
            return {"summary": _switch(scope, plan, batch, undo=True, data=dict(data))}

        return Step(batch.step, apply, undo)

    steps += [switch(b) for b in plan.batches]

    def forward(fn: Callable[[Scope, RotateCredentialsPlan], dict]) -> Callable[[Scope], dict]:
        return lambda scope: fn(scope, plan)

    steps.append(Step(PROMOTE, forward(_promote), lambda scope, data: _finish(scope, plan)))
    steps.append(Step("retire", forward(_retire), lambda scope, data: _finish(scope, plan)))
    steps.append(
        Step(
            "commit",
            lambda scope: (_commit_files(scope, plan), {"summary": "kept old files dropped"})[1],
            lambda scope, data: _finish(scope, plan),
        )
    )
    return steps


# --------------------------------------------------------------------------- the runbook


class RotateCredentialsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    credentials: list[Credential] | None = Field(
        default=None,
        min_length=1,
        description="Which passwords to rotate: database (the app's PostgreSQL login), broker, "
        "replication (the login the replicas stream with). Default: all (replication when the "
        "environment has a db-replica).",
    )

    @property
    def chosen(self) -> list[Credential]:
        """What was asked for (all three when nothing was: the plan drops replication when no
        replica runs)."""
        return list(self.credentials or ["database", "broker", "replication"])


class RotateCredentials(Runbook[RotateCredentialsParams, RotationFacts, RotateCredentialsPlan]):
    name = "rotate-credentials"
    Params = RotateCredentialsParams
    plan_type = RotateCredentialsPlan

    def block_name(self, rc: RunContext) -> str:
        return secrets_block_name(
            rc.env.deployment, rc.env.environment, rc.config.fabflows.secrets.block
        )

    def validate(self, rc: RunContext, params: RotateCredentialsParams) -> None:
        from fabflows.procedures.secret_files import load_secrets

        name = self.block_name(rc)
        block = load_secrets(name)
        if block is None:
            raise BadInput(f"secrets block {name} does not exist: run pull-server-secrets first")
        # the replication password need not be known: a rotation sets a new one on the other login
        missing = [
            SECRETS[k][0]
            for k in params.chosen
            if k != "replication" and block.get(SECRETS[k][0]) is None
        ]
        if missing:
            raise BadInput(f"block {name} has no value for {', '.join(missing)}")

    def gather(self, scope: Scope, params: RotateCredentialsParams) -> RotationFacts:
        from fabflows.procedures.secret_files import resolve_specs
        from tasks.aws.ec2 import describe_servers

        rc = scope.rc
        env = rc.env
        name = self.block_name(rc)
        block = load_block(name)
        servers = describe_servers(rc.creds, env.deployment, env.environment, states=("running",))
        hosts = hosts_from_servers(servers, env.address_attribute)
        if not hosts:
            raise BadInput(f"{env.label} has no running server")
        active = {}
        for k in params.chosen:
            v = block.get(SECRETS[k][1])
            if v is not None:
                active[SECRETS[k][1]] = v.get_secret_value()
        replica_logins, replica_status = self._replication_facts(scope, hosts, params, active)
        names = {n for k in params.chosen for n in SECRETS[k]}
        spec_paths: dict[str, list[str]] = {}
        for spec in resolve_specs(rc, ("app", "newrelic")):
            if names & set(spec.uses):
                for role in spec.roles:
                    spec_paths.setdefault(role, []).append(spec.path)
        pending = [
            SECRETS[k][0] + PENDING_SUFFIX
            for k in ("database", "broker", "replication")
            if block.get(SECRETS[k][0] + PENDING_SUFFIX) is not None
        ]
        settings = rc.config.fabflows.secrets
        return RotationFacts(
            block_name=name,
            hosts=hosts,
            active=active,
            pending=pending,
            spec_paths=spec_paths,
            broker_user=settings.broker_user,
            database_port=settings.database_port,
            replica_logins=replica_logins,
            replica_status=replica_status,
        )

    def _replication_facts(
        self,
        scope: Scope,
        hosts: list[FleetHost],
        params: RotateCredentialsParams,
        active: dict[str, str],
    ) -> tuple[dict[str, str | None], dict[str, str]]:
        """Which login each replica streams as (its primary_conninfo) and whether it streams; the
        current login, when the block does not name it yet, from the primary's
        ``<home>/replication_user`` (what a rotation wrote), else the provisioned one."""
        from tasks.postgres.replication_logins import (
            USER_SECRET,
            conninfo_user,
            primary_conninfo,
            receiver_status,
            replication_login,
        )

        replicas = [h for h in hosts if h.role == "db-replica"]
        primary = next((h for h in hosts if h.role == "db-primary"), None)
        if "replication" not in params.chosen or not replicas or primary is None:
            return {}, {}
        if USER_SECRET not in active:
            active[USER_SECRET] = replication_login(_remote(scope, primary.address), scope.env.home)
        logins: dict[str, str | None] = {}
        status: dict[str, str] = {}
        for h in replicas:
            try:
                remote = _remote(scope, h.address)
                logins[h.address] = conninfo_user(primary_conninfo(remote))
                status[h.address] = receiver_status(remote) or "not streaming"
            except Exception as exc:  # noqa: BLE001 - reported by the plan, nothing changes
                scope.log("%s: %s", h.label, exc, level="warning")
                logins[h.address], status[h.address] = None, "unreachable"
        return logins, status

    def plan(
        self, facts: RotationFacts, params: RotateCredentialsParams, env: EnvironmentConfig
    ) -> RotateCredentialsPlan:
        chosen = params.credentials or default_credentials(facts.hosts)
        return plan_rotate_credentials(facts, list(chosen), env)

    def steps(self, plan: RotateCredentialsPlan, params: RotateCredentialsParams) -> list[Step]:
        return rotation_steps(plan)

    def verify(
        self, scope: Scope, plan: RotateCredentialsPlan, params: RotateCredentialsParams
    ) -> list[str]:
        from fabflows.upgrade_mode import ssh_options
        from tasks.postgres.login_roles import accepts
        from tasks.ssh.rabbitmq import authenticates

        block = load_block(plan.block_name)
        problems = []
        for c in plan.credentials:
            user = block.get(c.user_secret)
            password = block.get(c.secret)
            if user is None or password is None or user.get_secret_value() != c.inactive:
                problems.append(f"block {plan.block_name}: {c.user_secret} is not {c.inactive}")
                continue
            if c.kind != "broker":
                ok = accepts(
                    ssh_options(scope.rc),
                    c.checked_on[0],
                    c.inactive,
                    plan.database_name if c.kind == "database" else "postgres",
                    password,
                    plan.database_port,
                )
            else:
                ok = all(
                    authenticates(_remote(scope, a), c.inactive, password) for a in c.checked_on
                )
            if not ok:
                problems.append(f"{c.inactive} is refused with the block's password")
            if c.kind == "replication":
                from tasks.postgres.replication_logins import streaming_logins

                serving = streaming_logins(_remote(scope, c.checked_on[0]))
                problems += [
                    f"the replica {a} streams as {serving.get(a) or 'nothing'}, not {c.inactive}"
                    for a in c.followers
                    if serving.get(a) != c.inactive
                ]
        return problems
