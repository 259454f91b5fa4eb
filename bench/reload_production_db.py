"""Benchmark reload-production-db on a real stack (moto + isolated test hosts + PostgreSQL 15).

    FABFLOWS_TEST_NET_PREFIX=f8 FABFLOWS_TEST_NET_SUBNET=10.218.0 \\
        .venv/bin/python -m bench.reload_production_db [--small-mb 100] [--large-mb 1000]

Measures, in one run and between the same two database servers:

1. the fastest raw copy: ``pg_dump -Fc -Z0 | pg_restore`` run on the target server (no snapshot
   export, no counting, no Prefect), at the large size;
2. the flow's wall time at the large size (and the copy step alone), as a ratio of (1);
3. user-visible downtime (upgrade mode on -> off, and an HTTP probe of the site every 100 ms for the
   whole run) at the small and the large size, and the migrations' time;
4. the original's approach on the same data: 503 page, app and pgbouncer
   stopped, ``dropdb``/``createdb``, plain ``pg_dump | psql`` while down, migrate, start, page off.

Prints a table and writes ``bench/results/reload_production_db.json``. Not a test: run it on a quiet
machine (timings vary with load).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sandbox.seed_db import psql, scale_for_megabytes, seed_database, seed_timeout  # noqa: E402
from sandbox.testhosts import TestNetwork  # noqa: E402
from tasks.http.probe import HttpProbe  # noqa: E402
from tests.flows.reload_stack import PROD_PASSWORD, Stack, build_stack, destroy_stack  # noqa: E402

RAW_PREFIX = r"""set -euo pipefail
IFS= read -r PGPASSWORD; export PGPASSWORD
dropdb --if-exists bench_raw; rm -rf /var/lib/postgresql/bench_dump
createdb -O dbuser -T template0 -E UTF8 bench_raw
export PGOPTIONS='-c maintenance_work_mem=256MB -c synchronous_commit=off'
start=$(date +%s.%N)
"""
RAW_SUFFIX = r"""
end=$(date +%s.%N)
echo "$start $end"
dropdb bench_raw; rm -rf /var/lib/postgresql/bench_dump
"""
RAW_MODES = {
    # what the flow runs (without the snapshot export and counting)
    "custom-Z0-stream": 'pg_dump -Fc -Z0 -h "$1" -U dbuser -d myproject_production'
    " | pg_restore --no-owner --no-acl --exit-on-error --role=dbuser -d bench_raw",
    "plain-stream": '{ echo "SET ROLE dbuser;"; pg_dump -O -x -h "$1" -U dbuser -d myproject_production; }'
    " | psql -q -X -v ON_ERROR_STOP=1 -d bench_raw >/dev/null",
    "directory-j2": 'pg_dump -Fd -j2 -Z0 -f /var/lib/postgresql/bench_dump -h "$1" -U dbuser -d myproject_production'
    " && pg_restore -j2 --no-owner --no-acl --exit-on-error --role=dbuser -d bench_raw /var/lib/postgresql/bench_dump",
}
"""Raw copies between the same two servers, run on the target (the fastest decides the baseline)."""

ORIGINAL_COPY = r"""set -o pipefail
IFS= read -r PGPASSWORD; export PGPASSWORD
dropdb myproject_staging
createdb -E UTF-8 -O dbuser myproject_staging
{ echo 'SET ROLE dbuser;'; pg_dump -O -x -h "$1" -U dbuser -d myproject_production; } \
  | psql -q -d myproject_staging >/dev/null
