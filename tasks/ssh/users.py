"""Sysadmin accounts on servers: validated input, host facts, a pure plan, and fleet steps.

The input is a users directory like FabulAWS's ``deployment/users/``: one public-key file per user
(file name = user name, one or more keys), plus an optional ``<user>.gecos`` with the full name.
:func:`load_users_dir` validates all of it before any host is touched and reports every problem at
once (:class:`fabflows.errors.BadInput`).

On a host, fabflows records the accounts it manages in ``/etc/fabflows/sysadmin-users`` (one name a
line). Only those are ever locked or removed; accounts fabflows did not create or adopt are never
touched. The marker is written *before* an account is created, so a run that dies half-way leaves
nothing fabflows would not recognise next time.

Per host, :func:`plan_host_users` turns :class:`HostFacts` (read by :data:`FACTS_SCRIPT`) and the
wanted :class:`SysadminUsersSpec` into an ordered list of :class:`Change` s, each with the exact
command it runs. The plan is pure and table-tested; the fleet steps read facts, plan, and run the
commands (or, in a dry run, only record them).
"""

from __future__ import annotations

import base64
import binascii
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import paramiko
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from fabflows.errors import BadInput
from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import FleetHost, FleetResult, HostResult, RateControl, run_fleet
from tasks.ssh.remote import Remote, atomic_write_argv, sh_argv

MARKER_PATH = "/etc/fabflows/sysadmin-users"
"""Accounts fabflows manages on a host, one name a line (root:root 0644)."""

NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
NAME_RULE = (
    "lowercase letters, digits, '_' and '-', starting with a letter or '_', at most 32 characters"
)

RESERVED_NAMES = frozenset(
    """root daemon bin sys sync games man lp mail news uucp proxy www-data backup list irc gnats
    nobody _apt systemd-network systemd-resolve systemd-timesync systemd-coredump messagebus sshd
    syslog postgres nginx supervisor ubuntu admin sudo adm wheel staff users operator halt shutdown
    tty disk kmem dialout cdrom floppy audio video plugdev netdev lxd docker""".split()
)
"""System accounts and groups a sysadmin file must not be named after."""

IGNORED_FILES = frozenset({".gitkeep", ".keep", ".gitignore", ".DS_Store"})

KEY_TYPES = {
    "ssh-ed25519": 256,
    "sk-ssh-ed25519@openssh.com": 256,
    "ecdsa-sha2-nistp256": 256,
    "ecdsa-sha2-nistp384": 384,
    "ecdsa-sha2-nistp521": 521,
    "sk-ecdsa-sha2-nistp256@openssh.com": 256,
    "ssh-rsa": 2048,  # minimum bits
}
"""Public key types accepted, with the minimum size (ssh-dss is refused: OpenSSH dropped it)."""

END_SESSIONS_SCRIPT = (
    'pkill -KILL -u "$1" || true; i=0; '
    'while pgrep -u "$1" >/dev/null && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i+1)); done'
)
"""Kill the user's processes and wait (up to 5 s) until they are gone, so userdel can proceed."""

SYSTEM_UID_MAX = 999
SHELL = "/bin/bash"
NOLOGIN_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false")
MAX_GECOS = 255

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


# --------------------------------------------------------------------------- input


class PublicKey(BaseModel):
    """One validated public key line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    blob: str = Field(description="The base64 key.")
    comment: str = ""
    bits: int
    fingerprint: str = Field(description="SHA256:... as ssh-keygen -l prints it.")

    @property
    def line(self) -> str:
        return " ".join(p for p in (self.type, self.blob, self.comment) if p)

    def describe(self) -> str:
        """As plans show a key: type, size and SHA256 digest, never the key itself."""
        return f"{self.type} {self.bits} {self.fingerprint}" + (
            f" ({self.comment})" if self.comment else ""
        )


class SysadminUser(BaseModel):
    """A sysadmin from the users directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_RE.pattern)
    public_keys: list[PublicKey] = Field(min_length=1)
    gecos: str | None = Field(default=None, description="Full name; None leaves it as is.")

    def authorized_keys(self) -> str:
        return "".join(k.line + "\n" for k in self.public_keys)


def _ssh_keygen_fingerprint(line: str) -> tuple[int, str] | str:
    """(bits, SHA256:...) from ``ssh-keygen -l``, or its error text."""
    exe = shutil.which("ssh-keygen")
    if exe is None:
        raise BadInput("ssh-keygen is not installed here; it is needed to check the keys")
    proc = subprocess.run(
        [exe, "-l", "-f", "/dev/stdin"],
        input=line + "\n",
        capture_output=True,
        text=True,
        timeout=10,
    )
    if proc.returncode != 0:
        return (proc.stderr or proc.stdout).strip().replace("/dev/stdin", "key") or "unreadable"
    fields = proc.stdout.split()
    return int(fields[0]), fields[1]


