"""Seed a moto server with FabulAWS-shaped environments (used by the sandbox, tests and benchmarks).

Per environment: one instance per non-web role, tagged ``deployment``/``environment``/``role``/``Name``
with its private address chosen by the caller (the sandbox passes its test hosts' addresses, so flows
connect to the instance's address as they would on AWS); a launch template and an autoscaling group for
web with a classic ELB and an ALB target group; the static-files bucket.

Subnets are in the config's ``avail_zones`` (as the runbooks that launch servers read them,
:func:`fabflows.procedures.placement.configured_placement`), so those runbooks find a subnet in
every zone the config names: ``subnet_cidr`` in the first zone and a spare subnet outside it in the
second, or, with ``split_subnet``, ``subnet_cidr`` cut into one subnet per zone, so that a server
launched in any of them gets an address inside ``subnet_cidr`` (the sandbox gives those a host).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field

import boto3

from config import FabulawsConfig, resolve_environment
from fabflows.procedures.placement import configured_placement

NON_WEB_ROLES = ("cache", "db-primary", "db-replica", "worker")


@dataclass
class SeededEnvironment:
    deployment: str
    environment: str
    instance_ids: dict[str, list[str]] = field(default_factory=dict)
    auto_scaling_group: str | None = None
    launch_template: str | None = None
    target_group_arn: str | None = None


@dataclass
class SeedResult:
    vpc_id: str
    subnet_id: str  # the first zone's: where the web servers and (unless split) all servers are
    environments: list[SeededEnvironment]
    zone_subnets: dict[str, str] = field(default_factory=dict)  # zone -> subnet id


def seed_zones(config: FabulawsConfig, region: str) -> list[str]:
    """The zones the seed makes subnets in: the config's ``avail_zones`` as full names (FabulAWS
    lists letters), then the region's first letters until there are two (an ALB needs two)."""
    zones, _ = configured_placement(config.model_extra or {}, region)
    zones = list(dict.fromkeys(zones))
    for letter in "abcdef":
        if len(zones) >= 2:
            break
        if f"{region}{letter}" not in zones:
            zones.append(f"{region}{letter}")
    return zones


@functools.lru_cache(maxsize=16)
def _clients(endpoint: str, region: str) -> dict[str, object]:
    """The seed's clients, made once per endpoint and region (each costs ~70 ms of CPU)."""
    kw = dict(
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="sandbox",
        aws_secret_access_key="sandbox",
    )
    return {s: boto3.client(s, **kw) for s in ("ec2", "autoscaling", "elb", "elbv2", "s3")}


