"""Sysadmin users, pure parts: the users-directory catalogue of bad inputs, facts parsing, the plan.

No peer: input validation runs before any host is contacted, and the plan is facts in, changes out.
The same functions against real hosts are in test_users_hosts.py.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from fabflows.errors import BadInput
from fabflows.testing.sshkeys import (
    KeyPair,
    dsa_public,
    ed25519_pair,
    rsa_pair,
    write_users_dir,
)
from tasks.ssh.users import (
    MARKER_PATH,
    AccountFacts,
    FileFacts,
    HostFacts,
    build_spec,
    check_user_name,
    load_users_dir,
    parse_facts,
    plan_host_users,
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
    assert [k.type for k in alice.keys] == ["ssh-ed25519", "ssh-rsa"]
    assert alice.keys[1].bits == 3072
    assert alice.keys[0].fingerprint.startswith("SHA256:")
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

    return [SysadminUser(name=n, keys=[parse_public_key(k.public)]) for n, k in pairs]


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
    keys = base64.b64encode(f"{ALICE.public}\n".encode()).decode()
    output = "\n".join(
        [
            "now\t1764115200",  # 2025-11-26
            "marker\tpresent",
            "managed\talice",
            "managed\tbad name;",
            "nologin\t/usr/sbin/nologin",
            "group\tsudo",
            "group\tadmin",
            "passwd\talice:x:1001:1001:Alice:/home/alice:/bin/bash",
            "shadow\talice\tstar\t",
            "groups\talice\talice sudo admin",
            "procs\talice\t2",
            "stat\talice\t/home/alice/.ssh\talice:alice:700:directory",
            "stat\talice\t/home/alice/.ssh/authorized_keys\talice:alice:600:regular file",
            f"keys\talice\t{keys}",
            "passwd\tcarol:x:1002:1002::/home/carol:/usr/sbin/nologin",
            "shadow\tcarol\tlocked\t1",
            "groups\tcarol\tcarol",
            "procs\tcarol\t0",
            "stat\tcarol\t/home/carol/.ssh\tsymlink",
            "nouser\tdave",
        ]
    )
    facts = parse_facts(output)
    assert facts.marker_present and facts.managed == ["alice"]
    assert facts.ignored_marker_lines == ["bad name;"]
    alice = facts.accounts["alice"]
    assert (alice.uid, alice.primary_group, alice.groups) == (
        1001,
        "alice",
        ["alice", "sudo", "admin"],
    )
    assert alice.keys_content == ALICE.public + "\n"
    assert alice.authorized_keys == FileFacts(
        owner="alice", group="alice", mode=0o600, kind="regular file"
    )
    assert not alice.expired and not alice.locked
    carol = facts.accounts["carol"]
    assert carol.expired and carol.locked and carol.ssh_dir.kind == "symlink"
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
    assert keys.argv[-4:] == ["alice", "alice", "0600", "/home/alice/.ssh/authorized_keys"]
    assert keys.stdin == ALICE.public + "\n"
    assert all(ALICE.public.split()[1] not in " ".join(c.argv) for c in plan.changes)
    marker = [c for c in plan.changes if c.action == "record-managed"][1]
    assert marker.argv[-1] == MARKER_PATH and marker.stdin == "alice\n"


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


def test_plan_refuses_host_without_deploy_user() -> None:
    facts = _facts(SPEC, ALICE_OK)
    facts = facts.model_copy(update={"accounts": {"alice": ALICE_OK}})
    assert "deploy user deploy does not exist" in plan_host_users(facts, SPEC).errors[0]
