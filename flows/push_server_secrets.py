"""push-server-secrets: write the secrets block to the servers, where the passwords are checked too."""

from __future__ import annotations

from typing import Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from blocks.secrets import ServerSecrets, secrets_block_name
from fabflows.errors import BadInput
from fabflows.procedures.secret_files import (
    AuthChange,
    FileChange,
    HostPlan,
    PushServerSecretsPlan,
    check_block,
    load_secrets,
    plan_push_server_secrets,
    secret_names,
)
from fabflows.procedures.secret_rollout import SecretFilesRunbook
from fabflows.runbook import RunContext
from fabflows.runtime.engine import RunbookReport, execute

FLOW_NAME = "push-server-secrets"
RestartMode = Literal["rolling", "fast"]

__all__ = [
    "AuthChange",
    "FileChange",
    "HostPlan",
    "PushServerSecretsPlan",
    "plan_push_server_secrets",
    "push_server_secrets",
]


class PushServerSecretsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    restart_mode: RestartMode = Field(
        default="rolling",
        description="rolling (no downtime) or fast (web servers at once in an upgrade window).",
    )


class PushServerSecrets(SecretFilesRunbook):
    name = FLOW_NAME
    Params = PushServerSecretsParams
    plan_type = PushServerSecretsPlan
    kinds = ("app", "newrelic")
    change_passwords = True
    mode_param = "restart_mode"

    def block_values(self, rc: RunContext) -> tuple[str, list[str], dict[str, SecretStr]]:
        names = secret_names(list(rc.config.password_names))
        block_name = secrets_block_name(
            rc.env.deployment, rc.env.environment, rc.config.fabflows.secrets.block
        )
        block = load_secrets(block_name)
        values = check_block(block, block_name, names)
        assert block is not None
        return block_name, *active_logins(block, block_name, names, values)


def active_logins(
    block: ServerSecrets, block_name: str, names: list[str], values: dict[str, SecretStr]
) -> tuple[list[str], dict[str, SecretStr]]:
    """The names and values to push, with the login each pushed password belongs to.

    rotate-credentials alternates two logins per password and names the one in use in the block
    (``database_user``, ``broker_user``) and on the servers (``<home>/database_user``...): the
    push writes that login with its password (the files, pgbouncer's userlist, the role whose
    password changes), never the config's original login, which after a rotation has a
    throwaway password. A block holding a rotation's pending password is refused.
    """
    pending = [n for n in block.names_set() if n.endswith("_pending")]
    if pending:
        raise BadInput(
            f"block {block_name} holds {', '.join(pending)} from an unfinished rotate-credentials "
            "run: run `fabflows recover` first"
        )
    names, values = list(names), dict(values)
    for password, login in (
        ("database_password", "database_user"),
        ("broker_password", "broker_user"),
    ):
        value = block.get(login)
        if password in names and login not in names and value is not None:
            names.append(login)
            values[login] = value
    return names, values


RUNBOOK = PushServerSecrets()


@flow(name=FLOW_NAME, log_prints=False)
def push_server_secrets(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    restart_mode: RestartMode = "rolling",
    window_override_reason: str | None = None,
) -> RunbookReport:
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
    new web servers carry the new files). `restart_mode=fast` takes the site down for seconds: it
    runs only inside the environment's maintenance window (or with `window_override_reason`), as
    does any apply in a protected environment.

    **Blast radius:** every server's secret files, the rendered config files, the app processes
    (restarted), and for a database or broker password, the database role and the broker user.
    Measured downtime: none in rolling mode; the upgrade window's otherwise (reported, with what a
    probe on the site URL got).

    **Dry run shows:** per server which files would be created or updated and why (names and paths,
    never values), which programs restart, which passwords change where they are checked, the mode
    and the steps.

    **Steps** (journaled): `stage` (new files beside the live ones), then by mode
    `apply-other-servers` and one `apply-web-<address>` per web server (rolling); or
    `apply-other-servers`, `upgrade-on`, `apply-web-servers`, `upgrade-off` (fast); or `upgrade-on`,
    `change-passwords`, `apply-all-servers`, `upgrade-off` (window); then `check-files` and
    `commit`.

    **Rollback:** until `commit` every server keeps its previous files (`<path>.fabflows-prev`). If
    a step fails (a restart, a server's own check, a password change), the steps done are undone,
    newest first: the previous files go back, the programs restart again, the passwords are changed
    back, upgrade mode ends. A run killed outright is undone the same way by `fabflows recover`
    (recover-environment), from the run's journal (paths and servers only, never a value); once
    `commit` has started, recover keeps the new files everywhere instead.

    Args:
        environment: Environment (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Set false to apply it.
        restart_mode: rolling (no downtime) or fast (web servers at once in an upgrade window) when
            no password checked by the database or the broker changes.
        window_override_reason: Apply outside the maintenance window, for this recorded reason.
    """
    return execute(RUNBOOK, locals())
