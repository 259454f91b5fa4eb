"""resume-run: go on with a failed or dead run from the step where it stopped."""

from __future__ import annotations

from prefect import flow

from config import ConfigError, load_config, resolve_environment
from fabflows.errors import BadInput, Refused
from fabflows.runtime.engine import RunbookReport, execute, load_runbook
from fabflows.runtime.journal import Journal
from fabflows.runtime.recovery import holder_run_id

FLOW_NAME = "resume-run"


@flow(name=FLOW_NAME, log_prints=False)
def resume_run(
    environment: str,
    run_id: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    window_override_reason: str | None = None,
) -> RunbookReport:
    """Resume a failed or dead run of any runbook from the step where it stopped.

    **When to run:** a run failed part-way (one server's package upgrade failed, a worker was
    lost) and the cause is fixed. `fabflows resume RUN_ID` is the same from a terminal. For a run
    started from a deployment, Prefect's **Retry** button does the same: the retried run has the
    same id, finds its own journal and goes on from it.

    **What it does:** reads the run's journal (parameters, plan, which steps were done), gathers the
    environment again and plans again under the environment's lock, refuses if the new plan has a
    step the journaled plan did not have (the environment changed in a way the run never planned),
    then runs the steps not done yet. Steps already done are not done again. Every gate applies as
    for the original run: window, approval, lock, journal, summary.

    **Blast radius:** what the original run's plan named, minus what it already did.

    **Dry run** (default): the plan now and which steps would be skipped.

    **Rolls back:** as the original runbook does; it writes to the original run's journal, so
    `recover` and a later resume see one history.

    Args:
        environment: Environment the run worked on (e.g. staging).
        run_id: The flow run id of the run to resume (see `fabflows runs`).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show what would be done (default). Set false (CLI --apply) to resume.
        window_override_reason: Run outside the maintenance window, for this recorded reason.
    """
    try:
        cfg = load_config(config)
        env = resolve_environment(cfg, environment, deployment)
    except ConfigError as exc:
        raise BadInput(str(exc)) from None
    journal = Journal.for_environment(env.label, cfg)
    entry = journal.entry(run_id)
    if entry is None:
        raise BadInput(f"no journal of run {run_id} on {env.label}")
    if not entry.open:
        raise BadInput(f"run {run_id} ({entry.flow}) is {entry.state}: nothing to resume")
    if holder_run_id(env.label, cfg) == run_id:
        raise Refused(f"run {run_id} is still running (it holds the lock of {env.label})")
    runbook = load_runbook(entry.flow)
    args = {
        **entry.params,
        "environment": env.environment,
        "deployment": env.deployment,
        "config": config,
        "dry_run": dry_run,
        "window_override_reason": window_override_reason,
    }
    return execute(runbook, args, resume_of=entry)
