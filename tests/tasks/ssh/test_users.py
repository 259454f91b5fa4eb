"""Sysadmin users, pure parts: the users-directory catalogue of bad inputs, facts parsing, the plan.

No peer: input validation runs before any host is contacted, and the plan is facts in, changes out.
The same functions against real hosts are in test_users_hosts.py.
"""

from __future__ import annotations

import pwd
from pathlib import Path

import paramiko
import pytest
from prefect.logging import disable_run_logger

from fabflows.errors import BadInput
from fabflows.testing.sshkeys import (
    KeyPair,
    dsa_public,
    ed25519_pair,
    rsa_pair,
    write_users_dir,
)
from tasks.ssh.connection import ConnectionPool, SshOptions, connect
from tasks.ssh.fleet import FleetHost, RateControl, run_fleet
from tasks.ssh.users import (
    MARKER_PATH,
    AccountFacts,
    FileFacts,
    HostFacts,
    apply_step,
    build_spec,
    check_user_name,
    list_sysadmin_accounts,
    load_users_dir,
    parse_facts,
    plan_host_users,
    public_key_of,
    update_sysadmin_accounts,
)

ALICE = ed25519_pair("alice@laptop")
BOB = ed25519_pair("bob@laptop")
OWN = ed25519_pair("fabflows")


# --------------------------------------------------------------------------- input catalogue


def test_good_directory(tmp_path: Path) -> None:
    second = rsa_pair(3072, "alice@desktop")
    d = write_users_dir(
        tmp_path / "users",
        {"alice": [ALICE, second], "bob": BOB, "_svc-ops": ed25519_pair()},
        gecos={"alice": "Alice Liddell,Room 1"},
    )
    (d / ".gitkeep").write_text("")
    (d / "bob").write_text("# Bob's key\n\n" + BOB.public + "\n")
    users = load_users_dir(d)
    assert [u.name for u in users] == ["_svc-ops", "alice", "bob"]
    alice = users[1]
    assert alice.gecos == "Alice Liddell,Room 1"
    assert [k.type for k in alice.public_keys] == ["ssh-ed25519", "ssh-rsa"]
    assert alice.public_keys[1].bits == 3072
    assert alice.public_keys[0].fingerprint.startswith("SHA256:")
    assert alice.authorized_keys() == ALICE.public + "\n" + second.public + "\n"
    assert users[2].gecos is None


PRIVATE = ed25519_pair().private.decode()
KEY_BLOB = ALICE.public.split()[1]
RSA_HEADER_ED_BLOB = "ssh-rsa " + KEY_BLOB


def _bad_files() -> list[tuple[str, str | bytes, str]]:
    """(file name, content, expected message part)."""
    good = ed25519_pair().public + "\n"
    return [
        ("root", good, "'root' is reserved"),
        ("sudo", good, "'sudo' is reserved"),
        ("myproject", good, "'myproject' is reserved"),  # the sample config's deploy user
        ("Alice", good, "upper-case"),
        ("al;ice", good, "shell metacharacters"),
        ("al ice", good, "shell metacharacters"),
        ("$(reboot)", good, "shell metacharacters"),
        ("`id`", good, "shell metacharacters"),
        ("-rf", good, "not a portable user name"),
        ("1alice", good, "not a portable user name"),
        ("a" * 33, good, "not a portable user name"),
        ("alice.bak", good, "not a portable user name"),
        ("..alice", good, "is a path"),
        ("émile", good, "not a portable user name"),
        ("empty", "", "has no key (the file is empty)"),
        ("blank", "\n   \n# only a comment\n", "has no key"),
        ("private", PRIVATE, "PRIVATE key"),
        ("garbage", "hello world\n", "does not start with a key type"),
        ("notbase64", "ssh-ed25519 @@@@\n", "not valid base64"),
        ("truncated", f"ssh-ed25519 {KEY_BLOB[:20]}\n", "refused by ssh-keygen"),
        ("mismatch", RSA_HEADER_ED_BLOB + "\n", "not a ssh-rsa key"),
        ("nokey", "ssh-ed25519\n", "no key"),
        ("dsa", dsa_public() + "\n", "DSA"),
        ("weakrsa", rsa_pair(1024).public + "\n", "1024-bit RSA"),
        ("options", f'command="/bin/true" {ed25519_pair().public}\n', "options"),
        ("binary", b"\xff\xfe\x00\x01", "UTF-8"),
        ("twice", good + good, "listed twice"),
        ("dupe", ALICE.public + "\n", "also 'alice'"),
    ]


