"""The sandbox daemon: a moto server, seeded environments, and one isolated test host per instance.

Started in the background by ``fabflows sandbox up``; stopped by ``fabflows sandbox down`` (SIGTERM).
It owns every process it starts (test hosts die with it, through PDEATHSIG), and every second it
reconciles EC2 (as moto sees it) with the test hosts:

- a running instance with an address in the sandbox subnet gets a host (``db`` image for database
  roles) with that address, so flows connect to the instance's address as they would on AWS;
- a stopped instance's host is stopped (its disk, the overlay's upper layer, is kept);
- a started instance's host is started again; a terminated instance's host is destroyed.

So instances that the autoscaling group launches, or that a runbook stops and starts, really appear,
stop and start. Files in the state dir: ``fabflows.yaml`` (the config flows use), ``state.json``
(status), ``hosts/`` (the test network: ssh_config, known_hosts, client key), ``daemon.log``.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import yaml

from config import FabulawsConfig, load_config
from sandbox.aws_seed import SeedResult, seed
from sandbox.demo_data import (
    APP_SERVER_PACKAGES,
    USERS_DIR,
    ensure_users_dir,
    prepare_apt,
    start_apt_repo,
)
from sandbox.provision import provision_app, provision_environment_app
from sandbox.seed_db import sandbox_db_scale, seed_database
from sandbox.testhosts import HostSpec, TestNetwork

log = logging.getLogger("fabflows.sandbox")

DB_ROLES = ("db-primary", "db-replica")
APP_ROLES = ("web", "worker")
ENVIRONMENTS = ("staging", "production")
SAMPLE = Path(__file__).resolve().parent / "fabulaws-config.yaml"


def default_state_dir() -> Path:
    return Path(os.environ.get("FABFLOWS_SANDBOX_DIR") or Path(__file__).resolve().parent / "state")


def write_config(state_dir: Path, endpoint: str, network: TestNetwork) -> Path:
    """The sandbox's config: FabulAWS's sample untouched, plus an overlay for the sandbox."""
    envs = {
        env: {
            "target_groups": [f"myproject-{env}-web"],
            "site_url": None,
            "time_zone": "America/New_York",
        }
        for env in ENVIRONMENTS
    }
    for env in envs.values():
        env.pop("site_url")
    data: dict[str, Any] = {
        "fabulaws_config": str(SAMPLE),
        # the sample's site domains are ELB names outside the sandbox: checks use the web servers
        "site_domains_map": {env: [] for env in ENVIRONMENTS},
        # the sample's page paths are relative to a project checkout: fabflows' default pages
        "static_html": {"upgrade_message": None, "healthcheck_override": None},
        # the test hosts' image has a `deploy` user (uid 1000) with NOPASSWD sudo
        "deploy_user": "deploy",
        # sysadmins' keys for update-sysadmin-users, and the app-server packages the sandbox's
        # apt repository has (the sample's Python/library packages are out of reach)
        "ssh_keys": str(USERS_DIR),
        "app_server_packages": list(APP_SERVER_PACKAGES),
        "home": "/home/deploy",
        "fabflows": {
            "aws": {
                "endpoint_url": endpoint,
                "access_key_id": "sandbox",
                "secret_access_key": "sandbox",
                "max_attempts": 4,
            },
            "ssh": {
                "user": "deploy",
                "identity_file": str(network.client_key),
                "known_hosts_file": str(network.known_hosts),
                "address_attribute": "private_ip_address",
                "connect_timeout": 5,
            },
            "environments": envs,
            "state_dir": str(state_dir / "runs"),
        },
    }
    path = state_dir / "fabflows.yaml"
    path.write_text(
        "# Written by `fabflows sandbox up`: the FabulAWS sample config as is, plus what the\n"
        "# sandbox needs (moto endpoint, test hosts' SSH identity and known_hosts).\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
    return path


def seed_sandbox(endpoint: str, cfg: FabulawsConfig, subnet: str, web_count: int) -> SeedResult:
    """The sandbox's AWS: its environments, the seeded servers at ``{subnet}.100`` onwards, and one
    subnet per zone of the config's ``avail_zones``, all inside the hosts' network, so that a
    server add-replica or add-server launches in any of those zones gets a host."""
    addresses = (f"{subnet}.{i}" for i in itertools.count(100))
    cidr = str(ipaddress.ip_network(f"{subnet}.0/24"))
    return seed(endpoint, cfg, list(ENVIRONMENTS), cidr, addresses, web_count, split_subnet=True)


class Sandbox:
    def __init__(self, state_dir: Path, port: int, prefix: str, subnet: str, web_count: int):
        self.state_dir = state_dir
        self.port = port
        self.prefix = prefix
        self.subnet = subnet
        self.web_count = web_count
        self.cidr = str(ipaddress.ip_network(f"{subnet}.0/24"))
        self.instance_hosts: dict[str, str] = {}  # instance id -> host name
        self.host_roles: dict[str, tuple[str, str]] = {}  # host name -> (environment, role)
        self.apps_ready = False  # databases seeded: new web/worker hosts get the app at start
        self.stopping = False
        self.failed = False

    # ------------------------------------------------------------------ lifecycle

    def up(self) -> None:
        from fabflows.testing.moto_server import MotoServer

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._status("starting")
        self.moto = MotoServer(port=self.port).start()
        log.info("moto server on %s", self.moto.endpoint)
        self.net = TestNetwork(self.state_dir / "hosts", prefix=self.prefix, subnet=self.subnet)
        self._status("building images (first time: about 2 minutes)")
        self.net.setup()
        ensure_users_dir(self.state_dir / "users-private")
        self.apt = start_apt_repo(self.state_dir / "apt", self.net)
        self.config_path = write_config(self.state_dir, self.moto.endpoint, self.net)
        cfg = load_config(self.config_path)
        self._status("seeding AWS")
        self.result = seed_sandbox(self.moto.endpoint, cfg, self.subnet, self.web_count)
        self._status("starting hosts")
        self.reconcile()
        self._status("seeding databases")
        self._seed_databases(cfg)
        self._status("building db-replicas from their db-primary (streaming replication)")
        self._replicate_databases()
        self._status("provisioning the app on web and worker servers")
        self._provision_apps(cfg)
        self._status("ready")
        log.info("sandbox ready")

    def run_forever(self) -> None:
        while not self.stopping:
            time.sleep(1.0)
            try:
                self.reconcile()
                # starts requested by other processes (TestNetwork.load(...).start_again) run here,
                # in the owner's main thread
                self.net.serve_pending()
            except Exception:  # keep the sandbox alive; the next tick tries again
                log.exception("reconcile failed")

    def down(self) -> None:
        log.info("tearing down")
        try:
            self.net.teardown()
        finally:
            if getattr(self, "apt", None) is not None:
                self.apt.stop()
            self.moto.stop()
            self._status("failed" if self.failed else "stopped")

    # ------------------------------------------------------------------ reconcile

    def _ec2(self) -> Any:
        return boto3.client(
            "ec2",
            endpoint_url=self.moto.endpoint,
            region_name="us-east-1",
            aws_access_key_id="sandbox",
            aws_secret_access_key="sandbox",
        )

    def _instances(self) -> list[dict[str, Any]]:
        out = []
        for page in self._ec2().get_paginator("describe_instances").paginate():
            for r in page["Reservations"]:
                out.extend(r["Instances"])
        return out

    def reconcile(self) -> None:
        """Make the test hosts follow the instances' states."""
        to_start: list[HostSpec] = []
        net = ipaddress.ip_network(self.cidr)
        for inst in self._instances():
            iid, state = inst["InstanceId"], inst["State"]["Name"]
            ip = inst.get("PrivateIpAddress")
            if not ip or ipaddress.ip_address(ip) not in net:
                continue
            tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
            name = self.instance_hosts.get(iid)
            host = self.net.hosts.get(name) if name else None
            if state in ("pending", "running"):
                if host is None:
                    role = tags.get("role", "web").removesuffix("-PENDING")
                    env = tags.get("environment", "x")
                    name = f"{env[:4]}-{role}-{iid[-6:]}"
                    self.instance_hosts[iid] = name
                    image = "db" if role in DB_ROLES else "app" if role in APP_ROLES else "base"
                    to_start.append(HostSpec(name=name, ip=ip, image=image))
                    self.host_roles[name] = (env, role)
                elif not host.running:
                    log.info("instance %s started: starting host %s", iid, name)
                    self.net.start_again(name)
            elif state in ("stopping", "stopped"):
                if host is not None and host.running:
                    log.info("instance %s stopped: stopping host %s", iid, name)
                    self.net.stop(name)
            elif state in ("shutting-down", "terminated"):
                if host is not None:
                    log.info("instance %s terminated: destroying host %s", iid, name)
                    self.net.destroy(name)
                    self.instance_hosts.pop(iid, None)
        if to_start:
            log.info("starting %d host(s): %s", len(to_start), ", ".join(s.name for s in to_start))
            self.net.start(to_start)
            for spec in to_start:  # apt from the sandbox's repository, as for every new server
                self._prepare_apt(self.net.hosts[spec.name])
            if self.apps_ready:  # e.g. a web server the autoscaling group launched
                for spec in to_start:
                    env, role = self.host_roles.get(spec.name, ("", ""))
                    if role in APP_ROLES:
                        self._provision_app(self.net.hosts[spec.name], env, role)
                    elif role == "db-replica":
                        self._provision_replica(self.net.hosts[spec.name], env)
        self._save_map()

    def _seed_databases(self, cfg: Any) -> None:
        secrets_file = self.state_dir / "secrets.json"
        stored = json.loads(secrets_file.read_text()) if secrets_file.exists() else {}
        missing = [
            (env, name)
            for env in ENVIRONMENTS
            for name in ("database_password", "replication_password")
            if name not in stored.get(env, {})
        ]
        for env, name in missing:  # a secrets file from before replication gains its password
            stored.setdefault(env, {})[name] = secrets.token_urlsafe(18)
        if missing:
            secrets_file.write_text(json.dumps(stored))
            secrets_file.chmod(0o600)
        for env in self.result.environments:
            for iid in env.instance_ids.get("db-primary", []):
                host = self.net.hosts[self.instance_hosts[iid]]
                seed_database(
                    host,
                    database=f"{cfg.project}_{env.environment}",
                    owner=cfg.database_user,
                    password=stored[env.environment]["database_password"],
                    scale=sandbox_db_scale(),
                )

    def _env_hosts(self, environment: str, role: str) -> list[Any]:
        """The running hosts of ``role`` in ``environment`` (seeded or launched since)."""
        return [
            self.net.hosts[n]
            for n, (e, r) in sorted(self.host_roles.items())
            if e == environment and r == role and n in self.net.hosts
        ]

    def _replicate_databases(self) -> None:
        """Every db-replica streams from its environment's db-primary (sandbox/replication.py);
        the replication password comes from secrets.json, as the database password does."""
        from sandbox.replication import provision_replication

        stored = json.loads((self.state_dir / "secrets.json").read_text())
        for env in self.result.environments:
            primaries = self._env_hosts(env.environment, "db-primary")
            replicas = self._env_hosts(env.environment, "db-replica")
            if primaries and replicas:
                provision_replication(
                    primaries[0],
                    replicas,
                    stored[env.environment]["replication_password"],
                    home="/home/deploy",
                )

    def _provision_replica(self, host: Any, environment: str) -> None:
        """A db-replica launched after seeding: built from its environment's db-primary."""
        from sandbox.replication import provision_replication

        try:
            primaries = self._env_hosts(environment, "db-primary")
            if not primaries:
                return
            stored = json.loads((self.state_dir / "secrets.json").read_text())
            provision_replication(primaries[0], [host], stored[environment]["replication_password"])
        except Exception:  # the host still runs; the log says why it does not replicate
            log.exception("could not build %s as a replica", host.name)

    def _provision_apps(self, cfg: Any) -> None:
        """The Django app on every web and worker host (reload-production-db's stack): password
        file on the db-primary, app on workers, migrations, then web servers."""
        self.cfg = cfg
        for env in self.result.environments:
            hosts = {
                role: [
                    self.net.hosts[self.instance_hosts[iid]]
                    for iid in env.instance_ids.get(role, [])
                    if iid in self.instance_hosts
                ]
                for role in ("db-primary", "web", "worker")
            }
            # web servers the group launched since seeding are found by their role
            hosts["web"] = [
                self.net.hosts[n]
                for n, (e, r) in self.host_roles.items()
                if e == env.environment and r == "web" and n in self.net.hosts
            ]
            if not hosts["db-primary"]:
                continue
            provision_environment_app(
                hosts["db-primary"][0],
                hosts["web"],
                hosts["worker"],
                **self._app_settings(env.environment),
            )
        self.apps_ready = True

    def _app_settings(self, environment: str) -> dict[str, Any]:
        cfg = self.cfg
        stored = json.loads((self.state_dir / "secrets.json").read_text())
        return dict(
            environment=environment,
            db_name=f"{cfg.project}_{environment}",
            db_user=cfg.database_user,
            db_password=stored[environment]["database_password"],
            home="/home/deploy",
            server_port=cfg.server_ports.get(environment, 8000),
            pgbouncer_port=cfg.pgbouncer_port,
        )

    def _provision_app(self, host: Any, environment: str, role: str) -> None:
        try:
            settings = self._app_settings(environment)
            db_iid = next(
                (
                    iid
                    for e in self.result.environments
                    if e.environment == environment
                    for iid in e.instance_ids.get("db-primary", [])
                ),
                None,
            )
            db = self.net.hosts[self.instance_hosts[db_iid]] if db_iid else None
            if db is None:
                return
            settings.pop("environment")
            provision_app(host, role=role, environment=environment, db_host=db.ip, **settings)
        except Exception:  # the host still runs; the log says why it has no app
            log.exception("could not provision the app on %s", host.name)

    def _prepare_apt(self, host: Any) -> None:
        try:
            prepare_apt(host, self.apt)
        except Exception:  # the host still runs; upgrade-packages will say its apt is unusable
            log.exception("could not point apt at the sandbox's repository on %s", host.name)

    def _save_map(self) -> None:
        # atomically: `fabflows sandbox` commands and tests read it while the daemon runs
        path = self.state_dir / "instances.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.instance_hosts, indent=1))
        tmp.replace(path)

    def _status(self, status: str) -> None:
        data = {
            "pid": os.getpid(),
            "status": status,
            "endpoint": getattr(getattr(self, "moto", None), "endpoint", None),
            "config": str(self.state_dir / "fabflows.yaml"),
            "ssh_config": str(self.state_dir / "hosts" / "ssh_config"),
            "updated": time.time(),
        }
        tmp = self.state_dir / "daemon.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.state_dir / "daemon.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sandbox.daemon")
    p.add_argument("--state-dir", type=Path, default=default_state_dir())
    p.add_argument("--port", type=int, default=int(os.environ.get("FABFLOWS_SANDBOX_PORT", 45055)))
    p.add_argument("--prefix", default=os.environ.get("FABFLOWS_SANDBOX_PREFIX", "fs"))
    p.add_argument("--subnet", default=os.environ.get("FABFLOWS_SANDBOX_SUBNET", "10.201.0"))
    p.add_argument("--web-count", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    sandbox = Sandbox(args.state_dir.resolve(), args.port, args.prefix, args.subnet, args.web_count)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        sandbox.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        sandbox.up()
        sandbox.run_forever()
    except Exception:
        log.exception("sandbox failed")
        sandbox.failed = True
        sandbox._status("failed")
        return 1
    finally:
        if hasattr(sandbox, "net"):
            sandbox.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
