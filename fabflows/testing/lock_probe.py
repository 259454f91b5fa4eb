"""A flow that only holds its environment's lock (deployed by the end-to-end tests, not registered)."""

from __future__ import annotations

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
) -> str:
    """Hold the environment's lock for ``seconds`` (writes ``marker`` once held).

    Args:
        environment: Environment to lock.
        deployment: Deployment.
        config: Config path (default: $FABFLOWS_CONFIG).
        seconds: How long to hold it.
        marker: File to append the hold interval to (epoch seconds).
    """
    ctx = load_context(environment, deployment, config)
    audit.record_start(ctx.env)
    with lock.environment_lock(ctx.env, ctx.config):
        if marker:  # "<acquired> <released>" lines, appended
            with open(marker, "a") as f:
                f.write(f"{time.time()} ")
        time.sleep(seconds)
        if marker:
            with open(marker, "a") as f:
                f.write(f"{time.time()}\n")
    return "released"