@pytest.mark.parametrize(("fname", "content", "message"), _bad_files(), ids=lambda v: str(v)[:12])
def test_bad_input_refused(tmp_path: Path, fname: str, content, message: str) -> None:
    d = write_users_dir(tmp_path / "users", {"alice": ALICE})
    path = d / fname
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(BadInput) as err:
        load_users_dir(d, extra_reserved=["myproject"])
    text = str(err.value)
    assert message in text
    assert fname in text, "the message names the file"
    assert "nothing was changed" in text


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "bob").mkdir(), "bob: is not a regular file"),
        (lambda d: (d / "carol.gecos").write_text("Carol\n"), "no key file 'carol'"),
        (lambda d: (d / "alice.gecos").write_text("Alice:0:0\n"), "contains ':'"),
        (lambda d: (d / "alice.gecos").write_text("Alice\nSecond line\n"), "line break"),
        (lambda d: (d / "alice.gecos").write_text("x" * 300), "longer than 255"),
    ],
)
def test_bad_directory_entries(tmp_path: Path, setup, message: str) -> None:
    d = write_users_dir(tmp_path / "users", {"alice": ALICE})
    setup(d)
    with pytest.raises(BadInput, match=message):
        load_users_dir(d)


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    d = write_users_dir(tmp_path / "users", {"alice": ALICE})
    (d / "root").write_text(BOB.public)
    (d / "empty").write_text("")
    with pytest.raises(BadInput) as err:
        load_users_dir(d)
    assert "2 problem(s)" in str(err.value)


@pytest.mark.parametrize(
    ("where", "message"),
    [("missing", "does not exist"), ("file", "is not a directory"), ("empty", "lists no users")],
)
def test_bad_directory(tmp_path: Path, where: str, message: str) -> None:
    path = tmp_path / where
    if where == "file":
        path.write_text("x")
    elif where == "empty":
        path.mkdir()
        (path / ".gitkeep").write_text("")
    with pytest.raises(BadInput, match=message):
        load_users_dir(path)


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "..", "a/b", "root", "www-data", "al\nice", "x y", "bob;rm"]
)
def test_check_user_name_refuses(name: str) -> None:
    assert check_user_name(name) is not None


def _users(*pairs: tuple[str, KeyPair]) -> list:
    from tasks.ssh.users import SysadminUser, parse_public_key

    return [SysadminUser(name=n, public_keys=[parse_public_key(k.public)]) for n, k in pairs]


def test_spec_refuses_self_lockout() -> None:
    users = _users(("alice", ALICE), ("ops", BOB))
    with pytest.raises(BadInput, match="lock itself out"):
        build_spec(
            users,
            admin_groups=["sudo"],
            deploy_user="deploy",
            connect_user="ops",
            connect_key=OWN.public,
            remove_unlisted=False,
        )
    with pytest.raises(BadInput, match="is the deploy user"):
        build_spec(
            _users(("deploy", ALICE)),
            admin_groups=["sudo"],
            deploy_user="deploy",
            connect_user="deploy",
            connect_key=OWN.public,
            remove_unlisted=False,
        )
    with pytest.raises(BadInput, match="not a valid group name"):
        build_spec(
            users,
            admin_groups=["sudo;reboot"],
            deploy_user="deploy",
            connect_user="deploy",
            connect_key=None,
            remove_unlisted=False,
        )


# --------------------------------------------------------------------------- facts