"""
"""The original: drop, create, then a plain dump into psql without ON_ERROR_STOP (errors ignored)."""


def reseed_production(stack: Stack, megabytes: float) -> float:
    """Replace production's database with one of about ``megabytes``; return its size in MB."""
    host = stack.hosts["proddb"]
    psql(host, "DROP DATABASE IF EXISTS myproject_production WITH (FORCE);")
    scale = scale_for_megabytes(megabytes)
    # the seeding psql's timeout grows with the size (a fixed 60 s killed the 1 GB seed)
    print(
        f"seeding production: about {megabytes:g} MB ({scale} users, "
        f"timeout {seed_timeout(scale):.0f} s)",
        flush=True,
    )
    started = time.monotonic()
    seed_database(host, "myproject_production", "dbuser", PROD_PASSWORD, scale=scale)
    size = psql(host, "SELECT pg_database_size('myproject_production');").strip()
    print(f"seeded {int(size) / 1e6:.1f} MB in {time.monotonic() - started:.1f} s", flush=True)
    return int(size) / 1e6


def raw_copy_seconds(stack: Stack, mode: str = "custom-Z0-stream") -> float:
    script = RAW_PREFIX + RAW_MODES[mode] + RAW_SUFFIX
    argv = ["runuser", "-u", "postgres", "--", "bash", "-c", script, "bash"]
    result = stack.hosts["db"].exec(
        [*argv, stack.hosts["proddb"].ip], input=PROD_PASSWORD + "\n", timeout=3600
    )
    start, end = result.stdout.split()[-2:]
    return float(end) - float(start)


def run_flow(stack: Stack) -> dict:
    from flows.reload_production_db import reload_production_db

    started = time.monotonic()
    report = reload_production_db(
        environment="staging", config=str(stack.config), dry_run=False, probe=True
    )
    wall = time.monotonic() - started
    if not report.outcome.startswith("applied"):
        raise RuntimeError(f"the reload did not apply: {report.outcome}")
    steps = {s.name: s.seconds for s in report.steps}
    details = report.details
    return {
        "flow_wall_s": round(wall, 2),
        "copy_step_s": steps.get("copy"),
        "copy_s": details.get("copy_seconds"),
        "window_s": report.downtime_seconds,
        "migrations_s": details.get("migrations_seconds"),
        "probe_non_200": details.get("probe_non_200"),
        "probe_downtime_s": details.get("probe_downtime_seconds"),
        "probe_longest_request_s": details.get("probe_longest_request_seconds"),
        "steps": steps,
    }


