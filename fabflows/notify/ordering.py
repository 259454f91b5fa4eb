"""Unblock the state events of a run the Prefect scheduler created shortly before it started.

The server emits an event for each state change of a flow run, with the new state's id as the
event's id and, when the previous state is less than 5 minutes old, ``follows`` set to the previous
state's id. Automations process an event only once the event it follows has been seen (for up to
15 minutes; after that it is taken as lost and processed anyway).

The scheduler service inserts its runs (and their first SCHEDULED state) straight into the database,
with no event. A run it schedules less than 5 minutes before it is due (the first run after
``fabflows deploy`` changed a schedule, or after a server restart) therefore starts with PENDING,
RUNNING, FAILED... events that all wait for a SCHEDULED event that never comes: no automation sees
them for 15 minutes. No notice, no crash detection, for exactly the run that was just scheduled.

``confirm_scheduled_state`` (called at the start of every runbook, ``fabflows.audit.record_start``)
emits the missing event, as the server would have: same id as the SCHEDULED state, same resource.
The events waiting for it are then processed at once, in order.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

TIGHT = timedelta(minutes=5)
"""The server sets ``follows`` only between state changes closer than this."""


def missing_leader(states: list[Any]) -> Any | None:
    """The run's first state if it is a SCHEDULED state the next state's event will follow
    (pure: the states as read from the API, any order)."""
    ordered = sorted(states, key=lambda s: s.timestamp)
    if len(ordered) < 2 or ordered[0].type.value != "SCHEDULED":
        return None
    first, second = ordered[0], ordered[1]
    if abs(second.timestamp - first.timestamp) >= TIGHT:
        return None
    return first


def _event_exists(client: Any, event_id: Any, occurred: datetime) -> bool:
    from prefect.events.filters import EventFilter, EventIDFilter, EventOccurredFilter

    page = client.read_events(
        EventFilter(
            id=EventIDFilter(id=[event_id]),
            occurred=EventOccurredFilter(
                since=occurred - timedelta(minutes=1),
                until=datetime.now(UTC) + timedelta(minutes=1),
            ),
        ),
        limit=1,
    )
    return bool(page.events)


def confirm_scheduled_state(run_id: Any) -> str | None:
    """Emit the SCHEDULED event of run ``run_id`` if the scheduler left it out and its next state's
    event waits for it. Returns what was done (None: nothing needed). Never raises: a run must not
    fail over this."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.events import emit_event

        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
            if not run.auto_scheduled:
                return None  # runs created through the API get their event from the server
            leader = missing_leader(client.read_flow_run_states(run_id))
            if leader is None or _event_exists(client, leader.id, leader.timestamp):
                return None
        emit_event(
            event="prefect.flow-run.Scheduled",
            resource={
                "prefect.resource.id": f"prefect.flow-run.{run.id}",
                "prefect.resource.name": run.name,
                "prefect.state-name": leader.name or "Scheduled",
                "prefect.state-type": "SCHEDULED",
                "prefect.state-timestamp": leader.timestamp.isoformat(),
            },
            occurred=leader.timestamp,
            id=leader.id,
            payload={"emitted-by": "fabflows: the scheduler inserted this state without an event"},
        )
    except Exception as exc:  # noqa: BLE001 - best effort; automations see the run after 15 min
        return f"could not confirm the scheduled state: {type(exc).__name__}: {exc}"
    return f"emitted the missing event of scheduled state {leader.id}"
