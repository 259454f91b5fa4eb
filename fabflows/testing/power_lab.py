"""An environment for the stop/start/resize tests and benchmarks: moto inventory, one isolated
test host per instance following EC2 states (:class:`~fabflows.testing.ec2_hosts.Ec2HostMirror`),
PostgreSQL with a table of ``rows`` rows on the primary and a replica streaming from it, a worker
with a celery stand-in under supervisor, web servers with FabulAWS's nginx logic, and a config
pointing at all of it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import load_config
from fabflows.testing.configs import moto_section, write_config
from fabflows.testing.ec2_hosts import Ec2HostMirror
from sandbox.aws_seed import seed
from sandbox.provision import provision_web
from sandbox.replication import basebackup_timeout, provision_replication, wait_for_postgres
from sandbox.testhosts import HostSpec, TestHost, TestNetwork

ROLES = ("cache", "db-primary", "db-replica", "worker")
HOME = "/home/deploy"
WORKER_SUPERVISOR = """\
[group:staging-celery]
programs=staging-celery-main
[program:staging-celery-main]
command=/bin/sleep 100000
autostart=false
startsecs=0
"""
SEED_TYPES = {
    "cache": "t1.micro",
    "db-primary": "m1.small",
    "db-replica": "m1.small",
    "web": "m1.small",
    "worker": "m3.large",
}


def supervisorctl(host: TestHost, *args: str, timeout: float = 15.0) -> None:
    """Run supervisorctl in a host, waiting for supervisord (PID 1) to open its socket first."""
    deadline = time.monotonic() + timeout
    while True:
        done = host.exec(["supervisorctl", *args], check=False)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"supervisorctl {' '.join(args)}: {done.stdout}{done.stderr}")
        time.sleep(0.2)


def psql(host: TestHost, sql: str) -> str:
    """``sql`` as the postgres superuser in the host; unaligned, tuples only."""
    return host.exec(
        ["runuser", "-u", "postgres", "--", "psql", "-Atc", sql], timeout=600
    ).stdout.strip()


def celery_state(host: TestHost) -> str:
    """The celery stand-in's supervisor state on the worker (RUNNING, STOPPED...)."""
    out = host.exec(["supervisorctl", "status", "staging-celery:staging-celery-main"], check=False)
    return out.stdout.split()[1]


def provision_web_host(host: TestHost, role: str) -> None:
    """What a web AMI's boot does here: FabulAWS's nginx logic and the app's port."""
    if role == "web":
        host.wait_for_port(80)
        provision_web(host, f"{HOME}/services/nginx/html", 8000)


def write_lab_config(
    directory: Path,
    endpoint: str,
    network: TestNetwork,
    instance_types: dict[str, str],
    staging: dict[str, Any] | None = None,
) -> Path:
    """The lab's config: ssh to the test hosts, short polls, ``staging`` settings on top."""
    section = moto_section(endpoint, staging=staging or {})
    section |= {
        "ssh": {
            "user": "deploy",
            "identity_file": str(network.client_key),
            "known_hosts_file": str(network.known_hosts),
            "address_attribute": "private_ip_address",
            "connect_timeout": 3,
        },
        "state_dir": str(directory / "state"),
        "stop_start": {
            "poll_seconds": 0.2,
            "reachable_wait_seconds": 120,
            "site_wait_seconds": 120,
            "instance_wait_seconds": 120,
        },
        "upgrade": {"check_timeout_seconds": 30},
        "refresh": {"poll_seconds": 0.2, "drain_seconds": 0, "instance_timeout_seconds": 120},
    }
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(
        directory,
        fabflows=section,
        deploy_user="deploy",
        home=HOME,
        static_html={},
        site_domains_map={"staging": []},
        instance_types={"staging": instance_types},
    )


@dataclass
class PowerLab:
    config: Path
    hosts: dict[str, TestHost]
    ids: dict[str, str]
    mirror: Ec2HostMirror
    database_bytes: int
    replication_password: str = ""
    """The replication role's password (only in the db servers' secret files and .pgpass)."""

    def destroy(self) -> None:
        self.mirror.destroy_created()
        for host in self.hosts.values():
            if host.name in self.mirror.network.hosts:
                self.mirror.network.destroy(host.name)


