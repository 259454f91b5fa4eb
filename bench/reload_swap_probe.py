"""What users see while reload-production-db swaps the copy in: the upgrade page or a pgbouncer pause.

    FABFLOWS_TEST_NET_PREFIX=hb FABFLOWS_TEST_NET_SUBNET=10.232.0 \\
        .venv/bin/python -m bench.reload_swap_probe [--runs 5] [--mb 20]

One real stack (moto, isolated test hosts, PostgreSQL 15, the Django app behind nginx and
pgbouncer), production migrated to the app's code (nothing pending, so the pause is allowed), and
an HTTP probe through the load balancer (the ELB proxy over moto's ELB, as users reach the site)
every 100 ms for each whole run (each request may take up to 10 s: a held request is measured, not
cut off at the probe's usual 2 s). Alternating, ``--runs`` times each:

- **upgrade page** (the baseline): ``swap: upgrade-page`` in config;
- **pgbouncer pause**: ``swap: auto`` (the plan takes the pause).

Per run: the probe's non-200 count and longest request, the window (first to last step with users
kept out or held). Reported as median and max per path. Goal for the pause: 0 non-200, longest
request <= 3 s. Writes ``bench/results/reload_swap_probe.json``. Not a test: timings vary with load.
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reload_production_db import reseed_production  # noqa: E402
from sandbox.seed_db import psql  # noqa: E402
from sandbox.testhosts import TestNetwork  # noqa: E402
from tests.flows.reload_stack import (  # noqa: E402
    MIGRATE_PRODUCTION,  # noqa: E402
    Stack,
    build_stack,
    destroy_stack,
)

PATHS = {"upgrade-page": "upgrade-page", "pause": "auto"}
"""Bench label -> the config's reload_production_db.swap."""


def config_for(stack: Stack, swap: str, directory: Path) -> Path:
    data = yaml.safe_load(stack.config.read_text())
    data["fabflows"].setdefault("reload_production_db", {})["swap"] = swap
    path = directory / f"fabflows-{swap}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def one_run(stack: Stack, config: Path, proxy_url: str, expected: str) -> dict:
    from flows.reload_production_db import reload_production_db
    from tasks.http.probe import HttpProbe

    # a held request waits (up to 10 s, as a browser would) and counts by its duration; the
    # probe's usual 2 s timeout would count a held request as refused
    probe = HttpProbe(proxy_url + "/", request_timeout=10).start()
    started = time.monotonic()
    try:
        report = reload_production_db(environment="staging", config=str(config), dry_run=False)
    finally:
        time.sleep(0.5)  # a last poll or two after the run
        summary = probe.stop()
    if not report.outcome.startswith("applied"):
        raise RuntimeError(f"the reload did not apply: {report.outcome}")
    path = report.details.get("swap_path")
    if path != expected:
        raise RuntimeError(f"the plan took {path}, the bench asked for {expected}")
    return {
        "path": path,
        "non_200": summary.non_200,
        "longest_request_s": summary.latency_max_s,
        "downtime_s": summary.total_downtime_s,
        "polls": summary.samples,
        "window_s": report.downtime_seconds,
        "pause_s": report.details.get("pause_seconds"),
        "run_s": round(time.monotonic() - started, 2),
    }


def distribution(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows if r[key] is not None]
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reload_swap_probe")
    p.add_argument("--runs", type=int, default=5, help="Runs of each path.")
    p.add_argument("--mb", type=float, default=20, help="Production's size (small: the window).")
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "reload_swap_probe.json"
    )
    args = p.parse_args(argv)
    prefix = os.environ.get("FABFLOWS_TEST_NET_PREFIX", "rs")
    subnet = os.environ.get("FABFLOWS_TEST_NET_SUBNET", "10.221.0")

    from prefect.testing.utilities import prefect_test_harness

    from fabflows.testing.elb_proxy import ElbProxy
    from fabflows.testing.moto_server import MotoServer

    results: dict = {"prefix": prefix, "subnet": subnet, "nproc": os.cpu_count(), "runs": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    net = TestNetwork(tmp / "hosts", prefix=prefix, subnet=subnet)
    net.setup()
    moto = MotoServer().start()
    stack = proxy = None
    try:
        with prefect_test_harness(server_startup_timeout=120):
            stack = build_stack(tmp / "stack", moto.endpoint, net, prod_scale=100)
            results["mb"] = round(reseed_production(stack, args.mb), 1)
            psql(stack.hosts["proddb"], MIGRATE_PRODUCTION, database=stack.source)
            configs = {label: config_for(stack, swap, tmp) for label, swap in PATHS.items()}
            proxy = ElbProxy(moto.endpoint, "myproject-staging-lb", timeout=60).start()  # ELB: 60 s
            time.sleep(1)
            rows: dict[str, list[dict]] = {label: [] for label in PATHS}
            for i in range(args.runs):
                for label in PATHS:
                    row = one_run(stack, configs[label], proxy.url, label)
                    rows[label].append(row)
                    print(f"{label} run {i + 1}: {json.dumps(row)}", flush=True)
            results["runs"] = rows
    finally:
        if proxy is not None:
            proxy.stop()
        if stack is not None:
            destroy_stack(stack)
        moto.stop()
        net.teardown()
    summary = {
        label: {k: distribution(r, k) for k in ("non_200", "longest_request_s", "window_s")}
        for label, r in results["runs"].items()
    }
    results["summary"] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nproduction {results['mb']} MB, {args.runs} runs each, probe every 100 ms via the ELB")
    print(f"{'':<28} {'upgrade page':>22} {'pgbouncer pause':>22}")
    for key, what in (
        ("non_200", "non-200 answers"),
        ("longest_request_s", "longest request (s)"),
        ("window_s", "window (s)"),
    ):
        cells = [
            f"{summary[label][key]['median']} / {summary[label][key]['max']}" for label in PATHS
        ]
        print(f"{what + ' median/max':<28} {cells[0]:>22} {cells[1]:>22}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
