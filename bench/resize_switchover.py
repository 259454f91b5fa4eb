"""What users see while resize-environment resizes the db-primary: by switchover or in place.

    FABFLOWS_TEST_NET_PREFIX=ha FABFLOWS_TEST_NET_SUBNET=10.231.0 \\
        .venv/bin/python -m bench.resize_switchover [--runs 3]

One real stack (moto, isolated test hosts following EC2's stop and start, PostgreSQL 15 with a
streaming db-replica, the Django app behind nginx and pgbouncer on two web servers and a worker)
and an HTTP probe through the load balancer (the ELB proxy over moto's ELB, as users reach the
site) every 100 ms for each whole run; a request may take up to 10 s (a held request is measured
by its duration, not counted as refused). Each run resizes both database servers to the next type
(m5.xlarge, m5.large, ...), alternating, ``--runs`` times each:

- **in place** (the baseline): ``primary_path: in-place``: the replica one at a time, then the
  primary in the upgrade window (503 page, stop, change type, start);
- **switchover**: ``primary_path: switchover``: the replica resized first, the switchover under a
  pgbouncer pause, the old primary resized as a replica.

Per run: the probe's non-200 count and longest request, the pause or window (the run's measured
downtime: first to last step that holds or keeps users out) and the whole run's time. Reported as
median and max per path. Goal for the switchover: 0 non-200, longest request <= 3 s. Writes
``bench/results/resize_switchover.json``. Not a test: timings vary with load. A run takes 20-50 s
(with the stack's minute to build): the default, 3 runs each, ends in 3-6 minutes on 2 cores;
``--runs 5`` (the issue's distribution) took 5.4 minutes at a load average of about 6.
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

from bench._common import RESULTS, prefect_server  # noqa: E402

PATHS = ("in-place", "switchover")
TYPES = ("m5.xlarge", "m5.large")


def config_for(config_path: Path, instance_type: str) -> Path:
    """The stack's config sizing both database roles to ``instance_type``, quick polls."""
    data = yaml.safe_load(config_path.read_text())
    data["instance_types"] = {"staging": {"db-primary": instance_type, "db-replica": instance_type}}
    data["site_domains_map"] = {"staging": []}
    data["fabflows"]["stop_start"] = {
        "poll_seconds": 0.2,
        "reachable_wait_seconds": 120,
        "site_wait_seconds": 120,
        "instance_wait_seconds": 120,
    }
    path = config_path.with_name(f"fabflows-{instance_type}.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def one_run(mirror, config: Path, proxy_url: str, path: str) -> dict:  # noqa: ANN001
    from flows.resize_environment import resize_environment
    from tasks.http.probe import HttpProbe

    probe = HttpProbe(proxy_url + "/", interval=0.1, request_timeout=10).start()
    started = time.monotonic()
    try:
        report = mirror.run(
            resize_environment,
            "staging",
            config=str(config),
            dry_run=False,
            primary_path=path,
            refresh_web=False,
        )
    finally:
        time.sleep(0.5)  # a last poll or two after the run
        seen = probe.stop()
    if not report.outcome.startswith("applied"):
        raise RuntimeError(f"the resize did not apply: {report.outcome}")
    steps = [s.name for s in report.steps]
    took = "switchover-pause" in steps
    if took != (path == "switchover"):
        raise RuntimeError(f"asked for {path}, the run's steps were {steps}")
    return {
        "path": path,
        "non_200": seen.non_200,
        "longest_request_s": seen.latency_max_s,
        "downtime_s": seen.total_downtime_s,
        "polls": seen.samples,
        "window_s": report.downtime_seconds,
        "switchover_s": report.details.get("switchover_seconds"),
        "run_s": round(time.monotonic() - started, 2),
        "steps": {s.name: s.seconds for s in report.steps},
    }


def distribution(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows if r[key] is not None]
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.resize_switchover")
    p.add_argument("--runs", type=int, default=3, help="Runs of each path.")
    p.add_argument("--out", type=Path, default=RESULTS / "resize_switchover.json")
    args = p.parse_args(argv)
    with prefect_server() as api_url:
        os.environ["PREFECT_API_URL"] = api_url
        return bench(args)


def bench(args: argparse.Namespace) -> int:
    from fabflows.testing.app_env import build_app_env
    from fabflows.testing.ec2_hosts import Ec2HostMirror
    from fabflows.testing.elb_proxy import ElbProxy
    from fabflows.testing.moto_server import MotoServer
    from sandbox.testhosts import TestNetwork

    prefix = os.environ.get("FABFLOWS_TEST_NET_PREFIX", "rz")
    subnet = os.environ.get("FABFLOWS_TEST_NET_SUBNET", "10.226.0")
    results: dict = {"prefix": prefix, "subnet": subnet, "nproc": os.cpu_count(), "runs": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-resize-switchover-"))
    net = TestNetwork(tmp / "hosts", prefix=prefix, subnet=subnet)
    net.setup()
    moto = MotoServer().start()
    env = mirror = proxy = None
    began = time.monotonic()
    try:
        (tmp / "env").mkdir()
        env = build_app_env(
            moto.endpoint, net, tmp / "env", rabbitmq=False, prefix="bz", replicas=True
        )
        mirror = Ec2HostMirror(net, moto.endpoint, net.subnet, name_prefix="bzm")
        for iid, host in env.hosts.items():
            mirror.adopt(iid, host)
        mirror.attach(moto)
        mirror.reconcile()
        proxy = ElbProxy(moto.endpoint, env.load_balancer, timeout=60).start()  # ELB: 60 s
        time.sleep(1)
        rows: dict[str, list[dict]] = {path: [] for path in PATHS}
        n = 0
        for i in range(args.runs):
            for path in PATHS:
                config = config_for(env.config_path, TYPES[n % len(TYPES)])
                n += 1
                row = one_run(mirror, config, proxy.url, path)
                rows[path].append(row)
                print(f"{path} run {i + 1}: {json.dumps(row)}", flush=True)
        results["runs"] = rows
    finally:
        if proxy is not None:
            proxy.stop()
        if mirror is not None:
            mirror.destroy_created()
        if env is not None:
            env.destroy()
        moto.stop()
        net.teardown()
    results["bench_s"] = round(time.monotonic() - began, 1)
    keys = ("non_200", "longest_request_s", "window_s", "run_s")
    summary = {path: {k: distribution(r, k) for k in keys} for path, r in results["runs"].items()}
    results["summary"] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{args.runs} runs each, probe every 100 ms via the ELB ({results['bench_s']} s)")
    print(f"{'':<30} {'in place (window)':>22} {'switchover (pause)':>22}")
    for key, what in (
        ("non_200", "non-200 answers"),
        ("longest_request_s", "longest request (s)"),
        ("window_s", "window / pause (s)"),
        ("run_s", "whole run (s)"),
    ):
        cells = [f"{summary[path][key]['median']} / {summary[path][key]['max']}" for path in PATHS]
        print(f"{what + ' median/max':<30} {cells[0]:>22} {cells[1]:>22}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
