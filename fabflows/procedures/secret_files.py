"""Secret files on the servers, shared by pull-server-secrets, push-server-secrets and
update-newrelic-keys: the secrets block, which files hold which secret, the pure push plan, and the
checks of the passwords where they are checked (the database role, the broker user).

Nothing here writes a value anywhere but the servers' files (through :mod:`tasks.ssh.secrets`):
plans, facts and journal data carry names, paths, owners, modes and per-run keyed prints only.
"""

from __future__ import annotations

from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, SecretBytes, SecretStr

from blocks.secrets import (
    NEWRELIC_KEY_FORMATS,
    ServerSecrets,
    check_newrelic_key,
    check_secret_name,
)
from config import EnvironmentConfig
from fabflows import logfilter
from fabflows.errors import BadInput
from fabflows.report import markdown_table
from fabflows.runbook import RunContext
from fabflows.runtime.plan import Change, RunbookPlan
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.fleet import FleetHost, RateControl, run_fleet
from tasks.ssh.rabbitmq import broker_check_step, broker_password_step
from tasks.ssh.secrets import (
    BadTemplate,
    FileSpec,
    Fingerprint,
    HostFiles,
    StagedFile,
    read_secret_values,
    render_file,
    resolve_files,
    secret_file_content,
    secret_path,
    template_context,
)

RolloutMode = Literal["rolling", "fast", "window"]

# --------------------------------------------------------------------------- the block


def load_secrets(block_name: str) -> ServerSecrets | None:
    """The secrets block, or None if there is no document of that name."""
    try:
        block = ServerSecrets.load(block_name)
    except ValueError as exc:
        if "Unable to find" in str(exc) or "not found" in str(exc).lower():
            return None
        raise
    logfilter.register_block_secrets(block)
    return block


def secret_names(names: list[str]) -> list[str]:
    """Config ``password_names``, checked (they become file names on the servers)."""
    try:
        return [check_secret_name(n) for n in names]
    except ValueError as exc:
        raise BadInput(f"password_names: {exc}") from None


def server_label(host: FleetHost) -> str:
    """How a server is named in plans: its Name tag (shared by a group's instances) and address."""
    return f"{host.name} ({host.address})" if host.name != host.address else host.address


def pick_source(hosts: list[FleetHost], role: str) -> FleetHost:
    """The first server of ``role`` (the original read the first worker), else the first server."""
    if not hosts:
        raise BadInput("no running server to read the secrets from")
    return next((h for h in hosts if h.role == role), hosts[0])


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


def newrelic_values(block, block_name: str, names: list[str]) -> dict[str, SecretStr]:  # noqa: ANN001
    """The New Relic keys from the block, checked for format before anything changes.

    Raises:
        BadInput: the block is missing, a key is unset, or a key does not look like a New Relic key.
    """
    if block is None:
        raise BadInput(f"secrets block {block_name} does not exist: run pull-server-secrets first")
    wanted = [n for n in NEWRELIC_KEY_FORMATS if n in names]
    if "newrelic_license_key" not in wanted:
        raise BadInput("password_names has no newrelic_license_key: nothing to update")
    values: dict[str, SecretStr] = {}
    problems = []
    for name in wanted:
        value = block.get(name)
        if value is None:
            problems.append(f"{name} is not set")
            continue
        try:
            check_newrelic_key(name, value)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        values[name] = value
    if problems:
        raise BadInput(f"block {block_name}: " + "; ".join(problems))
    return values


def resolve_specs(ctx: RunContext, kinds: tuple[str, ...]) -> list[FileSpec]:
    """The environment's secret-bearing config files of ``kinds`` (template files are read
    relative to the config file)."""
    from pathlib import Path

    from config.loader import find_config

    try:
        config_dir = find_config(ctx.config_path).resolve().parent
    except Exception:  # noqa: BLE001 - load_context already found it; fall back to the cwd
        config_dir = Path.cwd()
    try:
        specs = resolve_files(ctx.config.fabflows.secrets.files, ctx.env, config_dir)
    except BadTemplate as exc:
        raise BadInput(f"fabflows.secrets.files: {exc}") from None
    return [s for s in specs if s.kind in kinds]


