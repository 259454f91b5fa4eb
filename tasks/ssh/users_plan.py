"""Sysadmin users: the wanted state, a host's facts, and the pure per-host plan.

On a host, fabflows records the accounts it manages in ``/etc/fabflows/sysadmin-users`` (one name
a line). Only those are ever locked or removed; accounts fabflows did not create or adopt are
never touched. The marker is written *before* an account is created, so a run that dies half-way
leaves nothing fabflows would not recognise next time.

:func:`plan_host_users` turns :class:`HostFacts` and the wanted :class:`SysadminUsersSpec` into an
ordered list of :class:`Change` s, each with the exact command it runs (pure, table-tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fabflows.errors import BadInput
from tasks.ssh.remote import atomic_write_argv, sh_argv
from tasks.ssh.users_input import NAME_RE, SysadminUser

MARKER_PATH = "/etc/fabflows/sysadmin-users"
"""Accounts fabflows manages on a host, one name a line (root:root 0644)."""

END_SESSIONS_SCRIPT = (
    'pkill -KILL -u "$1" || true; i=0; '
    'while pgrep -u "$1" >/dev/null && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i+1)); done'
)
"""Kill the user's processes and wait (up to 5 s) until they are gone, so userdel can proceed."""

SYSTEM_UID_MAX = 999
SHELL = "/bin/bash"
NOLOGIN_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false")

ChangeAction = Literal[
    "create-group",
    "record-managed",
    "create-account",
    "update-account",
    "ensure-ssh-dir",
    "write-keys",
    "remove-legacy-keys",
    "lock-account",
    "leave-group",
    "remove-keys",
    "end-sessions",
    "remove-account",
]


class SysadminUsersSpec(BaseModel):
    """What every host should have: the accounts, their groups, the deploy user's keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    users: list[SysadminUser]
    admin_groups: list[str] = Field(description="Groups every sysadmin is in (config).")
    deploy_user: str = Field(description="Its authorized_keys are rebuilt from the listed keys.")
    connect_user: str = Field(description="The account fabflows connects as: never locked.")
    connect_key: str | None = Field(
        default=None, description="fabflows' own public key: kept in the connect user's keys."
    )
    remove_unlisted: bool = Field(
        default=False, description="Remove (userdel) managed accounts no longer listed, not lock."
    )

    @property
    def protected_users(self) -> set[str]:
        return {"root", self.deploy_user, self.connect_user}

    def deploy_keys(self) -> str:
        """The deploy user's authorized_keys: every listed key, plus fabflows' own if it logs in there."""
        lines = [k.line for u in self.users for k in u.public_keys]
        if self.connect_key and self.connect_user == self.deploy_user:
            blob = self.connect_key.split()[1]
            if not any(line.split()[1] == blob for line in lines):
                lines.append(f"{self.connect_key} fabflows")
        return "".join(line + "\n" for line in lines)


def build_spec(
    users: list[SysadminUser],
    *,
    admin_groups: Sequence[str],
    deploy_user: str,
    connect_user: str,
    connect_key: str | None,
    remove_unlisted: bool,
) -> SysadminUsersSpec:
    """Join the users with config; refuse anything that would lock fabflows out.

    Raises:
        BadInput: the deploy or connect user is listed as a sysadmin without fabflows' key, or the
            admin groups are not valid group names.
    """
    problems = []
    for g in admin_groups:
        if not NAME_RE.match(g):
            problems.append(f"admin group {g!r} in config is not a valid group name")
    names = {u.name for u in users}
    if deploy_user in names:
        problems.append(
            f"{deploy_user!r} is the deploy user; its keys are built from everyone's, "
            "it cannot also be a sysadmin file"
        )
    if connect_user in names and connect_key:
        listed = next(u for u in users if u.name == connect_user)
        blob = connect_key.split()[1]
        if not any(k.blob == blob for k in listed.public_keys):
            problems.append(
                f"{connect_user!r} is the account fabflows connects as, but its key file does not "
                "hold fabflows' own key: the run would lock itself out"
            )
    if problems:
        raise BadInput("refusing the users update:\n" + "\n".join(f"  - {p}" for p in problems))
    return SysadminUsersSpec(
        users=users,
        admin_groups=list(admin_groups),
        deploy_user=deploy_user,
        connect_user=connect_user,
        connect_key=connect_key,
        remove_unlisted=remove_unlisted,
    )


_FILE_TYPES = {"d": "directory", "f": "regular file", "l": "symlink"}


class FileFacts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    owner: str
    group: str
    mode: int
    kind: str = Field(description="directory, regular file, symlink, ...")


class AccountFacts(BaseModel):
    """One account as the host has it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    uid: int
    gid: int
    primary_group: str
    gecos: str
    home: str
    shell: str
    password: str = Field(description="empty / star / hash / locked / locked-empty / other.")
    expired: bool
    groups: list[str]
    ssh_dir: FileFacts | None = None
    authorized_keys: FileFacts | None = None
    authorized_keys2: FileFacts | None = None
    keys_content: str | None = Field(default=None, description="authorized_keys (public keys).")

    @property
    def locked(self) -> bool:
        return self.password.startswith("locked")


