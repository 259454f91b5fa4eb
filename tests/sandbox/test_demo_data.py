"""What the README's examples need from the sandbox: a users directory with working keys, and a
local apt repository that every host's apt points at (real test hosts, real apt)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sandbox.demo_data import APP_SERVER_PACKAGES, ensure_users_dir, prepare_apt, start_apt_repo
from tasks.ssh.users import load_users_dir


def test_users_dir_is_made_once_and_is_valid(tmp_path: Path) -> None:
    users_dir, private = tmp_path / "deployment" / "users", tmp_path / "private"
    assert ensure_users_dir(private, users_dir) == users_dir
    users = load_users_dir(users_dir)  # what update-sysadmin-users reads, validated
    assert [u.name for u in users] == ["alice", "bob"]
    assert users[0].gecos == "Alice Example" and users[1].gecos is None
    for user in users:
        key = private / user.name
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert b"PRIVATE KEY" in key.read_bytes()
    before = {p.name: p.read_text() for p in users_dir.iterdir()}
    ensure_users_dir(private, users_dir)  # an existing directory is kept as it is
    assert {p.name: p.read_text() for p in users_dir.iterdir()} == before


@pytest.mark.hosts
def test_hosts_apt_uses_the_sandbox_repository(make_hosts, test_network, tmp_path: Path) -> None:
    [host] = make_hosts(["dd-apt"])
    repo = start_apt_repo(tmp_path / "apt", test_network)
    try:
        prepare_apt(host, repo)
        assert host.exec(["dpkg-query", "-W", "-f", "${Version}", "fabflows-demo"]).stdout == "1.0"
        host.exec(["apt-get", "-q", "update"], timeout=120)
        upgrades = host.exec(["apt-get", "-s", "upgrade"]).stdout
        assert "Inst fabflows-demo [1.0] (2.0" in upgrades, upgrades
        install = host.exec(["apt-get", "-s", "install", *APP_SERVER_PACKAGES]).stdout
        assert "Inst fabflows-app-tools (1.0" in install, install
        sources = host.exec(["cat", "/etc/apt/sources.list"]).stdout
        assert sources == f"deb [trusted=yes] {repo.url.rstrip('/')}/ ./\n"
    finally:
        repo.stop()