# --------------------------------------------------------------------------- the plan


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
    name: str = Field(default="", description="The Name tag (or the address).")
    instance_id: str | None = None
    files: list[FileChange] = Field(default_factory=list)
    restart: list[str] = Field(default_factory=list)
    leftovers: list[str] = Field(default_factory=list)

    @property
    def fleet_host(self) -> FleetHost:
        return FleetHost(
            name=self.name or self.address,
            address=self.address,
            role=self.role,
            instance_id=self.instance_id,
        )


class AuthChange(BaseModel):
    """A password changed where it is checked (the database, the broker)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str
    where: str
    what: str
    addresses: list[str] = Field(
        default_factory=list, description="The servers where it is checked (db-primary, caches)."
    )


class PushServerSecretsPlan(RunbookPlan):
    """The plan of push-server-secrets and update-newrelic-keys (never values, never prints).

    It holds what the steps need to be rebuilt from the journal: the servers, their files and
    restarts, the passwords changed where they are checked, the secret names and the file specs
    (templates are config, not secrets) that the staging step renders again from the block.
    """

    block_name: str
    names: list[str] = Field(default_factory=list, description="Secret names written as files.")
    specs: list[FileSpec] = Field(default_factory=list, description="Rendered files.")
    changed_secrets: list[str] = Field(description="Names whose value changes on some server.")
    hosts: list[HostPlan]
    auth: list[AuthChange] = Field(default_factory=list)
    mode: RolloutMode
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
            return (
                f"**{self.environment}: the servers already hold block `{self.block_name}`.**\n\n"
                f"- **Plan digest:** `{self.digest()}`"
            )
        out = [
            f"**{self.environment}: push {', '.join(self.changed_secrets) or 'no new value'} from "
            f"block `{self.block_name}` to {len(self.changing)} server(s), {self.mode}**",
            "",
            f"Mode: {self.why}",
            "",
            f"- **Expected downtime:** {self._downtime_text()}",
            f"- **Plan digest:** `{self.digest()}`",
            "",
        ]
        out += [f"- **Problem:** {p}" for p in self.problems]
        if self.auth:
            out += ["Changed where they are checked:"]
            out += [f"- {a.secret}: {a.where}: `{a.what}`" for a in self.auth]
            out.append("")
        out.append(markdown_table(self.rows()))
        return "\n".join(out)

    def render_text(self) -> str:
        head = self.render_markdown().splitlines()[0].strip("*")
        from fabflows.report import text_table

        lines = [head, f"expected downtime: {self._downtime_text()}; digest {self.digest()}"]
        if not self.noop:
            lines.append(f"mode: {self.why}")
            lines += [f"changed where checked: {a.secret}: {a.where}" for a in self.auth]
            lines += ["", text_table(self.rows())]
        return "\n".join(lines)


def restart_names(
    settings_programs: dict[str, list[str]], env: EnvironmentConfig, role: str
) -> list[str]:
    return [
        name.format(environment=env.environment, deployment=env.deployment)
        for name in settings_programs.get(role, [])
    ]


DOWNTIME_SECONDS = {"rolling": None, "fast": 15.0, "window": 15.0}
"""What a plan expects: none rolling; the upgrade window's few seconds otherwise."""


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
    restart_mode: Literal["rolling", "fast"],
    auth: list[AuthChange],
    hosts: list[FleetHost] | None = None,
    flow_name: str = "push-server-secrets",
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
        hosts: the servers (their Name tags and instance ids, for the load balancers).
        flow_name: The runbook, for the plan's title.
    """
    by_path = {s.path: s for s in specs}
    by_address = {h.address: h for h in hosts or []}
    secret_paths = {secret_path(env.home, n): n for n in names}
    host_plans: list[HostPlan] = []
    changed_secrets: set[str] = set()
    changes: list[Change] = []
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
        fh = by_address.get(hf.address)
        hp = HostPlan(
            host=labels.get(hf.address, hf.host),
            address=hf.address,
            role=hf.role,
            name=fh.name if fh else hf.host,
            instance_id=fh.instance_id if fh else None,
            files=files,
            restart=restart,
            leftovers=hf.leftovers,
        )
        host_plans.append(hp)
        changes += [
            Change(target=hp.host, action=f"{f.change} {f.path}", detail=f.why) for f in files
        ]
        if restart:
            changes.append(Change(target=hp.host, action="restart " + ", ".join(restart)))
    needs_window = sorted(n for n in changed_secrets if n in window_for) + sorted(
        a.secret for a in auth if a.secret not in changed_secrets
    )
    if auth or needs_window:
        mode: RolloutMode = "window"
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
    changes += [
        Change(target=a.where, action=f"change {a.secret} where it is checked", detail=a.what)
        for a in auth
    ]
    return PushServerSecretsPlan(
        title=f"{flow_name} on {env.label}",
        environment=env.label,
        changes=changes,
        destructive=mode == "window",
        downtime_seconds=DOWNTIME_SECONDS[mode] if changes else None,
        block_name=block_name,
        names=list(names),
        specs=list(specs),
        changed_secrets=sorted(changed_secrets),
        hosts=host_plans,
        auth=auth,
        mode=mode,
        why=why,
    )


# --------------------------------------------------------------------------- contents (memory only)


Contents = dict[str, dict[str, tuple[FileSpec | None, SecretBytes]]]
"""address -> path -> (spec, content): what each server's files must hold (never persisted)."""