def parse_public_key(line: str) -> PublicKey:
    """Parse one ``type base64 [comment]`` line; raises ValueError saying what is wrong."""
    text = line.strip()
    if "PRIVATE KEY" in text or text.startswith("-----BEGIN"):
        raise ValueError("is a PRIVATE key: put only the public key (.pub) here")
    parts = text.split(None, 2)
    if not parts:
        raise ValueError("is empty")
    key_type = parts[0]
    if key_type == "ssh-dss":
        raise ValueError("is a DSA (ssh-dss) key, which OpenSSH no longer accepts")
    if key_type not in KEY_TYPES:
        if "=" in key_type or "," in key_type:
            raise ValueError("starts with authorized_keys options, which are not supported")
        raise ValueError(
            f"does not start with a key type ({key_type[:20]!r}); expected one of "
            + ", ".join(sorted(KEY_TYPES))
        )
    if len(parts) < 2:
        raise ValueError(f"has a type ({key_type}) but no key")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("has a key that is not valid base64") from None
    if len(raw) < 4 or raw[4 : 4 + int.from_bytes(raw[:4], "big")] != key_type.encode():
        raise ValueError(f"has a key whose content is not a {key_type} key")
    comment = parts[2].strip() if len(parts) > 2 else ""
    if any(ord(c) < 32 for c in comment):
        raise ValueError("has control characters in its comment")
    checked = _ssh_keygen_fingerprint(f"{key_type} {parts[1]}")
    if isinstance(checked, str):
        raise ValueError(f"is refused by ssh-keygen: {checked}")
    bits, fingerprint = checked
    if key_type == "ssh-rsa" and bits < KEY_TYPES["ssh-rsa"]:
        raise ValueError(f"is a {bits}-bit RSA key; at least 2048 bits are required")
    return PublicKey(
        type=key_type, blob=parts[1], comment=comment, bits=bits, fingerprint=fingerprint
    )


def check_user_name(name: str, reserved: frozenset[str] | set[str] = RESERVED_NAMES) -> str | None:
    """None if ``name`` can be a sysadmin account, else why not."""
    if "/" in name or name in (".", "..") or ".." in name:
        return "is a path, not a user name"
    if not NAME_RE.match(name):
        if any(c in name for c in " \t\n;|&$`<>(){}[]*?!'\"\\~#"):
            return f"contains shell metacharacters or spaces; user names are {NAME_RULE}"
        if name.lower() != name and NAME_RE.match(name.lower()):
            return f"has upper-case letters; user names are {NAME_RULE}"
        return f"is not a portable user name ({NAME_RULE})"
    if name in reserved:
        return "is reserved (a system account, group, or the account fabflows connects as)"
    return None


def check_gecos(text: str) -> str | None:
    """None if ``text`` can be a GECOS field, else why not."""
    if ":" in text:
        return "contains ':' (the /etc/passwd field separator)"
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return "contains a line break or another control character (one line only)"
    if len(text) > MAX_GECOS:
        return f"is longer than {MAX_GECOS} characters"
    return None


