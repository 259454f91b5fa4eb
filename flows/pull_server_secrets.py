"""pull-server-secrets: read the secret files on the servers into the environment's secrets block."""

from __future__ import annotations

from typing import Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from blocks.secrets import ServerSecrets, check_secret_name, secrets_block_name
from config import EnvironmentConfig
from fabflows import audit, lock, logfilter
from fabflows.errors import BadInput
from fabflows.report import artifact_key, markdown_table, publish_markdown, text_table
from fabflows.runbook import load_context
from tasks.aws.ec2 import describe_servers
from tasks.plan import StepResult
from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import FleetHost, hosts_from_servers
from tasks.ssh.secrets import Fingerprint, describe_secret_files, read_secret_values, secret_path

SecretAction = Literal["add", "update", "unchanged", "missing on server"]


class SecretChange(BaseModel):
    """What pulling does to one name of the block (names only, never values)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    action: SecretAction
    differs_on: list[str] = Field(
        default_factory=list,
        description="Other servers whose file differs from the source server's (or lacks it).",
    )


class PullServerSecretsPlan(BaseModel):
    """The plan of pull-server-secrets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    block_name: str
    block_exists: bool
    source: str = Field(description="The server whose files are read into the block.")
    compared_with: list[str] = Field(description="Other servers whose files were compared.")
    changes: list[SecretChange]

    @property
    def to_change(self) -> list[str]:
        return [c.name for c in self.changes if c.action in ("add", "update")]

    @property
    def differing(self) -> list[str]:
        """Names whose block value differs from the servers' (what the run reports)."""
        return self.to_change

    def rows(self) -> list[dict[str, str]]:
        return [
            {
                "name": c.name,
                "block": c.action,
                "differs on": ", ".join(c.differs_on) or "-",
            }
            for c in self.changes
        ]

    def render_markdown(self) -> str:
        head = (
            f"**{self.environment}: pull {len(self.to_change)} secret(s) from {self.source} into "
            f"block `{self.block_name}`**" + ("" if self.block_exists else " (new block)")
        )
        out = [head, "", markdown_table(self.rows())]
        split = [c for c in self.changes if c.differs_on]
        if split:
            out += [
                "",
                "**Servers disagree** (push-server-secrets makes them equal again): "
                + "; ".join(f"{c.name} on {', '.join(c.differs_on)}" for c in split),
            ]
        return "\n".join(out)