class HostFacts(BaseModel):
    """What the plan needs to know about one host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    marker_present: bool
    managed: list[str]
    groups: list[str]
    nologin: str
    accounts: dict[str, AccountFacts]
    ignored_marker_lines: list[str] = Field(default_factory=list)


def parse_facts(output: str) -> HostFacts:
    """Parse :data:`FACTS_SCRIPT`'s output (tab-separated lines)."""
    now_days = 0
    marker = False
    managed: list[str] = []
    ignored: list[str] = []
    group_lines: list[list[str]] = []
    nologin = "/usr/sbin/nologin"
    passwd: dict[str, list[str]] = {}
    shadow: dict[str, tuple[str, str]] = {}
    stats: dict[str, FileFacts] = {}
    key_lines: list[str] = []
    for line in output.splitlines():
        kind, _, rest = line.partition("\t")
        if kind == "now":
            now_days = int(rest) // 86400
        elif kind == "marker":
            marker = True
        elif kind == "managed":
            name = rest.strip()
            if not name:
                continue
            if NAME_RE.match(name):
                if name not in managed:
                    managed.append(name)
            else:
                ignored.append(name)
        elif kind == "nologin":
            nologin = rest.strip() or nologin
        elif kind == "group":
            group_lines.append(rest.split(":"))
        elif kind == "passwd":
            entry = rest.split(":")
            if len(entry) >= 7:
                passwd[entry[0]] = entry
        elif kind == "shadow":
            fields = rest.split("\t")
            shadow[fields[0]] = (fields[1], fields[2] if len(fields) > 2 else "")
        elif kind == "stat":
            path, _, desc = rest.rpartition("\t")
            owner, group, mode, ftype = desc.split(":")
            stats[path] = FileFacts(
                owner=owner, group=group, mode=int(mode, 8), kind=_FILE_TYPES.get(ftype, ftype)
            )
        elif kind == "keyline":
            key_lines.append(rest)
    group_names = [g[0] for g in group_lines if g and g[0]]
    gid_name = {g[2]: g[0] for g in group_lines if len(g) >= 3}
    members = {g[0]: set(filter(None, g[3].split(","))) for g in group_lines if len(g) >= 4}
    contents: dict[str, str] = {}
    for path, st in stats.items():
        if st.kind == "regular file" and path.endswith("/.ssh/authorized_keys"):
            contents[path] = ""
    for line in key_lines:  # "PATH:LINE" (grep -H); the longest known path that prefixes it
        for path in sorted(contents, key=len, reverse=True):
            if line.startswith(path + ":"):
                contents[path] += line[len(path) + 1 :] + "\n"
                break
    accounts = {}
    for name, entry in passwd.items():
        pw_kind, expire = shadow.get(name, ("other", ""))
        home = entry[5].rstrip("/") or "/"
        primary = gid_name.get(entry[3], entry[3])
        groups = [primary] + [g for g in group_names if name in members.get(g, ()) and g != primary]
        accounts[name] = AccountFacts(
            name=name,
            uid=int(entry[2]),
            gid=int(entry[3]),
            primary_group=primary,
            gecos=entry[4],
            home=entry[5],
            shell=entry[6],
            password=pw_kind,
            expired=bool(expire) and int(expire) <= now_days,
            groups=groups,
            ssh_dir=stats.get(f"{home}/.ssh"),
            authorized_keys=stats.get(f"{home}/.ssh/authorized_keys"),
            authorized_keys2=stats.get(f"{home}/.ssh/authorized_keys2"),
            keys_content=contents.get(f"{home}/.ssh/authorized_keys"),
        )
    return HostFacts(
        marker_present=marker,
        managed=managed,
        groups=group_names,
        nologin=nologin,
        accounts=accounts,
        ignored_marker_lines=ignored,
    )


