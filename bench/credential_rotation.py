"""Database and broker password rotation, side by side on the same real peers (moto, test hosts
running the Django app behind nginx and pgbouncer, PostgreSQL, RabbitMQ, a forwarding and
health-checking load balancer), with the site probed through the load balancer every 100 ms:

- baseline: push-server-secrets with new ``database_password`` and ``broker_password`` in the
  block (changed in place, inside an upgrade window);
- rotate-credentials: the same two passwords and the replicas' replication password with
  alternating logins (goal: 0 non-200, and the replica never stops streaming for more than a
  moment: the longest gap is measured from the primary's pg_stat_replication every 100 ms).

Each repetition runs the baseline (the app on ``<database_user>``: push-server-secrets changes the
password of the configured login), then two rotations (to the ``_alt`` logins and back), so the
next repetition's baseline starts where the first did. Every rotation is measured.

Usage (as root, like the tests)::

    FABFLOWS_TEST_NET_PREFIX=hd FABFLOWS_TEST_NET_SUBNET=10.234.0 \\
        .venv/bin/python bench/credential_rotation.py --reps 5

Prints a table (median and max per flow) and writes ``bench/results/credential_rotation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blocks.secrets import ServerSecrets  # noqa: E402
from fabflows.testing.app_env import build_app_env  # noqa: E402
from fabflows.testing.elb_proxy import ElbProxy  # noqa: E402
from fabflows.testing.moto_server import MotoServer  # noqa: E402
from fabflows.testing.replication_watch import ReplicationWatch  # noqa: E402
from sandbox.testhosts import TestNetwork  # noqa: E402
from tasks.http.probe import HttpProbe  # noqa: E402

BLOCK = "myproject-staging-secrets"
EXTRA = {"newrelic": {"drain_seconds": 1, "healthy_timeout_seconds": 60}}
BASELINE = "push-server-secrets (in place, window)"
ROTATION = "rotate-credentials (alternating logins)"


def _block() -> ServerSecrets:
    return ServerSecrets.load(BLOCK)


def _measured(flow: str, run) -> dict:  # noqa: ANN001 - a callable returning a RunbookReport
    url = _measured.url  # type: ignore[attr-defined]
    env = _measured.env  # type: ignore[attr-defined]
    watch = ReplicationWatch(env.db_host, [r.ip for r in env.by_role("db-replica")])
    probe = HttpProbe(url).start()
    started = time.monotonic()
    try:
        with watch:
            report = run()
    finally:
        summary = probe.stop()
    if report.problems or report.outcome.startswith("failed"):
        raise RuntimeError(f"{flow}: {report.render_text()}")
    return {
        "flow": flow,
        "run_s": round(time.monotonic() - started, 2),
        "non_200": summary.non_200,
        "downtime_s": summary.total_downtime_s,
        "polls": summary.samples,
        "replica_gap_s": round(watch.worst_gap, 2),
        "replica_lag_max_bytes": watch.max_lag,
    }


def bench(net: TestNetwork, reps: int) -> list[dict]:
    from flows.push_server_secrets import push_server_secrets
    from flows.rotate_credentials import rotate_credentials

    moto = MotoServer().start()
    proxy = ElbProxy(moto.endpoint, "myproject-staging-lb")
    env = build_app_env(
        moto.endpoint,
        net,
        Path(tempfile.mkdtemp(prefix="bench-rotation-")),
        web_count=2,
        rabbitmq=True,
        replicas=True,
        site_url=proxy.url,
        fabflows_extra=EXTRA,
        prefix="br",
    )
    proxy.start()
    time.sleep(1)
    _measured.url = proxy.url  # type: ignore[attr-defined]
    _measured.env = env  # type: ignore[attr-defined]
    config = str(env.config_path)
    rows: list[dict] = []
    try:
        block = ServerSecrets()
        for name, value in env.secrets.items():
            block.set(name, value)
        block.save(BLOCK, overwrite=True)
        for rep in range(reps):
            block = _block()
            block.set("database_password", f"db-inplace-{rep}-'$x")
            block.set("broker_password", f'broker-inplace-{rep}-"$y')
            block.save(BLOCK, overwrite=True)
            rows.append(
                _measured(
                    BASELINE,
                    lambda: push_server_secrets(
                        environment="staging", config=config, dry_run=False
                    ),
                )
            )
            print(rows[-1], flush=True)
            for _ in range(2):
                rows.append(
                    _measured(
                        ROTATION,
                        lambda: rotate_credentials(
                            environment="staging", config=config, dry_run=False
                        ),
                    )
                )
                print(rows[-1], flush=True)
    finally:
        proxy.stop()
        env.destroy()
        moto.stop()
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for flow in (BASELINE, ROTATION):
        group = [r for r in rows if r["flow"] == flow]
        if not group:
            continue
        entry: dict = {"flow": flow, "runs": len(group)}
        for field in ("run_s", "non_200", "downtime_s", "replica_gap_s"):
            values = [r[field] for r in group]
            entry[f"{field}_median"] = round(statistics.median(values), 2)
            entry[f"{field}_max"] = round(max(values), 2)
        out.append(entry)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    prefix = os.environ.get("FABFLOWS_TEST_NET_PREFIX", "hd")
    subnet = os.environ.get("FABFLOWS_TEST_NET_SUBNET", "10.234.0")
    from prefect.testing.utilities import prefect_test_harness

    net = TestNetwork(Path(tempfile.mkdtemp(prefix="bench-net-")), prefix=prefix, subnet=subnet)
    net.setup()
    try:
        with prefect_test_harness(server_startup_timeout=90):
            rows = bench(net, args.reps)
    finally:
        net.teardown()
    summary = summarize(rows)
    out = ROOT / "bench" / "results" / "credential_rotation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": rows, "summary": summary}, indent=1))
    print(
        "\nflow | runs | run s (median/max) | non-200 (median/max) | downtime s (median/max) | "
        "replica not streaming s (median/max)"
    )
    for e in summary:
        print(
            f"{e['flow']} | {e['runs']} | {e['run_s_median']}/{e['run_s_max']} | "
            f"{e['non_200_median']}/{e['non_200_max']} | "
            f"{e['downtime_s_median']}/{e['downtime_s_max']} | "
            f"{e['replica_gap_s_median']}/{e['replica_gap_s_max']}"
        )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
