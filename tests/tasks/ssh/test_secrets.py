"""Secret files over SFTP on real test hosts, and the pure parts (paths, templates) as tables."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretBytes, SecretStr

from config import EnvironmentConfig, resolve_environment
from config.models import FabulawsConfig, SecretFileSettings
from fabflows.testing.configs import SAMPLE
from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.remote import CommandError, Remote
from tasks.ssh.secrets import (
    DEFAULT_FILES,
    BadTemplate,
    Fingerprint,
    StagedFile,
    backed_up,
    check_remote_path,
    commit,
    describe_files,
    read_files,
    render_file,
    resolve_files,
    restore,
    run_with_secret,
    secret_from_file,
    secret_path,
    stage_files,
    swap_in,
    template_context,
)

TRICKY = "pw 'q\" $HOME `id` \\ $(id) ;|&"


def _env() -> EnvironmentConfig:
    import yaml

    data = yaml.safe_load(SAMPLE.read_text())
    data.update(deploy_user="deploy", home="/home/deploy/")
    return resolve_environment(FabulawsConfig.model_validate(data), "staging")


# --------------------------------------------------------------------------- pure


def test_default_files_resolve_for_staging() -> None:
    files = resolve_files(None, _env())
    by_path = {f.path: f for f in files}
    userlist = by_path["/home/deploy/services/pgbouncer/userlist-staging.txt"]
    assert userlist.owner == "deploy" and userlist.mode == 0o600
    assert userlist.restart == ["staging-pgbouncer"] and userlist.roles == ["web", "worker"]
    assert "database_password" in userlist.uses
    infra = by_path["/etc/newrelic-infra.yml"]
    assert infra.owner == "root" and infra.kind == "newrelic" and len(infra.roles) == 5
    assert len(files) == len(DEFAULT_FILES)


def test_render_quotes_for_pgbouncer_and_names_missing_values() -> None:
    env = _env()
    userlist = resolve_files(None, env)[0]
    ctx = template_context(env, "web-1", "web", {"database_password": 'a"b'})
    assert render_file(userlist, ctx).get_secret_value() == b'"dbuser" "a""b"\n'
    with pytest.raises(BadTemplate, match="newrelic_license_key") as info:
        render_file(resolve_files(None, env)[1], ctx)
    assert 'a"b' not in str(info.value)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"path": "/etc/x", "template": "{{ x", "roles": ["web"]}, "syntax error"),
        ({"path": "/etc/{nope}", "template": "x", "roles": ["web"]}, "unknown placeholder"),
        ({"path": "/etc/../x", "template": "x", "roles": ["web"]}, "normalized"),
        ({"path": "/etc/x", "template_file": "missing.j2", "roles": ["web"]}, "template file"),
        ({"path": "/etc/x.fabflows-prev", "template": "x", "roles": ["web"]}, "backups"),
    ],
)
def test_bad_file_entries(entry: dict, problem: str, tmp_path: Path) -> None:
    with pytest.raises(BadTemplate, match=problem):
        resolve_files([SecretFileSettings(**entry)], _env(), tmp_path)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"path": "relative/file", "template": "x", "roles": ["web"]}, "not absolute"),
        ({"path": "/etc/x", "roles": ["web"]}, "exactly one"),
        ({"path": "/etc/x", "template": "a", "template_file": "b", "roles": ["web"]}, "exactly"),
        ({"path": "/etc/x", "template": "a", "roles": ["mail"]}, "unknown role"),
        ({"path": "/etc/x", "template": "a", "roles": ["web"], "mode": "999"}, "pattern"),
    ],
)
def test_bad_file_settings(entry: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        SecretFileSettings(**entry)


def test_duplicate_paths_and_template_files(tmp_path: Path) -> None:
    (tmp_path / "t.j2").write_text("key={{ smtp_password }}\n")
    entry = {"path": "/etc/x", "template_file": "t.j2", "roles": ["web"]}
    files = resolve_files([SecretFileSettings(**entry)], _env(), tmp_path)
    assert files[0].uses == ["smtp_password"]
    with pytest.raises(BadTemplate, match="listed twice"):
        resolve_files([SecretFileSettings(**entry)] * 2, _env(), tmp_path)


@pytest.mark.parametrize("path", ["", "/", "x", "/a/../b", "/a//b", "/a\nb", "/a\tb"])
def test_unusable_paths(path: str) -> None:
    with pytest.raises(BadTemplate):
        check_remote_path(path)


def test_secret_paths_and_values() -> None:
    assert secret_path("/home/deploy/", "smtp_password") == "/home/deploy/smtp_password"
    with pytest.raises(ValueError):
        secret_path("/home/deploy", "../x")
    assert secret_from_file(b"abc\n").get_secret_value() == "abc"
    assert secret_from_file(b"abc\r\n").get_secret_value() == "abc"
    assert secret_from_file(b"a b ").get_secret_value() == "a b "


def test_fingerprints_are_keyed_and_never_pickled() -> None:
    import pickle

    a, b = Fingerprint(), Fingerprint()
    assert a("x") == a(SecretStr("x")) == a(SecretBytes(b"x")) != b("x")
    with pytest.raises(TypeError):
        pickle.dumps(a)


# --------------------------------------------------------------------------- on a real host


@pytest.fixture
def remote(make_hosts, test_network):
    (host,) = make_hosts(["sec1"])
    host.exec(["install", "-d", "-o", "deploy", "-g", "deploy", "/home/deploy/services"])
    opts = SshOptions(
        user="deploy",
        known_hosts_file=str(test_network.known_hosts),
        key_file=str(test_network.client_key),
        connect_timeout=5,
    )
    with ConnectionPool(opts) as pool:
        conn = pool.get(host.ip)
        yield host, Remote(conn=conn, host=host.name, dry_run=False)


def _ps(host) -> str:
    return host.exec(["ps", "-eo", "args"]).stdout


@pytest.mark.hosts
def test_stage_swap_restore_commit_keep_owner_mode_and_value(remote) -> None:
    host, r = remote
    secret = "/home/deploy/smtp_password"
    infra = "/etc/newrelic-infra.yml"
    host.exec(["sh", "-c", f"printf old > {secret}; chown deploy: {secret}; chmod 644 {secret}"])
    files = [
        StagedFile(path=secret, owner="deploy", mode=0o600, content=SecretBytes(TRICKY.encode())),
        StagedFile(path=infra, owner="root", mode=0o600, content=SecretBytes(b"license_key: k\n")),
    ]
    stage_files(r, files)
    assert host.exec(["cat", secret]).stdout == "old"  # nothing live changed yet
    assert host.exec(["stat", "-c", "%U %a", secret + ".fabflows-next"]).stdout.split() == [
        "deploy",
        "600",
    ]
    assert not host.exec(["sh", "-c", "ls -d /home/deploy/.fabflows-stage-*"], check=False).stdout
    swap_in(r, [secret, infra])
    assert host.exec(["cat", secret]).stdout == TRICKY
    assert host.exec(["stat", "-c", "%U %G %a", secret]).stdout.split() == ["deploy"] * 2 + ["600"]
    assert host.exec(["stat", "-c", "%U %a", infra]).stdout.split() == ["root", "600"]
    assert backed_up(r, [secret, infra]) == [secret, infra]

    facts = read_files(r, [secret, infra, "/nope"])
    assert secret_from_file(facts[secret][1]).get_secret_value() == TRICKY  # over SFTP
    assert facts[infra][1] == b"license_key: k\n"  # root's file: sudo cat
    assert facts["/nope"][0].exists is False
    fp = Fingerprint()
    described, leftovers = describe_files(r, [secret, infra], fp)
    assert described[0].fingerprint == fp(TRICKY) and described[0].mode == 0o600
    assert sorted(leftovers) == [infra + ".fabflows-absent", secret + ".fabflows-prev"]

    restore(r, [secret, infra])  # the compensation: back to what was there
    assert host.exec(["cat", secret]).stdout == "old"
    assert host.exec(["stat", "-c", "%a", secret]).stdout.strip() == "644"
    assert host.exec(["test", "-e", infra], check=False).returncode == 1
    assert backed_up(r, [secret, infra]) == []

    stage_files(r, files)
    swap_in(r, [secret, infra])
    commit(r, [secret, infra])
    assert backed_up(r, [secret, infra]) == []
    assert describe_files(r, [secret], fp)[1] == []
    assert TRICKY not in "\n".join(r.commands)
    assert all("stdin(" not in c for c in r.commands)


@pytest.mark.hosts
def test_swap_without_staging_fails_and_changes_nothing(remote) -> None:
    host, r = remote
    host.exec(["sh", "-c", "printf keep > /home/deploy/secret_key"])
    with pytest.raises(CommandError, match="not staged"):
        swap_in(r, ["/home/deploy/secret_key"])
    assert host.exec(["cat", "/home/deploy/secret_key"]).stdout == "keep"


@pytest.mark.hosts
def test_dry_run_records_commands_and_writes_nothing(remote) -> None:
    host, _ = remote
    dry = Remote(conn=_.conn, host=host.name, dry_run=True)
    stage_files(
        dry,
        [StagedFile(path="/home/deploy/x", owner="deploy", mode=0o600, content=SecretBytes(b"v"))],
    )
    swap_in(dry, ["/home/deploy/x"])
    assert len(dry.commands) == 2 and "install" in dry.commands[0]
    assert host.exec(["sh", "-c", "ls -a /home/deploy"]).stdout.count("fabflows") == 0


@pytest.mark.hosts
def test_secret_on_stdin_never_shows(remote) -> None:
    host, r = remote
    code = run_with_secret(
        r, ["sh", "-c", "cat > /tmp/got"], SecretStr(TRICKY), sudo=False, change=True
    )
    assert code == 0
    assert host.exec(["cat", "/tmp/got"]).stdout == TRICKY + "\n"
    assert r.commands == ["sh -c 'cat > /tmp/got' < stdin(secret, not shown)"]
    with pytest.raises(CommandError) as info:
        run_with_secret(
            r, ["sh", "-c", "cat >&2; exit 4"], SecretStr(TRICKY), sudo=False, change=False
        )
    assert TRICKY not in str(info.value) and "withheld" in str(info.value)
    assert TRICKY not in _ps(host)
