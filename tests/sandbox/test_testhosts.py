"""Isolated test hosts (sandbox/testhosts.py) against the real thing: no mocks.

The module starts its own network (prefix ``tt``, 10.204.0.0/24) with two base hosts and one db
host; the tests run in file order and the last one tears the network down and checks that
nothing is left behind.
"""

from __future__ import annotations

import http.client
import os
import pwd
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import paramiko
import psycopg
import pytest

from fabflows.testing.hosts_fixtures import fail_without_prerequisites
from sandbox.replication import wait_for_postgres
from sandbox.testhosts import (
    DEFAULT_USER,
    HostSpec,
    TestHost,
    TestHostError,
    TestNetwork,
    ensure_image,
    image_dir,
)

pytestmark = pytest.mark.hosts

PREFIX = "tt"
SUBNET = "10.204.0"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):
    fail_without_prerequisites()
    network = TestNetwork(tmp_path_factory.mktemp("tt"), prefix=PREFIX, subnet=SUBNET)
    network.setup()
    try:
        yield network
    finally:
        network.teardown()


@pytest.fixture(scope="module")
def hosts(net: TestNetwork) -> dict[str, TestHost]:
    started = net.start(
        [
            HostSpec("web1", f"{SUBNET}.2"),
            HostSpec("web2", f"{SUBNET}.3"),
            HostSpec("db1", f"{SUBNET}.4", "db"),
        ]
    )
    return {h.name: h for h in started}


def ssh(net: TestNetwork, name: str, command: str, check: bool = True):
    return subprocess.run(
        ["ssh", "-F", str(net.ssh_config()), name, command],
        capture_output=True,
        text=True,
        timeout=30,
        check=check,
        stdin=subprocess.DEVNULL,
    )


def connect(net: TestNetwork, host: TestHost, known_hosts: Path | None = None):
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts or net.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        host.ip,
        username=DEFAULT_USER,
        key_filename=str(net.client_key),
        look_for_keys=False,
        allow_agent=False,
        timeout=5,
        banner_timeout=5,
        auth_timeout=5,
    )
    return client


def run(client: paramiko.SSHClient, command: str) -> tuple[int, str]:
    _, stdout, _ = client.exec_command(command, timeout=20)
    out = stdout.read().decode()
    return stdout.channel.recv_exit_status(), out


def http_get(ip: str, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(ip, 80, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def served_host_key(ip: str) -> str:
    with socket.create_connection((ip, 22), timeout=5) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=5)
            key = transport.get_remote_server_key()
            return f"{key.get_name()} {key.get_base64()}"
        finally:
            transport.close()


def test_images_are_cached_with_marker():
    for variant in ("base", "db"):
        root = ensure_image(variant)
        assert root == image_dir(variant) / "rootfs"
        assert (root.parent / ".complete").exists()
        assert not list((root / "etc" / "ssh").glob("ssh_host_*")), "host keys must not be baked"
        shadow = (root / "etc" / "shadow").read_text()
        assert f"{DEFAULT_USER}:*:" in shadow


def test_openssh_client_with_generated_ssh_config(net, hosts):
    for name, host in hosts.items():
        out = ssh(net, name, "hostname; hostname -I; id -u; sudo -n whoami").stdout.split()
        assert out == [name, host.ip, "1000", "root"]
    config = net.ssh_config().read_text()
    assert "StrictHostKeyChecking yes" in config
    assert f"UserKnownHostsFile {net.known_hosts}" in config


def test_paramiko_reject_policy_with_known_hosts(net, hosts, tmp_path):
    client = connect(net, hosts["web1"])
    try:
        assert run(client, "sudo -n whoami") == (0, "root\n")
        assert run(client, "sudo -n -u postgres true")[0] != 0  # no postgres user on base
    finally:
        client.close()
    db = connect(net, hosts["db1"])
    try:
        assert run(db, "sudo -n -u postgres whoami") == (0, "postgres\n")
    finally:
        db.close()
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        connect(net, hosts["web1"], known_hosts=empty)
    # Another host's key under web1's address must be refused.
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"{hosts['web1'].ip} {' '.join(hosts['web2'].host_key.split()[:2])}\n")
    with pytest.raises(paramiko.BadHostKeyException):
        connect(net, hosts["web1"], known_hosts=wrong)


