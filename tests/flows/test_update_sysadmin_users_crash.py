"""SIGKILL update-sysadmin-users between servers, run recover-environment, and check on the real
test hosts that every server is either exactly as before the run or exactly as planned (accounts,
shadow entries, sudo group, authorized_keys, the managed-accounts marker); then resume the run and
check it finishes the servers not yet done without redoing the others.

One staging (moto inventory, five test hosts) serves the three kill points, one after the other:
each run changes the users directory, so "before" and "planned" differ on every server.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from config import load_config
from fabflows.runbook import load_context
from fabflows.runtime.journal import Journal
from fabflows.testing import faults
from fabflows.testing.configs import moto_section, write_config
from fabflows.testing.sshkeys import ed25519_pair, write_users_dir
from flows.recover_environment import recover_environment
from flows.resume_run import resume_run
from sandbox.aws_seed import seed
from sandbox.testhosts import HostSpec
from tasks.aws.ec2 import describe_servers

pytestmark = [pytest.mark.hosts, pytest.mark.flow]

SNAPSHOT = r"""
cat /etc/fabflows/sysadmin-users 2>/dev/null; echo '-- passwd'
getent passwd | awk -F: '$3>=1000 && $3<65534'; echo '-- shadow'
getent shadow | awk -F: '{print $1":"$2":"$8}'; echo '-- sudo'
getent group sudo; echo '-- keys'
for h in /home/*; do echo "$h"; cat "$h/.ssh/authorized_keys" 2>/dev/null; done
"""
"""What update-sysadmin-users changes on a server (and nothing that changes by itself)."""


@pytest.fixture
def staging(aws, test_network, make_hosts, tmp_path: Path):
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
    hosts = make_hosts([HostSpec(f"uc{i}", s.private_ip_address) for i, s in enumerate(servers)])
    return path, hosts, servers


def _snapshot(hosts) -> list[str]:
    return [h.exec(["sh", "-c", SNAPSHOT]).stdout for h in hosts]


def _kill_at(path: Path, users: Path, where: str, tmp_path: Path) -> None:
    """Run update-sysadmin-users (applying, one server at a time) in a process of its own and
    SIGKILL it at ``where``."""
    faults.run_until_paused(
        "update-sysadmin-users",
        where,
        ["-e", "staging", "-c", str(path), "--apply", "--users-dir", str(users)]
        + ["--max-concurrency", "1"],
        tmp_path / f"paused-{where.replace(':', '-')}",
        timeout=300,
        env={"FABFLOWS_PROGRESS_BAR": "0"},
    )


def test_killed_between_servers_each_server_is_old_or_new_then_resume_finishes(
    prefect_server, staging, tmp_path: Path
) -> None:
    path, hosts, servers = staging
    ids = [s.instance_id for s in servers]  # one step per server, in this order
    alice, bob = ed25519_pair("alice"), ed25519_pair("bob")
    cases = [
        ({"alice": alice}, f"users-{ids[0]}:after", 1),  # after the first server
        ({"alice": alice, "bob": bob}, f"users-{ids[2]}", 2),  # before the third
        ({"bob": bob}, f"users-{ids[-1]}:after", len(ids)),  # alice locked; after the last
    ]
    journal = Journal.for_environment("myproject/staging", load_config(path))
    for n, (listed, where, done) in enumerate(cases):
        users = write_users_dir(tmp_path / f"users{n}", listed)
        before = _snapshot(hosts)
        _kill_at(path, users, where, tmp_path)
        (dead,) = [e for e in journal.open_entries() if e.flow == "update-sysadmin-users"]
        assert len(dead.done_steps) == done, dead.describe()

        report = recover_environment(environment="staging", config=str(path), dry_run=False)
        assert report.outcome == "nothing to change", report.render_text()  # accounts are data
        assert f"users-{ids[0]}: accounts and keys are data" in report.render_text()
        middle = _snapshot(hosts)

        resumed = resume_run(
            environment="staging", run_id=dead.run_id, config=str(path), dry_run=False
        )
        assert resumed.outcome.startswith("applied"), resumed.render_text()
        assert resumed.details["Verified"] == "yes"
        after = _snapshot(hosts)
        # every server, after the kill and recover, is exactly as before or exactly as planned
        for host, b, m, a in zip(hosts, before, middle, after, strict=True):
            assert b != a, f"{host.name}: the run plans no change here"
            assert m in (b, a), f"{host.name} is half-changed after the kill:\n{m}"
        assert sum(m == a for m, a in zip(middle, after, strict=True)) == done
        # the resumed run did not touch the servers already done
        ran = [s.name for s in resumed.steps if s.state == "done"]
        assert ran == [f"users-{i}" for i in ids[done:]]
        assert journal.entry(dead.run_id).state == "done"