def test_parse_facts() -> None:
    output = "\n".join(
        [
            "now\t1764115200",  # 2025-11-26
            "marker\tpresent",
            "managed\talice",
            "managed\tbad name;",
            "nologin\t/usr/sbin/nologin",
            "group\tsudo:x:27:alice,bob",
            "group\tadmin:x:1000:alice",
            "group\talice:x:1001:",
            "group\tcarol:x:1002:",
            "passwd\talice:x:1001:1001:Alice:/home/alice:/bin/bash",
            "passwd\tcarol:x:1002:1002::/home/carol:/usr/sbin/nologin",
            "shadow\talice\tstar\t",
            "shadow\tcarol\tlocked\t1",
            "stat\t/home/alice/.ssh\talice:alice:700:d",
            "stat\t/home/alice/.ssh/authorized_keys\talice:alice:600:f",
            "stat\t/home/carol/.ssh\tcarol:carol:777:l",
            f"keyline\t/home/alice/.ssh/authorized_keys:{ALICE.public}",
            "keyline\t/home/alice/.ssh/authorized_keys:# a: comment",
        ]
    )
    facts = parse_facts(output)
    assert facts.marker_present and facts.managed == ["alice"]
    assert facts.ignored_marker_lines == ["bad name;"]
    assert facts.groups == ["sudo", "admin", "alice", "carol"]
    alice = facts.accounts["alice"]
    assert (alice.uid, alice.primary_group) == (1001, "alice")
    assert alice.groups == ["alice", "sudo", "admin"]
    assert alice.keys_content == ALICE.public + "\n# a: comment\n"
    assert alice.authorized_keys == FileFacts(
        owner="alice", group="alice", mode=0o600, kind="regular file"
    )
    assert alice.ssh_dir.kind == "directory" and alice.authorized_keys2 is None
    assert not alice.expired and not alice.locked
    carol = facts.accounts["carol"]
    assert carol.expired and carol.locked and carol.ssh_dir.kind == "symlink"
    assert carol.keys_content is None
    assert "dave" not in facts.accounts


# --------------------------------------------------------------------------- the plan

DIR = FileFacts(owner="", group="", mode=0o700, kind="directory")
KEYS = FileFacts(owner="", group="", mode=0o600, kind="regular file")


def _acct(
    name: str,
    uid: int = 1001,
    keys: str | None = None,
    groups: tuple[str, ...] = ("sudo", "admin"),
    **kw,
) -> AccountFacts:
    base = dict(
        name=name,
        uid=uid,
        gid=uid,
        primary_group=name,
        gecos="",
        home=f"/home/{name}",
        shell="/bin/bash",
        password="star",
        expired=False,
        groups=[name, *groups],
        ssh_dir=DIR.model_copy(update={"owner": name, "group": name}),
        authorized_keys=(
            KEYS.model_copy(update={"owner": name, "group": name}) if keys is not None else None
        ),
        keys_content=keys,
    )
    base.update(kw)
    return AccountFacts(**base)


def _spec(users=(("alice", ALICE),), remove=False, connect="deploy"):
    return build_spec(
        _users(*users),
        admin_groups=["sudo", "admin"],
        deploy_user="deploy",
        connect_user=connect,
        connect_key=OWN.public.rsplit(" ", 1)[0],
        remove_unlisted=remove,
    )


def _deploy(spec) -> AccountFacts:
    return _acct("deploy", uid=1000, keys=spec.deploy_keys(), groups=())


def _facts(
    spec, *accounts: AccountFacts, managed=("alice",), groups=("sudo", "admin")
) -> HostFacts:
    accts = {a.name: a for a in (_deploy(spec), *accounts)}
    return HostFacts(
        marker_present=bool(managed),
        managed=list(managed),
        groups=list(groups),
        nologin="/usr/sbin/nologin",
        accounts=accts,
    )


def _locked(name: str) -> AccountFacts:
    return _acct(
        name,
        uid=1002,
        keys=None,
        groups=(),
        password="locked",
        expired=True,
        shell="/usr/sbin/nologin",
    )


SPEC = _spec()
SPEC_BOB = _spec(users=(("alice", ALICE), ("bob", BOB)))
ALICE_OK = _acct("alice", keys=ALICE.public + "\n")

