"""The seed against a moto server: its subnets are in the zones the config names, so the runbooks
that launch a server (add-replica, add-server) find a zone and a subnet where the sandbox's config
says they may; in the sandbox, every such subnet lies inside the hosts' network (a launched server
gets a host). Nothing is started but moto: the sandbox's own config and seed, no hosts."""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path

import pytest
import yaml
from prefect.logging import disable_run_logger

from config import load_config
from fabflows.procedures.placement import choose_zone, configured_placement
from fabflows.runbook import load_context
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.configs import moto_section, write_config
from sandbox.aws_seed import seed, seed_zones
from sandbox.daemon import ENVIRONMENTS, seed_sandbox
from sandbox.daemon import write_config as write_sandbox_config
from sandbox.testhosts import TestNetwork
from tasks.aws.ec2 import describe_servers
from tasks.aws.launch import (
    describe_availability_zones,
    describe_launch_source,
    describe_zone_subnets,
)

SUBNET = "10.233.0"  # never set up here: only its paths go in the config


def _subnet_cidrs(aws) -> dict[str, str]:  # noqa: ANN001
    subnets = boto_client(aws, "ec2").describe_subnets()["Subnets"]
    return {s["SubnetId"]: s["CidrBlock"] for s in subnets}


def test_sandbox_places_new_servers_in_its_configured_zones_inside_its_network(
    tmp_path: Path, aws
) -> None:  # noqa: ANN001
    network = TestNetwork(tmp_path / "hosts", prefix="hc", subnet=SUBNET)
    path = write_sandbox_config(tmp_path, aws.endpoint, network)
    cfg = load_config(path)
    seeded = seed_sandbox(aws.endpoint, cfg, SUBNET, web_count=1)
    cidrs = _subnet_cidrs(aws)
    hosts_net = ipaddress.ip_network(f"{SUBNET}.0/24")
    for environment in ENVIRONMENTS:
        ctx = load_context(environment, config=str(path))
        env, creds = ctx.env, ctx.creds
        configured, configured_subnets = configured_placement(cfg.model_extra or {}, env.region)
        # FabulAWS's sample names e and c: the seed's subnets are there, not elsewhere
        assert configured == ["us-east-1e", "us-east-1c"]
        assert sorted(seeded.zone_subnets) == sorted(configured)
        with disable_run_logger():
            servers = describe_servers.fn(creds, env.deployment, env.environment)
            region_zones = describe_availability_zones.fn(creds)
            for role, counted in [
                ("db-replica", ("db-primary", "db-replica")),
                ("worker", ("worker",)),
                ("cache", ("cache",)),
            ]:
                like = next(s for s in servers if s.role == counted[0])
                source = describe_launch_source.fn(creds, like.instance_id)
                assert source.vpc_id
                vpc_subnets = describe_zone_subnets.fn(creds, source.vpc_id)
                placement = choose_zone(
                    wanted=None,
                    env=env,
                    region_zones=region_zones,
                    configured_zones=configured,
                    configured_subnets=configured_subnets,
                    vpc_subnets=vpc_subnets,
                    source=source,
                    servers_by_zone={
                        s.name: s.availability_zone or "" for s in servers if s.role in counted
                    },
                )
                assert not placement.problems, (role, placement)
                # the seeded servers are all in the first zone: the fewest are in the second
                assert placement.zone == "us-east-1c", (role, placement)
                assert placement.subnet
                assert ipaddress.ip_network(cidrs[placement.subnet]).subnet_of(hosts_net)
                # and the zone given by its letter works too
                for letter in ("e", "c"):
                    asked = choose_zone(
                        wanted=letter,
                        env=env,
                        region_zones=region_zones,
                        configured_zones=configured,
                        configured_subnets=configured_subnets,
                        vpc_subnets=vpc_subnets,
                        source=source,
                        servers_by_zone={},
                    )
                    assert not asked.problems and asked.zone == f"us-east-1{letter}", asked
    # the seeded servers keep their addresses (the hosts' first zone, .100 onwards)
    for env_seed in seeded.environments:
        for role, ids in env_seed.instance_ids.items():
            if role == "web":
                continue
            described = boto_client(aws, "ec2").describe_instances(InstanceIds=ids)
            for r in described["Reservations"]:
                for inst in r["Instances"]:
                    assert inst["Placement"]["AvailabilityZone"] == "us-east-1e"
                    assert int(inst["PrivateIpAddress"].rsplit(".", 1)[1]) >= 100


@pytest.mark.parametrize(
    ("avail_zones", "expected"),
    [
        (["e", "c"], ["us-east-1e", "us-east-1c"]),
        (["us-east-1d"], ["us-east-1d", "us-east-1a"]),
        ([], ["us-east-1a", "us-east-1b"]),
    ],
)
def test_seed_subnets_follow_avail_zones(tmp_path: Path, aws, avail_zones, expected) -> None:  # noqa: ANN001
    path = write_config(tmp_path, fabflows=moto_section(aws.endpoint))
    data = yaml.safe_load(path.read_text())
    data["avail_zones"] = avail_zones
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(path)
    assert seed_zones(cfg, "us-east-1") == expected
    addresses = (f"10.250.0.{i}" for i in itertools.count(10))
    seeded = seed(aws.endpoint, cfg, ["staging"], "10.250.0.0/24", addresses)
    assert list(seeded.zone_subnets) == expected
    cidrs = _subnet_cidrs(aws)
    # without a split: the servers' subnet is the whole network, in the first zone
    assert seeded.subnet_id == seeded.zone_subnets[expected[0]]
    assert cidrs[seeded.subnet_id] == "10.250.0.0/24"
    assert not ipaddress.ip_network(cidrs[seeded.zone_subnets[expected[1]]]).overlaps(
        ipaddress.ip_network("10.250.0.0/24")
    )
