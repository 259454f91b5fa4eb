"""Scale-out, once: the Prefect server on PostgreSQL, two process workers on the same pool, runs
spread over both, and the environment lock on the postgres backend serialising the runs that change
one environment across the two workers."""

from __future__ import annotations

import itertools
import time

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.settings import PREFECT_API_URL, temporary_settings

from config import load_config
from fabflows.registry import FLOWS
from fabflows.testing.configs import moto_section, write_config
from sandbox.aws_seed import seed

from .stack import FLOWS_UNDER_TEST, Stack


def test_two_workers_on_postgres_share_the_runs(pg_cluster, moto_server, tmp_path) -> None:
    moto_server.reset()
    prefect_db = pg_cluster.create_database("prefect_scale")
    lock_db = pg_cluster.create_database("fabflows_locks")
    config_path = write_config(
        tmp_path,
        fabflows=moto_section(moto_server.endpoint)
        | {
            "state_dir": str(tmp_path / "state"),
            "lock": {"backend": "postgres", "postgres_url": lock_db, "poll_seconds": 0.2},
        },
    )
    seed(
        moto_server.endpoint,
        load_config(config_path),
        ["staging"],
        "10.217.0.0/24",
        (f"10.217.0.{i}" for i in itertools.count(10)),
    )
    stack = Stack(
        tmp_path, database_url=prefect_db.replace("postgresql://", "postgresql+asyncpg://")
    )
    try:
        stack.start_server()
        stack.deploy(
            config_path, {"describe-environment": FLOWS["describe-environment"], **FLOWS_UNDER_TEST}
        )
        # one run at a time each: a worker busy with a run leaves the next to the other
        stack.start_worker("w1", limit=1)
        stack.start_worker("w2", limit=1)
        with (
            temporary_settings({PREFECT_API_URL: stack.api}),
            get_client(sync_client=True) as client,
        ):
            deadline = time.monotonic() + 60  # both workers polling before any run exists
            online: set[str] = set()
            while time.monotonic() < deadline and not online >= {"w1", "w2"}:
                workers = client.read_workers_for_work_pool("fabflows")
                online = {w.name for w in workers if str(w.status.value) == "ONLINE"}
                time.sleep(0.5)
            assert online >= {"w1", "w2"}, online
            describe = client.read_deployment_by_name("describe-environment/myproject-staging")
            hold = client.read_deployment_by_name("hold-environment-lock/myproject-staging")
            runs = [client.create_flow_run_from_deployment(describe.id) for _ in range(4)]
            runs += [
                client.create_flow_run_from_deployment(
                    hold.id, parameters={"seconds": 2, "marker": str(tmp_path / "holds.txt")}
                )
                for _ in range(4)
            ]
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                states = [client.read_flow_run(r.id).state for r in runs]
                if all(s.is_final() for s in states):
                    break
                time.sleep(1)
            assert all(s.is_completed() for s in states), [s.name for s in states]
            ran_on = {}
            for r in runs:
                logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id])))
                text = "\n".join(log.message for log in logs)
                ran_on[r.id] = (
                    "w1" if "Worker 'w1'" in text else "w2" if "Worker 'w2'" in text else "?"
                )
        assert set(ran_on.values()) == {"w1", "w2"}, ran_on
        print(f"\nruns per worker: {sorted(ran_on.values())}")
        hold_workers = {ran_on[r.id] for r in runs[4:]}
        print(f"lock-holding runs ran on {sorted(hold_workers)}")
        # the lock holders never overlapped, though they ran on two workers
        spans = sorted(
            tuple(map(float, line.split()))
            for line in (tmp_path / "holds.txt").read_text().splitlines()
        )
        assert len(spans) == 4
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end, "two runs held the environment at once"
        assert pg_cluster  # the server's data is in PostgreSQL: no SQLite file was made
        assert not (tmp_path / "server" / "home" / "prefect.db").exists()
    finally:
        stack.close()
