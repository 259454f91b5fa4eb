"""pytest fixtures: one moto server per test run, reset between tests, and a seeded environment."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import boto3
import pytest

from fabflows.testing.moto_server import MotoServer


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """A real moto HTTP server (server mode), started once per run."""
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws(moto_server: MotoServer) -> Iterator[MotoServer]:
    """The moto server, emptied before the test (50 ms)."""
    moto_server.reset()
    yield moto_server


@pytest.fixture(autouse=True, scope="session")
def _hide_user_aws_and_ssh() -> Iterator[None]:
    """Tests never read the user's ~/.aws or real credentials (SSH config is never loaded by fabflows)."""
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE")
    }
    os.environ["AWS_CONFIG_FILE"] = os.devnull
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    os.environ.pop("AWS_PROFILE", None)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def boto_client(server: MotoServer, service: str, region: str = "us-east-1"):
    """A boto3 client on the moto server, for test set-up and assertions."""
    return _cached_client(server.endpoint, service, region)


@functools.lru_cache(maxsize=64)
def _cached_client(endpoint: str, service: str, region: str):  # noqa: ANN202
    """One client per endpoint, service and region: making one costs ~70 ms of CPU, and boto3's
    clients are safe to share between threads."""
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
