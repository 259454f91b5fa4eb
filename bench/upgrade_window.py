"""Time in upgrade mode vs time spent upgrading: upgrade-packages on 1 and 10 isolated test hosts.

Each round starts from fresh hosts (version 1 of the test packages "in the image", a local apt
repository with version 2 and an app-server package to install) and a freshly seeded moto, then
runs the upgrade-packages flow (apply, no approval) against a real Prefect server, as a worker
would. From the run's report:

- **in upgrade mode**: from the start of entering the window (suspending the group) to the end of
  leaving it (pages off, processes resumed, every web server and the site answering 200);
- **upgrading**: the apply itself (the runbook's upgrade steps: apt on every batch of servers);
- **enter / leave**: the window's own cost; **downtime**: what a probe polling the site every
  100 ms saw (non-200 time);
- the flow's wall time (gather, plan, window, report).

Sizes: 1 host (one web server) and 10 hosts (cache, db-primary, db-replica, worker and 6 web
servers), each with ``max_concurrency`` 1 (the default: one host of a role at a time, as the
original) and ``100%`` (all hosts of a role at once).

Needs root (test hosts) and dpkg-dev. Uses the f4 test network (10.214.0.0/24) unless
FABFLOWS_TEST_NET_PREFIX / FABFLOWS_TEST_NET_SUBNET say otherwise. Results:
bench/results/upgrade_window.json.

Usage: .venv/bin/python bench/upgrade_window.py [--rounds 2] [--sizes 1,10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import RESULTS, prefect_server

PREFIX = os.environ.get("FABFLOWS_TEST_NET_PREFIX", "f4")
SUBNET = os.environ.get("FABFLOWS_TEST_NET_SUBNET", "10.214.0")

SIZES = {
    1: {"roles": ("web",), "web_count": 1},
    10: {"roles": ("cache", "db-primary", "db-replica", "web", "worker"), "web_count": 6},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", default="1,10")
    parser.add_argument("--concurrency", default="1,100%")
    args = parser.parse_args()
    with prefect_server() as api_url:
        os.environ["PREFECT_API_URL"] = api_url
        return bench(args, api_url)


def bench(args: argparse.Namespace, api_url: str) -> int:
    from fabflows.testing.moto_server import MotoServer
    from fabflows.testing.upgrade_lab import make_lab, serve_test_repo
    from flows.upgrade_packages import upgrade_packages
    from sandbox.testhosts import TestNetwork

    work = Path(tempfile.mkdtemp(prefix="bench-upgrade-"))
    moto = MotoServer().start()
    net = TestNetwork(work / "net", prefix=PREFIX, subnet=SUBNET, images=("base",))
    net.setup()
    repo = serve_test_repo(work / "repo", net)
    results: dict[str, dict[str, object]] = {}
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            for concurrency in args.concurrency.split(","):
                if size == 1 and concurrency != args.concurrency.split(",")[0]:
                    continue  # one host: concurrency makes no difference
                rows = []
                for rnd in range(args.rounds):
                    for name in list(net.hosts):
                        net.destroy(name)
                    moto.reset()
                    lab_dir = work / f"lab-{size}-{concurrency.rstrip('%')}-{rnd}"
                    lab_dir.mkdir()
                    lab = make_lab(
                        lab_dir,
                        moto.endpoint,
                        net,
                        net.start,
                        repo,
                        **SIZES[size],
                    )
                    assert len(lab.servers) == size, (size, len(lab.servers))
                    started = time.perf_counter()
                    state = upgrade_packages(
                        environment="staging",
                        config=str(lab.config_path),
                        dry_run=False,
                        max_concurrency=concurrency,
                        return_state=True,
                    )
                    wall = time.perf_counter() - started
                    if not state.is_completed():
                        raise RuntimeError(f"flow failed: {state.message}")
                    report = state.result()
                    assert report.details["Not upgraded"] == "none", report.render_text()
                    steps = {st.name: st for st in report.steps}
                    batches = [st for st in report.steps if st.name.startswith("upgrade ")]
                    upgrading = round(sum(st.seconds or 0 for st in batches), 3)
                    row = {
                        "wall_s": round(wall, 2),
                        "in_upgrade_mode_s": report.downtime_seconds,
                        "upgrading_s": upgrading,
                        "enter_s": steps["upgrade-mode-on"].seconds,
                        "leave_s": steps["upgrade-mode-off"].seconds,
                        "window_overhead_s": round(report.downtime_seconds - upgrading, 3),
                        "probe_downtime_s": report.details.get("Probe downtime s"),
                        "per_batch_apt_s": round(
                            statistics.median(st.seconds or 0 for st in batches), 2
                        ),
                    }
                    rows.append(row)
                    print(
                        f"{size:>2} host(s), concurrency {concurrency:>4}, round {rnd + 1}: {row}"
                    )
                key = f"{size}_hosts_concurrency_{concurrency}"
                results[key] = {
                    "hosts": size,
                    "max_concurrency": concurrency,
                    "rounds": rows,
                    "median": {
                        k: round(statistics.median(r[k] for r in rows if r[k] is not None), 3)
                        for k in rows[0]
                    },
                }
    finally:
        repo.stop()
        net.teardown()
        moto.stop()
    out = {
        "what": "upgrade-packages: time in upgrade mode vs time spent upgrading",
        "prefect_api": "temporary prefect server (as a worker would use)",
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "upgrade_window.json").write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(
        f"{'case':<32} {'in mode':>8} {'upgrading':>10} {'overhead':>9} {'enter':>6} {'leave':>6} {'probe':>6} {'wall':>6}"
    )
    for key, r in results.items():
        m = r["median"]
        print(
            f"{key:<32} {m['in_upgrade_mode_s']:>8.1f} {m['upgrading_s']:>10.1f} "
            f"{m['window_overhead_s']:>9.1f} {m['enter_s']:>6.1f} {m['leave_s']:>6.1f} "
            f"{m['probe_downtime_s']:>6.1f} {m['wall_s']:>6.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