# --------------------------------------------------------------------------- the plan


class Change(BaseModel):
    """One change on one host, with the exact command that makes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: ChangeAction
    user: str = Field(default="", description="The account concerned ('' for host-wide changes).")
    summary: str = Field(description="What changes, for operators.")
    argv: list[str] = Field(description="The command, run as root (sudo -n).")
    stdin: str | None = Field(default=None, description="Content fed on stdin (public keys only).")


class HostUsersPlan(BaseModel):
    """The changes one host needs, or why it cannot be planned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    changes: list[Change] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list, description="Worth knowing, changes nothing.")
    errors: list[str] = Field(default_factory=list, description="Why this host is not changed.")

    def summaries(self) -> list[str]:
        return [c.summary for c in self.changes]


def _write_file_argv(path: str, owner: str, group: str, mode: int, content: str) -> list[str]:
    size = len(content.encode())
    return atomic_write_argv(path, owner=owner, group=group, mode=mode, size=size)


def _lines(names: Sequence[str]) -> str:
    return "".join(n + "\n" for n in names)


def _key_names(content: str | None) -> set[str]:
    out = set()
    for line in (content or "").splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.lstrip().startswith("#"):
            out.add(parts[1])
    return out


def _describe_keys_change(old: str | None, new: str) -> str:
    before, after = _key_names(old), _key_names(new)
    added, removed = len(after - before), len(before - after)
    bits = []
    if added:
        bits.append(f"+{added} key(s)")
    if removed:
        bits.append(f"-{removed} key(s)")
    return ", ".join(bits) or "same keys, content or order differs"


SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/proc", "/root", "/sbin", "/sys", "/usr")


def check_home(home: str) -> str | None:
    """None if ``home`` is a plausible home directory to write ~/.ssh into, else why not."""
    clean = "/" + home.strip("/")
    if not home.startswith("/") or clean == "/" or ".." in clean.split("/"):
        return f"home directory {home!r} is not an absolute path below /"
    if clean.startswith(tuple(d + "/" for d in SYSTEM_DIRS)) or clean in SYSTEM_DIRS:
        return f"home directory {home!r} is a system directory"
    return None


def _ensure_keys(
    changes: list[Change],
    errors: list[str],
    user: str,
    home: str,
    group: str,
    acct: AccountFacts | None,
    wanted: str,
) -> None:
    """~/.ssh (0700) and authorized_keys (0600) owned by the user, with exactly ``wanted``."""
    ssh_dir = f"{home.rstrip('/')}/.ssh"
    why = check_home(home)
    if why:
        errors.append(f"{user}: {why}; not writing {ssh_dir}")
        return
    if acct is not None and acct.ssh_dir is not None and acct.ssh_dir.kind != "directory":
        errors.append(f"{ssh_dir} is a {acct.ssh_dir.kind}, not a directory; fix it by hand")
        return
    d = acct.ssh_dir if acct else None
    if d is None or (d.owner, d.group, d.mode) != (user, group, 0o700):
        changes.append(
            Change(
                action="ensure-ssh-dir",
                user=user,
                summary=f"{user}: {'create' if d is None else 'fix owner/mode of'} {ssh_dir} (0700)",
                argv=["install", "-d", "-o", user, "-g", group, "-m", "0700", ssh_dir],
            )
        )
    f = acct.authorized_keys if acct else None
    old = acct.keys_content if acct else None
    content_ok = old == wanted
    meta_ok = f is not None and (f.owner, f.group, f.mode, f.kind) == (
        user,
        group,
        0o600,
        "regular file",
    )
    if not (content_ok and meta_ok):
        if f is None:
            what = f"write authorized_keys ({len(_key_names(wanted))} key(s))"
        elif not content_ok:
            what = f"rewrite authorized_keys ({_describe_keys_change(old, wanted)})"
        else:
            what = "fix owner/mode of authorized_keys (0600)"
        changes.append(
            Change(
                action="write-keys",
                user=user,
                summary=f"{user}: {what}",
                argv=_write_file_argv(f"{ssh_dir}/authorized_keys", user, group, 0o600, wanted),
                stdin=wanted,
            )
        )
    if acct is not None and acct.authorized_keys2 is not None:
        changes.append(
            Change(
                action="remove-legacy-keys",
                user=user,
                summary=f"{user}: remove legacy authorized_keys2 (FabulAWS), its keys bypass the list",
                argv=["rm", "-f", "--", f"{ssh_dir}/authorized_keys2"],
            )
        )