PLAN_CASES = [
    # (id, spec, facts, expected actions, expected summary fragments)
    ("in-sync", SPEC, _facts(SPEC, ALICE_OK), [], []),
    (
        "fresh-host",
        SPEC,
        _facts(SPEC, managed=()),
        ["record-managed", "record-managed", "create-account", "ensure-ssh-dir", "write-keys"],
        ["+alice", "alice: create account in sudo,admin", "write authorized_keys (1 key(s))"],
    ),
    (
        "missing-group",
        SPEC,
        _facts(SPEC, ALICE_OK, groups=("sudo",)),
        ["create-group"],
        ["create group admin"],
    ),
    (
        "adopt-existing",
        SPEC,
        _facts(SPEC, _acct("alice", keys=None, groups=("sudo",)), managed=()),
        ["record-managed", "record-managed", "update-account", "write-keys"],
        ["alice: add to admin"],
    ),
    (
        "key-rotated",
        SPEC,
        _facts(SPEC, _acct("alice", keys=BOB.public + "\n")),
        ["write-keys"],
        ["rewrite authorized_keys (+1 key(s), -1 key(s))"],
    ),
    (
        "wrong-mode",
        SPEC,
        _facts(
            SPEC,
            ALICE_OK.model_copy(
                update={
                    "authorized_keys": KEYS.model_copy(
                        update={"owner": "alice", "group": "alice", "mode": 0o644}
                    )
                }
            ),
        ),
        ["write-keys"],
        ["fix owner/mode of authorized_keys"],
    ),
    (
        "legacy-keys2",
        SPEC,
        _facts(SPEC, ALICE_OK.model_copy(update={"authorized_keys2": KEYS})),
        ["remove-legacy-keys"],
        ["authorized_keys2"],
    ),
    (
        "unlisted-locked",
        SPEC,
        _facts(
            SPEC, ALICE_OK, _acct("carol", uid=1002, keys=BOB.public), managed=("alice", "carol")
        ),
        ["lock-account", "leave-group", "leave-group", "remove-keys", "end-sessions"],
        ["carol: lock", "remove from group sudo", "carol: remove authorized_keys"],
    ),
    (
        "already-locked",
        SPEC,
        _facts(SPEC, ALICE_OK, _locked("carol"), managed=("alice", "carol")),
        [],
        [],
    ),
    (
        "unlisted-removed",
        _spec(remove=True),
        _facts(_spec(remove=True), ALICE_OK, _locked("carol"), managed=("alice", "carol")),
        ["end-sessions", "remove-account", "record-managed"],
        ["carol: REMOVE account"],
    ),
    (
        "relisted-unlocks",
        SPEC_BOB,
        _facts(
            SPEC_BOB,
            ALICE_OK,
            _locked("bob").model_copy(update={"name": "bob", "home": "/home/bob"}),
            managed=("alice", "bob"),
        ),
        ["update-account", "write-keys"],
        ["bob: unlock (expiry cleared), shell /bin/bash, password unlocked, add to sudo, admin"],
    ),
    (
        "unmanaged-never-touched",
        SPEC,
        _facts(SPEC, ALICE_OK, _acct("mallory", uid=1003, keys=BOB.public)),
        [],
        [],
    ),
    (
        "gone-user-dropped-from-marker",
        SPEC,
        _facts(SPEC, ALICE_OK, managed=("alice", "zed")),
        ["record-managed", "record-managed"],
        ["-zed"],
    ),
    (
        "deploy-keys-rebuilt",
        SPEC_BOB,
        _facts(
            SPEC_BOB,
            ALICE_OK,
            _acct("bob", uid=1002, keys=BOB.public + "\n"),
            managed=("alice", "bob"),
        ).model_copy(
            update={
                "accounts": {
                    **_facts(
                        SPEC_BOB, ALICE_OK, _acct("bob", uid=1002, keys=BOB.public + "\n")
                    ).accounts,
                    "deploy": _acct(
                        "deploy",
                        uid=1000,
                        keys=ALICE.public + "\nssh-ed25519 AAAAold x\n",
                        groups=(),
                    ),
                }
            }
        ),
        ["write-keys"],
        ["deploy: rewrite authorized_keys (+2 key(s), -1 key(s))"],
    ),
]


@pytest.mark.parametrize(
    ("spec", "facts", "actions", "fragments"),
    [c[1:] for c in PLAN_CASES],
    ids=[c[0] for c in PLAN_CASES],
)
def test_plan(spec, facts, actions, fragments) -> None:
    plan = plan_host_users(facts, spec)
    assert not plan.errors
    assert [c.action for c in plan.changes] == actions
    text = "\n".join(plan.summaries())
    for fragment in fragments:
        assert fragment in text


