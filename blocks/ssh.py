"""SSH identity block: the key fabflows connects with, never in config files or parameters."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class SshIdentity(Block):
    """The SSH user and private key fabflows connects to servers with.

    Host keys are not part of this block: they come from the known_hosts file named in config
    (``fabflows.ssh.known_hosts_file``) or from ``known_hosts`` here, and are always checked.
    Block documents are named ``<environment>-ssh`` (e.g. ``production-ssh``).
    """

    _block_type_name = "fabflows SSH identity"
    _block_type_slug = "fabflows-ssh-identity"
    _description = "SSH user, private key and optional known_hosts lines for fabflows runbooks."

    username: str = Field(description="User to connect as (usually the deploy user).")
    private_key: SecretStr = Field(description="OpenSSH private key (PEM / OpenSSH format).")
    passphrase: SecretStr | None = Field(default=None, description="Key passphrase, if any.")
    known_hosts: str | None = Field(
        default=None,
        description="known_hosts lines checked in addition to the configured known_hosts file.",
    )
