"""An app environment whose db-primary can be killed again and again (test lab only).

:func:`build_failover_env`: the app stack (``build_app_env``) with a second streaming db-replica.
:func:`rebuild_old_primary`: after a failover, the old primary's host started again, rebuilt as a
replica of the new primary and tagged ``db-replica`` (what ``reset-replicas`` does for a fenced
primary), so the next round can kill the primary again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
import requests

from fabflows.testing.app_env import AppEnv, InstanceFollower, build_app_env
from sandbox.replication import build_replica, setup_primary, wait_for_postgres
from sandbox.testhosts import TestHost, TestNetwork

DECOMMISSIONED_TAG = "fabflows:decommissioned"


def ec2_of(env: AppEnv) -> Any:
    return boto3.client(
        "ec2",
        endpoint_url=env.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def tags_of(env: AppEnv, iid: str) -> dict[str, str]:
    inst = ec2_of(env).describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    return {t["Key"]: t["Value"] for t in inst.get("Tags", [])}


def role_ids(env: AppEnv, role: str) -> list[str]:
    return sorted(iid for iid in env.hosts if tags_of(env, iid).get("role") == role)


def psql(host: TestHost, query: str, db: str = "myproject_staging") -> str:
    return host.exec(
        ["runuser", "-u", "postgres", "--", "psql", "-qAtX", "-d", db], input=query
    ).stdout.strip()


def writable(host: TestHost) -> bool:
    return psql(host, "SELECT pg_is_in_recovery();", "postgres") == "f"


def add_replica(env: AppEnv, name: str = "myproject_staging_db-replica_2") -> str:
    """Another db-replica: an instance in moto, its host built from the primary, streaming."""
    ec2 = ec2_of(env)
    primary_iid = role_ids(env, "db-primary")[0]
    inst = ec2.describe_instances(InstanceIds=[primary_iid])["Reservations"][0]["Instances"][0]
    tags = tags_of(env, primary_iid)
    res = ec2.run_instances(
        ImageId=inst["ImageId"],
        MinCount=1,
        MaxCount=1,
        InstanceType=inst["InstanceType"],
        SubnetId=inst["SubnetId"],
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "Name", "Value": name},
                    {"Key": "deployment", "Value": tags["deployment"]},
                    {"Key": "environment", "Value": tags["environment"]},
                    {"Key": "role", "Value": "db-replica"},
                ],
            }
        ],
    )
    iid = res["Instances"][0]["InstanceId"]
    follower = InstanceFollower(env, prefix="fn")
    follower.tick()
    if follower.errors:
        raise RuntimeError("; ".join(follower.errors))
    return iid


def build_failover_env(
    moto_endpoint: str, net: TestNetwork, directory: Path, prefix: str = "fo"
) -> AppEnv:
    env = build_app_env(moto_endpoint, net, directory, rabbitmq=False, prefix=prefix, replicas=True)
    try:
        add_replica(env)
    except BaseException:
        env.destroy()
        raise
    return env


def rebuild_old_primary(env: AppEnv, old_iid: str, new_iid: str) -> None:
    """The old primary's host started again (if stopped), rebuilt as a replica of the new
    primary, tagged db-replica with its fence record removed."""
    old, new = env.hosts[old_iid], env.hosts[new_iid]
    if not old.running:
        env.net.start_again(old.name)
    wait_for_postgres(old, 60)
    setup_primary(new, [old.ip], env.replication_password)
    build_replica(old, new, env.replication_password)
    ec2 = ec2_of(env)
    ec2.create_tags(Resources=[old_iid], Tags=[{"Key": "role", "Value": "db-replica"}])
    ec2.delete_tags(Resources=[old_iid], Tags=[{"Key": DECOMMISSIONED_TAG}])
    env.db_host = new


def post_ok(url: str, timeout: float = 30, interval: float = 0.3) -> bool:
    """POST the app's write-check page until it answers 200 (True) or ``timeout`` passes."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.post(url, data={"text": "lab"}, timeout=5).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(interval)
    return False