def plan_host_users(facts: HostFacts, spec: SysadminUsersSpec) -> HostUsersPlan:
    """Pure: the changes that bring one host to ``spec`` (empty when it is already there)."""
    changes: list[Change] = []
    notes: list[str] = []
    errors: list[str] = []
    listed = {u.name: u for u in spec.users}
    managed = set(facts.managed)
    if facts.ignored_marker_lines:
        notes.append(
            f"ignored invalid names in {MARKER_PATH}: " + ", ".join(facts.ignored_marker_lines)
        )

    for g in spec.admin_groups:
        if g not in facts.groups:
            changes.append(
                Change(
                    action="create-group",
                    summary=f"create group {g} (admin group from config)",
                    argv=["groupadd", g],
                )
            )

    unlisted = sorted(managed - set(listed))
    protected = sorted(n for n in unlisted if n in spec.protected_users)
    for n in protected:
        notes.append(f"{n} is in {MARKER_PATH} but is the deploy/connect user: never locked")
    unlisted = [n for n in unlisted if n not in spec.protected_users]
    removing = [n for n in unlisted if spec.remove_unlisted and n in facts.accounts]
    gone = [n for n in unlisted if n not in facts.accounts]

    # the durable record first: every account this run creates or adopts is in it before it exists
    recorded = sorted((managed | set(listed)) - set(gone) - set(protected))
    final = sorted(set(recorded) - set(removing))
    if recorded != sorted(facts.managed) or not facts.marker_present:
        added = sorted(set(recorded) - managed)
        dropped = sorted(managed - set(recorded))
        bits = [
            f"+{', '.join(added)}" if added else "",
            f"-{', '.join(dropped)}" if dropped else "",
        ]
        changes.append(
            Change(
                action="record-managed",
                summary=f"record managed accounts in {MARKER_PATH}"
                + (f" ({' '.join(b for b in bits if b)})" if any(bits) else ""),
                argv=["sh", "-c", 'install -d -m 0755 "$(dirname "$1")"', "sh", MARKER_PATH],
            )
        )
        changes.append(
            Change(
                action="record-managed",
                summary=f"write {MARKER_PATH}",
                argv=_write_file_argv(MARKER_PATH, "root", "root", 0o644, _lines(recorded)),
                stdin=_lines(recorded),
            )
        )

    groups_arg = ",".join(spec.admin_groups)
    for name in sorted(listed):
        user = listed[name]
        acct = facts.accounts.get(name)
        if acct is None:
            home = f"/home/{name}"
            argv = ["useradd", "--create-home", "--home-dir", home, "--shell", SHELL]
            argv += ["--user-group", "--password", "*"]
            if groups_arg:
                argv += ["--groups", groups_arg]
            if user.gecos is not None:
                argv += ["--comment", user.gecos]
            argv += ["--", name]
            changes.append(
                Change(
                    action="create-account",
                    user=name,
                    summary=f"{name}: create account in {groups_arg or 'no extra groups'}",
                    argv=argv,
                )
            )
            _ensure_keys(changes, errors, name, home, name, None, user.authorized_keys())
            continue
        if acct.uid <= SYSTEM_UID_MAX and name not in managed:
            errors.append(
                f"{name} exists as a system account (uid {acct.uid}); refusing to adopt it"
            )
            continue
        if name not in managed:
            notes.append(f"{name} exists and is not yet managed by fabflows: adopting it")
        opts: list[str] = []
        what: list[str] = []
        if acct.expired:
            opts += ["--expiredate", ""]
            what.append("unlock (expiry cleared)")
        if acct.shell in NOLOGIN_SHELLS:
            opts += ["--shell", SHELL]
            what.append(f"shell {SHELL}")
        if acct.password == "locked":
            opts.append("--unlock")
            what.append("password unlocked")
        elif acct.password in ("empty", "locked-empty", "other"):
            opts += ["--password", "*"]
            what.append("no password (key login only)")
        missing = [g for g in spec.admin_groups if g not in acct.groups]
        if missing:
            opts += ["--append", "--groups", ",".join(missing)]
            what.append(f"add to {', '.join(missing)}")
        if user.gecos is not None and user.gecos != acct.gecos:
            opts += ["--comment", user.gecos]
            what.append(f"GECOS {user.gecos!r}")
        if opts:
            changes.append(
                Change(
                    action="update-account",
                    user=name,
                    summary=f"{name}: " + ", ".join(what),
                    argv=["usermod", *opts, "--", name],
                )
            )
        _ensure_keys(
            changes, errors, name, acct.home, acct.primary_group, acct, user.authorized_keys()
        )

    deploy = facts.accounts.get(spec.deploy_user)
    if deploy is None:
        errors.append(f"deploy user {spec.deploy_user} does not exist on this host")
    else:
        _ensure_keys(
            changes,
            errors,
            spec.deploy_user,
            deploy.home,
            deploy.primary_group,
            deploy,
            spec.deploy_keys(),
        )

    for name in unlisted:
        acct = facts.accounts.get(name)
        if acct is None:
            continue
        if acct.uid <= SYSTEM_UID_MAX:
            errors.append(
                f"{name} in {MARKER_PATH} is a system account (uid {acct.uid}); not touched"
            )
            continue
        if name in removing:
            changes.append(_end_sessions(name))
            changes.append(
                Change(
                    action="remove-account",
                    user=name,
                    summary=f"{name}: REMOVE account and home {acct.home} (no longer listed)",
                    argv=["userdel", "--remove", "--", name],
                )
            )
            continue
        locking = not (acct.expired and acct.locked and acct.shell in NOLOGIN_SHELLS)
        if locking:
            changes.append(
                Change(
                    action="lock-account",
                    user=name,
                    summary=f"{name}: lock (no longer listed): password locked, expired, no login shell",
                    argv=[
                        "usermod",
                        "--lock",
                        "--expiredate",
                        "1",
                        "--shell",
                        facts.nologin,
                        "--",
                        name,
                    ],
                )
            )
        for g in spec.admin_groups:
            if g in acct.groups and g != acct.primary_group:
                changes.append(
                    Change(
                        action="leave-group",
                        user=name,
                        summary=f"{name}: remove from group {g}",
                        argv=["gpasswd", "--delete", name, g],
                    )
                )
        files = [
            f"{acct.home.rstrip('/')}/.ssh/{f}"
            for f, present in (
                ("authorized_keys", acct.authorized_keys),
                ("authorized_keys2", acct.authorized_keys2),
            )
            if present is not None
        ]
        if files:
            changes.append(
                Change(
                    action="remove-keys",
                    user=name,
                    summary=f"{name}: remove {', '.join(Path(f).name for f in files)}",
                    argv=["rm", "-f", "--", *files],
                )
            )
        if locking:
            changes.append(_end_sessions(name))

    if removing:
        changes.append(
            Change(
                action="record-managed",
                summary=f"write {MARKER_PATH} (-{', '.join(removing)})",
                argv=_write_file_argv(MARKER_PATH, "root", "root", 0o644, _lines(final)),
                stdin=_lines(final),
            )
        )
    if errors:
        return HostUsersPlan(changes=[], notes=notes, errors=errors)
    return HostUsersPlan(changes=changes, notes=notes)


def _end_sessions(name: str) -> Change:
    return Change(
        action="end-sessions",
        user=name,
        summary=f"{name}: end running sessions and processes",
        argv=sh_argv(END_SESSIONS_SCRIPT, name),
    )