def seed(
    endpoint: str,
    config: FabulawsConfig,
    environments: list[str],
    subnet_cidr: str,
    addresses: Iterator[str],
    web_count: int = 2,
    extra_per_role: int = 0,
    split_subnet: bool = False,
) -> SeedResult:
    """Create the environments. ``addresses`` yields private IPs for the non-web instances; each
    instance goes in the subnet that holds its address (the first zone's when none does)."""
    region = config.fabflows.aws.region or config.region
    c = _clients(endpoint, region)
    ec2, asg, elb, elbv2, s3 = (c[k] for k in ("ec2", "autoscaling", "elb", "elbv2", "s3"))
    net = ipaddress.ip_network(subnet_cidr)
    vpc_net = net.supernet(new_prefix=16)
    vpc_id = ec2.create_vpc(CidrBlock=str(vpc_net))["Vpc"]["VpcId"]
    az = seed_zones(config, region)
    if split_subnet:
        bits = (len(az) - 1).bit_length()
        if net.prefixlen + bits > 28:  # AWS's smallest subnet is a /28
            raise ValueError(f"{subnet_cidr} is too small for {len(az)} zones' subnets")
        cidrs = list(net.subnets(prefixlen_diff=bits))[: len(az)]
    else:
        # a second subnet only so the ALB has two AZs; nothing runs in it
        cidrs = [net, next(s for s in vpc_net.subnets(new_prefix=24) if not s.overlaps(net))]
    zone_subnets: dict[str, str] = {}
    subnet_nets: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
    for zone, cidr in zip(az, cidrs, strict=False):
        sid = ec2.create_subnet(VpcId=vpc_id, CidrBlock=str(cidr), AvailabilityZone=zone)["Subnet"][
            "SubnetId"
        ]
        zone_subnets[zone] = sid
        subnet_nets.append((cidr, sid))
    subnet_id, spare_id = subnet_nets[0][1], subnet_nets[1][1]

    def subnet_of(address: str) -> str:
        ip = ipaddress.ip_address(address)
        return next((sid for cidr, sid in subnet_nets if ip in cidr), subnet_id)

    sg_id = ec2.create_security_group(GroupName="sandbox", Description="sandbox", VpcId=vpc_id)[
        "GroupId"
    ]
    ami = config.instance_settings.ami or "ami-12345678"
    seeded = []
    for env_name in environments:
        env = resolve_environment(config, env_name)
        out = SeededEnvironment(env.deployment, env.environment)

        def tags(role: str, name: str, env=env) -> list[dict[str, str]]:
            return [
                {"Key": "Name", "Value": name},
                {"Key": "deployment", "Value": env.deployment},
                {"Key": "environment", "Value": env.environment},
                {"Key": "role", "Value": role},
            ]

        for role in NON_WEB_ROLES:
            if role not in env.roles:
                continue
            for i in range(1 + extra_per_role):
                name = f"{env.deployment}_{env.environment}_{role}" + (f"_{i}" if i else "")
                address = next(addresses)
                res = ec2.run_instances(
                    ImageId=ami,
                    MinCount=1,
                    MaxCount=1,
                    InstanceType=env.instance_types.get(role, "t3.small"),
                    SubnetId=subnet_of(address),
                    PrivateIpAddress=address,
                    SecurityGroupIds=[sg_id],
                    TagSpecifications=[{"ResourceType": "instance", "Tags": tags(role, name)}],
                )
                out.instance_ids.setdefault(role, []).append(res["Instances"][0]["InstanceId"])
        lt_name = f"{env.deployment}-{env.environment}-web"
        ec2.create_launch_template(
            LaunchTemplateName=lt_name,
            LaunchTemplateData={
                "ImageId": ami,
                "InstanceType": env.instance_types.get("web", "t3.small"),
                "SecurityGroupIds": [sg_id],
            },
        )
        out.launch_template = lt_name
        for lb in env.load_balancers:
            elb.create_load_balancer(
                LoadBalancerName=lb,
                Listeners=[{"Protocol": "HTTP", "LoadBalancerPort": 80, "InstancePort": 80}],
                Subnets=[subnet_id],
                SecurityGroups=[sg_id],
            )
            elb.configure_health_check(
                LoadBalancerName=lb,
                HealthCheck={
                    "Target": "HTTP:80/healthcheck.html",
                    "Interval": 10,
                    "Timeout": 5,
                    "UnhealthyThreshold": 2,
                    "HealthyThreshold": 2,
                },
            )
        tg_name = f"{env.deployment}-{env.environment}-web"[:32]
        alb = elbv2.create_load_balancer(
            Name=tg_name, Subnets=[subnet_id, spare_id], SecurityGroups=[sg_id], Type="application"
        )["LoadBalancers"][0]["LoadBalancerArn"]
        tg_arn = elbv2.create_target_group(
            Name=tg_name,
            Protocol="HTTP",
            Port=80,
            VpcId=vpc_id,
            HealthCheckPath="/healthcheck.html",
            TargetType="instance",
        )["TargetGroups"][0]["TargetGroupArn"]
        elbv2.create_listener(
            LoadBalancerArn=alb,
            Protocol="HTTP",
            Port=80,
            DefaultActions=[{"Type": "forward", "TargetGroupArn": tg_arn}],
        )
        out.target_group_arn = tg_arn
        if env.auto_scaling_group:
            asg.create_auto_scaling_group(
                AutoScalingGroupName=env.auto_scaling_group,
                LaunchTemplate={"LaunchTemplateName": lt_name, "Version": "$Latest"},
                MinSize=min(1, web_count),
                DesiredCapacity=web_count,
                MaxSize=max(4, web_count * 2),
                VPCZoneIdentifier=subnet_id,
                LoadBalancerNames=env.load_balancers,
                TargetGroupARNs=[tg_arn],
                HealthCheckType="ELB",
                HealthCheckGracePeriod=60,
                Tags=[
                    {
                        **t,
                        "PropagateAtLaunch": True,
                        "ResourceId": env.auto_scaling_group,
                        "ResourceType": "auto-scaling-group",
                    }
                    for t in tags("web", f"{env.deployment}_{env.environment}_web")
                ],
            )
            group = asg.describe_auto_scaling_groups(
                AutoScalingGroupNames=[env.auto_scaling_group]
            )["AutoScalingGroups"][0]
            out.instance_ids["web"] = [i["InstanceId"] for i in group["Instances"]]
            out.auto_scaling_group = env.auto_scaling_group
        s3.create_bucket(Bucket=env.static_bucket)
        seeded.append(out)
    return SeedResult(
        vpc_id=vpc_id, subnet_id=subnet_id, environments=seeded, zone_subnets=zone_subnets
    )
