"""pytest fixtures: Prefect's test harness (a real temporary server), once per test run, on demand.

The session's server runs without two of its services, the task-run recorder and the triggers
(automations): no test on it reads task runs or waits for an automation to fire. The recorder
writes every task run's states from its events: five flow runs of 40 trivial tasks cost the server
14.8 s of CPU with the two, 3.7 s without; the suite's real flows, with fewer tasks and more API
calls, about 13 % less (32.4 -> 28.2 s for two modules, server start included). Tests that check
what those services do get a server with all of them: the leak scan reads every task run
(:func:`prefect_server_all_services`), the e2e tests start their own servers as operators do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

SERVICES = (
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED",
)


@contextmanager
def _harness(services_on: bool) -> Iterator[None]:
    """The harness, its server with or without the two services. They are settings of this
    process's settings context while the harness runs (the harness starts its server with that
    context's settings), so a harness started inside another sets them again."""
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    updates = {getattr(prefect.settings, name): services_on for name in SERVICES}
    with prefect.settings.temporary_settings(updates=updates):
        # an upper bound: on a loaded 2-core machine the server has needed more than 60 s
        with prefect_test_harness(server_startup_timeout=180):
            restart_prefect_senders()
            yield


def restart_prefect_senders() -> None:
    """Prefect's events and logs are sent by one worker per process, which takes the API's
    address when it starts and keeps it. A harness started inside another would get nothing
    (its runs' events and logs went on to the outer server), and after a test that talked to a
    server of its own (the e2e stacks) every later event of the process went to that stopped
    server and was lost: stop them, so that the next event or log starts them again with the
    address then in force. (The harness stops them itself when it ends.)"""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        worker.drain_all(timeout=30)  # from synchronous code: waits for them to end


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """Start the harness (~11 s) only when a flow test asks for it."""
    with _harness(services_on=False):
        yield


@pytest.fixture(scope="module")
def prefect_server_all_services() -> Iterator[None]:
    """A harness of the module's own with every service on (task runs recorded), in place of the
    session's while the module runs."""
    with _harness(services_on=True):
        yield
