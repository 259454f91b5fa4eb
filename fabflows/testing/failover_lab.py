"""An app environment whose db-primary can be killed again and again (test lab only).

:func:`build_failover_env`: the app stack (``build_app_env``) with a second streaming db-replica.
:func:`rebuild_old_primary`: after a failover, the old primary's host started again, rebuilt as a
replica of the new primary and tagged ``db-replica`` (what ``reset-replicas`` does for a fenced
primary), so the next round can kill the primary again.
:func:`break_replication`: a replica that cannot catch up any more (its WAL receiver stopped, its
slot dropped, the WAL it needs removed from the primary).
:func:`replicas_caught_up`: every replica streaming (``pg_stat_replication``), zero lag, and the
same row counts as the primary.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import boto3
import requests
from psycopg import sql

from fabflows.testing.app_env import AppEnv, InstanceFollower, build_app_env
from sandbox.replication import (
    build_replica,
    receiver_status,
    setup_primary,
    stop_wal_receiver,
    wait_for_postgres,
)
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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.post(url, data={"text": "lab"}, timeout=5).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(interval)
    return False


def name_of(env: AppEnv, iid: str) -> str:
    """The instance's Name tag (its id when it has none)."""
    return tags_of(env, iid).get("Name") or iid


def cluster(env: AppEnv) -> dict[str, str]:
    """instance id -> role tag, for the db servers (decommissioned ones included)."""
    out = {}
    for iid in env.hosts:
        role = tags_of(env, iid).get("role", "")
        if role.startswith("db-") or role == "decommissioned":
            out[iid] = role
    return out


def web_urls(env: AppEnv, path: str = "write-check") -> list[str]:
    return [f"http://{h.ip}/{path}" for h in env.by_role("web")]


def row_counts(host: TestHost) -> tuple[str, str]:
    """(orders, site notes) on ``host``: the seeded table and the one the app writes."""
    return (
        psql(host, "SELECT count(*) FROM shop_order;"),
        psql(host, "SELECT count(*) FROM shop_sitenote;"),
    )


def streaming_replicas(primary: TestHost) -> dict[str, int]:
    """The primary's ``pg_stat_replication``: replica address -> bytes of WAL it has not replayed,
    for the senders in state ``streaming``."""
    out = psql(
        primary,
        "SELECT host(client_addr), pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint "
        "FROM pg_stat_replication WHERE state = 'streaming';",
        "postgres",
    )
    rows = [line.split("|") for line in out.splitlines() if line]
    return {address: int(lag or -1) for address, lag in rows}


def replicas_caught_up(env: AppEnv, timeout: float = 60) -> list[str]:
    """Wait until every db-replica streams from the db-primary (its ``pg_stat_replication``) with
    zero lag and the same row counts; returns what is still wrong after ``timeout`` (empty: all
    caught up)."""
    (primary_iid,) = role_ids(env, "db-primary")
    primary = env.hosts[primary_iid]
    replicas = [env.hosts[i] for i in role_ids(env, "db-replica")]
    deadline = time.monotonic() + timeout
    while True:
        streaming = streaming_replicas(primary)
        wrong = []
        for r in replicas:
            if r.ip not in streaming:
                wrong.append(f"{r.name} does not stream from {primary.name}")
            elif streaming[r.ip] != 0:
                wrong.append(f"{r.name} is {streaming[r.ip]} bytes behind {primary.name}")
            elif row_counts(r) != row_counts(primary):
                wrong.append(
                    f"{r.name} has {row_counts(r)} rows, {primary.name} {row_counts(primary)}"
                )
        if not wrong or time.monotonic() > deadline:
            return wrong
        time.sleep(0.3)


def break_replication(env: AppEnv, replica_iid: str) -> str:
    """Break a replica for good: its WAL receiver stopped, its slot dropped on the primary, the
    primary made to remove the WAL segment the replica needs next (switch, checkpoint, until the
    segment is gone from its ``pg_wal``), then the receiver's conninfo given back: it connects
    and is refused (that WAL is gone), so it never streams again. Returns the removed segment."""
    replica = env.hosts[replica_iid]
    (primary_iid,) = role_ids(env, "db-primary")
    primary = env.hosts[primary_iid]
    conninfo = stop_wal_receiver(replica)
    slot = psql(replica, "SHOW primary_slot_name;", "postgres")
    received = psql(replica, "SELECT pg_last_wal_receive_lsn();", "postgres")
    drop = sql.SQL(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {};"
    ).format(sql.Literal(slot))
    psql(primary, drop.as_string(None), "postgres")
    # the segment holding the next byte it needs (+ 1: an LSN on a segment's first byte names
    # the segment before it)
    needed = psql(
        primary,
        sql.SQL("SELECT pg_walfile_name({}::pg_lsn + 1);")
        .format(sql.Literal(received))
        .as_string(None),
        "postgres",
    )
    if not re.fullmatch(r"[0-9A-F]{24}", needed):
        raise AssertionError(f"no WAL segment for {received!r} on {primary.name}: {needed!r}")
    present = sql.SQL("SELECT count(*) FROM pg_ls_waldir() WHERE name = {};").format(
        sql.Literal(needed)
    )
    for _ in range(20):
        if psql(primary, present.as_string(None), "postgres") == "0":
            break
        psql(primary, "INSERT INTO shop_sitenote (text, created) VALUES ('gap', now());")
        psql(primary, "SELECT pg_switch_wal();", "postgres")
        psql(primary, "CHECKPOINT;", "postgres")
    else:
        raise AssertionError(f"{primary.name} still has WAL segment {needed}")
    give_back = sql.SQL("ALTER SYSTEM SET primary_conninfo = {};").format(sql.Literal(conninfo))
    psql(replica, give_back.as_string(None), "postgres")
    psql(replica, "SELECT pg_reload_conf();", "postgres")
    # the receiver retries every 5 s (wal_retrieve_retry_interval): it must never stream
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        if receiver_status(replica) == "streaming" or replica.ip in streaming_replicas(primary):
            raise AssertionError(f"{replica.name} streams again: replication is not broken")
        time.sleep(0.2)
    return needed
