"""update-sysadmin-users for real: moto inventory, isolated test hosts at the instances' addresses,
the Prefect harness. The plan itself is table-tested in tests/tasks/ssh/test_users.py."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.logging import disable_run_logger

from config import load_config, resolve_environment
from fabflows.cli import render_result
from fabflows.runbook import load_context
from fabflows.runtime.engine import RunbookReport
from fabflows.testing.configs import SAMPLE, moto_section, write_config
from fabflows.testing.sshkeys import ed25519_pair, write_users_dir
from flows.update_sysadmin_users import (
    image_note,
    plan_update_sysadmin_users,
    render_plan,
    update_sysadmin_users,
)
from sandbox.aws_seed import seed
from sandbox.testhosts import HostSpec
from tasks.aws.autoscaling import AutoScalingGroup
from tasks.aws.ec2 import Server, describe_servers
from tasks.ssh.fleet import FleetHost, FleetResult, HostResult, hosts_from_servers
from tasks.ssh.users import MARKER_PATH, HostFacts, SysadminUser, build_spec, parse_public_key

ENV = resolve_environment(load_config(SAMPLE), "staging")
ALICE = ed25519_pair("alice")
SPEC = build_spec(
    [SysadminUser(name="alice", public_keys=[parse_public_key(ALICE.public)])],
    admin_groups=["sudo"],
    deploy_user="myproject",
    connect_user="myproject",
    connect_key=None,
    remove_unlisted=False,
)


def _server(n: int, role: str, state: str = "running", asg: str | None = None) -> Server:
    return Server(
        instance_id=f"i-{n}",
        name=f"{role}-{n}",
        role=role,
        deployment="myproject",
        environment="staging",
        instance_type="t3.small",
        state=state,
        private_ip_address=f"10.0.0.{n}",
        image_id="ami-old",
        auto_scaling_group=asg,
    )


def _facts(managed: list[str], with_alice: bool) -> HostFacts:
    from tasks.ssh.users import AccountFacts, FileFacts

    def acct(name: str, uid: int, keys: str) -> AccountFacts:
        return AccountFacts(
            name=name, uid=uid, gid=uid, primary_group=name, gecos="", home=f"/home/{name}",
            shell="/bin/bash", password="star", expired=False, groups=[name, "sudo"],
            ssh_dir=FileFacts(owner=name, group=name, mode=0o700, kind="directory"),
            authorized_keys=FileFacts(owner=name, group=name, mode=0o600, kind="regular file"),
            keys_content=keys,
        )  # fmt: skip

    accounts = {"myproject": acct("myproject", 1000, SPEC.deploy_keys())}
    if with_alice:
        accounts["alice"] = acct("alice", 1001, ALICE.public + "\n")
    if "bob" in managed:
        accounts["bob"] = acct("bob", 1002, "ssh-ed25519 AAAAbob bob\n")
    return HostFacts(
        marker_present=bool(managed), managed=managed, groups=["sudo"],
        nologin="/usr/sbin/nologin", accounts=accounts,
    )  # fmt: skip


def test_plan_over_servers_is_pure() -> None:
    servers = [
        _server(1, "web", asg="myproject-staging-ag"),
        _server(2, "worker"),
        _server(3, "cache"),
        _server(4, "db-primary", state="stopped"),
    ]
    hosts = [FleetHost(name=s.name, address=s.private_ip_address, role=s.role) for s in servers[:3]]
    gathered = FleetResult(
        name="list", dry_run=True, max_concurrency=3, error_budget=0, stopped=False,
        duration_s=0.1,
        results=[
            HostResult(status="unchanged", host="web-1", address="10.0.0.1", output=_facts([], False)),
            HostResult(status="unchanged", host="worker-2", address="10.0.0.2",
                       output=_facts(["alice", "bob"], True)),
            HostResult(status="failed", host="cache-3", address="10.0.0.3",
                       message="unreachable: timed out"),
        ],
    )  # fmt: skip
    group = AutoScalingGroup(
        auto_scaling_group_name="myproject-staging-ag", min_size=1, desired_capacity=1,
        max_size=2, launch_template="lt-web", launch_template_version="3",
    )  # fmt: skip
    plan = plan_update_sysadmin_users(ENV, SPEC, servers, hosts, gathered, group)
    assert [h.status for h in plan.hosts] == ["would change", "would change", "unreachable"]
    assert plan.not_reached == ["db-primary-4 (i-4) (stopped)"]
    assert plan.destructive  # bob is managed on worker-2 and no longer listed: locked
    assert [h.host for h in plan.blocked] == ["cache-3"]
    assert "ami-old" in plan.image_note and "lt-web (version 3)" in plan.image_note
    md = render_plan(plan)
    assert "## web-1 (1 host(s))" in md and "sudo -n -- useradd" in md
    assert "bob: lock" in md and "not updated (not running): db-primary-4" in md
    assert ALICE.public.split()[1] not in md  # keys are on stdin: only size and digest shown
    assert plan.approved()["10.0.0.2"] == [c.summary for c in plan.hosts[1].changes]


def test_no_image_note_without_changes() -> None:
    servers = [_server(1, "web", asg="myproject-staging-ag")]
    hosts = [FleetHost(name="web-1", address="10.0.0.1")]
    gathered = FleetResult(
        name="list", dry_run=True, max_concurrency=1, error_budget=0, stopped=False,
        duration_s=0.1,
        results=[HostResult(status="unchanged", host="web-1", address="10.0.0.1",
                            output=_facts(["alice"], True))],
    )  # fmt: skip
    plan = plan_update_sysadmin_users(ENV, SPEC, servers, hosts, gathered, None)
    assert plan.hosts[0].status == "unchanged" and plan.image_note is None
    assert not plan.destructive


def test_report_text_is_the_compact_plan_and_tells_same_named_servers_apart() -> None:
    """Two web servers share a Name tag: plan, table and text name each with its instance id; the
    terminal text lists keys by type, size and digest, never the key, and names deploy-serial."""
    servers = [
        _server(1, "web", asg="myproject-staging-ag").model_copy(update={"name": "web"}),
        _server(2, "web", asg="myproject-staging-ag").model_copy(update={"name": "web"}),
    ]
    hosts = hosts_from_servers(servers, "private_ip_address")
    gathered = FleetResult(
        name="list", dry_run=True, max_concurrency=2, error_budget=0, stopped=False,
        duration_s=0.1,
        results=[
            HostResult(status="unchanged", host=h.label, address=h.address,
                       output=_facts([], False))
            for h in hosts
        ],
    )  # fmt: skip
    plan = plan_update_sysadmin_users(ENV, SPEC, servers, hosts, gathered, None)
    assert [h.host for h in plan.hosts] == ["web (i-1)", "web (i-2)"]
    report = RunbookReport(
        flow="update-sysadmin-users", environment=ENV.label, dry_run=True,
        outcome="dry run: would apply 1 step(s)", plan_text=plan.render_text(),
    )  # fmt: skip
    note = image_note(ENV, servers, None, True)
    text = render_result(report)  # exactly what `fabflows run` prints
    key = parse_public_key(ALICE.public)
    assert f"- alice: ssh-ed25519 256 {key.fingerprint}" in text
    assert key.blob not in text and "argv:" not in text and "stdin:" not in text
    assert "## " not in text and "```" not in text and "**" not in text  # plain text, not markdown
    assert "web (i-1), web (i-2) (2 host(s))" in text
    assert "web (i-1)" in render_plan(plan) and "web (i-2)" in render_plan(plan)
    assert "< stdin(" in text  # keys travel on stdin: shown by size and digest
    assert "run deploy-serial" in note and "later runbook" not in note
    assert len(text.splitlines()) < 40, text


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


@pytest.mark.hosts
@pytest.mark.flow
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
    # 5 servers, 25% at a time: 3 batches (one engine step each)
    assert report.dry_run and report.outcome == "dry run: would apply 3 step(s)"
    assert report.plan_text.count("would change") == 5
    text = report.render_text()  # what `fabflows run` prints: the compact plan, no key material
    assert "STALE" in text and "myproject-staging-ag" in text
    assert alice.public.split()[1] not in text and "stdin:" not in text
    assert f"alice: ssh-ed25519 256 {parse_public_key(alice.public).fingerprint}" in text
    assert all(f"{s.name} ({s.instance_id})" in text for s in servers)
    assert len(text.splitlines()) < 80, text
    assert all(h.exec(["getent", "passwd", "alice"], check=False).returncode == 2 for h in hosts)

    state = _run(path, users, dry_run=False, max_concurrency="100%")
    assert state.is_completed(), state.message
    report = state.result()
    assert report.details["Verified"] == "yes" and report.outcome == "applied 1 step(s)"
    assert [s.state for s in report.steps] == ["done"]
    assert report.steps[0].summary.count(": changed") == 5
    for h in hosts:
        assert h.exec(["getent", "passwd", "alice"]).stdout.startswith("alice:")

    state = _run(path, users, dry_run=False)
    assert state.is_completed(), state.message
    assert state.result().outcome == "nothing to change"
    assert state.result().plan_text.count("already as listed") == 5


def _artifact_keys() -> set[str]:
    import asyncio

    async def keys() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts() if a.key}

    return asyncio.run(keys())


@pytest.mark.hosts
@pytest.mark.flow
def test_unreachable_server_stops_before_any_change(
    prefect_server, staging, test_network, tmp_path: Path
) -> None:
    path, hosts, servers = staging
    users = write_users_dir(tmp_path / "users", {"alice": ed25519_pair()})
    test_network.kill_sshd(hosts[0].name)
    state = _run(path, users, dry_run=False)
    assert state.is_failed()
    assert "stopped before any change" in state.message
    label = f"{servers[0].name} ({servers[0].instance_id})"
    assert f"{label} ({hosts[0].ip}): unreachable: connection refused" in state.message
    assert all(h.exec(["test", "-e", MARKER_PATH], check=False).returncode == 1 for h in hosts)
    assert "update-sysadmin-users-myproject-staging-plan" in _artifact_keys()
