"""pull-server-secrets: read the secret files on the servers into the environment's secrets block."""

from __future__ import annotations

from typing import Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from blocks.secrets import ServerSecrets, secrets_block_name
from config import EnvironmentConfig
from fabflows import logfilter
from fabflows.procedures.secret_files import (
    load_secrets,
    pick_source,
    secret_names,
    server_label,
)
from fabflows.report import markdown_table
from fabflows.runbook import RunContext
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from fabflows.runtime.plan import Change, RunbookPlan
from tasks.aws.ec2 import describe_servers
from tasks.ssh.fleet import FleetHost, hosts_from_servers
from tasks.ssh.secrets import Fingerprint, describe_secret_files, read_secret_values, secret_path

FLOW_NAME = "pull-server-secrets"
SecretAction = Literal["add", "update", "unchanged", "missing on server"]

__all__ = ["load_secrets", "plan_pull_server_secrets", "pull_server_secrets", "server_label"]


class SecretChange(BaseModel):
    """What pulling does to one name of the block (names only, never values)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    action: SecretAction
    differs_on: list[str] = Field(
        default_factory=list,
        description="Other servers whose file differs from the source server's (or lacks it).",
    )


class PullServerSecretsPlan(RunbookPlan):
    """The plan of pull-server-secrets (names only: never values or prints)."""

    block_name: str
    block_exists: bool
    source: str = Field(description="The server whose files are read into the block.")
    source_host: FleetHost | None = None
    compared_with: list[str] = Field(description="Other servers whose files were compared.")
    secrets: list[SecretChange]

    @property
    def to_change(self) -> list[str]:
        return [c.name for c in self.secrets if c.action in ("add", "update")]

    def rows(self) -> list[dict[str, str]]:
        return [
            {"name": c.name, "block": c.action, "differs on": ", ".join(c.differs_on) or "-"}
            for c in self.secrets
        ]

    def render_markdown(self) -> str:
        head = (
            f"**{self.environment}: pull {len(self.to_change)} secret(s) from {self.source} into "
            f"block `{self.block_name}`**" + ("" if self.block_exists else " (new block)")
        )
        out = [head, "", f"- **Plan digest:** `{self.digest()}`", "", markdown_table(self.rows())]
        split = [c for c in self.secrets if c.differs_on]
        if split:
            out += [
                "",
                "**Servers disagree** (push-server-secrets makes them equal again): "
                + "; ".join(f"{c.name} on {', '.join(c.differs_on)}" for c in split),
            ]
        return "\n".join(out)

    def render_text(self) -> str:
        from fabflows.report import text_table

        return "\n".join(
            [self.render_markdown().splitlines()[0].strip("*"), f"digest {self.digest()}", ""]
            + [text_table(self.rows())]
            + [
                f"servers disagree: {c.name} on {', '.join(c.differs_on)}"
                for c in self.secrets
                if c.differs_on
            ]
        )


def plan_pull_server_secrets(
    env: EnvironmentConfig,
    block_name: str,
    names: list[str],
    source: str,
    server_prints: dict[str, dict[str, str | None]],
    block_prints: dict[str, str | None] | None,
    source_host: FleetHost | None = None,
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
        source_host: The source server (the step reads it again).
    """
    source_prints = server_prints[source]
    others = [h for h in server_prints if h != source]
    secrets = []
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
        secrets.append(SecretChange(name=name, action=action, differs_on=differs))
    changes = [
        Change(target=f"block {block_name}", action=f"{c.action} {c.name}", step="save-block")
        for c in secrets
        if c.action in ("add", "update")
    ]
    return PullServerSecretsPlan(
        title=f"{FLOW_NAME} on {env.label}",
        environment=env.label,
        changes=changes,
        noops=[f"{c.name}: {c.action}" for c in secrets if c.action not in ("add", "update")],
        block_name=block_name,
        block_exists=block_prints is not None,
        source=source,
        source_host=source_host,
        compared_with=others,
        secrets=secrets,
    )


class PullParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PullFacts(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    block_name: str
    names: list[str]
    source: FleetHost
    labels: dict[str, str]
    server_prints: dict[str, dict[str, str | None]]
    block_prints: dict[str, str | None] | None


def _block_name(rc: RunContext) -> str:
    return secrets_block_name(
        rc.env.deployment, rc.env.environment, rc.config.fabflows.secrets.block
    )


def _save_step(plan: PullServerSecretsPlan) -> Step:
    """Write the pulled names into the block; the previous version is saved first as
    ``<block>-previous``, and the journal records only which documents (never a value)."""
    name = plan.block_name
    backup = f"{name}-previous"

    def apply(scope: Scope) -> dict:
        env = scope.env
        assert plan.source_host is not None
        values = read_secret_values(scope.pool, plan.source_host, env.home, plan.to_change)
        pulled = {n: v for n, v in values.items() if v is not None}
        for value in pulled.values():
            logfilter.register_secret(value)
        current = load_secrets(name)
        if current is not None:
            copy = current.model_copy(deep=True)
            copy._block_document_id = None
            copy._block_document_name = None
            copy.save(backup, overwrite=True)
        scope.record(block=name, previous=backup if current is not None else None)
        block = current.model_copy(deep=True) if current is not None else ServerSecrets()
        for n in sorted(pulled):
            block.set(n, pulled[n])
        block.save(name, overwrite=True)
        getattr(scope, "details", {})["Names changed in the block"] = (
            ", ".join(sorted(pulled)) or "none"
        )
        return {
            "block": name,
            "previous": backup if current is not None else None,
            "summary": f"wrote {', '.join(sorted(pulled))} into block {name}"
            + (f" (previous values kept in {backup})" if current is not None else ""),
        }

    def undo(scope: Scope, data: dict) -> None:
        if "block" not in data:
            return  # stopped before it wrote the block
        if data.get("previous"):
            previous = load_secrets(data["previous"])
            if previous is None:
                raise RuntimeError(f"block {data['previous']} is gone: cannot put {name} back")
            copy = previous.model_copy(deep=True)
            copy._block_document_id = None
            copy._block_document_name = None
            copy.save(name, overwrite=True)
        else:
            try:
                ServerSecrets.delete(name)
            except ValueError:
                pass  # already gone

    return Step("save-block", apply, undo, auto_undo=False)


class PullServerSecrets(Runbook[PullParams, PullFacts, PullServerSecretsPlan]):
    name = FLOW_NAME
    Params = PullParams
    plan_type = PullServerSecretsPlan

    def validate(self, rc: RunContext, params: PullParams) -> None:
        secret_names(list(rc.config.password_names))

    def gather(self, scope: Scope, params: PullParams) -> PullFacts:
        rc = scope.rc
        env = rc.env
        names = secret_names(list(rc.config.password_names))
        block_name = _block_name(rc)
        current = load_secrets(block_name)
        servers = describe_servers(rc.creds, env.deployment, env.environment, states=("running",))
        hosts = hosts_from_servers(servers, env.address_attribute)
        source = pick_source(hosts, rc.config.fabflows.secrets.pull_from_role)
        fingerprint = Fingerprint()
        paths = [secret_path(env.home, n) for n in names]
        facts = describe_secret_files(
            scope.pool, hosts, {h.address: paths for h in hosts}, fingerprint
        )
        labels = {h.address: server_label(h) for h in hosts}
        server_prints = {
            labels[f.address]: {n: f.fingerprint_of(secret_path(env.home, n)) for n in names}
            for f in facts
        }
        block_prints = (
            {n: (fingerprint(v) if (v := current.get(n)) is not None else None) for n in names}
            if current is not None
            else None
        )
        for change_name, prints in server_prints.items():
            for n, p in prints.items():
                if p != server_prints[labels[source.address]].get(n):
                    scope.log("%s differs between %s and %s", n, source.name, change_name)
        return PullFacts(
            block_name=block_name,
            names=names,
            source=source,
            labels=labels,
            server_prints=server_prints,
            block_prints=block_prints,
        )

    def plan(
        self, facts: PullFacts, params: PullParams, env: EnvironmentConfig
    ) -> PullServerSecretsPlan:
        return plan_pull_server_secrets(
            env,
            facts.block_name,
            facts.names,
            facts.labels[facts.source.address],
            facts.server_prints,
            facts.block_prints,
            source_host=facts.source,
        )

    def steps(self, plan: PullServerSecretsPlan, params: PullParams) -> list[Step]:
        return [_save_step(plan)] if plan.to_change else []

    def verify(self, scope: Scope, plan: PullServerSecretsPlan, params: PullParams) -> list[str]:
        assert plan.source_host is not None
        values = read_secret_values(scope.pool, plan.source_host, scope.env.home, plan.to_change)
        block = load_secrets(plan.block_name)
        fingerprint = Fingerprint()
        return [
            f"block {plan.block_name} does not hold the pulled value of {n}"
            for n, v in values.items()
            if v is not None
            and (
                block is None or block.get(n) is None or fingerprint(block.get(n)) != fingerprint(v)
            )
        ]


RUNBOOK = PullServerSecrets()


@flow(name=FLOW_NAME, log_prints=False)
def pull_server_secrets(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    window_override_reason: str | None = None,
) -> RunbookReport:
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

    **Steps** (journaled): `save-block`. A run killed during it is undone by `fabflows recover`:
    the block goes back to its previous version (or is removed if the pull created it); the
    journal names the block documents only.

    Args:
        environment: Environment (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show what would change in the block (default). Set false to write it.
        window_override_reason: Apply outside the maintenance window (protected environments),
            for this recorded reason.
    """
    return execute(RUNBOOK, locals())