def test_plan_commands_are_exact_and_keys_only_on_stdin() -> None:
    plan = plan_host_users(_facts(SPEC, managed=()), SPEC)
    create = next(c for c in plan.changes if c.action == "create-account")
    assert create.argv == [
        "useradd", "--create-home", "--home-dir", "/home/alice", "--shell", "/bin/bash",
        "--user-group", "--password", "*", "--groups", "sudo,admin", "--", "alice",
    ]  # fmt: skip
    keys = next(c for c in plan.changes if c.action == "write-keys")
    assert keys.argv[-5:] == [
        "alice", "alice", "0600", str(len(ALICE.public) + 1), "/home/alice/.ssh/authorized_keys"
    ]  # fmt: skip
    assert keys.stdin == ALICE.public + "\n"
    assert all(ALICE.public.split()[1] not in " ".join(c.argv) for c in plan.changes)
    marker = [c for c in plan.changes if c.action == "record-managed"][1]
    assert marker.argv[-2:] == ["6", MARKER_PATH] and marker.stdin == "alice\n"


def test_plan_never_locks_deploy_or_connect_user() -> None:
    spec = _spec(connect="ops", users=(("alice", ALICE),))
    facts = _facts(
        spec, ALICE_OK, _acct("ops", uid=1005, keys=OWN.public), managed=("alice", "ops", "deploy")
    )
    plan = plan_host_users(facts, spec)
    assert not any(
        c.user in ("ops", "deploy") and c.action.startswith(("lock", "remove"))
        for c in plan.changes
    )
    assert any("never locked" in n for n in plan.notes)


def test_deploy_keys_keep_own_key() -> None:
    assert OWN.public.split()[1] in SPEC.deploy_keys()
    assert ALICE.public in SPEC.deploy_keys()


@pytest.mark.parametrize(
    ("facts_update", "error"),
    [
        ({"alice": _acct("alice", uid=105)}, "system account"),
        (
            {
                "alice": ALICE_OK.model_copy(
                    update={"ssh_dir": FileFacts(owner="", group="", mode=0, kind="symlink")}
                )
            },
            "is a symlink",
        ),
    ],
)
def test_plan_refuses_host(facts_update, error) -> None:
    facts = _facts(SPEC, managed=())
    facts = facts.model_copy(update={"accounts": {**facts.accounts, **facts_update}})
    plan = plan_host_users(facts, SPEC)
    assert plan.changes == []
    assert error in " ".join(plan.errors)


@pytest.mark.parametrize("home", ["/", "/etc", "/root", "/usr/local/x", "relative", "/home/../etc"])
def test_plan_refuses_system_home(home: str) -> None:
    facts = _facts(SPEC, managed=())
    facts = facts.model_copy(
        update={"accounts": {**facts.accounts, "alice": _acct("alice", home=home)}}
    )
    plan = plan_host_users(facts, SPEC)
    assert plan.changes == [] and "home directory" in plan.errors[0]


def test_plan_refuses_host_without_deploy_user() -> None:
    facts = _facts(SPEC, ALICE_OK)
    facts = facts.model_copy(update={"accounts": {"alice": ALICE_OK}})
    assert "deploy user deploy does not exist" in plan_host_users(facts, SPEC).errors[0]


# --------------------------------------------------------------------------- on real hosts

RATE = RateControl(max_concurrency="100%", max_errors=0)


def _opts(net, user: str = "deploy", key: Path | None = None) -> SshOptions:
    return SshOptions(
        user=user,
        known_hosts_file=str(net.known_hosts),
        key_file=str(key or net.client_key),
        connect_timeout=3,
    )


def _host_spec(net, users_dir: Path, remove: bool = False):
    opts = _opts(net)
    return build_spec(
        load_users_dir(users_dir),
        admin_groups=["admin", "sudo"],
        deploy_user="deploy",
        connect_user="deploy",
        connect_key=public_key_of(opts),
        remove_unlisted=remove,
    )


def _apply(net, hosts, spec, *, dry_run: bool, approved=None):
    fleet = [FleetHost(name=h.name, address=h.ip) for h in hosts]
    with disable_run_logger(), ConnectionPool(_opts(net)) as pool:
        return update_sysadmin_accounts.fn(fleet, spec, pool, RATE, approved, dry_run=dry_run)


