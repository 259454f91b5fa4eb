"""update-sysadmin-users for real: moto inventory, isolated test hosts at the instances' addresses,
the Prefect harness. The plan itself is table-tested in tests/tasks/ssh/test_users.py."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.logging import disable_run_logger

from config import load_config
from fabflows.runbook import load_context
from fabflows.testing.configs import moto_section, write_config
from fabflows.testing.sshkeys import ed25519_pair, write_users_dir
from flows.update_sysadmin_users import update_sysadmin_users
from sandbox.aws_seed import seed
from sandbox.testhosts import HostSpec
from tasks.aws.ec2 import describe_servers
from tasks.ssh.users import MARKER_PATH

pytestmark = [pytest.mark.hosts, pytest.mark.flow]


@pytest.fixture
def staging(aws, test_network, make_hosts, tmp_path: Path):
    """Staging in moto (4 roles + 1 autoscaled web) with a real test host at every address."""
    subnet = test_network.subnet
    section = moto_section(aws.endpoint)
    section["ssh"] = {
        "identity_file": str(test_network.client_key),
        "known_hosts_file": str(test_network.known_hosts),
        "address_attribute": "private_ip_address",
        "connect_timeout": 3,
    }
    path = write_config(tmp_path, fabflows=section, deploy_user="deploy", home="/home/deploy")
    cfg = load_config(path)
    seed(
        aws.endpoint,
        cfg,
        ["staging"],
        f"{subnet}.0/24",
        (f"{subnet}.{n}" for n in itertools.count(200)),
        web_count=1,
    )
    with disable_run_logger():
        creds = load_context("staging", config=str(path)).creds
        servers = describe_servers.fn(creds, "myproject", "staging")
    hosts = make_hosts([HostSpec(f"su{i}", s.private_ip_address) for i, s in enumerate(servers)])
    return path, hosts, servers


def _run(path: Path, users: Path, **kw):
    return update_sysadmin_users(
        environment="staging", config=str(path), users_dir=str(users), return_state=True, **kw
    )


def test_dry_run_apply_and_again(prefect_server, staging, tmp_path: Path) -> None:
    path, hosts, servers = staging
    assert len(hosts) == 5 and {s.role for s in servers} >= {"web", "worker", "db-primary"}
    alice = ed25519_pair("alice")
    users = write_users_dir(tmp_path / "users", {"alice": alice, "bob": ed25519_pair()})

    bad = write_users_dir(tmp_path / "bad", {"alice": alice, "root": ed25519_pair()})
    state = _run(path, bad, dry_run=False)
    assert state.is_failed() and "'root' is reserved" in state.message
    assert all(h.exec(["test", "-e", MARKER_PATH], check=False).returncode == 1 for h in hosts)

    state = _run(path, users)  # dry run (the default)
    assert state.is_completed(), state.message
    report = state.result()
    assert report.dry_run and len(report.plan.changing) == 5
    assert "STALE" in report.image_note and "myproject-staging-ag" in report.image_note
    assert all(h.exec(["getent", "passwd", "alice"], check=False).returncode == 2 for h in hosts)

    state = _run(path, users, dry_run=False, max_concurrency="100%")
    assert state.is_completed(), state.message
    report = state.result()
    assert report.verified and len(report.applied.changed) == 5
    for h in hosts:
        assert h.exec(["getent", "passwd", "alice"]).stdout.startswith("alice:")

    state = _run(path, users, dry_run=False)
    assert state.is_completed(), state.message
    assert state.result().outcome == "nothing to change: 5 server(s) already as listed"


def _artifact_keys() -> set[str]:
    import asyncio

    async def keys() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts() if a.key}

    return asyncio.run(keys())


def test_unreachable_server_stops_before_any_change(
    prefect_server, staging, test_network, tmp_path: Path
) -> None:
    path, hosts, servers = staging
    users = write_users_dir(tmp_path / "users", {"alice": ed25519_pair()})
    test_network.kill_sshd(hosts[0].name)
    state = _run(path, users, dry_run=False)
    assert state.is_failed()
    assert "stopped before any change" in state.message
    assert f"{servers[0].name} ({hosts[0].ip}): unreachable: connection refused" in state.message
    assert all(h.exec(["test", "-e", MARKER_PATH], check=False).returncode == 1 for h in hosts)
    assert "update-sysadmin-users-myproject-staging-plan" in _artifact_keys()