def load_users_dir(path: str | Path, extra_reserved: Sequence[str] = ()) -> list[SysadminUser]:
    """Read and validate a users directory; every problem is reported at once.

    Raises:
        BadInput: naming each bad file and what is wrong with it.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise BadInput(f"users directory {root} does not exist")
    if not root.is_dir():
        raise BadInput(f"users directory {root} is not a directory")
    reserved = set(RESERVED_NAMES) | set(extra_reserved)
    problems: list[str] = []
    keys_files: dict[str, Path] = {}
    gecos_files: dict[str, Path] = {}
    bad_names: set[str] = set()
    for entry in sorted(root.iterdir()):
        fname = entry.name
        if fname in IGNORED_FILES:
            continue
        if not entry.is_file():
            problems.append(f"{fname}: is not a regular file (one key file per user)")
            continue
        base, dot, ext = fname.rpartition(".")
        if dot and ext == "gecos":
            gecos_files[base] = entry
            name = base
        else:
            keys_files[fname] = entry
            name = fname
        why = check_user_name(name, reserved)
        if why:
            problems.append(f"{fname}: user name {name!r} {why}")
            bad_names.add(name)
    for name, entry in gecos_files.items():
        if name not in keys_files:
            problems.append(f"{entry.name}: there is no key file {name!r} for this GECOS file")
    users: list[SysadminUser] = []
    seen_keys: dict[str, str] = {}
    for name, entry in sorted(keys_files.items()):
        if name in bad_names:
            continue
        try:
            text = entry.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{entry.name}: cannot be read as UTF-8 text ({exc})")
            continue
        keys: list[PublicKey] = []
        lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1)]
        content = [(n, ln) for n, ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if "PRIVATE KEY" in text:
            problems.append(f"{entry.name}: is a PRIVATE key: put only the public key (.pub) here")
            continue
        if not content:
            problems.append(f"{entry.name}: has no key (the file is empty)")
            continue
        for lineno, line in content:
            try:
                key = parse_public_key(line)
            except ValueError as exc:
                problems.append(f"{entry.name} line {lineno}: {exc}")
                continue
            owner = seen_keys.get(key.blob)
            if owner == name:
                problems.append(f"{entry.name} line {lineno}: the same key is listed twice")
                continue
            if owner is not None:
                problems.append(
                    f"{entry.name} line {lineno}: the same key is also {owner!r}'s key "
                    f"({key.fingerprint}); one key, one person"
                )
                continue
            seen_keys[key.blob] = name
            keys.append(key)
        gecos = None
        if name in gecos_files:
            try:
                gecos = gecos_files[name].read_text(encoding="utf-8").strip("\n")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(f"{name}.gecos: cannot be read as UTF-8 text ({exc})")
                continue
            why = check_gecos(gecos)
            if why:
                problems.append(f"{name}.gecos: {why}")
                continue
        if keys:
            users.append(SysadminUser(name=name, public_keys=keys, gecos=gecos))
    if problems:
        raise BadInput(
            f"users directory {root}: {len(problems)} problem(s), nothing was changed:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    if not users:
        raise BadInput(
            f"users directory {root} lists no users; refusing to lock every managed account "
            "(to remove everyone, say so one user at a time)"
        )
    return users


def public_key_of(opts: SshOptions) -> str | None:
    """The public key line of the key fabflows connects with (so it never locks itself out)."""
    pkey = opts.pkey
    if pkey is None and opts.key_file:
        pkey = paramiko.PKey.from_path(opts.key_file)
    if pkey is None:
        return None
    return f"{pkey.get_name()} {pkey.get_base64()}"


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


# --------------------------------------------------------------------------- host facts

FACTS_SCRIPT = r"""set -u
marker=$1; shift
printf 'now\t%s\n' "$(date +%s)"
if [ -f "$marker" ]; then
  printf 'marker\tpresent\n'
  while IFS= read -r n || [ -n "$n" ]; do
    printf 'managed\t%s\n' "$n"
    case "$n" in ''|-*) ;; *) set -- "$@" "$n";; esac
  done < "$marker"
fi
printf 'nologin\t%s\n' "$(command -v nologin || echo /usr/sbin/nologin)"
getent group | while IFS= read -r l; do printf 'group\t%s\n' "$l"; done
pw=$(getent passwd "$@")
printf '%s\n' "$pw" | while IFS= read -r l; do [ -n "$l" ] && printf 'passwd\t%s\n' "$l"; done
getent shadow "$@" | while IFS=: read -r n p _ _ _ _ _ ex _; do
  case "$p" in '') k=empty;; '!') k=locked-empty;; '!'*) k=locked;; '*') k=star;; '$'*) k=hash;; *) k=other;; esac
  printf 'shadow\t%s\t%s\t%s\n' "$n" "$k" "$ex"
done
printf '%s\n' "$pw" | while IFS=: read -r n _ _ _ _ h _; do
  [ -n "$n" ] && printf '%s\n' "$h/.ssh" "$h/.ssh/authorized_keys" "$h/.ssh/authorized_keys2"
done | sort -u | xargs -r -d '\n' sh -c 'find -P "$@" -maxdepth 0 -printf "stat\t%p\t%u:%g:%m:%y\n" 2>/dev/null; true' sh
printf '%s\n' "$pw" | while IFS=: read -r n _ _ _ _ h _; do
  [ -n "$n" ] && [ ! -L "$h/.ssh" ] && printf '%s\n' "$h/.ssh/authorized_keys"
done | sort -u | xargs -r -d '\n' sh -c 'find -P "$@" -maxdepth 0 -type f -exec grep -aH "" -- {} + 2>/dev/null; true' sh |
  while IFS= read -r l; do printf 'keyline\t%s\n' "$l"; done