def test_hosts_are_isolated(net, hosts):
    ssh(net, "web1", "sudo useradd --create-home isolation-check")
    assert hosts["web1"].exec(["getent", "passwd", "isolation-check"]).returncode == 0
    assert "isolation-check" in (hosts["web1"].upper / "etc" / "passwd").read_text()
    assert hosts["web2"].exec(["getent", "passwd", "isolation-check"], check=False).returncode == 2
    assert hosts["db1"].exec(["getent", "passwd", "isolation-check"], check=False).returncode == 2
    with pytest.raises(KeyError):
        pwd.getpwnam("isolation-check")
    base = ensure_image("base")
    assert "isolation-check" not in (base / "etc" / "passwd").read_text()
    # Groups the runbooks add sysadmins to, and each host's own hostname.
    assert hosts["web2"].exec(["getent", "group", "admin", "sudo"]).stdout.count("\n") == 2
    assert hosts["web2"].exec(["hostname"]).stdout.strip() == "web2"
    assert (hosts["web2"].root() / "etc" / "hostname").read_text() == "web2\n"


def test_nginx_serves_each_host_separately(net, hosts):
    for host in hosts.values():
        host.wait_for_port(80, timeout=15)
    page = hosts["web1"].root() / "var" / "www" / "html" / "which.html"
    page.write_text("web1 page\n")
    assert http_get(hosts["web1"].ip, "/which.html") == (200, "web1 page\n")
    assert http_get(hosts["web2"].ip, "/which.html")[0] == 404
    # supervisord calls it RUNNING after startsecs (1 s), which may be after port 80 opens.
    deadline = time.monotonic() + 10
    while "RUNNING" not in (status := ssh(net, "web1", "sudo supervisorctl status nginx").stdout):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)


def test_postgres_on_db_host(net, hosts):
    db = hosts["db1"]
    wait_for_postgres(db, timeout=20)
    out = ssh(net, "db1", "sudo -u postgres psql -tAc 'select 1'").stdout
    assert out.strip() == "1"
    db.exec(
        ["runuser", "-u", "postgres", "--", "psql", "-q", "-c"]
        + ["CREATE ROLE app LOGIN PASSWORD 'app-secret'"]
    )
    with psycopg.connect(
        host=db.ip,
        port=5432,
        user="app",
        password="app-secret",
        dbname="postgres",
        connect_timeout=5,
    ) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.execute("show fsync").fetchone() == ("off",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host=db.ip, user="app", password="wrong", dbname="postgres", connect_timeout=5
        )


def test_stop_and_start_again_keep_disk_and_host_key(net, hosts):
    web2, db = hosts["web2"], hosts["db1"]
    ssh(net, "web2", "echo kept > ~/kept.txt")
    wait_for_postgres(db, timeout=20)
    db.exec(["runuser", "-u", "postgres", "--", "psql", "-q", "-c", "CREATE TABLE kept (x int)"])
    keys = {h.name: served_host_key(h.ip) for h in (web2, db)}
    old_pids = {h.name: h.pid for h in (web2, db)}

    for host in (web2, db):
        net.stop(host.name, graceful=host is db)  # web2: a power cut; db1: a clean shutdown
        assert not host.running and host.pid is None
        with pytest.raises(OSError):  # like a stopped instance: nothing answers
            socket.create_connection((host.ip, 22), timeout=0.5).close()

    assert (web2.upper / "home" / DEFAULT_USER / "kept.txt").read_text() == "kept\n"
    for host in (web2, db):
        net.start_again(host.name)
        assert host.running and host.pid not in (None, old_pids[host.name])
        assert served_host_key(host.ip) == keys[host.name]

    assert ssh(net, "web2", "cat ~/kept.txt; hostname").stdout.split() == ["kept", "web2"]
    wait_for_postgres(db, timeout=20)
    out = ssh(net, "db1", "sudo -u postgres psql -tAc 'select count(*) from kept'").stdout
    assert out.strip() == "0"
    log = ssh(net, "db1", "sudo cat /var/log/supervisor/postgresql.log").stdout
    assert "received fast shutdown request" in log  # supervisord's stopsignal=INT
    assert "automatic recovery" not in log  # a clean shutdown, no crash recovery


