"""push-server-secrets: write the secrets block to the servers, where the passwords are checked too."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field, SecretBytes, SecretStr

from blocks.secrets import (
    NEWRELIC_KEY_FORMATS,
    ServerSecrets,
    check_newrelic_key,
    secrets_block_name,
)
from config import EnvironmentConfig
from fabflows import approval, audit, lock, logfilter
from fabflows.errors import BadInput
from fabflows.file_rollout import HostChange, Rollout, RolloutFailed, RolloutReport
from fabflows.report import artifact_key, markdown_table, publish_markdown, text_table
from fabflows.runbook import RunContext, load_context
from flows.pull_server_secrets import load_secrets, secret_names, server_label
from tasks.aws.ec2 import describe_servers
from tasks.postgres.roles import alter_role_password, shown_statement
from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import FleetHost, RateControl, hosts_from_servers, run_fleet
from tasks.ssh.rabbitmq import broker_check_step, broker_password_step
from tasks.ssh.secrets import (
    BadTemplate,
    FileSpec,
    Fingerprint,
    HostFiles,
    StagedFile,
    describe_secret_files,
    read_secret_values,
    render_file,
    resolve_files,
    secret_file_content,
    secret_path,
    template_context,
)

RestartMode = Literal["rolling", "fast"]


class FileChange(BaseModel):
    """One file on one server that the push changes (names and paths only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    why: str = Field(description="secret <name>, or rendered (uses <names>).")
    change: Literal["create", "update", "owner/mode"]


class HostPlan(BaseModel):
    """What the push does on one server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    address: str
    role: str
    files: list[FileChange] = Field(default_factory=list)
    restart: list[str] = Field(default_factory=list)
    leftovers: list[str] = Field(default_factory=list)


class AuthChange(BaseModel):
    """A password changed where it is checked (the database, the broker)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str
    where: str
    what: str


class PushServerSecretsPlan(BaseModel):
    """The plan of push-server-secrets (never values, never digests of values)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    block_name: str
    changed_secrets: list[str] = Field(description="Names whose value changes on some server.")
    hosts: list[HostPlan]
    auth: list[AuthChange] = Field(default_factory=list)
    mode: Literal["rolling", "fast", "window"]
    why: str

    @property
    def changing(self) -> list[HostPlan]:
        return [h for h in self.hosts if h.files or h.restart]

    @property
    def noop(self) -> bool:
        return not self.changing and not self.auth

    def rows(self) -> list[dict[str, str]]:
        return [
            {
                "server": h.host,
                "role": h.role,
                "files": ", ".join(f"{f.path} ({f.change}: {f.why})" for f in h.files) or "-",
                "restart": ", ".join(h.restart) or "-",
                "leftovers": ", ".join(h.leftovers) or "-",
            }
            for h in self.hosts
        ]

    def render_markdown(self) -> str:
        if self.noop:
            return f"**{self.environment}: the servers already hold block `{self.block_name}`.**"
        out = [
            f"**{self.environment}: push {', '.join(self.changed_secrets) or 'no new value'} from "
            f"block `{self.block_name}` to {len(self.changing)} server(s), {self.mode}**",
            "",
            f"Mode: {self.why}",
            "",
        ]
        if self.auth:
            out += ["Changed where they are checked:"]
            out += [f"- {a.secret}: {a.where}: `{a.what}`" for a in self.auth]
            out.append("")
        out.append(markdown_table(self.rows()))
        return "\n".join(out)


class PushServerSecretsResult(BaseModel):
    """What push-server-secrets did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan: PushServerSecretsPlan
    dry_run: bool
    rollout: RolloutReport | None = None
    verified: bool = False
    outcome: str = ""


# --------------------------------------------------------------------------- pure parts


def restart_names(
    settings_programs: dict[str, list[str]], env: EnvironmentConfig, role: str
) -> list[str]:
    return [
        name.format(environment=env.environment, deployment=env.deployment)
        for name in settings_programs.get(role, [])
    ]


def plan_push_server_secrets(
    env: EnvironmentConfig,
    block_name: str,
    names: list[str],
    specs: list[FileSpec],
    facts: list[HostFiles],
    desired: dict[str, dict[str, str]],
    labels: dict[str, str],
    app_programs: dict[str, list[str]],
    window_for: list[str],
    restart_mode: RestartMode,
    auth: list[AuthChange],
) -> PushServerSecretsPlan:
    """Pure: compare each server's files with what the block renders to, decide restarts and mode.

    Args:
        env: The environment.
        block_name: The secrets block.
        names: Secret names (config ``password_names``).
        specs: Config files embedding secrets.
        facts: Each server's files as read (owner, mode, keyed print).
        desired: address -> path -> keyed print of the wanted content.
        labels: address -> how the server is named in the plan.
        app_programs: role -> supervisor groups the app runs (restarted when anything changes).
        window_for: secrets whose change needs an upgrade window.
        restart_mode: rolling or fast, when no window is needed.
        auth: password changes where they are checked (from the gather step).
    """
    by_path = {s.path: s for s in specs}
    secret_paths = {secret_path(env.home, n): n for n in names}
    hosts: list[HostPlan] = []
    changed_secrets: set[str] = set()
    for hf in facts:
        files: list[FileChange] = []
        restart: list[str] = []
        content_changed = False
        for path, wanted in desired.get(hf.address, {}).items():
            fact = hf.fact(path)
            spec = by_path.get(path)
            owner = spec.owner if spec else env.deploy_user
            mode = spec.mode if spec else 0o600
            why = (
                f"secret {secret_paths[path]}"
                if path in secret_paths
                else (
                    "rendered (uses "
                    + ", ".join(n for n in (spec.uses if spec else []) if n in names)
                    + ")"
                )
            )
            if fact is None or not fact.exists:
                change = "create"
            elif fact.fingerprint != wanted:
                change = "update"
            elif fact.owner != owner or fact.mode != mode:
                change = "owner/mode"
            else:
                continue
            files.append(FileChange(path=path, why=why, change=change))
            if change != "owner/mode":
                content_changed = True
                if path in secret_paths:
                    changed_secrets.add(secret_paths[path])
                elif spec:
                    for name in spec.restart:
                        if name not in restart:
                            restart.append(name)
        if content_changed:
            for name in restart_names(app_programs, env, hf.role):
                if name not in restart:
                    restart.append(name)
        hosts.append(
            HostPlan(
                host=labels.get(hf.address, hf.host),
                address=hf.address,
                role=hf.role,
                files=files,
                restart=restart,
                leftovers=hf.leftovers,
            )
        )
    needs_window = sorted(n for n in changed_secrets if n in window_for) + sorted(
        a.secret for a in auth if a.secret not in changed_secrets
    )
    if auth or needs_window:
        mode: Literal["rolling", "fast", "window"] = "window"
        why = (
            f"{', '.join(sorted(set(needs_window)))} change(s) where the password is checked: the "
            "database/broker password, the files and the restarts happen in one short upgrade window"
        )
    else:
        mode = restart_mode
        why = (
            "web servers restarted one at a time out of the load balancers (no downtime)"
            if mode == "rolling"
            else "workers restarted, then web servers at once inside a short upgrade window"
        )
    return PushServerSecretsPlan(
        environment=env.label,
        block_name=block_name,
        changed_secrets=sorted(changed_secrets),
        hosts=hosts,
        auth=auth,
        mode=mode,
        why=why,
    )


def check_block(
    block: ServerSecrets | None, block_name: str, names: list[str]
) -> dict[str, SecretStr]:
    """Every configured name must be set in the block; New Relic keys must look like keys."""
    if block is None:
        raise BadInput(
            f"secrets block {block_name} does not exist: run pull-server-secrets, or create it "
            "in the UI (Blocks > fabflows server secrets)"
        )
    values = block.values(names)
    missing = [n for n, v in values.items() if v is None]
    if missing:
        raise BadInput(f"block {block_name} has no value for {', '.join(missing)}")
    problems = []
    for name in NEWRELIC_KEY_FORMATS:
        if name in values:
            try:
                check_newrelic_key(name, values[name])
            except ValueError as exc:
                problems.append(str(exc))
    if problems:
        raise BadInput(f"block {block_name}: " + "; ".join(problems))
    return {n: v for n, v in values.items() if v is not None}


def resolve_specs(ctx: RunContext, config: str | None, kinds: tuple[str, ...]) -> list[FileSpec]:
    from config.loader import find_config

    try:
        config_dir = find_config(config).resolve().parent
    except Exception:  # noqa: BLE001 - load_context already found it; fall back to the cwd
        config_dir = Path.cwd()
    try:
        specs = resolve_files(ctx.config.fabflows.secrets.files, ctx.env, config_dir)
    except BadTemplate as exc:
        raise BadInput(f"fabflows.secrets.files: {exc}") from None
    return [s for s in specs if s.kind in kinds]


def desired_contents(
    env: EnvironmentConfig,
    hosts: list[FleetHost],
    names: list[str],
    specs: list[FileSpec],
    values: dict[str, SecretStr],
    labels: dict[str, str],
    with_secret_files: bool = True,
) -> dict[str, dict[str, tuple[FileSpec | None, SecretBytes]]]:
    """address -> path -> (spec, content): secret files and rendered files (in memory only)."""
    plain = {n: values[n].get_secret_value() for n in names}
    out: dict[str, dict[str, tuple[FileSpec | None, SecretBytes]]] = {}
    for host in hosts:
        files: dict[str, tuple[FileSpec | None, SecretBytes]] = {}
        if with_secret_files:
            for name in names:
                files[secret_path(env.home, name)] = (None, secret_file_content(values[name]))
        context = template_context(env, labels.get(host.address, host.name), host.role, plain)
        for spec in specs:
            if host.role in spec.roles:
                try:
                    files[spec.path] = (spec, render_file(spec, context))
                except BadTemplate as exc:
                    raise BadInput(f"fabflows.secrets.files: {exc}") from None
        out[host.address] = files
    return out


def host_changes(
    env: EnvironmentConfig,
    plan_hosts: list[HostPlan],
    hosts: list[FleetHost],
    contents: dict[str, dict[str, tuple[FileSpec | None, SecretBytes]]],
) -> list[HostChange]:
    by_address = {h.address: h for h in hosts}
    out = []
    for hp in plan_hosts:
        files = []
        for fc in hp.files:
            spec, content = contents[hp.address][fc.path]
            files.append(
                StagedFile(
                    path=fc.path,
                    owner=spec.owner if spec else env.deploy_user,
                    mode=spec.mode if spec else 0o600,
                    content=content,
                )
            )
        if files or hp.restart:
            out.append(HostChange(host=by_address[hp.address], files=files, restart=hp.restart))
    return out


def verify_files(
    facts: list[HostFiles],
    contents: dict[str, dict[str, tuple[FileSpec | None, SecretBytes]]],
    fingerprint: Fingerprint,
    deploy_user: str,
) -> list[str]:
    """Pure: what is still wrong after the push (empty: every file as wanted)."""
    wrong = []
    for hf in facts:
        for path, (spec, content) in contents.get(hf.address, {}).items():
            fact = hf.fact(path)
            owner = spec.owner if spec else deploy_user
            mode = spec.mode if spec else 0o600
            if fact is None or not fact.exists:
                wrong.append(f"{hf.host}: {path} is missing")
            elif fact.fingerprint != fingerprint(content):
                wrong.append(f"{hf.host}: {path} does not hold the block's value")
            elif fact.owner != owner or fact.mode != mode:
                wrong.append(f"{hf.host}: {path} is {fact.owner} {fact.describe_mode()}")
    return wrong


# --------------------------------------------------------------------------- gather helpers


def reference_value(
    pool: ConnectionPool, hosts: list[FleetHost], role: str, home: str, name: str
) -> tuple[FleetHost | None, SecretStr | None]:
    """The value of ``name`` on the first server of ``role`` (where the password is checked)."""
    host = next((h for h in hosts if h.role == role), None)
    if host is None:
        return None, None
    return host, read_secret_values(pool, host, home, [name]).get(name)


@task(name="change-broker-password", cache_policy=NO_CACHE, persist_result=False, retries=0)
def change_broker_password(
    pool: ConnectionPool,
    hosts: list[FleetHost],
    user: str,
    current: SecretStr,
    new: SecretStr,
    *,
    dry_run: bool,
    checked: bool = False,
) -> None:
    """Make every cache server's RabbitMQ accept ``new`` for ``user`` (compensation: swap them)."""
    result = run_fleet(
        hosts,
        broker_password_step(user, current, new, checked=checked),
        pool=pool,
        rate=RateControl(max_concurrency="100%", max_errors=0),
        dry_run=dry_run,
        name="change-broker-password",
    )
    result.raise_for_errors()


@task(name="check-broker-password", cache_policy=NO_CACHE, persist_result=False, retries=1)
def check_broker(
    pool: ConnectionPool, hosts: list[FleetHost], user: str, current: SecretStr, new: SecretStr
) -> dict[str, str]:
    """Read-only: address -> which password (``current``/``new``) each broker accepts.

    Raises:
        FleetError: a broker refuses both (the servers' broker_password does not match it).
    """
    result = run_fleet(
        hosts,
        broker_check_step(user, current, new),
        pool=pool,
        rate=RateControl(max_concurrency="100%", max_errors="100%"),
        dry_run=True,
        name="check-broker-password",
    )
    result.raise_for_errors()
    return {r.address: r.output for r in result.results}


# --------------------------------------------------------------------------- the flow


@flow(name="push-server-secrets", log_prints=False)
def push_server_secrets(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    restart_mode: RestartMode = "rolling",
) -> PushServerSecretsResult:
    """Write the secrets block to every server, and change the passwords where they are checked.

    The original's `update_server_passwords` ran `echo "<value>" > <home>/<name>` (the value in its
    output and in `ps`, broken by quotes and `$`), and never changed the PostgreSQL or RabbitMQ
    passwords, so rotating them broke the site. Here:

    - each secret file `<home>/<name>` is written over SFTP, mode 600, owned by the deploy user; the
      config files that embed secrets (`fabflows.secrets.files`: pgbouncer's userlist, the New Relic
      files...) are re-rendered from the block;
    - when `database_password` or `broker_password` changes, the application's PostgreSQL role
      (`ALTER ROLE` on the db-primary, through an SSH tunnel, as the role itself) and the broker
      user (`rabbitmqctl change_password`, password on stdin) change too, inside one short upgrade
      window with the files and the restarts;
    - other changes restart the app rolling: workers first, then web servers one at a time out of
      the load balancers (`restart_mode=fast`: all web servers at once inside an upgrade window).

    **When to run:** after changing a value in the block `<deployment>-<environment>-secrets` (the
    rotation recipe: pull-server-secrets, edit the block, push-server-secrets, then deploy-serial so
    new web servers carry the new files).

    **Blast radius:** every server's secret files, the rendered config files, the app processes
    (restarted), and for a database or broker password, the database role and the broker user.
    Measured downtime: none in rolling mode; the upgrade window's otherwise (reported).

    **Dry run shows:** per server which files would be created or updated and why (names and paths,
    never values), which programs restart, which passwords change where they are checked, and the
    mode.

    **Rollback:** every new file is staged first; old files are kept as `<path>.fabflows-prev` until
    the end. If a restart, a server's own check or a password change fails, the previous files go
    back, the programs restart again and the database/broker passwords are changed back; the run
    fails naming which servers run what. A run killed outright leaves the backups on the servers
    (the next plan lists them as leftovers).

    Args:
        environment: Environment (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Set false to apply it.
        restart_mode: rolling (no downtime) or fast (web servers at once in an upgrade window) when
            no password checked by the database or the broker changes.
    """
    logger = get_run_logger()
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    audit.record_start(env)
    settings = ctx.config.fabflows.secrets
    names = secret_names(list(ctx.config.password_names))
    block_name = secrets_block_name(env.deployment, env.environment, settings.block)
    values = check_block(load_secrets(block_name), block_name, names)
    for value in values.values():
        logfilter.register_secret(value)
    specs = resolve_specs(ctx, config, ("app", "newrelic"))

    servers = describe_servers(ctx.creds, env.deployment, env.environment, states=("running",))
    hosts = hosts_from_servers(servers, env.address_attribute)
    if not hosts:
        raise BadInput(f"{env.label} has no running server")
    labels = {h.address: server_label(h) for h in hosts}
    contents = desired_contents(env, hosts, names, specs, values, labels)
    fingerprint = Fingerprint()
    desired = {
        a: {p: fingerprint(c) for p, (_, c) in files.items()} for a, files in contents.items()
    }
    opts = SshOptions.from_settings(ctx.config.fabflows.ssh, env.deploy_user)
    with ConnectionPool(opts) as pool:
        facts = describe_secret_files(
            pool, hosts, {a: list(files) for a, files in contents.items()}, fingerprint
        )
        auth, auth_steps = gather_auth(ctx, pool, hosts, names, values, opts, labels)
        plan = plan_push_server_secrets(
            env,
            block_name,
            names,
            specs,
            facts,
            desired,
            labels,
            settings.app_programs,
            settings.window_for,
            restart_mode,
            auth,
        )
        key = artifact_key("push-server-secrets", env.deployment, env.environment)
        plan_md = plan.render_markdown()
        publish_markdown(key + "-plan", plan_md, f"Push plan for {env.label}")
        logger.info("%s\n%s", plan_md.splitlines()[0], text_table(plan.rows()))
        if dry_run or plan.noop:
            outcome = "dry run" if dry_run else "nothing to change"
            audit.record_summary(env, outcome=outcome, plan_markdown=plan_md)
            return PushServerSecretsResult(plan=plan, dry_run=dry_run, outcome=outcome)

        if approval.approval_required(env, destructive=plan.mode == "window"):
            approval.request_approval(
                env, ctx.config, plan_markdown=plan_md, expected_downtime=None
            )
        changes = host_changes(env, plan.hosts, hosts, contents)
        with lock.environment_lock(env, ctx.config):
            rollout = Rollout(
                ctx,
                pool,
                changes,
                settings=ctx.config.fabflows.newrelic,
                dry_run=False,
                config_path=config,
            )
            rollout.stage()
            try:
                report = rollout.run(
                    plan.mode,
                    before_swap=auth_steps[0] if auth else None,
                    undo_before_swap=auth_steps[1] if auth else None,
                )
            except RolloutFailed as exc:
                publish_markdown(key + "-rollout", exc.report.render_markdown(), "Rolled back")
                audit.record_summary(env, outcome="rolled back", plan_markdown=plan_md)
                raise
            after = describe_secret_files(
                pool, hosts, {a: list(files) for a, files in contents.items()}, fingerprint
            )
            wrong = verify_files(after, contents, fingerprint, env.deploy_user)
            if wrong:
                raise RuntimeError("after the push: " + "; ".join(wrong))
            rollout.commit()
    publish_markdown(key + "-rollout", report.render_markdown(), f"Push to {env.label}")
    logger.info("%s", report.describe())
    audit.record_summary(
        env,
        outcome="completed",
        plan_markdown=plan_md,
        details={"rollout": report.describe()},
    )
    return PushServerSecretsResult(
        plan=plan, dry_run=False, rollout=report, verified=True, outcome="completed"
    )


def gather_auth(
    ctx: RunContext,
    pool: ConnectionPool,
    hosts: list[FleetHost],
    names: list[str],
    values: dict[str, SecretStr],
    opts: SshOptions,
    labels: dict[str, str],
):  # noqa: ANN201 - (list[AuthChange], (apply, undo))
    """Which checked passwords change, and the steps that change (and change back) them."""
    env = ctx.env
    settings = ctx.config.fabflows.secrets
    auth: list[AuthChange] = []
    do: list = []
    undo: list = []
    if "database_password" in names:
        db, current = reference_value(pool, hosts, "db-primary", env.home, "database_password")
        new = values["database_password"]
        if (
            db is not None
            and current is not None
            and current.get_secret_value() != new.get_secret_value()
        ):
            where = f"PostgreSQL role {env.database_user} on {labels[db.address]}"
            auth.append(
                AuthChange(
                    secret="database_password", where=where, what=shown_statement(env.database_user)
                )
            )
            args = dict(
                server=db.address,
                role=env.database_user,
                database=env.database_name,
                port=settings.database_port,
            )
            do.append(
                lambda a=args, c=current, n=new: alter_role_password(
                    opts, **a, current=c, new=n, dry_run=False
                )
            )
            undo.append(
                lambda a=args, c=current, n=new: alter_role_password(
                    opts, **a, current=n, new=c, dry_run=False
                )
            )
    if "broker_password" in names:
        caches = [h for h in hosts if h.role == "cache"]
        cache, current = reference_value(pool, hosts, "cache", env.home, "broker_password")
        new = values["broker_password"]
        user = settings.broker_user or env.deploy_user
        if (
            cache is not None
            and current is not None
            and current.get_secret_value() != new.get_secret_value()
        ):
            # which password each broker accepts, checked now (outside any window): a broker
            # refusing both stops the run here, before anything changed
            states = check_broker(pool, caches, user, current, new)
            todo = [c for c in caches if states.get(c.address) != "new"]
            if todo:
                auth.append(
                    AuthChange(
                        secret="broker_password",
                        where=f"RabbitMQ user {user} on "
                        + ", ".join(labels[c.address] for c in todo),
                        what=f"rabbitmqctl change_password {user} < stdin",
                    )
                )
                do.append(
                    lambda c=current, n=new, h=todo: change_broker_password(
                        pool, h, user, c, n, dry_run=False, checked=True
                    )
                )
                undo.append(
                    lambda c=current, n=new, h=todo: change_broker_password(
                        pool, h, user, n, c, dry_run=False
                    )
                )

    def apply() -> None:
        for step in do:
            step()

    def revert() -> None:
        problems = []
        for step in reversed(undo):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - try every one, report all
                problems.append(str(exc))
        if problems:
            raise RuntimeError("; ".join(problems))

    return auth, (apply, revert)
