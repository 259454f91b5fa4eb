"""describe-environment at 20, 100 and 500 instances in moto: AWS calls made and wall time.

The flow runs against a real Prefect server. The number of AWS calls must not grow with instances
(one paginated, filtered DescribeInstances; 1000 instances per page).

Usage: .venv/bin/python bench/describe_scale.py [--sizes 20 100 500]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import boto3
from _common import RESULTS, prefect_server

from config import load_config
from fabflows.testing.configs import moto_section, write_config
from fabflows.testing.moto_server import MotoServer
from sandbox.aws_seed import seed

ROLES = ("cache", "db-primary", "db-replica", "worker")


def populate(endpoint: str, n: int) -> None:
    """Add instances so the environment has ``n`` in all (web comes from the ASG)."""
    ec2 = boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="y",
    )
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    per_role = max(0, (n - 6) // len(ROLES))
    extra = (n - 6) - per_role * len(ROLES)
    for i, role in enumerate(ROLES):
        count = per_role + (1 if i < extra else 0)
        if count:
            ec2.run_instances(
                ImageId="ami-12345678",
                MinCount=count,
                MaxCount=count,
                InstanceType="t3.small",
                SubnetId=subnet,
                TagSpecifications=[
                    {
                        "ResourceType": "instance",
                        "Tags": [
                            {"Key": "deployment", "Value": "myproject"},
                            {"Key": "environment", "Value": "staging"},
                            {"Key": "role", "Value": role},
                            {"Key": "Name", "Value": f"myproject_staging_{role}"},
                        ],
                    }
                ],
            )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[20, 100, 500])
    args = p.parse_args()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.describe_environment import describe_environment

    moto = MotoServer().start()
    out = []
    with prefect_server() as url, temporary_settings(updates={PREFECT_API_URL: url}):
        for n in args.sizes:
            moto.reset()
            work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
            config = write_config(
                work,
                fabflows=moto_section(
                    moto.endpoint, staging={"target_groups": ["myproject-staging-web"]}
                ),
            )
            addresses = (f"10.250.{i // 250}.{i % 250 + 2}" for i in range(10_000))
            seed(moto.endpoint, load_config(config), ["staging"], "10.250.0.0/22", addresses)
            populate(moto.endpoint, n)
            describe_environment(environment="staging", config=str(config))  # warm-up
            started = time.perf_counter()
            d = describe_environment(environment="staging", config=str(config))
            elapsed = time.perf_counter() - started
            assert len(d.servers) == n, (len(d.servers), n)
            out.append({"instances": n, "aws_calls": d.aws_calls, "wall_s": round(elapsed, 2)})
            print(f"{n:>4} instances: {d.aws_calls} AWS calls, {elapsed:.2f} s")
    moto.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "describe_scale.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
