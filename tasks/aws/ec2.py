"""EC2 reads: the servers of a deployment/environment, found by tags as FabulAWS does."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict, Field

from config.models import LEGACY_ROLE_NAMES, ROLES, normalize_role
from tasks.aws.session import aws_client

LIVE_STATES = ("pending", "running", "stopping", "stopped")


class Server(BaseModel):
    """One EC2 instance of an environment."""

    model_config = ConfigDict(frozen=True)

    instance_id: str
    name: str = Field(description="The Name tag (informational).")
    role: str
    deployment: str
    environment: str
    instance_type: str
    state: str
    availability_zone: str | None = None
    private_ip_address: str | None = None
    public_ip_address: str | None = None
    private_dns_name: str | None = None
    public_dns_name: str | None = None
    launch_time: datetime | None = None
    image_id: str | None = None
    auto_scaling_group: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)

    def address(self, attribute: str) -> str:
        """The address to reach this server at (config's ``ec2_attr_for_ssh``), falling back to others."""
        for attr in (attribute, "private_ip_address", "public_ip_address", "public_dns_name"):
            value = getattr(self, attr, None)
            if value:
                return value
        raise ValueError(f"{self.instance_id} has no address (state {self.state})")


def server_from_instance(instance: dict[str, Any]) -> Server:
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    return Server(
        instance_id=instance["InstanceId"],
        name=tags.get("Name", ""),
        role=normalize_role(tags.get("role", "")),
        deployment=tags.get("deployment", ""),
        environment=tags.get("environment", ""),
        instance_type=instance["InstanceType"],
        state=instance["State"]["Name"],
        availability_zone=instance.get("Placement", {}).get("AvailabilityZone"),
        private_ip_address=instance.get("PrivateIpAddress") or None,
        public_ip_address=instance.get("PublicIpAddress") or None,
        private_dns_name=instance.get("PrivateDnsName") or None,
        public_dns_name=instance.get("PublicDnsName") or None,
        launch_time=instance.get("LaunchTime"),
        image_id=instance.get("ImageId"),
        auto_scaling_group=tags.get("aws:autoscaling:groupName"),
        tags=tags,
    )


def role_tag_values(roles: list[str] | None = None) -> list[str]:
    """Tag values that mean ``roles``, legacy names included (db-master is db-primary)."""
    wanted = list(roles or ROLES)
    legacy = [old for old, new in LEGACY_ROLE_NAMES.items() if new in wanted]
    return wanted + legacy


@task(cache_policy=NO_CACHE, name="describe-servers", retries=2, retry_delay_seconds=2)
def describe_servers(
    creds: AwsCredentials,
    deployment: str,
    environment: str,
    roles: list[str] | None = None,
    states: tuple[str, ...] = LIVE_STATES,
) -> list[Server]:
    """Servers tagged ``deployment``/``environment`` with a role, sorted by role then name.

    One paginated DescribeInstances with server-side filters: the number of calls grows with pages
    (1000 instances each), not with instances or roles. ``<role>-PENDING`` and ``<role>-OLD`` servers
    (being built, retired) are not part of the environment and are left out, as in the original.
    """
    ec2 = aws_client(creds, "ec2")
    filters = [
        {"Name": "tag:deployment", "Values": [deployment]},
        {"Name": "tag:environment", "Values": [environment]},
        {"Name": "tag:role", "Values": role_tag_values(roles)},
        {"Name": "instance-state-name", "Values": list(states)},
    ]
    servers = []
    pages = 0
    for page in ec2.get_paginator("describe_instances").paginate(
        Filters=filters, PaginationConfig={"PageSize": 1000}
    ):
        pages += 1
        for reservation in page["Reservations"]:
            servers.extend(server_from_instance(i) for i in reservation["Instances"])
    order = {role: i for i, role in enumerate(ROLES)}
    servers.sort(key=lambda s: (order.get(s.role, 99), s.name, s.instance_id))
    get_run_logger().info(
        "%s/%s: %d servers in %d page(s)", deployment, environment, len(servers), pages
    )
    return servers