def build_power_lab(
    network: TestNetwork,
    moto: Any,
    directory: Path,
    *,
    rows: int,
    instance_types: dict[str, str],
    first_address: int = 4,
    name_prefix: str = "pl",
    staging: dict[str, Any] | None = None,
    start: Callable[[Sequence[HostSpec]], list[TestHost]] | None = None,
) -> PowerLab:
    """Start the hosts (call from the main thread), seed moto, fill the database.

    Args:
        network: The test network the hosts join.
        moto: The moto server (``endpoint``; its requests drive the mirror).
        directory: Where the configs and state go.
        rows: Rows in ``shop_order`` on the db-primary.
        instance_types: The config's instance types (the seed uses :data:`SEED_TYPES`).
        first_address: Host part of the first non-web server's address (moto gives the
            group's instances the next free ones).
        name_prefix: Host names: ``<prefix>-<role>``, new web hosts ``<prefix>w...``.
        staging: Extra settings of the ``staging`` environment (``cache_strategy``...).
        start: Starts the hosts (default ``network.start``; tests pass ``make_hosts``).
    """
    from fabflows.testing import launch_template_fidelity, moto_fidelity

    moto_fidelity.apply()  # Standby leaves the load balancers, as on AWS (deploy-serial needs it)
    launch_template_fidelity.apply()  # a version made from another inherits its data, as on AWS
    subnet = network.subnet
    specs = [
        HostSpec(
            f"{name_prefix}-{role}",
            f"{subnet}.{first_address + n}",
            "db" if role.startswith("db") else "base",
        )
        for n, role in enumerate(ROLES)
    ]
    hosts = dict(zip(ROLES, (start or network.start)(specs), strict=True))
    worker = hosts["worker"]
    worker.exec(["sh", "-c", "cat > /etc/supervisor/conf.d/app.conf"], input=WORKER_SUPERVISOR)
    supervisorctl(worker, "update")
    supervisorctl(worker, "start", "staging-celery:*")
    primary = hosts["db-primary"]
    wait_for_postgres(primary)  # an open port can still answer 'the database system is starting up'
    psql(primary, "CREATE TABLE shop_order (id bigint PRIMARY KEY, note text, created timestamptz)")
    fill = "INSERT INTO shop_order SELECT g, repeat(md5(g::text), 2), now() FROM generate_series(1, :rows) g;\n"
    primary.exec(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            "psql",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"rows={int(rows)}",
        ],
        input=fill,
        timeout=900,
    )
    size = int(psql(primary, "SELECT pg_database_size('postgres')"))
    # the db-replica streams from the primary (role, pg_hba, pg_basebackup -R with a slot)
    replication_password = secrets.token_urlsafe(18)
    provision_replication(
        primary,
        [hosts["db-replica"]],
        replication_password,
        home=HOME,
        timeout=basebackup_timeout(size),
    )
    seeded_cfg = load_config(
        write_lab_config(directory / "seed", moto.endpoint, network, SEED_TYPES, staging)
    )
    seeded = seed(
        moto.endpoint, seeded_cfg, ["staging"], f"{subnet}.0/24", iter(h.ip for h in hosts.values())
    ).environments[0]
    ids = {role: seeded.instance_ids[role][0] for role in ROLES}

    def on_new_host(host: TestHost, role: str) -> None:
        # a new db-replica streams from the primary, as building one from the image would
        if role == "db-replica":
            provision_replication(primary, [host], replication_password, home=HOME)
        else:
            provision_web_host(host, role)

    mirror = Ec2HostMirror(
        network,
        moto.endpoint,
        subnet,
        on_new_host=on_new_host,
        name_prefix=f"{name_prefix}w",
    )
    for role, host in hosts.items():
        mirror.adopt(ids[role], host)
    mirror.attach(moto)
    mirror.reconcile()
    config = write_lab_config(directory, moto.endpoint, network, instance_types, staging)
    return PowerLab(
        config=config,
        hosts=hosts,
        ids=ids,
        mirror=mirror,
        database_bytes=size,
        replication_password=replication_password,
    )
