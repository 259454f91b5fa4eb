"""How fabflows reaches AWS and the servers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from config.models.base import _NAME, Strict


class AwsSettings(Strict):
    """Where and as whom fabflows talks to AWS."""

    credentials_block: str | None = Field(
        default=None,
        pattern=_NAME,
        description="Name of a prefect-aws AwsCredentials block. Unset: boto3's default chain.",
    )
    region: str | None = Field(
        default=None,
        pattern=r"^[a-z]{2}(-[a-z]+)+-\d$",
        description="AWS region. Default: the top-level region.",
    )
    endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="Override the AWS endpoint (a moto server in tests and the sandbox).",
    )
    max_attempts: int = Field(
        default=8,
        ge=1,
        le=20,
        description="botocore total attempts for each call (throttling and 5xx are retried with backoff).",
    )
    access_key_id: str | None = Field(
        default=None,
        description="Only for the local sandbox's fake AWS: an access key id used when no block is set.",
    )
    secret_access_key: SecretStr | None = Field(
        default=None,
        description="Only for the local sandbox's fake AWS (moto accepts any key).",
    )


class SshSettings(Strict):
    """How fabflows reaches servers over SSH. Host keys are always checked."""

    user: str | None = Field(
        default=None, pattern=r"^[a-z_][a-z0-9_-]{0,31}$", description="Default: deploy_user."
    )
    port: int = Field(default=22, ge=1, le=65535)
    identity_block: str | None = Field(
        default=None, pattern=_NAME, description="Name of an SshIdentity block holding the key."
    )
    identity_file: str | None = Field(
        default=None, description="Path of a private key file, if no block is used."
    )
    known_hosts_file: str = Field(
        default="~/.ssh/known_hosts",
        description="known_hosts checked for every connection; unknown or changed keys are refused.",
    )
    address_attribute: (
        Literal["public_dns_name", "public_ip_address", "private_ip_address", "private_dns_name"]
        | None
    ) = Field(
        default=None, description="Instance attribute to connect to. Default: ec2_attr_for_ssh."
    )
    connect_timeout: float = Field(default=10, gt=0, le=300)
    command_timeout: float = Field(default=900, gt=0, le=86400)
