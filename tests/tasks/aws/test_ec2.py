"""Inventory against a moto server: tag filters, legacy roles, calls grow with pages, throttling."""

from __future__ import annotations

import itertools
from pathlib import Path

from prefect.logging import disable_run_logger

from config import load_config
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.configs import moto_section, write_config
from sandbox.aws_seed import seed
from tasks.aws.ec2 import describe_servers
from tasks.aws.session import CALLS, calls_since, make_credentials


def _context(tmp_path: Path, aws):
    cfg = load_config(write_config(tmp_path, fabflows=moto_section(aws.endpoint)))
    return cfg, make_credentials(cfg.fabflows.aws, cfg.region)


def _addresses():
    return (f"10.250.0.{i}" for i in itertools.count(10))


def test_servers_of_one_environment_only(tmp_path: Path, aws) -> None:
    cfg, creds = _context(tmp_path, aws)
    seed(aws.endpoint, cfg, ["staging", "production"], "10.250.0.0/24", _addresses())
    with disable_run_logger():
        servers = describe_servers.fn(creds, "myproject", "staging")
    assert {s.environment for s in servers} == {"staging"}
    assert [s.role for s in servers] == [
        "cache",
        "db-primary",
        "db-replica",
        "web",
        "web",
        "worker",
    ]
    web = [s for s in servers if s.role == "web"]
    assert all(s.auto_scaling_group == "myproject-staging-ag" for s in web)
    db = next(s for s in servers if s.role == "db-primary")
    assert db.private_ip_address.startswith("10.250.0.")
    assert db.address("private_ip_address") == db.private_ip_address


def test_stopped_servers_are_listed_with_state_and_retired_ones_are_not(
    tmp_path: Path, aws
) -> None:
    cfg, creds = _context(tmp_path, aws)
    result = seed(aws.endpoint, cfg, ["staging"], "10.250.0.0/24", _addresses())
    ec2 = boto_client(aws, "ec2")
    worker = result.environments[0].instance_ids["worker"][0]
    replica = result.environments[0].instance_ids["db-replica"][0]
    ec2.stop_instances(InstanceIds=[worker])
    ec2.create_tags(Resources=[replica], Tags=[{"Key": "role", "Value": "db-replica-OLD"}])
    with disable_run_logger():
        servers = {s.instance_id: s for s in describe_servers.fn(creds, "myproject", "staging")}
    assert servers[worker].state == "stopped"
    assert replica not in servers


def test_legacy_role_tags_are_read_as_todays_roles(tmp_path: Path, aws) -> None:
    cfg, creds = _context(tmp_path, aws)
    result = seed(aws.endpoint, cfg, ["staging"], "10.250.0.0/24", _addresses())
    ec2 = boto_client(aws, "ec2")
    primary = result.environments[0].instance_ids["db-primary"][0]
    ec2.create_tags(Resources=[primary], Tags=[{"Key": "role", "Value": "db-master"}])
    with disable_run_logger():
        servers = {s.instance_id: s for s in describe_servers.fn(creds, "myproject", "staging")}
    assert servers[primary].role == "db-primary"


def test_one_call_for_all_roles_and_instances(tmp_path: Path, aws) -> None:
    cfg, creds = _context(tmp_path, aws)
    seed(aws.endpoint, cfg, ["staging"], "10.250.0.0/24", _addresses(), extra_per_role=3)
    before = CALLS.copy()
    with disable_run_logger():
        servers = describe_servers.fn(creds, "myproject", "staging")
    assert len(servers) == 4 * 4 + 2
    assert calls_since(before) == {"ec2:DescribeInstances": 1}


def test_throttling_is_retried_by_the_client(tmp_path: Path, aws) -> None:
    cfg, creds = _context(tmp_path, aws)
    seed(aws.endpoint, cfg, ["staging"], "10.250.0.0/24", _addresses())
    aws.queue_fault("ec2", "DescribeInstances", "RequestLimitExceeded", 503, count=2)
    with disable_run_logger():
        servers = describe_servers.fn(creds, "myproject", "staging")
    assert len(servers) == 6
    assert not aws.injector.faults  # both faults were served, then the call succeeded
    assert aws.injector.requests.count(("ec2", "DescribeInstances")) == 3