def original(stack: Stack) -> dict:
    """The original's reload_production_db, step by step, on the same hosts and data."""
    web, worker, db = stack.hosts["web"], stack.hosts["worker"], stack.hosts["db"]
    root = "/home/deploy/services/nginx/html"
    probe = HttpProbe(f"http://{web.ip}/").start()
    started = time.monotonic()
    web.exec(["sh", "-c", f"echo down > {root}/503.html; echo OK > {root}/healthcheck.html"])
    web.exec(["supervisorctl", "stop", "staging-web:*"])
    worker.exec(["supervisorctl", "stop", "staging-celery:*"])
    for h in (web, worker):
        h.exec(["supervisorctl", "stop", "staging-pgbouncer:*"])
    copy_started = time.monotonic()
    db.exec(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            "bash",
            "-c",
            ORIGINAL_COPY,
            "bash",
            stack.hosts["proddb"].ip,
        ],
        input=PROD_PASSWORD + "\n",
        timeout=3600,
        check=False,
    )
    copy = time.monotonic() - copy_started
    for h in (web, worker):
        h.exec(["supervisorctl", "start", "staging-pgbouncer:*"])
    worker.exec(
        [
            "runuser",
            "-u",
            "deploy",
            "--",
            "sh",
            "-c",
            "cd /home/deploy/www/staging/code_root && python3 manage.py migrate --noinput",
        ]
    )
    worker.exec(["supervisorctl", "start", "staging-celery:*"])
    web.exec(["supervisorctl", "start", "staging-web:*"])
    web.exec(["sh", "-c", f"rm -f {root}/503.html {root}/healthcheck.html"])
    down = time.monotonic() - started
    time.sleep(1.0)
    summary = probe.stop()
    return {
        "downtime_s": round(down, 2),
        "copy_s": round(copy, 2),
        "probe_non_200": summary.non_200,
        "probe_downtime_s": summary.total_downtime_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reload_production_db")
    p.add_argument("--small-mb", type=float, default=100)
    p.add_argument("--large-mb", type=float, default=1000)
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "reload_production_db.json"
    )
    args = p.parse_args(argv)
    prefix = os.environ.get("FABFLOWS_TEST_NET_PREFIX", "rb")
    subnet = os.environ.get("FABFLOWS_TEST_NET_SUBNET", "10.219.0")

    from prefect.testing.utilities import prefect_test_harness

    from fabflows.testing.moto_server import MotoServer

    results: dict = {"prefix": prefix, "subnet": subnet, "nproc": os.cpu_count()}
    tmp = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    net = TestNetwork(tmp / "hosts", prefix=prefix, subnet=subnet)
    net.setup()
    moto = MotoServer().start()
    stack = None
    try:
        with prefect_test_harness(server_startup_timeout=120):
            stack = build_stack(tmp / "stack", moto.endpoint, net, prod_scale=100)
            # small
            results["small_mb"] = round(reseed_production(stack, args.small_mb), 1)
            results["small_flow"] = run_flow(stack)
            print("small:", json.dumps(results["small_flow"]), flush=True)
            # large
            results["large_mb"] = round(reseed_production(stack, args.large_mb), 1)
            raw_runs: dict[str, list[float]] = {m: [] for m in RAW_MODES}
            for mode in RAW_MODES:
                raw_runs[mode].append(round(raw_copy_seconds(stack, mode), 2))
                print("raw copy", mode, raw_runs[mode][-1], flush=True)
            results["large_flow"] = run_flow(stack)
            print("large:", json.dumps(results["large_flow"]), flush=True)
            for mode in RAW_MODES:
                raw_runs[mode].append(round(raw_copy_seconds(stack, mode), 2))
                print("raw copy", mode, raw_runs[mode][-1], flush=True)
            results["raw_copy_s"] = raw_runs
            best_mode = min(RAW_MODES, key=lambda m: min(raw_runs[m]))
            raw = min(raw_runs[best_mode])
            results["raw_fastest"] = {"mode": best_mode, "seconds": raw}
            results["ratio_flow_wall_vs_raw"] = round(results["large_flow"]["flow_wall_s"] / raw, 2)
            results["ratio_copy_step_vs_raw"] = round(results["large_flow"]["copy_step_s"] / raw, 2)
            results["original"] = original(stack)
            print("original:", json.dumps(results["original"]), flush=True)
    finally:
        if stack is not None:
            destroy_stack(stack)
        moto.stop()
        net.teardown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        ("database", f"{results['small_mb']} MB", f"{results['large_mb']} MB"),
        *[
            (f"raw {m} (best of 2)", "", f"{min(v):.1f} s")
            for m, v in results["raw_copy_s"].items()
        ],
        (
            "flow wall time",
            f"{results['small_flow']['flow_wall_s']} s",
            f"{results['large_flow']['flow_wall_s']} s",
        ),
        (
            "flow copy step",
            f"{results['small_flow']['copy_step_s']} s",
            f"{results['large_flow']['copy_step_s']} s",
        ),
        (
            "window (upgrade mode on->off)",
            f"{results['small_flow']['window_s']} s",
            f"{results['large_flow']['window_s']} s",
        ),
        (
            "  of which migrations",
            f"{results['small_flow']['migrations_s']} s",
            f"{results['large_flow']['migrations_s']} s",
        ),
        (
            "probe: non-200 time",
            f"{results['small_flow']['probe_downtime_s']} s",
            f"{results['large_flow']['probe_downtime_s']} s",
        ),
        ("original: downtime", "", f"{results['original']['downtime_s']} s"),
    ]
    for a, b, c in rows:
        print(f"{a:<34} {b:>12} {c:>12}")
    print(
        f"flow wall / raw copy: {results['ratio_flow_wall_vs_raw']}x; copy step / raw: {results['ratio_copy_step_vs_raw']}x"
    )
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
