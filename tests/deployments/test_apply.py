"""Registering deployments on a real Prefect server (the test harness): upserts keep exactly the
generated schedules, and a flow deployed to several environments is registered once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prefect.client.orchestration import get_client

from deployments.apply import ensure_work_pool, upsert_deployment
from deployments.generate import DeploymentSpec, ScheduleEntry

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_server")]

POOL = "fabflows-apply-test"


def _spec(environment: str, schedules: list[ScheduleEntry]) -> DeploymentSpec:
    return DeploymentSpec(
        flow_name="apply-test-flow",
        import_path="flows.describe_environment:describe_environment",
        entrypoint="flows/describe_environment.py:describe_environment",
        name=f"myproject-{environment}",
        deployment="myproject",
        environment=environment,
        description="test",
        tags=["fabflows-apply-test"],
        parameters={"environment": environment},
        parameter_schema={"type": "object", "properties": {}},
        schedules=schedules,
        job_variables={"working_dir": "/tmp"},
        work_pool=POOL,
    )


async def _deploy(specs: list[DeploymentSpec]) -> tuple[list[Any], list[list[tuple]], int, int]:
    async with get_client() as client:
        await ensure_work_pool(client, POOL, 1)
        flow_ids: dict[str, Any] = {}
        ids = [await upsert_deployment(client, spec, flow_ids) for spec in specs]
        stored = [
            sorted((s.slug, s.schedule.cron) for s in await client.read_deployment_schedules(i))
            for i in ids
        ]
        flows = [f for f in await client.read_flows() if f.name == "apply-test-flow"]
        return ids, stored, len(flows), len(flow_ids)


def test_upsert_keeps_exactly_the_generated_schedules_and_registers_a_flow_once() -> None:
    night = ScheduleEntry(cron="0 2 * * *", timezone="UTC", slug="night")
    noon = ScheduleEntry(cron="0 12 * * *", timezone="UTC", slug="noon")
    ids, stored, flows, registered = asyncio.run(
        _deploy([_spec("staging", [night]), _spec("testing", [])])
    )
    assert stored == [[("night", "0 2 * * *")], []]
    assert (flows, registered) == (1, 1)  # one flow on the server, registered by one request
    # deploy again with other schedules: the old one goes, the new one comes, the same deployment
    again, stored, _, _ = asyncio.run(
        _deploy([_spec("staging", [noon]), _spec("testing", [night])])
    )
    assert again == ids
    assert stored == [[("noon", "0 12 * * *")], [("night", "0 2 * * *")]]
    # and once more unchanged: nothing added twice
    _, stored, _, _ = asyncio.run(_deploy([_spec("staging", [noon]), _spec("testing", [night])]))
    assert stored == [[("noon", "0 12 * * *")], [("night", "0 2 * * *")]]