def _login(net, host, user: str, pair: KeyPair, tmp_path: Path) -> str:
    key = pair.write_private(tmp_path / f"{user}-{host.name}.key")
    conn = connect(host.ip, _opts(net, user, key))
    try:
        return conn.run("id -un; sudo -n id -un", hide=True, in_stream=False).stdout
    finally:
        conn.close()


def _passwd(host, name: str) -> str | None:
    proc = host.exec(["getent", "passwd", name], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


@pytest.mark.hosts
def test_accounts_on_real_hosts(make_hosts, test_network, tmp_path: Path) -> None:
    """Dry shows, apply makes, dry and apply again change nothing; alice logs in with her key."""
    hosts = make_hosts(["users1", "users2"])
    alice, bob = ed25519_pair("alice@laptop"), ed25519_pair("bob@laptop")
    d = write_users_dir(tmp_path / "users", {"alice": alice, "bob": bob}, {"alice": "Alice L,Ops"})
    spec = _host_spec(test_network, d)
    before = {h.name: h.exec(["cat", "/etc/passwd"]).stdout for h in hosts}

    dry = _apply(test_network, hosts, spec, dry_run=True)
    assert [r.label for r in dry.results] == ["would change", "would change"]
    assert any(
        c.startswith("sudo -n -- useradd") and c.endswith("-- alice")
        for c in dry.results[0].commands
    )
    assert all(alice.public.split()[1] not in c for c in dry.results[0].commands)
    assert {h.name: h.exec(["cat", "/etc/passwd"]).stdout for h in hosts} == before

    applied = _apply(test_network, hosts, spec, dry_run=False)
    assert [r.status for r in applied.results] == ["changed", "changed"], applied.text_report()
    for h in hosts:
        assert _passwd(h, "alice").split(":")[4:] == ["Alice L,Ops", "/home/alice", "/bin/bash"]
        assert "sudo" in h.exec(["id", "-Gn", "alice"]).stdout.split()
        assert h.exec(
            ["stat", "-c", "%U:%G:%a", "/home/alice/.ssh", "/home/alice/.ssh/authorized_keys"]
        ).stdout.split() == ["alice:alice:700", "alice:alice:600"]
        assert h.exec(["cat", MARKER_PATH]).stdout == "alice\nbob\n"
        deploy_keys = h.exec(["cat", "/home/deploy/.ssh/authorized_keys"]).stdout
        for blob in (
            alice.public.split()[1],
            bob.public.split()[1],
            public_key_of(_opts(test_network)).split()[1],
        ):
            assert blob in deploy_keys
        assert _login(test_network, h, "alice", alice, tmp_path).split() == ["alice", "root"]
    with pytest.raises(paramiko.AuthenticationException):
        _login(test_network, hosts[0], "alice", bob, tmp_path)  # bob's key is not alice's
    with pytest.raises(KeyError):
        pwd.getpwnam("alice")  # nothing appeared on the machine running the tests

    again = _apply(test_network, hosts, spec, dry_run=True)
    assert [r.status for r in again.results] == ["unchanged", "unchanged"]
    again = _apply(test_network, hosts, spec, dry_run=False)
    assert [r.message for r in again.results] == ["already as listed"] * 2


@pytest.mark.hosts
def test_unlisted_locked_relisted_removed(make_hosts, test_network, tmp_path: Path) -> None:
    (host,) = make_hosts(["users3"])
    alice, bob = ed25519_pair("alice"), ed25519_pair("bob")
    full = write_users_dir(tmp_path / "full", {"alice": alice, "bob": bob})
    only_alice = write_users_dir(tmp_path / "alice", {"alice": alice})
    host.exec(["useradd", "--create-home", "--groups", "sudo", "mallory"])  # not fabflows'
    host.exec(
        ["sh", "-c", "echo 'ssh-ed25519 AAAAold legacy' > /home/deploy/.ssh/authorized_keys2"]
    )
    assert _apply(test_network, [host], _host_spec(test_network, full), dry_run=False).ok
    assert (
        host.exec(["test", "-e", "/home/deploy/.ssh/authorized_keys2"], check=False).returncode == 1
    )
    key = bob.write_private(tmp_path / "bob.key")
    session = connect(host.ip, _opts(test_network, "bob", key))  # bob is logged in

    locked = _apply(test_network, [host], _host_spec(test_network, only_alice), dry_run=False)
    assert locked.ok, locked.text_report()
    assert "bob: lock" in locked.results[0].message
    with pytest.raises((paramiko.AuthenticationException, paramiko.SSHException)):
        _login(test_network, host, "bob", bob, tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - his session was ended (any error: it is gone)
        session.run("true", hide=True, in_stream=False, timeout=5)
    session.close()
    shadow = host.exec(["getent", "shadow", "bob"]).stdout.split(":")
    assert shadow[1].startswith("!") and shadow[7] == "1"
    assert "sudo" not in host.exec(["id", "-Gn", "bob"]).stdout.split()
    assert _passwd(host, "bob").endswith("/usr/sbin/nologin")
    assert host.exec(["cat", MARKER_PATH]).stdout == "alice\nbob\n"  # still managed (locked)
    assert "sudo" in host.exec(["id", "-Gn", "mallory"]).stdout.split()  # never touched
    assert not host.exec(["getent", "shadow", "mallory"]).stdout.split(":")[7]
    assert _login(test_network, host, "alice", alice, tmp_path).split() == ["alice", "root"]
    assert (
        _apply(test_network, [host], _host_spec(test_network, only_alice), dry_run=False)
        .results[0]
        .status
        == "unchanged"
    )

    relisted = _apply(test_network, [host], _host_spec(test_network, full), dry_run=False)
    assert "bob: unlock" in relisted.results[0].message
    assert _login(test_network, host, "bob", bob, tmp_path).split() == ["bob", "root"]

    removed = _apply(
        test_network, [host], _host_spec(test_network, only_alice, remove=True), dry_run=False
    )
    assert "bob: REMOVE account" in removed.results[0].message, removed.text_report()
    assert _passwd(host, "bob") is None
    assert host.exec(["test", "-e", "/home/bob"], check=False).returncode == 1
    assert host.exec(["cat", MARKER_PATH]).stdout == "alice\n"
    assert _passwd(host, "mallory") is not None


@pytest.mark.hosts
def test_drift_since_plan_refused(make_hosts, test_network, tmp_path: Path) -> None:
    (host,) = make_hosts(["users4"])
    spec = _host_spec(test_network, write_users_dir(tmp_path / "u", {"alice": ed25519_pair()}))
    fleet = [FleetHost(name=host.name, address=host.ip)]
    with disable_run_logger(), ConnectionPool(_opts(test_network)) as pool:
        facts = list_sysadmin_accounts.fn(fleet, spec, pool, RATE).results[0].output
    approved = {host.ip: plan_host_users(facts, spec).summaries()}
    host.exec(["groupdel", "admin"])  # someone changed the host after the plan was shown
    result = _apply(test_network, [host], spec, dry_run=False, approved=approved)
    assert result.results[0].status == "failed"
    assert "changed since the plan" in result.results[0].message
    assert _passwd(host, "alice") is None


@pytest.mark.hosts
def test_own_login_broken_keys_restored(make_hosts, test_network, tmp_path: Path) -> None:
    """Compensation: if fabflows cannot log in after rewriting its keys, the old keys come back."""
    (host,) = make_hosts(["users5"])
    previous = host.exec(["cat", "/home/deploy/.ssh/authorized_keys"]).stdout
    spec = _host_spec(test_network, write_users_dir(tmp_path / "u", {"alice": ed25519_pair()}))
    stranger = _opts(test_network, key=ed25519_pair().write_private(tmp_path / "stranger"))

    def login_check(h: FleetHost) -> None:  # a real login that fails: a key the host never saw
        connect(h.address, stranger).close()

    fleet = [FleetHost(name=host.name, address=host.ip)]
    with disable_run_logger(), ConnectionPool(_opts(test_network)) as pool:
        result = run_fleet(
            fleet,
            apply_step(spec, None, login_check),
            pool=pool,
            rate=RATE,
            dry_run=False,
            name="t",
        )
    assert result.results[0].status == "failed"
    assert "previous authorized_keys restored" in result.results[0].message
    assert host.exec(["cat", "/home/deploy/.ssh/authorized_keys"]).stdout == previous
    assert (
        host.exec(["stat", "-c", "%U:%a", "/home/deploy/.ssh/authorized_keys"]).stdout.strip()
        == "deploy:600"
    )
