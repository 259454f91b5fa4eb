"""Remote commands on a real host: quoting, content on stdin, atomic writes, timeouts, dry form."""

from __future__ import annotations

import hashlib
import time

import pytest

from tasks.ssh.connection import SshOptions, connect
from tasks.ssh.remote import CommandError, Remote, atomic_write_argv, display

HOSTILE = "$(touch /tmp/pwned); `touch /tmp/pwned2` 'q' \"dq\" * ~ \\ \n|&;"


def test_display_is_quoted_and_hides_content() -> None:
    assert display(["echo", "a b", "$HOME"]) == "echo 'a b' '$HOME'"
    shown = display(["cat"], b"secret-ish content")
    assert "secret-ish" not in shown and "stdin(18 bytes, sha256" in shown
    with pytest.raises(ValueError, match="not an absolute path"):
        atomic_write_argv("etc/x", owner="root", group="root", mode=0o644, size=1)


@pytest.fixture
def remote(make_hosts, test_network):
    (host,) = make_hosts(["rm1"])
    opts = SshOptions(
        user="deploy",
        known_hosts_file=str(test_network.known_hosts),
        key_file=str(test_network.client_key),
        connect_timeout=3,
    )
    conn = connect(host.ip, opts)
    try:
        yield host, Remote(conn=conn, host=host.name, dry_run=False, command_timeout=20)
    finally:
        conn.close()


@pytest.mark.hosts
def test_arguments_are_never_interpreted_by_a_shell(remote) -> None:
    host, r = remote
    out = r.read(["printf", "%s", HOSTILE])
    assert out.stdout == HOSTILE
    out = r.read(["printf", "%s", HOSTILE], sudo=True)
    assert out.stdout == HOSTILE
    assert host.exec(["ls", "/tmp"]).stdout.split() == []


@pytest.mark.hosts
def test_atomic_write_owner_mode_and_stdin(remote) -> None:
    host, r = remote
    content = HOSTILE.encode() * 30000  # ~1 MB, shell metacharacters and all
    r.write_file("/etc/fabflows-test.conf", b"old\n", owner="root", group="root", mode=0o644)
    result = r.write_file(
        "/etc/fabflows-test.conf", content, owner="deploy", group="sudo", mode=0o640
    )
    assert result is not None and result.exit_code == 0
    assert host.exec(["stat", "-c", "%U:%G:%a", "/etc/fabflows-test.conf"]).stdout.strip() == (
        "deploy:sudo:640"
    )
    digest = host.exec(["sha256sum", "/etc/fabflows-test.conf"]).stdout.split()[0]
    assert digest == hashlib.sha256(content).hexdigest()
    assert not [f for f in host.exec(["ls", "-a", "/etc"]).stdout.split() if f.startswith(".fabf")]
    assert HOSTILE not in r.commands[-1] and "stdin(" in r.commands[-1]


@pytest.mark.hosts
def test_failed_write_leaves_no_temp_file(remote) -> None:
    host, r = remote
    with pytest.raises(CommandError, match="exited 1") as err:
        r.write_file("/etc/fabflows-x", b"x", owner="nosuchuser", group="root", mode=0o600)
    assert "invalid user" in err.value.stderr
    assert not [f for f in host.exec(["ls", "-a", "/etc"]).stdout.split() if f.startswith(".fabf")]
    assert host.exec(["test", "-e", "/etc/fabflows-x"], check=False).returncode == 1


@pytest.mark.hosts
def test_dry_run_records_and_does_not_run(remote) -> None:
    host, r = remote
    dry = Remote(conn=r.conn, host=r.host, dry_run=True)
    assert dry.write(["touch", "/var/tmp/dry"], sudo=True) is None
    assert dry.write_file("/var/tmp/dry2", b"x", owner="root", group="root", mode=0o600) is None
    assert dry.commands[0] == "sudo -n -- touch /var/tmp/dry"
    assert dry.read(["hostname"]).stdout.strip() == "rm1"  # reads still run
    assert host.exec(["ls", "/var/tmp"]).stdout.split() == []


