"""reload-production-db end to end on a real stack (moto + test hosts + PostgreSQL + Django)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flows.reload_production_db import reload_production_db
from tests.flows.reload_stack import PRE_SUSPENDED, Stack, build_stack, destroy_stack

pytestmark = [pytest.mark.hosts, pytest.mark.flow]


@pytest.fixture(scope="module")
def stack(moto_server, test_network, tmp_path_factory, prefect_server) -> Iterator[Stack]:
    moto_server.reset()
    s = build_stack(tmp_path_factory.mktemp("reload"), moto_server.endpoint, test_network)
    try:
        yield s
    finally:
        destroy_stack(s)


def _invariants(stack: Stack) -> None:
    assert stack.suspended() == PRE_SUSPENDED
    assert not [k for k in stack.asg_tags() if k.startswith("fabflows:")]
    r = stack.site()
    assert r.status_code == 200, r.text
    assert all(state == "RUNNING" for state in stack.programs().values()), stack.programs()
    dbs = stack.databases()
    assert stack.live in dbs and dbs[stack.live] == ""
    assert not [n for n in dbs if n.startswith(stack.live + "__")], dbs


def test_dry_run_then_apply(stack: Stack) -> None:
    before = stack.count("db", stack.live)
    dry = reload_production_db(environment="staging", config=str(stack.config))
    assert dry.dry_run and dry.plan.source_bytes > 0
    assert stack.count("db", stack.live) == before
    assert "reload" in stack.site().text or stack.site().status_code == 200

    report = reload_production_db(
        environment="staging", config=str(stack.config), dry_run=False, probe=True
    )
    print(report.render_text())
    assert report.outcome == "reloaded"
    assert stack.count("db", stack.live) == stack.count("proddb", stack.source)
    assert report.copy_result.snapshot_counts["public.auth_user"] == stack.count(
        "proddb", stack.source
    )
    assert report.downtime_s is not None and report.downtime_s < 30
    assert report.probe is not None and report.probe.non_200 > 0
    _invariants(stack)
