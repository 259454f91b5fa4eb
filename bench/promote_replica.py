"""promote-replica after the db-primary's host is killed: how soon the site writes again.

One environment on isolated test hosts (moto inventory; a db-primary and two streaming
db-replicas; two web servers and a worker running the sandbox's Django app through pgbouncer).
Each round:

1. the primary's host is powered off (SIGKILL to everything in it, its address stops answering);
2. promote-replica runs (apply) while a probe POSTs the app's write-check page on a web server
   every 100 ms;
3. measured: **site back** = from the run's start to the first 200 of that POST (a row written
   through nginx, the app, pgbouncer and the new primary), the run's own length, the plan's
   upgrade-page time (the engine's downtime), and the probe's non-200 count;
4. the old primary's host is started again and rebuilt as a replica of the new one, so the next
   round kills the new primary.

Goal (issue 13): site back within 60 s of the run starting. Needs root. Uses the test network
FABFLOWS_TEST_NET_PREFIX / FABFLOWS_TEST_NET_SUBNET (default r1, 10.242.0.0/24).
Results: bench/results/promote_replica.json.

Usage: .venv/bin/python bench/promote_replica.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests
from _common import RESULTS, prefect_server

PREFIX = os.environ.get("FABFLOWS_TEST_NET_PREFIX", "r1")
SUBNET = os.environ.get("FABFLOWS_TEST_NET_SUBNET", "10.242.0")


class WriteProbe:
    """POST ``url`` every ``interval`` s in a thread; remembers when each answer came."""

    def __init__(self, url: str, interval: float = 0.1):
        self.url = url
        self.interval = interval
        self.answers: list[tuple[float, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    status = session.post(self.url, data={"text": "bench"}, timeout=2).status_code
                except requests.RequestException:
                    status = None
                self.answers.append((time.monotonic(), status))
                self._stop.wait(self.interval)

    def start(self) -> WriteProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def first_ok_after(self, t: float) -> float | None:
        return next((at for at, s in self.answers if at >= t and s == 200), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with prefect_server() as api_url:
        os.environ["PREFECT_API_URL"] = api_url
        return bench(args)


def bench(args: argparse.Namespace) -> int:
    from fabflows.testing.failover_lab import (
        build_failover_env,
        rebuild_old_primary,
        role_ids,
        writable,
    )
    from fabflows.testing.moto_server import MotoServer
    from flows.promote_replica import promote_replica
    from sandbox.testhosts import TestNetwork

    moto = MotoServer().start()
    scratch = Path(tempfile.mkdtemp(prefix="bench-promote-"))
    net = TestNetwork(scratch / "net", prefix=PREFIX, subnet=SUBNET)
    net.setup()
    results = []
    try:
        (scratch / "env").mkdir()
        env = build_failover_env(moto.endpoint, net, scratch / "env", "bp")
        web = env.by_role("web")[0]
        try:
            for round_ in range(args.rounds):
                (old_iid,) = role_ids(env, "db-primary")
                old = env.hosts[old_iid]
                net.stop(old.name, graceful=False)
                probe = WriteProbe(f"http://{web.ip}/write-check").start()
                started = time.monotonic()
                report = promote_replica(
                    environment="staging", config=str(env.config_path), dry_run=False
                )
                run_s = time.monotonic() - started
                back = None
                deadline = time.monotonic() + 60
                while back is None and time.monotonic() < deadline:
                    back = probe.first_ok_after(started)
                    time.sleep(0.1)
                probe.stop()
                (new_iid,) = role_ids(env, "db-primary")
                row = {
                    "round": round_,
                    "outcome": report.outcome,
                    "run_s": round(run_s, 1),
                    "site_back_s": None if back is None else round(back - started, 1),
                    "upgrade_page_s": report.downtime_seconds,
                    "non_200": sum(1 for at, s in probe.answers if at >= started and s != 200),
                    "new_primary_writable": writable(env.hosts[new_iid]),
                    "steps": {s.name: s.seconds for s in report.steps},
                }
                results.append(row)
                print(json.dumps(row), flush=True)
                rebuild_old_primary(env, old_iid, new_iid)
        finally:
            env.destroy()
    finally:
        net.teardown()
        moto.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "promote_replica.json").write_text(json.dumps(results, indent=2) + "\n")
    backs = [r["site_back_s"] for r in results if r["site_back_s"] is not None]
    runs = [r["run_s"] for r in results]
    print(
        f"\n{len(results)} rounds; site back (s): median {statistics.median(backs):.1f}, "
        f"max {max(backs):.1f} (goal <= 60); run (s): median {statistics.median(runs):.1f}, "
        f"max {max(runs):.1f}; rounds without the site back in 60 s: "
        f"{len(results) - len(backs)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
