"""AWS clients, always built from a prefect-aws ``AwsCredentials`` block.

Transient errors (throttling, 5xx, connection resets) are retried by botocore's *standard* retry mode with
exponential backoff (``max_attempts`` from config); no hand-written retry loops. Every call is counted
per ``service:operation`` so runs and benchmarks can report how many AWS calls they made.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from typing import Any

from prefect_aws import AwsClientParameters, AwsCredentials

from config.models import AwsSettings

CALLS: Counter[str] = Counter()
"""AWS API calls made by this process, keyed ``service:Operation`` (read by reports and benchmarks)."""

_counted: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()


def make_credentials(settings: AwsSettings, region: str) -> AwsCredentials:
    """The credentials block for a run: the named block, or boto3's default chain.

    The endpoint and retry policy from config are applied on top, so tests and the sandbox can point the
    same code at a moto server.
    """
    if settings.credentials_block:
        creds = AwsCredentials.load(settings.credentials_block)
        if settings.region or not creds.region_name:
            creds.region_name = region
    else:
        creds = AwsCredentials(
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            region_name=region,
        )
    params = creds.aws_client_parameters or AwsClientParameters()
    creds.aws_client_parameters = AwsClientParameters(
        endpoint_url=settings.endpoint_url or params.endpoint_url,
        verify=params.verify,
        config={
            **(params.config or {}),
            "retries": {"mode": "standard", "total_max_attempts": settings.max_attempts},
            "connect_timeout": 10,
            "read_timeout": 60,
        },
    )
    return creds


def _count(model: Any, **_: Any) -> None:
    CALLS[f"{model.service_model.service_name}:{model.name}"] += 1


def aws_client(creds: AwsCredentials, service: str) -> Any:
    """A boto3 client for ``service`` from ``creds`` (cached by prefect-aws), with call counting."""
    client = creds.get_client(service)
    with _lock:
        if client not in _counted:
            client.meta.events.register("before-call", _count)
            _counted.add(client)
    return client


def calls_since(snapshot: Counter[str]) -> Counter[str]:
    """Calls made since ``snapshot`` (a copy of CALLS taken earlier)."""
    return CALLS - snapshot