"""
"""Read as root, with a fixed number of processes whatever the number of users: the marker, the
groups, and for every listed or managed user the passwd entry, the password *state* (a
classification, never the hash) and expiry, and ~/.ssh, authorized_keys and authorized_keys2 (owner,
mode, type; the keys themselves). Symlinks are reported, never followed."""

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


def read_host_facts(remote: Remote, spec: SysadminUsersSpec) -> HostFacts:
    """One command, as root, reads everything the plan needs."""
    names = sorted({u.name for u in spec.users} | {spec.deploy_user, spec.connect_user})
    out = remote.read(sh_argv(FACTS_SCRIPT, MARKER_PATH, *names), sudo=True)
    return parse_facts(out.stdout)


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


# --------------------------------------------------------------------------- fleet steps


def facts_step(spec: SysadminUsersSpec) -> Callable[[Remote, FleetHost], HostResult]:
    """Read one host's accounts: ``unchanged`` (a read), ``output`` is its :class:`HostFacts`."""

    def step(remote: Remote, host: FleetHost) -> HostResult:
        facts = read_host_facts(remote, spec)
        return HostResult(
            status="unchanged",
            message=f"{len(facts.accounts)} account(s) read, {len(facts.managed)} managed",
            output=facts,
        )

    return step


LoginCheck = Callable[[FleetHost], None]


def apply_step(
    spec: SysadminUsersSpec,
    approved: dict[str, list[str]] | None,
    login_check: LoginCheck | None,
) -> Callable[[Remote, FleetHost], HostResult]:
    """Re-read, re-plan, refuse drift from the approved plan, run the changes, check login.

    ``approved`` maps host address -> the change summaries the operator saw (None: no check). If
    the connect user's authorized_keys were rewritten, ``login_check`` opens a fresh connection;
    if that fails, the previous authorized_keys are put back over the still-open connection.
    """

    def step(remote: Remote, host: FleetHost) -> HostResult:
        facts = read_host_facts(remote, spec)
        plan = plan_host_users(facts, spec)
        if plan.errors:
            return HostResult(status="failed", message="; ".join(plan.errors))
        if approved is not None and plan.summaries() != approved.get(host.address, []):
            return HostResult(
                status="failed",
                message="host changed since the plan was shown; nothing done here. Now it needs: "
                + ("; ".join(plan.summaries()) or "nothing"),
            )
        if not plan.changes:
            return HostResult(status="unchanged", message="already as listed")
        remote.write_batch(
            [(c.argv, c.stdin.encode() if c.stdin is not None else None) for c in plan.changes],
            sudo=True,
        )
        rewrote_own = any(
            c.action == "write-keys" and c.user == spec.connect_user for c in plan.changes
        )
        if rewrote_own and login_check is not None and not remote.dry_run:
            try:
                login_check(host)
            except Exception as exc:
                acct = facts.accounts[spec.connect_user]
                previous = acct.keys_content
                path = f"{acct.home.rstrip('/')}/.ssh/authorized_keys"
                if previous is not None:
                    remote.write_file(
                        path,
                        previous.encode(),
                        owner=spec.connect_user,
                        group=acct.primary_group,
                        mode=0o600,
                    )
                return HostResult(
                    status="failed",
                    message=f"{spec.connect_user} could not log in after the keys changed ({exc}); "
                    "previous authorized_keys restored",
                )
        return HostResult(status="changed", message="; ".join(plan.summaries()))

    return step


@task(name="list-sysadmin-accounts", cache_policy=NONE)
def list_sysadmin_accounts(
    hosts: list[FleetHost], spec: SysadminUsersSpec, pool: ConnectionPool, rate: RateControl
) -> FleetResult:
    """Read every host's accounts (read only; each result's ``output`` is its HostFacts)."""
    return run_fleet(
        hosts, facts_step(spec), pool=pool, rate=rate, dry_run=True, name="list-sysadmin-accounts"
    )


@task(name="update-sysadmin-accounts", cache_policy=NONE, retries=0)
def update_sysadmin_accounts(
    hosts: list[FleetHost],
    spec: SysadminUsersSpec,
    pool: ConnectionPool,
    rate: RateControl,
    approved: dict[str, list[str]] | None,
    *,
    dry_run: bool,
) -> FleetResult:
    """Bring every host's sysadmin accounts to ``spec``; in a dry run only record the commands.

    Idempotent: each host is re-read and re-planned, so a second run changes nothing. A host whose
    plan differs from ``approved`` is not touched (it changed since the operator saw the plan).
    Compensation: if fabflows' own login breaks after its keys were rewritten, the previous keys are
    restored at once; created accounts are not removed again (a later run with the user dropped
    locks them).
    """
    opts = pool.opts

    def login_check(host: FleetHost) -> None:
        from tasks.ssh.connection import connect

        connect(host.address, opts).close()

    return run_fleet(
        hosts,
        apply_step(spec, approved, login_check),
        pool=pool,
        rate=rate,
        dry_run=dry_run,
        name="update-sysadmin-accounts",
    )
