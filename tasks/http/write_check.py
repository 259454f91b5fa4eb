"""Does the app write? A POST to its write-check page, retried until it answers 200.

The app's write-check page (``POST <server>/write-check`` in the sandbox's app) saves a row through
the app's own database settings, so 200 proves the whole path: nginx, the app, pgbouncer and a
primary that takes writes. Each URL is asked until it answers 200 or the time is up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import requests
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.http.probe import HttpCheck


def post_until_ok(
    url: str, *, timeout: float, interval: float = 0.3, request_timeout: float = 5.0
) -> HttpCheck:
    """POST ``url`` until it answers 200 or ``timeout`` passes (TLS not verified: per server)."""
    started = time.monotonic()
    deadline = started + timeout
    status: int | None = None
    error = ""
    with requests.Session() as session:
        while True:
            try:
                r = session.post(
                    url,
                    data={"text": "fabflows write check"},
                    timeout=request_timeout,
                    allow_redirects=False,
                    verify=False,
                )
                status, error = r.status_code, ""
            except requests.RequestException as exc:
                status, error = None, type(exc).__name__
            now = time.monotonic()
            if status == 200 or now >= deadline:
                return HttpCheck(
                    url=url,
                    expected=200,
                    status=status,
                    ok=status == 200,
                    waited_s=round(now - started, 3),
                    error=error,
                )
            time.sleep(interval)


@task(name="check-app-writes", cache_policy=NO_CACHE, retries=0)
def check_app_writes(urls: Sequence[str], *, timeout: float = 60.0) -> list[HttpCheck]:
    """POST every URL's write-check page until each answers 200 (or ``timeout`` passes).

    Args:
        urls: Write-check URLs (each web server's, and the site's).
        timeout: Seconds each URL is given.
    """
    return [post_until_ok(u, timeout=timeout) for u in urls]
