"""Probe flows the end-to-end tests deploy (not registered): hold the lock, pause for approval."""

from __future__ import annotations

import os
import time

from prefect import flow

from fabflows import audit, lock
from fabflows.runbook import load_context


@flow(name="hold-environment-lock")
def hold_environment_lock(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    seconds: float = 30,
    marker: str = "",
    release: str = "",
) -> str:
    """Hold the environment's lock for ``seconds``, or until the file ``release`` exists.

    Args:
        environment: Environment to lock.
        deployment: Deployment.
        config: Config path (default: $FABFLOWS_CONFIG).
        seconds: How long to hold it at most.
        marker: File to append the hold interval to (epoch seconds).
        release: A file whose appearance ends the hold early.
    """
    ctx = load_context(environment, deployment, config)
    audit.record_start(ctx.env)
    with lock.environment_lock(ctx.env, ctx.config):
        if marker:  # "<acquired> <released>" lines, appended
            with open(marker, "a") as f:
                f.write(f"{time.time()} ")
        until = time.monotonic() + seconds
        while time.monotonic() < until and not (release and os.path.exists(release)):
            time.sleep(0.1)
        if marker:
            with open(marker, "a") as f:
                f.write(f"{time.time()}\n")
    return "released"


@flow(name="approval-probe")
def approval_probe(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    timeout_seconds: int = 300,
) -> str:
    """Pause for approval of a dummy destructive plan, then report the decision.

    Args:
        environment: Environment the dummy plan is for.
        deployment: Deployment.
        config: Config path (default: $FABFLOWS_CONFIG).
        timeout_seconds: Seconds before no decision rejects.
    """
    from datetime import timedelta

    from fabflows import approval

    ctx = load_context(environment, deployment, config)
    starter = audit.record_start(ctx.env)
    plan = "| change | where |\n|---|---|\n| drop table sessions | db-primary |"
    try:
        decision = approval.request_approval(
            ctx.env,
            ctx.config,
            plan_markdown=plan,
            expected_downtime=timedelta(minutes=1),
            timeout=timedelta(seconds=timeout_seconds),
            poll=timedelta(seconds=1),
        )
    except approval.ApprovalRejected as exc:
        audit.record_summary(ctx.env, outcome=str(exc), plan_markdown=plan, starter=starter)
        return exc.as_state()
    audit.record_summary(ctx.env, outcome="approved", plan_markdown=plan, starter=starter)
    return f"approved by {decision.approver}"