class PullServerSecretsResult(BaseModel):
    """What pull-server-secrets did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan: PullServerSecretsPlan
    dry_run: bool
    saved: StepResult | None = None
    names_changed: list[str] = Field(default_factory=list)


def plan_pull_server_secrets(
    env: EnvironmentConfig,
    block_name: str,
    names: list[str],
    source: str,
    server_prints: dict[str, dict[str, str | None]],
    block_prints: dict[str, str | None] | None,
) -> PullServerSecretsPlan:
    """Pure: compare the servers' files with each other and with the block.

    Args:
        env: The environment.
        block_name: The block document's name.
        names: Secret names (config ``password_names``).
        source: Name of the server read into the block (a key of ``server_prints``).
        server_prints: server name -> secret name -> keyed print of its file (None: no file).
        block_prints: secret name -> keyed print of the block's value (None: unset);
            None: the block does not exist.
    """
    source_prints = server_prints[source]
    others = [h for h in server_prints if h != source]
    changes = []
    for name in names:
        wanted = source_prints.get(name)
        differs = [h for h in others if server_prints[h].get(name) != wanted]
        current = (block_prints or {}).get(name)
        if wanted is None:
            action: SecretAction = "missing on server"
        elif current is None:
            action = "add"
        elif current != wanted:
            action = "update"
        else:
            action = "unchanged"
        changes.append(SecretChange(name=name, action=action, differs_on=differs))
    return PullServerSecretsPlan(
        environment=env.label,
        block_name=block_name,
        block_exists=block_prints is not None,
        source=source,
        compared_with=others,
        changes=changes,
    )


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


@task(name="save-secrets-block", cache_policy=NO_CACHE, persist_result=False, retries=0)
def save_secrets_block(
    block_name: str,
    current: ServerSecrets | None,
    values: dict[str, SecretStr],
    *,
    dry_run: bool,
) -> StepResult:
    """Write ``values`` into the block (creating it), keeping the previous version.

    Compensation: the previous values are saved first as ``<block>-previous`` (a real block
    document, encrypted like the first), so a wrong pull is undone by copying it back.
    """
    names = sorted(values)
    if not names:
        return StepResult(changed=False, dry_run=dry_run, summary=f"{block_name}: nothing to pull")
    if dry_run:
        return StepResult(
            changed=True,
            dry_run=True,
            summary=f"Would write {', '.join(names)} into block {block_name}",
        )
    if current is not None:
        backup = current.model_copy(deep=True)
        backup._block_document_id = None
        backup._block_document_name = None
        backup.save(f"{block_name}-previous", overwrite=True)
    block = current.model_copy(deep=True) if current is not None else ServerSecrets()
    for name in names:
        block.set(name, values[name])
    block.save(block_name, overwrite=True)
    return StepResult(
        changed=True,
        dry_run=False,
        summary=f"Wrote {', '.join(names)} into block {block_name}"
        + (f" (previous values kept in {block_name}-previous)" if current is not None else ""),
    )


@flow(name="pull-server-secrets", log_prints=False)
def pull_server_secrets(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
) -> PullServerSecretsResult:
    """Read the secret files on the servers into the environment's secrets block.

    The original's `update_local_fabsecrets`, without its traps: it wrote a local
    `fabsecrets_<env>.py` (no escaping, no chmod) that then silently overrode the servers. Here the
    values go into the Prefect block `<deployment>-<environment>-secrets` (encrypted, `********` in
    the UI), and nothing local.

    **When to run:** before rotating a secret (so the block holds what the servers use), or to
    check that the block and the servers agree.

    **Reads:** the files `<home>/<name>` for every name of the config's `password_names` on every
    running server (SFTP, or `sudo cat` for files the SSH user cannot read); the values come from
    the first server of `fabflows.secrets.pull_from_role` (default: the first worker) and the others
    are compared with it. Nothing is changed on any server.

    **Blast radius:** the block only. The previous values are kept in
    `<deployment>-<environment>-secrets-previous` (the rollback: copy them back).

    **Dry run shows:** which names the block would get, change or keep, and which servers disagree
    with the source. Names only, never values or digests of values.

    Args:
        environment: Environment (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show what would change in the block (default). Set false to write it.
    """
    logger = get_run_logger()
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    audit.record_start(env)
    settings = ctx.config.fabflows.secrets
    names = secret_names(list(ctx.config.password_names))
    block_name = secrets_block_name(env.deployment, env.environment, settings.block)

    current = load_secrets(block_name)
    servers = describe_servers(ctx.creds, env.deployment, env.environment, states=("running",))
    hosts = hosts_from_servers(servers, env.address_attribute)
    source = pick_source(hosts, settings.pull_from_role)
    fingerprint = Fingerprint()
    paths = [secret_path(env.home, n) for n in names]
    opts = SshOptions.from_settings(ctx.config.fabflows.ssh, env.deploy_user)
    with ConnectionPool(opts) as pool:
        facts = describe_secret_files(pool, hosts, {h.address: paths for h in hosts}, fingerprint)
        values = read_secret_values(pool, source, env.home, names)
    labels = {h.address: server_label(h) for h in hosts}
    server_prints = {
        labels[f.address]: {n: f.fingerprint_of(secret_path(env.home, n)) for n in names}
        for f in facts
    }
    for value in values.values():
        logfilter.register_secret(value)
    block_prints = (
        {n: (fingerprint(v) if (v := current.get(n)) is not None else None) for n in names}
        if current is not None
        else None
    )
    plan = plan_pull_server_secrets(
        env, block_name, names, labels[source.address], server_prints, block_prints
    )
    key = artifact_key("pull-server-secrets", env.deployment, env.environment)
    publish_markdown(key + "-plan", plan.render_markdown(), f"Pull plan for {env.label}")
    logger.info("%s\n%s", plan.render_markdown().splitlines()[0], text_table(plan.rows()))
    for change in plan.changes:
        if change.differs_on:
            logger.warning(
                "%s differs between %s and %s",
                change.name,
                source.name,
                ", ".join(change.differs_on),
            )
    if dry_run:
        audit.record_summary(env, outcome="dry run", plan_markdown=plan.render_markdown())
        return PullServerSecretsResult(plan=plan, dry_run=True)

    pulled = {n: values[n] for n in plan.to_change if values.get(n) is not None}
    with lock.environment_lock(env, ctx.config):
        saved = save_secrets_block(block_name, current, pulled, dry_run=False)
    check = load_secrets(block_name)
    wrong = [
        n
        for n in pulled
        if check is None
        or check.get(n) is None
        or fingerprint(check.get(n)) != fingerprint(pulled[n])
    ]
    if wrong:
        raise RuntimeError(
            f"block {block_name} does not hold the pulled value of {', '.join(wrong)}"
        )
    logger.info("%s", saved.summary)
    audit.record_summary(
        env,
        outcome="completed",
        plan_markdown=plan.render_markdown(),
        details={"names changed in the block": ", ".join(plan.to_change) or "none"},
    )
    return PullServerSecretsResult(
        plan=plan, dry_run=False, saved=saved, names_changed=list(plan.to_change)
    )
