"""pytest fixture: Prefect's test harness (a real temporary server), once per test run, on demand."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """Start the harness (~11 s) only when a flow test asks for it."""
    from prefect.testing.utilities import prefect_test_harness

    # an upper bound: on a loaded 2-core machine the server has needed more than 60 s
    with prefect_test_harness(server_startup_timeout=180):
        yield
