"""A db-primary and a db-replica streaming from it, on isolated test hosts (``db`` image), for the
replication tests: the primary seeded with the sandbox's small Django-like database, the replica
built from it by ``sandbox.replication`` (role, pg_hba, ``pg_basebackup -R`` with a slot)."""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.replication import provision_replication
from sandbox.seed_db import seed_database
from sandbox.testhosts import HostSpec, TestHost, TestNetwork
from tasks.postgres.server import DbServer

DATABASE = "myproject_staging"
DB_USER = "dbuser"
DB_PASSWORD = "db-pw"
REPLICATION_PASSWORD = "rep'l:pw\\$ \"x`id`"
"""Quotes, a backslash, a colon, a dollar and backticks: must survive .pgpass and stdin."""


@dataclass
class ReplicatedPair:
    primary: TestHost
    replica: TestHost
    slot: str

    @property
    def primary_server(self) -> DbServer:
        return DbServer(name=self.primary.name, address=self.primary.ip, db_address=self.primary.ip)

    @property
    def replica_server(self) -> DbServer:
        return DbServer(name=self.replica.name, address=self.replica.ip, db_address=self.replica.ip)

    def destroy(self, net: TestNetwork) -> None:
        for host in (self.replica, self.primary):
            if host.name in net.hosts:
                net.destroy(host.name)


def free_addresses(net: TestNetwork, count: int, start: int = 150) -> list[str]:
    taken = {h.ip for h in net.hosts.values()}
    free = [f"{net.subnet}.{n}" for n in range(start, 254) if f"{net.subnet}.{n}" not in taken]
    return free[:count]


def start_replicated_pair(
    net: TestNetwork, names: tuple[str, str] = ("rpri", "rrep"), scale: int = 50
) -> ReplicatedPair:
    """Start both hosts (main thread), seed the primary, build the replica; streaming on return."""
    ips = free_addresses(net, 2)
    primary, replica = net.start(
        [HostSpec(names[0], ips[0], "db"), HostSpec(names[1], ips[1], "db")]
    )
    pair = ReplicatedPair(primary=primary, replica=replica, slot="")
    try:
        seed_database(primary, DATABASE, DB_USER, DB_PASSWORD, scale=scale)
        pair.slot = provision_replication(primary, [replica], REPLICATION_PASSWORD)[replica.name]
    except BaseException:
        pair.destroy(net)
        raise
    return pair
