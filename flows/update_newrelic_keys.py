"""update-newrelic-keys: render the New Relic files from the secrets block and restart, undoably."""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from blocks.secrets import NEWRELIC_KEY_FORMATS, check_newrelic_key, secrets_block_name
from fabflows import approval, audit, lock, logfilter
from fabflows.errors import BadInput
from fabflows.file_rollout import Rollout, RolloutFailed, RolloutReport
from fabflows.report import artifact_key, publish_markdown, text_table
from fabflows.runbook import load_context
from flows.pull_server_secrets import load_secrets, server_label
from flows.push_server_secrets import (
    PushServerSecretsPlan,
    desired_contents,
    host_changes,
    plan_push_server_secrets,
    resolve_specs,
    verify_files,
)
from tasks.aws.ec2 import describe_servers
from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import hosts_from_servers
from tasks.ssh.secrets import Fingerprint, describe_secret_files

Mode = Literal["rolling", "fast"]

NEWRELIC_NAMES = tuple(NEWRELIC_KEY_FORMATS)


class UpdateNewrelicKeysResult(BaseModel):
    """What update-newrelic-keys did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan: PushServerSecretsPlan
    dry_run: bool
    rollout: RolloutReport | None = None
    downtime_s: float | None = Field(
        default=None, description="Measured: the probe's total non-200 time at the site URL."
    )
    non_200: int | None = Field(default=None, description="Probe answers that were not 200.")
    outcome: str = ""


def newrelic_values(block, block_name: str, names: list[str]) -> dict[str, SecretStr]:  # noqa: ANN001
    """The New Relic keys from the block, checked for format before anything changes.

    Raises:
        BadInput: the block is missing, a key is unset, or a key does not look like a New Relic key.
    """
    if block is None:
        raise BadInput(f"secrets block {block_name} does not exist: run pull-server-secrets first")
    wanted = [n for n in NEWRELIC_NAMES if n in names]
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


@flow(name="update-newrelic-keys", log_prints=False)
def update_newrelic_keys(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    mode: Mode = "rolling",
) -> UpdateNewrelicKeysResult:
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
      original's order); the downtime is measured by the probe and reported.

    **When to run:** after changing a New Relic key in the block (then deploy-serial, so new web
    servers carry the files).

    **Blast radius:** the New Relic files, the key files, and restarts of the app (`<env>-web`,
    `<env>-celery`) and of `newrelic-infra`. **Dry run shows:** per server which files change and
    what restarts, and the mode.

    **Rollback:** if a restart or a server's own check fails, the previous files go back on every
    server that got the new ones and the programs restart again; the run fails naming which
    server runs what.

    Args:
        environment: Environment (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Set false to apply it.
        mode: rolling (one web server at a time, no downtime) or fast (upgrade mode around the web
            restarts, measured downtime).
    """
    logger = get_run_logger()
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    audit.record_start(env)
    settings = ctx.config.fabflows.secrets
    names = list(ctx.config.password_names)
    block_name = secrets_block_name(env.deployment, env.environment, settings.block)
    values = newrelic_values(load_secrets(block_name), block_name, names)
    for value in values.values():
        logfilter.register_secret(value)
    specs = resolve_specs(ctx, config, ("newrelic",))
    if not specs:
        raise BadInput("fabflows.secrets.files has no file of kind newrelic")
    key_names = sorted(values)

    servers = describe_servers(ctx.creds, env.deployment, env.environment, states=("running",))
    hosts = hosts_from_servers(servers, env.address_attribute)
    if not hosts:
        raise BadInput(f"{env.label} has no running server")
    labels = {h.address: server_label(h) for h in hosts}
    contents = desired_contents(env, hosts, key_names, specs, values, labels)
    fingerprint = Fingerprint()
    desired = {a: {p: fingerprint(c) for p, (_, c) in f.items()} for a, f in contents.items()}
    opts = SshOptions.from_settings(ctx.config.fabflows.ssh, env.deploy_user)
    with ConnectionPool(opts) as pool:
        paths = {a: list(f) for a, f in contents.items()}
        facts = describe_secret_files(pool, hosts, paths, fingerprint)
        plan = plan_push_server_secrets(
            env, block_name, key_names, specs, facts, desired, labels,
            settings.app_programs, [], mode, [],
        )  # fmt: skip
        key = artifact_key("update-newrelic-keys", env.deployment, env.environment)
        plan_md = plan.render_markdown()
        publish_markdown(key + "-plan", plan_md, f"New Relic plan for {env.label}")
        logger.info("%s\n%s", plan_md.splitlines()[0], text_table(plan.rows()))
        if dry_run or plan.noop:
            outcome = "dry run" if dry_run else "nothing to change"
            audit.record_summary(env, outcome=outcome, plan_markdown=plan_md)
            return UpdateNewrelicKeysResult(plan=plan, dry_run=dry_run, outcome=outcome)
        if approval.approval_required(env, destructive=mode == "fast"):
            approval.request_approval(
                env, ctx.config, plan_markdown=plan_md, expected_downtime=None
            )
        changes = host_changes(env, plan.hosts, hosts, contents)
        with lock.environment_lock(env, ctx.config):
            rollout = Rollout(
                ctx, pool, changes, settings=ctx.config.fabflows.newrelic, dry_run=False,
                config_path=config,
            )  # fmt: skip
            rollout.stage()
            try:
                report = rollout.run(mode)
            except RolloutFailed as exc:
                publish_markdown(key + "-rollout", exc.report.render_markdown(), "Rolled back")
                audit.record_summary(env, outcome="rolled back", plan_markdown=plan_md)
                raise
            after = describe_secret_files(pool, hosts, paths, fingerprint)
            wrong = verify_files(after, contents, fingerprint, env.deploy_user)
            if wrong:
                raise RuntimeError("after the update: " + "; ".join(wrong))
            rollout.commit()
    probe = report.probe
    publish_markdown(key + "-rollout", report.render_markdown(), f"New Relic keys on {env.label}")
    logger.info("%s", report.describe())
    from datetime import timedelta

    audit.record_summary(
        env,
        outcome="completed",
        plan_markdown=plan_md,
        downtime=timedelta(seconds=probe.total_downtime_s) if probe else None,
        details={"rollout": report.describe()},
    )
    return UpdateNewrelicKeysResult(
        plan=plan,
        dry_run=False,
        rollout=report,
        downtime_s=probe.total_downtime_s if probe else None,
        non_200=probe.non_200 if probe else None,
        outcome="completed",
    )