@pytest.mark.hosts
def test_command_timeout_and_exit_codes(remote) -> None:
    _, r = remote
    started = time.monotonic()
    with pytest.raises(CommandError, match="timed out") as err:
        r.read(["sleep", "30"], timeout=1)
    assert err.value.timed_out and time.monotonic() - started < 3
    with pytest.raises(CommandError, match=r"`ls /nonexistent` exited 2: .*No such file"):
        r.read(["ls", "/nonexistent"])
    assert r.read(["sh", "-c", "exit 1"], ok_codes=(0, 1)).exit_code == 1
    assert r.read(["sudo", "-n", "true"]).exit_code == 0  # the connection is still usable


@pytest.mark.hosts
def test_batch_shares_stdin_and_stops_at_first_failure(remote) -> None:
    host, r = remote
    one, two = b"first file\n", HOSTILE.encode()
    steps = [
        (atomic_write_argv("/var/tmp/one", owner="root", group="root", mode=0o600, size=len(one)), one),
        (["install", "-d", "-m", "0750", "/var/tmp/dir"], None),
        (atomic_write_argv("/var/tmp/two", owner="deploy", group="deploy", mode=0o644, size=len(two)), two),
    ]  # fmt: skip
    assert r.write_batch(steps).exit_code == 0
    assert host.exec(["cat", "/var/tmp/one"]).stdout == one.decode()
    assert host.exec(["cat", "/var/tmp/two"]).stdout == HOSTILE
    assert host.exec(["stat", "-c", "%U:%a", "/var/tmp/two", "/var/tmp/dir"]).stdout.split() == [
        "deploy:644",
        "root:750",
    ]
    assert r.commands[-2] == "sudo -n -- install -d -m 0750 /var/tmp/dir"
    failing = [(["touch", "/var/tmp/a"], None), (["false"], None), (["touch", "/var/tmp/b"], None)]
    with pytest.raises(CommandError, match=r"`sudo -n -- false` exited 1"):
        r.write_batch(failing)
    assert _exists(host, "/var/tmp/a") and not _exists(host, "/var/tmp/b")
    short = [
        (atomic_write_argv("/var/tmp/c", owner="root", group="root", mode=0o600, size=99), b"x")
    ]
    with pytest.raises(CommandError, match="short input"):
        r.write_batch(short)
    assert not _exists(host, "/var/tmp/c")


def _exists(host, path: str) -> bool:
    return host.exec(["test", "-e", path], check=False).returncode == 0


@pytest.mark.hosts
def test_a_command_that_ends_without_reading_its_input_reports_its_own_error(remote) -> None:
    """sudo refusing (an unknown user, say) exits before reading stdin: the caller gets the exit
    code and stderr every time, never a send error that depends on who was faster."""
    _, r = remote
    big = b"x" * (4 << 20)
    for _ in range(3):
        with pytest.raises(CommandError) as info:
            r.read(["sh", "-c", "echo refused >&2; exit 3"], stdin=big)
        assert info.value.exit_code == 3 and "refused" in str(info.value)


@pytest.mark.hosts
def test_output_sent_after_the_exit_status_is_kept(remote) -> None:
    """sshd reports a command's exit as soon as it ends and sends what is still in its output
    after that: the output is read to EOF (a read once printed fewer lines than it should, with
    exit 0, in a loaded run). A background process that holds the output open costs a moment,
    not the command's timeout."""
    _, r = remote
    out = r.read(["sh", "-c", "(sleep 0.3; echo late) & echo early"])
    assert out.stdout.split() == ["early", "late"]
    started = time.monotonic()
    out = r.read(["sh", "-c", "sleep 30 & echo started"])
    assert out.stdout.split() == ["started"] and out.exit_code == 0
    assert time.monotonic() - started < 5
