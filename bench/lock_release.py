"""How the per-environment lock behaves under contention and when its holder dies.

    .venv/bin/python bench/lock_release.py [--rounds 5]

For each backend (file, postgres on a throwaway cluster): 20 processes racing for one environment
(total time, overlaps: must be 0), and the time from SIGKILL of a holder process to the next
acquisition (median and max over the rounds); for postgres also a silent holder (SIGSTOP, like a
vanished machine) with dead_session_seconds=10. Writes bench/results/lock_release.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config.models import LockSettings  # noqa: E402
from fabflows.lock import LockHolder, environment_lock  # noqa: E402
from fabflows.testing.pgcluster import PgCluster  # noqa: E402

LABEL = "bench/staging"
HOLD = """
import sys, time
from config.models import LockSettings
from fabflows.lock import environment_lock
with environment_lock(sys.argv[3], settings=LockSettings.model_validate_json(sys.argv[1]), state_dir=sys.argv[2], poll=0.05):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(name: str) -> LockHolder:
    return LockHolder(
        label=LABEL, flow_name=name, host="bench", pid=os.getpid(), since=datetime.now(UTC)
    )


def _contender(i: int, settings: str, state_dir: str, out: str, barrier) -> None:
    barrier.wait()
    with environment_lock(LABEL, settings=LockSettings.model_validate_json(settings), state_dir=state_dir,
                          poll=0.02, timeout=300, holder=_holder(f"c{i}"), on_wait=lambda *a: None):  # fmt: skip
        entered = time.monotonic()
        time.sleep(0.05)
        left = time.monotonic()
    with open(out, "a") as f:
        f.write(json.dumps([entered, left]) + "\n")
    os._exit(0)


def race(settings: LockSettings, state_dir: str) -> dict:
    out = Path(tempfile.mkdtemp()) / "holds.jsonl"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(20)
    started = time.monotonic()
    procs = [
        ctx.Process(
            target=_contender, args=(i, settings.model_dump_json(), state_dir, str(out), barrier)
        )
        for i in range(20)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    spans = sorted(json.loads(line) for line in out.read_text().splitlines())
    overlaps = sum(1 for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1])
    return {
        "holders": len(spans),
        "overlaps": overlaps,
        "seconds": round(time.monotonic() - started, 2),
    }


def release_after(settings: LockSettings, state_dir: str, sig: int) -> float:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, settings.model_dump_json(), state_dir, LABEL],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    assert proc.stdout and proc.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    os.kill(proc.pid, sig)
    with environment_lock(LABEL, settings=settings, state_dir=state_dir, poll=0.02, timeout=300,
                          holder=_holder("waiter"), on_wait=lambda *a: None):  # fmt: skip
        elapsed = time.monotonic() - t0
    proc.kill()
    proc.wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cluster = PgCluster().start()
    results: dict = {}
    try:
        backends = {
            "file": LockSettings(),
            "postgres": LockSettings(
                backend="postgres",
                postgres_url=cluster.create_database("bench_locks"),
                dead_session_seconds=10,
            ),  # fmt: skip
        }
        for name, settings in backends.items():
            state_dir = tempfile.mkdtemp()
            kills = [release_after(settings, state_dir, signal.SIGKILL) for _ in range(args.rounds)]
            results[name] = {
                "race_20": race(settings, state_dir),
                "sigkill_release_s": {
                    "median": round(statistics.median(kills), 3),
                    "max": round(max(kills), 3),
                },
            }
            if name == "postgres":
                results[name]["silent_holder_release_s"] = round(
                    release_after(settings, state_dir, signal.SIGSTOP), 1
                )
            print(name, json.dumps(results[name]))
    finally:
        cluster.destroy()
    out = ROOT / "bench" / "results" / "lock_release.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
