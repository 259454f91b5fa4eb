"""How long a person waits for `fabflows run describe-environment`.

Compared in the same run, against one seeded moto server and a real Prefect server:
  plain     - a plain boto3 script making the same AWS calls (bench/plain_describe.py)
  warm      - `fabflows run` with a Prefect server and the warm runner (the default after
              `fabflows server start` / `fabflows demo`)
  cold      - `fabflows run` with a Prefect server, no warm runner (Prefect's imports each call)
  embedded  - `fabflows run` with no server at all (Prefect starts a temporary one)

Usage: .venv/bin/python bench/describe_latency.py [--runs 5]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, ROOT, median, prefect_server, timed

from config import load_config
from fabflows.testing.configs import moto_section, write_config
from fabflows.testing.moto_server import MotoServer
from sandbox.aws_seed import seed

PY = str(ROOT / ".venv/bin/python")
FABFLOWS = str(ROOT / ".venv/bin/fabflows")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    moto = MotoServer().start()
    work = Path(tempfile.mkdtemp(prefix="bench-describe-"))
    config = write_config(
        work,
        fabflows=moto_section(moto.endpoint, staging={"target_groups": ["myproject-staging-web"]}),
    )
    seed(
        moto.endpoint,
        load_config(config),
        ["staging"],
        "10.250.0.0/24",
        (f"10.250.0.{i}" for i in itertools.count(10)),
    )
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base_env["FABFLOWS_STATE_DIR"] = str(work / "state")
    run = [FABFLOWS, "run", "describe-environment", "-e", "staging", "-c", str(config)]
    plain = [
        PY,
        str(ROOT / "bench/plain_describe.py"),
        moto.endpoint,
        "myproject",
        "staging",
        "myproject-staging-ag",
        "myproject-staging-lb",
        "myproject-staging-web",
    ]
    results: dict[str, list[float]] = {"plain": [], "warm": [], "cold": [], "embedded": []}
    with prefect_server() as url:
        server_env = base_env | {"PREFECT_API_URL": url}
        warm = subprocess.Popen(
            [PY, "-m", "fabflows.warm", "serve"],
            env=server_env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            from fabflows.warm import installation_id

            while not (work / "state" / f"warm-{installation_id()}.sock").exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("warm runner did not start")
                time.sleep(0.1)
            timed(run, server_env)  # first flow run on a fresh server registers the flow
            for _ in range(args.runs):
                results["plain"].append(timed(plain, base_env))
                results["warm"].append(timed(run, server_env))
                results["cold"].append(timed(run, server_env | {"FABFLOWS_NO_WARM": "1"}))
        finally:
            warm.terminate()
            warm.wait(10)
    home = tempfile.mkdtemp(prefix="bench-embedded-")
    embedded_env = base_env | {
        "FABFLOWS_NO_WARM": "1",
        "PREFECT_HOME": home,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    timed(run, embedded_env)  # first ever run migrates the new database
    for _ in range(min(args.runs, 3)):
        results["embedded"].append(timed(run, embedded_env))
    moto.stop()
    plain_median = median(results["plain"])
    summary = {
        name: {
            "median_s": round(median(v), 2),
            "ratio_to_plain": round(median(v) / plain_median, 2),
            "runs": [round(x, 2) for x in v],
        }
        for name, v in results.items()
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "describe_latency.json").write_text(json.dumps(summary, indent=2))
    print(f"{'mode':<10} {'median':>8} {'x plain':>8}")
    for name, s in summary.items():
        print(f"{name:<10} {s['median_s']:>7.2f}s {s['ratio_to_plain']:>7.2f}x")


if __name__ == "__main__":
    sys.exit(main())
