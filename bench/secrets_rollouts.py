"""Measure the secrets work's numbers on real peers (moto, test hosts running the Django app behind
nginx, PostgreSQL, RabbitMQ, a forwarding and health-checking load balancer):

- update-newrelic-keys ``fast``: the downtime users see (the 100 ms probe on the site URL through
  the load balancer), the time in upgrade mode, the whole run;
- update-newrelic-keys ``rolling``: non-200 answers (the issue asks for zero) and duration;
- push-server-secrets rotating ``database_password`` and ``broker_password`` (upgrade window);
- deploy-serial for 2 and 4 web servers: duration, non-200 answers, lowest serving capacity.

Usage (as root, like the tests)::

    FABFLOWS_TEST_NET_PREFIX=f5b FABFLOWS_TEST_NET_SUBNET=10.216.0 \\
        .venv/bin/python bench/secrets_rollouts.py --reps 3 --web-counts 2,4

Prints a table and writes ``bench/results/secrets_rollouts.json``.
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
from fabflows.testing.app_env import (  # noqa: E402
    InstanceFollower,
    build_app_env,
    run_in_thread,
)
from fabflows.testing.elb_proxy import CapacitySampler, ElbProxy  # noqa: E402
from fabflows.testing.moto_server import MotoServer  # noqa: E402
from sandbox.testhosts import TestNetwork  # noqa: E402

BLOCK = "myproject-staging-secrets"
EXTRA = {
    "newrelic": {"drain_seconds": 1, "healthy_timeout_seconds": 60},
    "refresh": {"drain_seconds": 1, "poll_seconds": 0.5, "instance_timeout_seconds": 120},
}


def _save(values: dict[str, str]) -> None:
    block = ServerSecrets()
    for name, value in values.items():
        block.set(name, value)
    block.save(BLOCK, overwrite=True)


def _rollout_row(flow: str, started: float, rollout) -> dict:  # noqa: ANN001 - RolloutReport
    """One result row: the run's wall time, the rollout's, and what the 100 ms probe saw."""
    probe = rollout.probe
    return {
        "flow": flow,
        "web_servers": 2,
        "run_s": round(time.monotonic() - started, 2),
        "rollout_s": rollout.duration_s,
        "window_s": rollout.window_seconds,
        "downtime_s": probe.total_downtime_s,
        "non_200": probe.non_200,
        "polls": probe.samples,
    }


def stack(net: TestNetwork, web_count: int, rabbitmq: bool):
    moto = MotoServer().start()
    proxy = ElbProxy(moto.endpoint, "myproject-staging-lb")
    env = build_app_env(
        moto.endpoint,
        net,
        Path(tempfile.mkdtemp(prefix="bench-secrets-")),
        web_count=web_count,
        rabbitmq=rabbitmq,
        site_url=proxy.url,
        fabflows_extra=EXTRA,
        prefix="bs",
    )
    proxy.start()
    time.sleep(1)
    return moto, proxy, env


def bench_newrelic(net: TestNetwork, reps: int) -> list[dict]:
    from flows.update_newrelic_keys import update_newrelic_keys

    moto, proxy, env = stack(net, 2, rabbitmq=False)
    rows = []
    try:
        values = dict(env.secrets)
        for rep in range(reps):
            for mode in ("fast", "rolling"):
                values["newrelic_license_key"] = f"{rep}{'a' if mode == 'fast' else 'b'}" * 20
                _save(values)
                started = time.monotonic()
                result = update_newrelic_keys(
                    environment="staging", config=str(env.config_path), dry_run=False, mode=mode
                )
                rows.append(_rollout_row(f"update-newrelic-keys {mode}", started, result.rollout))
                print(rows[-1], flush=True)
    finally:
        proxy.stop()
        env.destroy()
        moto.stop()
    return rows


def bench_rotation(net: TestNetwork, reps: int) -> list[dict]:
    from flows.push_server_secrets import push_server_secrets

    moto, proxy, env = stack(net, 2, rabbitmq=True)
    rows = []
    try:
        values = dict(env.secrets)
        _save(values)
        push_server_secrets(environment="staging", config=str(env.config_path), dry_run=False)
        for rep in range(reps):
            values["database_password"] = f"db-rotated-{rep}-'$x"
            values["broker_password"] = f'broker-rotated-{rep}-"$y'
            _save(values)
            started = time.monotonic()
            result = push_server_secrets(
                environment="staging", config=str(env.config_path), dry_run=False
            )
            rows.append(
                _rollout_row("push-server-secrets db+broker (window)", started, result.rollout)
            )
            print(rows[-1], flush=True)
    finally:
        proxy.stop()
        env.destroy()
        moto.stop()
    return rows


def bench_refresh(net: TestNetwork, web_count: int, reps: int) -> list[dict]:
    from flows.deploy_serial import deploy_serial

    moto, proxy, env = stack(net, web_count, rabbitmq=False)
    rows = []
    try:
        for _ in range(reps):
            follower = InstanceFollower(env, prefix="bn")
            with CapacitySampler(proxy) as capacity:
                future = run_in_thread(
                    deploy_serial,
                    environment="staging",
                    config=str(env.config_path),
                    dry_run=False,
                    return_state=True,
                )
                state = follower.run_until(future, timeout=1800)
            if not state.is_completed():
                raise RuntimeError(state.message)
            result = state.result()
            rows.append(
                {
                    "flow": "deploy-serial",
                    "web_servers": web_count,
                    "run_s": result.seconds,
                    "replaced": len(result.details["replaced"]),
                    "non_200": result.details["probe"]["non_200"],
                    "polls": result.details["probe"]["samples"],
                    "min_serving": min(capacity.seen),
                    "max_serving": max(capacity.seen),
                }
            )
            print(rows[-1], flush=True)
    finally:
        proxy.stop()
        env.destroy()
        moto.stop()
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["flow"], r["web_servers"]) for r in rows})
    for flow, web in keys:
        group = [r for r in rows if r["flow"] == flow and r["web_servers"] == web]
        entry = {"flow": flow, "web_servers": web, "runs": len(group)}
        for field in ("run_s", "downtime_s", "window_s", "non_200", "min_serving"):
            values = [r[field] for r in group if r.get(field) is not None]
            if values:
                entry[f"{field}_median"] = round(statistics.median(values), 2)
                entry[f"{field}_max"] = round(max(values), 2)
        out.append(entry)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--web-counts", default="2,4")
    parser.add_argument("--skip", default="", help="comma list of: newrelic,rotation,refresh")
    args = parser.parse_args()
    prefix = os.environ.get("FABFLOWS_TEST_NET_PREFIX", "f5b")
    subnet = os.environ.get("FABFLOWS_TEST_NET_SUBNET", "10.216.0")
    skip = set(filter(None, args.skip.split(",")))
    from prefect.testing.utilities import prefect_test_harness

    net = TestNetwork(Path(tempfile.mkdtemp(prefix="bench-net-")), prefix=prefix, subnet=subnet)
    net.setup()
    rows: list[dict] = []
    try:
        with prefect_test_harness(server_startup_timeout=90):
            if "newrelic" not in skip:
                rows += bench_newrelic(net, args.reps)
            if "rotation" not in skip:
                rows += bench_rotation(net, max(1, args.reps - 1))
            if "refresh" not in skip:
                for count in (int(c) for c in args.web_counts.split(",")):
                    rows += bench_refresh(net, count, max(1, args.reps - 1))
    finally:
        net.teardown()
    out = ROOT / "bench" / "results" / "secrets_rollouts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if skip and out.exists():  # a partial run: keep the earlier figures of the parts skipped
        measured = {r["flow"] for r in rows}
        earlier = json.loads(out.read_text()).get("runs", [])
        rows = [r for r in earlier if r["flow"] not in measured] + rows
    summary = summarize(rows)
    out.write_text(json.dumps({"runs": rows, "summary": summary}, indent=1, default=str))
    print("\nflow | web servers | runs | run s (median/max) | downtime s | non-200 | min serving")
    for e in summary:
        print(
            f"{e['flow']} | {e['web_servers']} | {e['runs']} | "
            f"{e.get('run_s_median')}/{e.get('run_s_max')} | "
            f"{e.get('downtime_s_median', '-')}/{e.get('downtime_s_max', '-')} | "
            f"{e.get('non_200_median', '-')}/{e.get('non_200_max', '-')} | "
            f"{e.get('min_serving_median', '-')}"
        )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
