"""SSH key pairs and users directories for tests and benchmarks (generated, never real keys)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


@dataclass(frozen=True)
class KeyPair:
    """A generated key: ``public`` is an OpenSSH line, ``private`` an OpenSSH private key."""

    public: str
    private: bytes

    def write_private(self, path: Path) -> Path:
        path.write_bytes(self.private)
        path.chmod(0o600)
        return path


def _pair(key, comment: str) -> KeyPair:
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    return KeyPair(public=f"{public} {comment}".strip(), private=private)


def ed25519_pair(comment: str = "") -> KeyPair:
    return _pair(ed25519.Ed25519PrivateKey.generate(), comment)


def rsa_pair(bits: int = 2048, comment: str = "") -> KeyPair:
    return _pair(rsa.generate_private_key(public_exponent=65537, key_size=bits), comment)


def dsa_public(comment: str = "") -> str:
    """A well-formed ssh-dss line (its blob is only the type: DSA is refused by type)."""
    return f"ssh-dss AAAAB3NzaC1kc3MAAAAA {comment}".strip()


def write_users_dir(
    directory: Path, users: dict[str, list[KeyPair] | KeyPair], gecos: dict[str, str] | None = None
) -> Path:
    """A FabulAWS-style users directory: one public-key file per user, optional ``.gecos``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, keys in users.items():
        pairs = keys if isinstance(keys, list) else [keys]
        (directory / name).write_text("".join(k.public + "\n" for k in pairs))
    for name, text in (gecos or {}).items():
        (directory / f"{name}.gecos").write_text(text + "\n")
    return directory
