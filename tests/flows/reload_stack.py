"""A small real stack for reload-production-db tests and benchmarks: moto (EC2, the web autoscaling
group) seeded with staging and production, and isolated test hosts at the instances' addresses —
both db-primaries (PostgreSQL 15 with Django-like data), staging's web and worker servers running
the Django app under supervisor behind nginx and pgbouncer."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import requests
from psycopg import sql

from config import load_config
from sandbox.aws_seed import seed
from sandbox.provision import provision_environment_app, write_secret_file
from sandbox.seed_db import psql, seed_database
from sandbox.testhosts import HostSpec, TestHost, TestNetwork

PROD_PASSWORD = "prod 'secret\" $pw"
STAGING_PASSWORD = "staging-secret-pw"
# The seeded production lacks the app's migration shop.0002_sitenote (the home page reads its
# table), so a reload of it has a pending migration and takes the upgrade page. This brings
# production to the code's migrations (nothing pending: the pgbouncer pause), and back.
MIGRATE_PRODUCTION = """
CREATE TABLE IF NOT EXISTS shop_sitenote (
    id bigserial PRIMARY KEY, text varchar(200) NOT NULL, created timestamptz NOT NULL);
ALTER TABLE shop_sitenote OWNER TO dbuser;
INSERT INTO django_migrations (app, name, applied)
SELECT 'shop', '0002_sitenote', now()
WHERE NOT EXISTS (SELECT 1 FROM django_migrations WHERE app = 'shop' AND name = '0002_sitenote');
"""
UNMIGRATE_PRODUCTION = """
DROP TABLE IF EXISTS shop_sitenote;
DELETE FROM django_migrations WHERE app = 'shop' AND name = '0002_sitenote';
"""

PRE_SUSPENDED = ["AZRebalance"]
"""Suspended before every run by "someone else": must still be suspended afterwards, no more."""


@dataclass
class Stack:
    config: Path
    endpoint: str
    net: TestNetwork
    hosts: dict[str, TestHost]
    asg: str
    live: str = "myproject_staging"
    source: str = "myproject_production"
    names: list[str] = field(default_factory=list)

    @property
    def web(self) -> TestHost:
        return self.hosts["web"]

    def asg_client(self) -> Any:
        return boto3.client(
            "autoscaling",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def suspended(self) -> list[str]:
        g = self.asg_client().describe_auto_scaling_groups(AutoScalingGroupNames=[self.asg])
        return sorted(p["ProcessName"] for p in g["AutoScalingGroups"][0]["SuspendedProcesses"])

    def asg_tags(self) -> dict[str, str]:
        g = self.asg_client().describe_auto_scaling_groups(AutoScalingGroupNames=[self.asg])
        return {t["Key"]: t["Value"] for t in g["AutoScalingGroups"][0].get("Tags", [])}

    def site(self, path: str = "/") -> requests.Response:
        return requests.get(f"http://{self.web.ip}{path}", timeout=5)

    def databases(self) -> dict[str, str]:
        """name -> comment on the staging server."""
        out = psql(
            self.hosts["db"],
            "SELECT datname || '|' || coalesce(shobj_description(oid, 'pg_database'), '') "
            "FROM pg_database WHERE NOT datistemplate;",
        )
        return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)

    def count(self, host: str, database: str, table: str = "auth_user") -> int:
        query = sql.SQL("SELECT count(*) FROM {};").format(sql.Identifier(table))
        return int(psql(self.hosts[host], query.as_string(None), database=database))

    def programs(self) -> dict[str, str]:
        states = {}
        for name in ("web", "worker"):
            out = self.hosts[name].exec(["supervisorctl", "status"], check=False).stdout
            for line in out.splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    states[f"{name}:{parts[0]}"] = parts[1]
        return states


def stack_config(
    directory: Path,
    endpoint: str,
    net: TestNetwork,
    site_url: str | None = None,
    **reload_settings: Any,
) -> Path:
    import yaml

    from fabflows.testing.configs import SAMPLE

    data = {
        "fabulaws_config": str(SAMPLE),
        "deploy_user": "deploy",
        "home": "/home/deploy",
        # the sample's page paths are relative to a project checkout: use fabflows' default pages
        "static_html": {"upgrade_message": None, "healthcheck_override": None},
        # the sample's domains are not in the test network: the site is staging's web server
        "site_domains_map": {"staging": [], "production": []},
        "fabflows": {
            "aws": {
                "endpoint_url": endpoint,
                "access_key_id": "testing",
                "secret_access_key": "testing",
                "max_attempts": 2,
            },
            "ssh": {
                "user": "deploy",
                "identity_file": str(net.client_key),
                "known_hosts_file": str(net.known_hosts),
                "address_attribute": "private_ip_address",
                "connect_timeout": 5,
            },
            "environments": {
                "staging": {"site_url": site_url} if site_url else {},
                "production": {},
            },
            "state_dir": str(directory / "state"),
            "lock": {"wait_timeout_minutes": 1, "poll_seconds": 0.2},
            "upgrade": {"check_timeout_seconds": 20},
            "reload_production_db": reload_settings,
        },
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fabflows.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def build_stack(
    directory: Path,
    endpoint: str,
    net: TestNetwork,
    *,
    prod_scale: int = 600,
    staging_scale: int = 60,
    **reload_settings: Any,
) -> Stack:
    """Seed moto, start the hosts at the seeded addresses, seed the databases, provision the app."""
    config_path = stack_config(directory, endpoint, net, **reload_settings)
    cfg = load_config(config_path)
    taken = {h.ip for h in net.hosts.values()}
    free = (f"{net.subnet}.{n}" for n in itertools.count(150) if f"{net.subnet}.{n}" not in taken)
    result = seed(endpoint, cfg, ["staging", "production"], f"{net.subnet}.0/24", free, web_count=1)
    ec2 = boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    ips = {}
    for r in ec2.describe_instances()["Reservations"]:
        for i in r["Instances"]:
            ips[i["InstanceId"]] = i["PrivateIpAddress"]
    by_env = {e.environment: e for e in result.environments}
    stg, prod = by_env["staging"], by_env["production"]
    want = {
        "db": (ips[stg.instance_ids["db-primary"][0]], "db"),
        "worker": (ips[stg.instance_ids["worker"][0]], "app"),
        "web": (ips[stg.instance_ids["web"][0]], "app"),
        "proddb": (ips[prod.instance_ids["db-primary"][0]], "db"),
    }
    for _, (ip, _) in want.items():
        if ip in taken:
            raise RuntimeError(f"moto gave {ip}, which a running test host already uses")
    prefix = directory.name[-6:].replace("_", "").lower() or "r"
    names = {k: f"{k}-{prefix}"[:40] for k in want}
    started = net.start([HostSpec(names[k], ip, image) for k, (ip, image) in want.items()])
    stack_config(directory, endpoint, net, f"http://{want['web'][0]}/", **reload_settings)
    hosts = dict(zip(want, started, strict=True))
    seed_database(
        hosts["proddb"], "myproject_production", "dbuser", PROD_PASSWORD, scale=prod_scale
    )
    write_secret_file(hosts["proddb"], "/home/deploy", "database_password", PROD_PASSWORD)
    seed_database(hosts["db"], "myproject_staging", "dbuser", STAGING_PASSWORD, scale=staging_scale)
    provision_environment_app(
        hosts["db"],
        [hosts["web"]],
        [hosts["worker"]],
        environment="staging",
        db_name="myproject_staging",
        db_user="dbuser",
        db_password=STAGING_PASSWORD,
        server_port=8000,
    )
    stack = Stack(
        config=config_path,
        endpoint=endpoint,
        net=net,
        hosts=hosts,
        asg=stg.auto_scaling_group or "",
        names=list(names.values()),
    )
    stack.asg_client().suspend_processes(
        AutoScalingGroupName=stack.asg, ScalingProcesses=PRE_SUSPENDED
    )
    # the roles with no test host (cache, replicas) are stopped: every running server is one a
    # runbook can reach (the watchdog and recover-environment read every server's staged files)
    hostless = [i for i, ip in ips.items() if ip not in {ip for ip, _ in want.values()}]
    if hostless:
        ec2.stop_instances(InstanceIds=hostless)
    return stack


def destroy_stack(stack: Stack) -> None:
    for name in stack.names:
        if name in stack.net.hosts:
            stack.net.destroy(name)
