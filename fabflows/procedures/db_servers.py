"""A database server as the PostgreSQL tasks take it, from an EC2 server of the environment."""

from __future__ import annotations

from config import EnvironmentConfig
from tasks.aws.ec2 import Server
from tasks.postgres.server import DbServer


def db_server(s: Server, env: EnvironmentConfig) -> DbServer:
    """SSH at the environment's address attribute; PostgreSQL at the private address."""
    address = s.address(env.address_attribute)
    return DbServer(
        name=s.name or s.instance_id,
        address=address,
        db_address=s.private_ip_address or address,
        instance_id=s.instance_id,
    )
