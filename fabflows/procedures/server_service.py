"""Taking servers out of service and bringing them back: what stop-, start- and
resize-environment share (the original's ``mount_encrypted`` and its service starts).

A server is brought into service once SSH answers with its known host key: with
``instance_settings.fs_encrypt`` its data volume is unlocked (the LUKS passphrase from its Prefect
Secret block, written to stdin) and mounted, then the role's services are started where they are
not running. Quieting stops the role's background services (celery) first.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr

from fabflows.procedures.environment_power import ServerAction
from fabflows.runbook import RunContext
from fabflows.runtime.engine import Scope
from tasks.aws.ec2 import Server
from tasks.aws.ec2_writes import (
    STOPPED_TAG,
    RunRecord,
    describe_instances,
    start_instances,
    stop_instances,
    tag_instances,
    wait_for_instances,
)
from tasks.ssh.fleet import FleetHost, RateControl, run_fleet
from tasks.ssh.mount import EncryptedVolume, post_start_step, quiet_step, wait_for_ssh


def load_passphrase(ctx: RunContext) -> SecretStr | None:
    """The LUKS passphrase from its Secret block (only when fs_encrypt is on and a block is set)."""
    settings = ctx.config.fabflows.environments.get(ctx.env.environment)
    if (
        not ctx.config.instance_settings.fs_encrypt
        or not settings
        or not settings.luks_passphrase_block
    ):
        return None
    from prefect.blocks.system import Secret

    value = Secret.load(settings.luks_passphrase_block).get()
    return SecretStr(str(value))


def encrypted_volume(ctx: RunContext) -> EncryptedVolume | None:
    cfg = ctx.config
    if not cfg.instance_settings.fs_encrypt:
        return None
    settings = cfg.fabflows.stop_start
    env_settings = cfg.fabflows.environments.get(ctx.env.environment)
    return EncryptedVolume(
        device=settings.encrypted_device,
        mapper_name=settings.encrypted_mapper_name,
        mount_command=list(settings.mount_command),
        passphrase_block=env_settings.luks_passphrase_block if env_settings else None,
    )


def services(ctx: RunContext, table: dict[str, list[str]], role: str) -> list[str]:
    return [s.replace("{environment}", ctx.env.environment) for s in table.get(role, [])]


def wait_states(ctx: RunContext, ids: list[str], state: str) -> list[Server]:
    settings = ctx.config.fabflows.stop_start
    return wait_for_instances(
        ctx.creds, ids, state, timeout=settings.instance_wait_seconds, poll=settings.poll_seconds
    )


def hosts_of(ctx: RunContext, servers: Sequence[Server]) -> list[FleetHost]:
    out = []
    for s in servers:
        try:
            address = s.address(ctx.env.address_attribute)
        except ValueError:
            continue
        out.append(
            FleetHost(
                name=s.name or s.instance_id,
                address=address,
                role=s.role,
                instance_id=s.instance_id,
            )
        )
    return out


def action_hosts(actions: Sequence[ServerAction]) -> list[FleetHost]:
    return [
        FleetHost(
            name=a.name or a.instance_id, address=a.address, role=a.role, instance_id=a.instance_id
        )
        for a in actions
        if a.address
    ]


def quiet(scope: Scope, hosts: list[FleetHost], role: str, name: str) -> str:
    """Stop the role's background services (celery) on ``hosts``; the summary."""
    if not hosts:
        return f"{name}: no host"
    settings = scope.rc.config.fabflows.stop_start
    result = run_fleet(
        hosts,
        quiet_step(services(scope.rc, settings.quiet_services, role)),
        pool=scope.pool,
        rate=RateControl(max_concurrency="100%", max_errors=0),
        dry_run=False,
        name=name,
    )
    result.raise_for_errors()
    return result.summary()


def in_service(scope: Scope, hosts: list[FleetHost], role: str, name: str) -> str:
    """Wait until SSH answers with the known host key, then the original's ``mount_encrypted``
    (unlock and mount the encrypted volume) and the role's services started; the summary."""
    if not hosts:
        return f"{name}: no host"
    from fabflows.upgrade_mode import ssh_options

    settings = scope.rc.config.fabflows.stop_start
    wait_for_ssh(
        hosts,
        ssh_options(scope.rc),
        timeout=settings.reachable_wait_seconds,
        poll=min(2.0, settings.poll_seconds),
    )
    result = run_fleet(
        hosts,
        post_start_step(
            services(scope.rc, settings.role_services, role),
            volume=encrypted_volume(scope.rc),
            passphrase=load_passphrase(scope.rc),
        ),
        pool=scope.pool,
        rate=RateControl(max_concurrency="100%", max_errors=0),
        dry_run=False,
        name=name,
    )
    result.raise_for_errors()
    return result.summary()


def start_into_service(scope: Scope, ids: list[str], role: str) -> list[str]:
    """Start the stopped ones among ``ids``, wait until all run, bring them into service (at the
    addresses EC2 gives now). Summaries of what was done."""
    if not ids:
        return []
    log = [start_instances(scope.rc.creds, ids, dry_run=False).summary]
    fresh = wait_states(scope.rc, ids, "running")
    log.append(in_service(scope, hosts_of(scope.rc, fresh), role, f"in-service-{role}"))
    return log


def stop_keeping_records(scope: Scope, ids: list[str], flow: str) -> list[str]:
    """Stop the running ones among ``ids`` and wait; an instance's existing stop record (from
    the stop this puts back) is kept as it was."""
    if not ids:
        return []
    creds = scope.rc.creds
    before = {s.instance_id: s.tags.get(STOPPED_TAG) for s in describe_instances(creds, ids)}
    record = RunRecord(run=scope.run_id, flow=flow, since=datetime.now(UTC))
    log = [stop_instances(creds, ids, record, dry_run=False).summary]
    wait_states(scope.rc, ids, "stopped")
    for iid, value in before.items():
        if value:
            tag_instances(creds, [iid], {STOPPED_TAG: value}, dry_run=False)
    return log


def journaled(scope: Scope, step: str) -> dict[str, Any]:
    """What an earlier step of this run returned (this process, else its journal)."""
    if step in scope.results and isinstance(scope.results[step], dict):
        return scope.results[step]
    if scope.journal is not None:
        entry = scope.journal.entry(scope.run_id)
        rec = entry.step(step) if entry else None
        if rec is not None:
            return rec.data
    return {}
