"""Sysadmin users: the users directory, validated before any host is touched.

A users directory is like FabulAWS's ``deployment/users/``: one public-key file per user (file
name = user name, one or more keys), plus an optional ``<user>.gecos`` with the full name.
:func:`load_users_dir` validates all of it and reports every problem at once
(:class:`fabflows.errors.BadInput`); keys are parsed with ``ssh-keygen`` and shown only by type,
size and digest.
"""

from __future__ import annotations

import base64
import binascii
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import paramiko
from pydantic import BaseModel, ConfigDict, Field

from fabflows.errors import BadInput
from tasks.ssh.connection import SshOptions

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

MAX_GECOS = 255


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