def test_destroy_removes_everything_of_the_host(net, hosts):
    (tmp,) = net.start([HostSpec("tmp1", f"{SUBNET}.20")])
    assert f"{tmp.ip} ssh-ed25519" in net.known_hosts.read_text()
    netns, veth, hostdir = tmp.netns, tmp.veth, tmp.dir
    net.destroy("tmp1")
    assert "tmp1" not in net.hosts
    assert (
        netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert veth not in links.split()
    assert not hostdir.exists()
    assert f"{tmp.ip} " not in net.known_hosts.read_text()
    assert "Host tmp1" not in net.ssh_config().read_text()
    # The address can be used again at once (fixed MAC per address, no stale ARP entry).
    (again,) = net.start([HostSpec("tmp2", f"{SUBNET}.20")])
    assert ssh(net, "tmp2", "hostname").stdout.strip() == "tmp2"
    net.destroy(again.name)


def test_partition_makes_connects_time_out(net, hosts):
    web1 = hosts["web1"]
    client = connect(net, web1)
    try:
        net.partition("web1")
        with pytest.raises(TimeoutError):
            socket.create_connection((web1.ip, 22), timeout=1.5).close()
        # Other hosts are not affected.
        socket.create_connection((hosts["web2"].ip, 22), timeout=2).close()
    finally:
        net.heal("web1")
    assert run(client, "hostname") == (0, "web1\n")  # the open connection survives a short cut
    client.close()
    assert ssh(net, "web1", "hostname").stdout.strip() == "web1"


def test_kill_sshd_only_on_that_host(net, hosts):
    web2 = hosts["web2"]
    web2.wait_for_port(80)
    killed = net.kill_sshd("web2")
    assert killed
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection((web2.ip, 22), timeout=1).close()
            time.sleep(0.05)
        except ConnectionRefusedError:
            break
    else:
        pytest.fail("sshd still accepting connections after kill_sshd")
    assert http_get(web2.ip, "/")[0] == 200  # the host itself is still up
    assert ssh(net, "web1", "hostname").stdout.strip() == "web1"  # other hosts keep sshd
    net.start_sshd("web2")
    assert ssh(net, "web2", "hostname").stdout.strip() == "web2"


def test_other_process_drives_hosts_through_state_file(net, hosts):
    """A CLI process stops and starts a host that this (owning) process launched."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from sandbox.testhosts import TestNetwork
        net = TestNetwork.load({str(net.state_dir)!r})
        assert not net.is_owner
        net.stop("web2")
        assert not net.hosts["web2"].running
        host = net.start_again("web2")
        assert host.running, host
        print("pid", host.pid)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        net.serve_pending()  # the owner launches what the other process asked for
        time.sleep(0.05)
    out, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    assert hosts["web2"].running
    assert out.split() == ["pid", str(hosts["web2"].pid)]
    assert ssh(net, "web2", "cat ~/kept.txt").stdout.strip() == "kept"


def test_make_hosts_fixture(make_hosts, test_network):
    from fabflows.testing.hosts_fixtures import TEST_SUBNET

    web, db = make_hosts(["fx-web", HostSpec("fx-db", f"{TEST_SUBNET}.50", "db")])
    assert web.ip.startswith(f"{TEST_SUBNET}.")
    assert ssh(test_network, "fx-web", "hostname").stdout.strip() == "fx-web"
    assert db.exec(["hostname"]).stdout.strip() == "fx-db"


def test_bad_specs_are_refused(net):
    with pytest.raises(ValueError, match="valid hostname"):
        net.start([HostSpec("Bad_Name", f"{SUBNET}.30")])
    with pytest.raises(ValueError, match="not a host address"):
        net.start([HostSpec("ok", f"{SUBNET}.1")])
    with pytest.raises(ValueError, match="not a host address"):
        net.start([HostSpec("ok", "10.203.0.9")])
    with pytest.raises(TestHostError, match="no host named"):
        net.stop("nosuchhost")


def _leftovers(prefix: str, state_dir: Path) -> list[str]:
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {n.split()[0]}" for n in netns.splitlines() if n.startswith(f"{prefix}-")]
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split()[0].split("@")[0]
        if name == f"{prefix}br0" or (name.startswith(f"{prefix}v") and name[3:].isdigit()):
            found.append(f"link {name}")
    for line in Path("/proc/mounts").read_text().splitlines():
        target = line.split()[1]
        if str(state_dir) in target or f"/run/netns/{prefix}-" in target:
            found.append(f"mount {target}")
    if (state_dir / "hosts").exists() and any((state_dir / "hosts").iterdir()):
        found.append(f"dir {state_dir / 'hosts'}")
    return found


def test_teardown_and_crash_reaping_leave_nothing(net, hosts, tmp_path):
    assert _leftovers(PREFIX, net.state_dir)  # the hosts are there before
    t = time.monotonic()
    net.teardown()
    print(f"teardown of {PREFIX}: {time.monotonic() - t:.2f} s")
    assert _leftovers(PREFIX, net.state_dir) == []
    assert net.hosts == {}

    # A run that dies by SIGKILL: PDEATHSIG kills its hosts, reap_stale() removes the rest.
    crashed = tmp_path / "crashed"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from sandbox.testhosts import HostSpec, TestNetwork
        net = TestNetwork(Path({str(crashed)!r}), prefix={PREFIX!r}, subnet={SUBNET!r})
        net.setup()
        (h,) = net.start([HostSpec("crash1", "{SUBNET}.40")])
        print(h.pid, flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        host_pid = int(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{host_pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{host_pid}"), "host outlived its launcher"
    assert _leftovers(PREFIX, crashed)  # netns, veth, bridge and dir remain

    reaper = TestNetwork(tmp_path / "reaper", prefix=PREFIX, subnet=SUBNET)
    reaper.reap_stale()
    assert _leftovers(PREFIX, crashed) == []