def desired_contents(
    env: EnvironmentConfig,
    hosts: list[FleetHost],
    names: list[str],
    specs: list[FileSpec],
    values: dict[str, SecretStr],
    labels: dict[str, str],
    with_secret_files: bool = True,
) -> Contents:
    """address -> path -> (spec, content): secret files and rendered files (in memory only)."""
    plain = {n: values[n].get_secret_value() for n in names}
    out: Contents = {}
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


def staged_files(env: EnvironmentConfig, hp: HostPlan, contents: Contents) -> list[StagedFile]:
    """The files of one server's plan, with their contents (for staging)."""
    out = []
    for fc in hp.files:
        spec, content = contents[hp.address][fc.path]
        out.append(
            StagedFile(
                path=fc.path,
                owner=spec.owner if spec else env.deploy_user,
                mode=spec.mode if spec else 0o600,
                content=content,
            )
        )
    return out


def verify_files(
    facts: list[HostFiles],
    contents: Contents,
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


# --------------------------------------------------------------------------- where passwords are checked


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


def gather_auth(
    ctx: RunContext,
    pool: ConnectionPool,
    hosts: list[FleetHost],
    names: list[str],
    values: dict[str, SecretStr],
    labels: dict[str, str],
) -> list[AuthChange]:
    """Which checked passwords change (read only: the database and broker are not touched)."""
    from tasks.postgres.roles import shown_statement

    env = ctx.env
    settings = ctx.config.fabflows.secrets
    auth: list[AuthChange] = []
    # the logins in use (rotate-credentials alternates two; the block names the current one)
    db_user = values["database_user"].get_secret_value() if "database_user" in values else None
    db_user = db_user or env.database_user
    broker_user = values["broker_user"].get_secret_value() if "broker_user" in values else None
    if "database_password" in names:
        db, current = reference_value(pool, hosts, "db-primary", env.home, "database_password")
        new = values["database_password"]
        if (
            db is not None
            and current is not None
            and current.get_secret_value() != new.get_secret_value()
        ):
            auth.append(
                AuthChange(
                    secret="database_password",
                    where=f"PostgreSQL role {db_user} on {labels[db.address]}",
                    what=shown_statement(db_user),
                    addresses=[db.address],
                )
            )
    if "broker_password" in names:
        caches = [h for h in hosts if h.role == "cache"]
        cache, current = reference_value(pool, hosts, "cache", env.home, "broker_password")
        new = values["broker_password"]
        user = broker_user or settings.broker_user or env.deploy_user
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
                        addresses=[c.address for c in todo],
                    )
                )
    return auth
