"""The sandbox daemon for real: moto + one isolated host per instance, following EC2 states."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from config import load_config
from fabflows.runbook import load_context
from tasks.aws.ec2 import describe_servers
from tasks.ssh.connection import SshOptions, connect

pytestmark = pytest.mark.hosts
ROOT = Path(__file__).resolve().parents[2]
PREFIX, SUBNET = "tsb", "10.206.0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _links() -> str:
    return subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout


def test_sandbox_follows_ec2_and_leaves_nothing_behind(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the sandbox needs root (network namespaces, overlay mounts)"
    state = tmp_path / "sandbox"
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sandbox.daemon",
            "--state-dir",
            str(state),
            "--port",
            str(_free_port()),
            "--prefix",
            PREFIX,
            "--subnet",
            SUBNET,
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def ready():
            if proc.poll() is not None:
                raise AssertionError(
                    "daemon died:\n" + (tmp_path / "daemon.log").read_text()[-3000:]
                )
            try:
                return json.loads((state / "daemon.json").read_text())["status"] == "ready"
            except (FileNotFoundError, json.JSONDecodeError):
                return False

        _wait(ready, 600, "the sandbox to be ready")
        config = str(state / "fabflows.yaml")
        ctx = load_context("staging", config=config)
        with disable_run_logger():
            servers = describe_servers.fn(ctx.creds, "myproject", "staging")
        assert sorted(s.role for s in servers) == [
            "cache",
            "db-primary",
            "db-replica",
            "web",
            "web",
            "worker",
        ]

        # flows reach every instance at its address over SSH, host keys checked
        cfg = load_config(config)
        opts = SshOptions.from_settings(cfg.fabflows.ssh, cfg.deploy_user)
        primary = next(s for s in servers if s.role == "db-primary")
        conn = connect(primary.address(ctx.env.address_attribute), opts)
        out = conn.sudo(
            "psql -Atc 'select count(*) from auth_user' myproject_staging", user="postgres"
        ).stdout.strip()
        conn.close()
        assert int(out) == 2000

        # the db-replica streams from the db-primary and holds the same data
        replica = next(s for s in servers if s.role == "db-replica")
        conn = connect(replica.address(ctx.env.address_attribute), opts)
        status = conn.sudo(
            "psql -Atc 'select status, sender_host from pg_stat_wal_receiver'", user="postgres"
        ).stdout.strip()
        rows = conn.sudo(
            "psql -Atc 'select count(*) from auth_user' myproject_staging", user="postgres"
        ).stdout.strip()
        conn.close()
        assert status == f"streaming|{primary.private_ip_address}"
        assert int(rows) == 2000
        # its password lives in the sandbox's secrets only, never in the log
        stored = json.loads((state / "secrets.json").read_text())
        assert (
            stored["staging"]["replication_password"] not in (tmp_path / "daemon.log").read_text()
        )

        # stopping the instance stops its host; starting it brings it back with its disk
        worker = next(s for s in servers if s.role == "worker")
        ec2 = ctx.creds.get_client("ec2")
        ec2.stop_instances(InstanceIds=[worker.instance_id])
        hosts_state = state / "hosts" / "state.json"

        def host_pid():
            instances = json.loads((state / "instances.json").read_text())
            hosts = json.loads(hosts_state.read_text())["hosts"]
            entry = (
                hosts[instances[worker.instance_id]]
                if isinstance(hosts, dict)
                else next(h for h in hosts if h["name"] == instances[worker.instance_id])
            )
            return entry.get("pid")

        _wait(lambda: host_pid() is None, 20, "the worker's host to stop")
        with pytest.raises(OSError):
            socket.create_connection((worker.private_ip_address, 22), timeout=1).close()
        ec2.start_instances(InstanceIds=[worker.instance_id])
        _wait(lambda: host_pid() is not None, 20, "the worker's host to start again")
        conn = connect(worker.private_ip_address, opts)
        assert conn.run("hostname", hide=True).stdout.strip().endswith(worker.instance_id[-6:])
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{PREFIX}-" not in netns
    assert f"{PREFIX}br0" not in _links()
    assert str(state) not in Path("/proc/mounts").read_text()
