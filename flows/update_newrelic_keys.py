"""update-newrelic-keys: render the New Relic files from the secrets block and restart, undoably."""

from __future__ import annotations

from typing import Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from blocks.secrets import secrets_block_name
from fabflows.errors import BadInput
from fabflows.procedures.secret_files import (
    PushServerSecretsPlan,
    load_secrets,
    newrelic_values,
    resolve_specs,
)
from fabflows.procedures.secret_rollout import SecretFacts, SecretFilesRunbook
from fabflows.runbook import RunContext
from fabflows.runtime.engine import RunbookReport, execute

FLOW_NAME = "update-newrelic-keys"
Mode = Literal["rolling", "fast"]

__all__ = ["newrelic_values", "update_newrelic_keys"]


class UpdateNewrelicKeysParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field(
        default="rolling",
        description="rolling (one web server at a time) or fast (upgrade mode around the web "
        "restarts).",
    )


class UpdateNewrelicKeys(SecretFilesRunbook):
    name = FLOW_NAME
    Params = UpdateNewrelicKeysParams
    plan_type = PushServerSecretsPlan
    kinds = ("newrelic",)
    change_passwords = False
    mode_param = "mode"

    def block_values(self, rc: RunContext) -> tuple[str, list[str], dict[str, SecretStr]]:
        block_name = secrets_block_name(
            rc.env.deployment, rc.env.environment, rc.config.fabflows.secrets.block
        )
        values = newrelic_values(
            load_secrets(block_name), block_name, list(rc.config.password_names)
        )
        return block_name, sorted(values), values

    def validate(self, rc: RunContext, params: BaseModel) -> None:
        self.block_values(rc)
        if not resolve_specs(rc, self.kinds):
            raise BadInput("fabflows.secrets.files has no file of kind newrelic")

    def plan(self, facts: SecretFacts, params: BaseModel, env) -> PushServerSecretsPlan:  # noqa: ANN001
        plan = super().plan(facts, params, env)
        # the approval (protected environments) is for the fast mode's downtime
        return plan.model_copy(update={"destructive": plan.mode == "fast" and plan.changed})


RUNBOOK = UpdateNewrelicKeys()


@flow(name=FLOW_NAME, log_prints=False)
def update_newrelic_keys(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    mode: Mode = "rolling",
    window_override_reason: str | None = None,
) -> RunbookReport:
    """Render the New Relic files from the secrets block and restart what reads them.

    The original's `update_newrelic_keys` rendered `services/newrelic-<env>-{web,celery}.ini` and
    `/etc/newrelic-infra.yml`, restarted celery, raised the 503 page, restarted the web processes and
    dropped the page (10-20 s of downtime, never measured). Here, from the block
    `<deployment>-<environment>-secrets`:

    - the keys are checked first (license keys: 40 characters, hexadecimal, `...NRAL` or `eu01xx...`;
      API keys: `NRAK-` + 27, or legacy REST keys `NRRA-` + 42); a wrong key stops the run before
      any change. The keys are not checked against New Relic's API (not reachable from here);
    - the New Relic files (`fabflows.secrets.files` of kind newrelic) and the key files
      `<home>/newrelic_*` are staged on every server, the old ones kept until the end;
    - `mode=rolling` (default): workers and other servers restart, then web servers one at a time
      out of the load balancers (no downtime: a probe on the site URL counts non-200 answers);
    - `mode=fast`: workers restart, upgrade mode on, every web server restarts, upgrade mode off (the
      original's order); the downtime is measured and reported. Fast takes the site down, so it
      runs only inside the environment's maintenance window (or with `window_override_reason`).

    **When to run:** after changing a New Relic key in the block (then deploy-serial, so new web
    servers carry the files).

    **Blast radius:** the New Relic files, the key files, and restarts of the app (`<env>-web`,
    `<env>-celery`) and of `newrelic-infra`. **Dry run shows:** per server which files change and
    what restarts, the mode and the steps.

    **Steps** (journaled): `stage`, `apply-other-servers`, then one `apply-web-<address>` per web
    server (rolling) or `upgrade-on`, `apply-web-servers`, `upgrade-off` (fast); `check-files`,
    `commit`.

    **Rollback:** if a restart or a server's own check fails, the steps done are undone newest
    first: the previous files go back on every server that got the new ones, the programs restart
    again, upgrade mode ends; the run fails naming which server failed. A run killed outright is
    undone the same way by `fabflows recover`, from its journal (paths and servers only); once
    `commit` has started, the new files stay everywhere.

    Args:
        environment: Environment (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Set false to apply it.
        mode: rolling (one web server at a time, no downtime) or fast (upgrade mode around the web
            restarts, measured downtime).
        window_override_reason: Apply outside the maintenance window, for this recorded reason.
    """
    return execute(RUNBOOK, locals())
