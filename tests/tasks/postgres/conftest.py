"""Two database servers (isolated test hosts on the ``db`` image) shared by this directory's tests:
``source`` holds a small production database, ``target`` a staging one."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sandbox.seed_db import seed_database
from sandbox.testhosts import HostSpec, TestHost, TestNetwork
from tasks.postgres.server import DbServer
from tasks.ssh.connection import ConnectionPool, SshOptions

PASSWORD = "pr0d 'pw\" $x"  # quotes, a space and a dollar: must survive stdin, never a command line
STAGING_PASSWORD = "st4ging-pw"
SCALE = 300


@dataclass
class DbPair:
    net: TestNetwork
    source_host: TestHost
    target_host: TestHost
    source: DbServer
    target: DbServer
    pool: ConnectionPool


@pytest.fixture(scope="module")
def db_pair(test_network: TestNetwork) -> Iterator[DbPair]:
    subnet = test_network.subnet
    names = ("pgsrc", "pgdst")
    taken = {h.ip for h in test_network.hosts.values()}
    free = [f"{subnet}.{n}" for n in range(200, 250) if f"{subnet}.{n}" not in taken]
    src, dst = test_network.start(
        [HostSpec(names[0], free[0], "db"), HostSpec(names[1], free[1], "db")]
    )
    try:
        seed_database(src, "myproject_production", "dbuser", PASSWORD, scale=SCALE)
        seed_database(dst, "myproject_staging", "dbuser", STAGING_PASSWORD, scale=50)
        opts = SshOptions(
            user="deploy",
            known_hosts_file=str(test_network.known_hosts),
            key_file=str(test_network.client_key),
            connect_timeout=5,
            command_timeout=120,
        )
        with ConnectionPool(opts) as pool:
            yield DbPair(
                net=test_network,
                source_host=src,
                target_host=dst,
                source=DbServer(name="pgsrc", address=src.ip, db_address=src.ip),
                target=DbServer(name="pgdst", address=dst.ip, db_address=dst.ip),
                pool=pool,
            )
    finally:
        for name in names:
            if name in test_network.hosts:
                test_network.destroy(name)
