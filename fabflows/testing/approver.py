"""An approver for tests: waits for the paused run, as someone watching the UI would, and resumes
it with a decision through the Prefect API."""

from __future__ import annotations

import threading
import time
from typing import Any


def resume_when_paused(
    run_input: dict[str, Any], timeout: float = 60
) -> tuple[threading.Thread, list[str]]:
    """Start a thread that resumes the first PAUSED flow run with ``run_input``; returns the
    thread and the list it appends the resumed run's id to."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    resumed: list[str] = []

    def approve() -> None:
        deadline = time.monotonic() + timeout
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                paused = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(
                            type=FlowRunFilterStateType(any_=[StateType.PAUSED])
                        )
                    )
                )
                if paused:
                    resume_flow_run(paused[0].id, run_input=run_input)
                    resumed.append(str(paused[0].id))
                    return
                time.sleep(0.2)

    thread = threading.Thread(target=approve, daemon=True)
    thread.start()
    return thread, resumed
