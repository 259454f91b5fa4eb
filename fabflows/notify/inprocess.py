"""What a deployment run of a runbook does for its own notices, from its own process.

The automations run the notifier deployment for every event of a fabflows run: a flow run a worker
has to pick up and start as a new process. Its imports alone take seconds, 20-35 s on a loaded
worker machine, and a worker polls every ``PREFECT_WORKER_QUERY_SECONDS``. The run the event is
about is often still alive and has everything imported, so it does the urgent part itself:

- at its start (``watch_this_run``, from ``fabflows.audit.record_start``): a thread of the run does
  its window and slow-run checks (it sleeps until each is due: a run that ended has nothing to
  check), and an ``on_failure`` hook is registered; it makes sure the crash watcher runs (one
  notifier run that polls for fabflows runs marked CRASHED while any is going:
  ``fabflows.notify.notifier.watch``), so a crash notice does not wait for a process to start;
- when it FAILS, Prefect calls that hook once the FAILED state is recorded: it sends the notice;
- when it pauses for approval (``watch_approval``, from ``fabflows.approval.request_approval``): a
  thread sends the approval notice as soon as the run is PAUSED, then the reminder half way to the
  deadline; the timeout notice is a check run of the notifier deployment, scheduled ``CHECK_LEAD``
  before the deadline (the run's own process ends right after its CANCELLED state).

The notifier runs the automations start do the same and find it done: every notice has a key and is
sent once, and the checks of one state are planned once. They still matter:
a crashed run (its process is gone), a run whose process died before it could send, and runs not
started from a deployment (a terminal run: the fast path is skipped there, so flow tests under
Prefect's test harness pay nothing for it) get their notices from them.
"""

from __future__ import annotations

import threading
import time
from typing import Any

HOOK_NAME = "fabflows_notify_failed"
PAUSE_WAIT_SECONDS = 60.0
"""How long ``watch_approval``'s thread waits for the run to be PAUSED (it polls every 0.5 s)."""


def _deployment_run() -> Any | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or ctx.flow_run.deployment_id is None:
        return None
    return ctx


def _in_thread(name: str, target: Any, *args: Any) -> None:
    threading.Thread(target=target, args=args, name=name, daemon=True).start()


def watch_this_run() -> bool:
    """Plan this run's checks (in a thread) and add the failure hook to its flow (once per flow
    object). False (nothing done) outside a deployment run."""
    from prefect.logging import get_run_logger

    ctx = _deployment_run()
    if ctx is None:
        return False
    hooks = ctx.flow.on_failure_hooks
    if not any(getattr(h, "__name__", "") == HOOK_NAME for h in hooks):
        hooks.append(fabflows_notify_failed)
    run = ctx.flow_run
    _in_thread(
        "fabflows-notify-started",
        _handle,
        "started",
        run.id,
        (run.parameters or {}).get("config"),
        get_run_logger(),
    )
    return True


def watch_approval(config_path: str | None = None) -> bool:
    """Send the approval notice once this run is PAUSED (a thread that waits at most
    ``PAUSE_WAIT_SECONDS``). False outside a deployment run."""
    from prefect.logging import get_run_logger

    ctx = _deployment_run()
    if ctx is None:
        return False
    run = ctx.flow_run
    path = config_path or (run.parameters or {}).get("config")
    _in_thread("fabflows-notify-paused", _when_paused, run.id, path, get_run_logger())
    return True


def _when_paused(run_id: Any, config_path: str | None, logger: Any) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + PAUSE_WAIT_SECONDS
    try:
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_paused():
                    break
                if state is not None and state.is_final():
                    return
                time.sleep(0.5)
            else:
                return
        _handle("paused", run_id, config_path, logger)
    except Exception as exc:  # noqa: BLE001 - the automation's notifier run still sends it
        logger.warning("approval notice not sent from the run: %s: %s", type(exc).__name__, exc)


def _handle(kind: str, run_id: Any, config_path: str | None, logger: Any) -> None:
    """The notifier's ``handle`` in this process; every check it plans is a run of its own."""
    from prefect.client.orchestration import get_client

    from config import load_config
    from fabflows.notify.notifier import ensure_watcher, handle

    try:
        config = load_config(config_path)
        with get_client(sync_client=True) as client:
            said = handle(client, config, kind, run_id, "", "", in_run=True)
            if kind == "started" and _watch_crashes(config, client, run_id):
                said += "; " + ensure_watcher(client, run_id)
    except Exception as exc:  # noqa: BLE001 - the automation's notifier run still does it
        logger.warning("notify %s from the run failed: %s: %s", kind, type(exc).__name__, exc)
        return
    logger.debug("notify %s: %s", kind, said)


def _watch_crashes(config: Any, client: Any, run_id: Any) -> bool:
    """Does this run's environment notify crashes? (A recovery alone can wait for the "run ended"
    automation's notifier run.)"""
    from fabflows.notify.notifier import environment_of
    from fabflows.notify.send import wanted

    env = environment_of(config, client.read_flow_run(run_id))
    return env is not None and wanted(config, env.environment, "crashed")


def fabflows_notify_failed(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_failure`` hook: the "ended" notice of this run, if its environment wants it."""
    from prefect.logging import get_run_logger

    from config import load_config
    from fabflows.notify.notifier import environment_of
    from fabflows.notify.send import wanted

    logger = get_run_logger()
    path = (flow_run.parameters or {}).get("config")
    try:
        config = load_config(path)
        env = environment_of(config, flow_run)
        if env is None or not wanted(config, env.environment, "failed"):
            return
    except Exception:  # noqa: BLE001 - no config, no notice from here
        return
    _handle("ended", flow_run.id, path, logger)
