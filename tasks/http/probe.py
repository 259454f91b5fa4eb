"""HTTP checks from outside: what users and the load balancer get, and measured downtime.

- :func:`wait_for_status` asks one URL until it answers the expected status (or time runs out).
- :func:`check_upgrade_mode` (task): every web server answers users 503 (with the upgrade page)
  and the health check 200, so the load balancer keeps them in service.
- :func:`check_site_up` (task): every web server (and the site URL) answers 200 again.
- :class:`HttpProbe`: polls one URL every 100 ms in a background thread and records every answer;
  its :class:`ProbeSummary` gives the non-200 count and the outage durations. Runbooks with
  downtime wrap their window in one to report measured, not estimated, downtime::

      with HttpProbe(site_url) as probe:
          ...
      report.downtime = probe.summary()

Per-server URLs address a server directly (``http://10.0.1.5/``); TLS certificates are not verified
there (they name the site, not the server). The site URL is checked with verification on.
Redirects are never followed: a 301 is an answer like any other.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from urllib.parse import urlsplit

import requests
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field
from urllib3.exceptions import InsecureRequestWarning

from fabflows.progress import Waiting

DEFAULT_INTERVAL = 0.1
"""The probe's poll interval (seconds)."""


class HttpCheck(BaseModel):
    """One URL: what was expected, what it answered last, and how long it took to get there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    expected: int
    status: int | None = Field(description="Last HTTP status (None: no answer).")
    ok: bool
    body_matches: bool | None = Field(
        default=None, description="The body was the expected page (None: not checked)."
    )
    waited_s: float = Field(description="Seconds until the expected answer (or until giving up).")
    error: str = Field(default="", description="Why there was no answer (connection refused...).")

    def describe(self) -> str:
        got = self.status if self.status is not None else f"no answer ({self.error})"
        if self.ok:
            return f"{self.url}: {self.status} as expected"
        if self.status == self.expected and self.body_matches is False:
            return f"{self.url}: {self.status} but not the expected page"
        return f"{self.url}: expected {self.expected}, got {got} after {self.waited_s:.1f} s"


class HttpCheckFailed(RuntimeError):
    """Some URLs did not answer as expected; ``checks`` has every result."""

    def __init__(self, what: str, checks: Sequence[HttpCheck]):
        self.checks = list(checks)
        bad = [c.describe() for c in checks if not c.ok]
        super().__init__(f"{what}: " + "; ".join(bad))


def _verify_for(url: str, site_urls: Sequence[str]) -> bool:
    return url in site_urls


def _get(
    session: requests.Session, url: str, timeout: float, verify: bool
) -> tuple[int | None, bytes, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureRequestWarning)
            r = session.get(url, timeout=timeout, allow_redirects=False, verify=verify)
        return r.status_code, r.content, ""
    except requests.RequestException as exc:
        reason = type(exc).__name__
        if isinstance(exc, requests.ConnectionError):
            reason = "connection failed"
        elif isinstance(exc, requests.Timeout):
            reason = "timed out"
        return None, b"", reason


def wait_for_status(
    url: str,
    expected: int,
    *,
    timeout: float,
    body: bytes | None = None,
    verify: bool = False,
    interval: float = 0.2,
    request_timeout: float = 5.0,
) -> HttpCheck:
    """GET ``url`` until it answers ``expected`` (and ``body``, if given) or ``timeout`` passes."""
    started = time.monotonic()
    deadline = started + timeout
    session = requests.Session()
    try:
        while True:
            status, content, error = _get(
                session, url, min(request_timeout, max(timeout, 0.5)), verify
            )
            matches = None if body is None else content == body
            ok = status == expected and matches is not False
            now = time.monotonic()
            if ok or now >= deadline:
                return HttpCheck(
                    url=url,
                    expected=expected,
                    status=status,
                    ok=ok,
                    body_matches=matches,
                    waited_s=round(now - started, 3),
                    error=error,
                )
            time.sleep(min(interval, max(0.0, deadline - now)))
    finally:
        session.close()


def join_url(base: str, path: str) -> str:
    """``http://h/`` + ``/healthcheck.html`` -> ``http://h/healthcheck.html``."""
    return base.rstrip("/") + "/" + path.lstrip("/")


def _check_all(
    specs: Sequence[tuple[str, int, bytes | None, bool]], timeout: float, what: str = ""
) -> list[HttpCheck]:
    if not specs:
        return []
    with (
        Waiting(what or f"{len(specs)} URL(s) to answer", timeout) as waiting,
        ThreadPoolExecutor(max_workers=min(16, len(specs)), thread_name_prefix="http") as ex,
    ):
        futures = [
            ex.submit(wait_for_status, url, code, timeout=timeout, body=body, verify=verify)
            for url, code, body, verify in specs
        ]
        waiting.until_done(futures, "URL(s) answered as expected")
        return [f.result() for f in futures]


@task(name="check-upgrade-mode", cache_policy=NO_CACHE, retries=0)
def check_upgrade_mode(
    server_urls: list[str],
    healthcheck_path: str,
    page: bytes | None,
    *,
    site_url: str | None = None,
    timeout: float = 30.0,
) -> list[HttpCheck]:
    """From outside: users get 503 (the upgrade page) and the health check gets 200, everywhere.

    Raises:
        HttpCheckFailed: a server (or the site) answered anything else within ``timeout``.
    """
    return _check_front_and_health(
        server_urls,
        healthcheck_path,
        site_url,
        (503, page),
        timeout,
        "upgrade mode is not what users and the load balancer see",
    )


@task(name="check-site-up", cache_policy=NO_CACHE, retries=0)
def check_site_up(
    server_urls: list[str],
    healthcheck_path: str,
    *,
    site_url: str | None = None,
    timeout: float = 30.0,
) -> list[HttpCheck]:
    """From outside: every web server (and the site) answers 200 for users and the health check.

    Raises:
        HttpCheckFailed: something did not answer 200 within ``timeout``.
    """
    return _check_front_and_health(
        server_urls,
        healthcheck_path,
        site_url,
        (200, None),
        timeout,
        "the site does not answer 200",
    )


def _check_front_and_health(
    server_urls: list[str],
    healthcheck_path: str,
    site_url: str | None,
    front: tuple[int, bytes | None],
    timeout: float,
    failure: str,
) -> list[HttpCheck]:
    """Each server (and the site): ``/`` answers ``front`` (status, body), the health check 200."""
    bases = list(server_urls) + ([site_url] if site_url else [])
    sites = [site_url] if site_url else []
    specs: list[tuple[str, int, bytes | None, bool]] = []
    for base in bases:
        verify = _verify_for(base, sites)
        specs.append((base, front[0], front[1], verify))
        specs.append((join_url(base, healthcheck_path), 200, None, verify))
    what = f"{len(server_urls)} web server(s){' and the site' if site_url else ''} to answer {front[0]}"
    checks = _check_all(specs, timeout, what)
    logger = get_run_logger()
    for c in checks:
        logger.info("%s", c.describe())
    if not all(c.ok for c in checks):
        raise HttpCheckFailed(failure, checks)
    return checks


# --------------------------------------------------------------------------- downtime probe


class ProbeSample(BaseModel):
    """One poll: when (seconds since the probe started), the status (None: no answer), latency."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    t: float
    status: int | None
    latency_s: float


class Outage(BaseModel):
    """A run of consecutive non-200 answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start_s: float = Field(description="Seconds after the probe started: first non-200 answer.")
    end_s: float = Field(description="Seconds after the probe started: next 200 (or last poll).")
    duration_s: float
    statuses: list[int | None] = Field(description="Distinct answers during the outage.")


class ProbeSummary(BaseModel):
    """What users saw at one URL while the probe ran."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    started_at: datetime
    duration_s: float
    interval_s: float
    samples: int
    non_200: int = Field(description="Polls that did not get a 200 (errors included).")
    outages: list[Outage]
    total_downtime_s: float = Field(description="Sum of the outages' durations.")
    longest_outage_s: float
    latency_p50_s: float | None
    latency_max_s: float | None

    def describe(self) -> str:
        if not self.non_200:
            return f"{self.url}: 200 throughout ({self.samples} polls over {self.duration_s:.1f} s)"
        return (
            f"{self.url}: {self.non_200} of {self.samples} polls not 200; downtime "
            f"{self.total_downtime_s:.1f} s in {len(self.outages)} outage(s), longest "
            f"{self.longest_outage_s:.1f} s"
        )


def summarize_samples(
    url: str,
    started_at: datetime,
    samples: Sequence[ProbeSample],
    interval: float,
    duration: float,
) -> ProbeSummary:
    """Pure: outages are runs of non-200 samples, from the first bad sample to the next good one."""
    outages: list[Outage] = []
    start: float | None = None
    statuses: list[int | None] = []
    for s in samples:
        if s.status != 200:
            if start is None:
                start, statuses = s.t, []
            if s.status not in statuses:
                statuses.append(s.status)
        elif start is not None:
            outages.append(
                Outage(
                    start_s=start,
                    end_s=s.t,
                    duration_s=round(s.t - start, 3),
                    statuses=statuses,
                )
            )
            start = None
    if start is not None:
        end = samples[-1].t if samples else start
        outages.append(
            Outage(start_s=start, end_s=end, duration_s=round(end - start, 3), statuses=statuses)
        )
    latencies = sorted(s.latency_s for s in samples if s.status is not None)
    return ProbeSummary(
        url=url,
        started_at=started_at,
        duration_s=round(duration, 3),
        interval_s=interval,
        samples=len(samples),
        non_200=sum(1 for s in samples if s.status != 200),
        outages=outages,
        total_downtime_s=round(sum(o.duration_s for o in outages), 3),
        longest_outage_s=max((o.duration_s for o in outages), default=0.0),
        latency_p50_s=latencies[len(latencies) // 2] if latencies else None,
        latency_max_s=latencies[-1] if latencies else None,
    )


class HttpProbe:
    """Poll ``url`` every ``interval`` seconds in a background thread until stopped.

    Use as a context manager (or ``start()`` / ``stop()``); ``summary()`` may be called at any time.
    Each poll waits at most ``request_timeout`` seconds; a poll that gets no answer counts as down.
    """

    def __init__(
        self,
        url: str,
        interval: float = DEFAULT_INTERVAL,
        request_timeout: float = 2.0,
        verify: bool | None = None,
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"probe URL {url!r} is not an http(s) URL")
        if interval <= 0:
            raise ValueError("probe interval must be positive")
        self.url = url
        self.interval = interval
        self.request_timeout = request_timeout
        self.verify = verify if verify is not None else False
        self.samples: list[ProbeSample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._started_at = datetime.now(UTC)
        self._stopped_at: float | None = None

    def start(self) -> HttpProbe:
        self._t0 = time.monotonic()
        self._started_at = datetime.now(UTC)
        self._thread = threading.Thread(target=self._run, name="http-probe", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        session = requests.Session()
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                sent = time.monotonic()
                status, _, _ = _get(session, self.url, self.request_timeout, self.verify)
                got = time.monotonic()
                with self._lock:
                    self.samples.append(
                        ProbeSample(
                            t=round(sent - self._t0, 4),
                            status=status,
                            latency_s=round(got - sent, 4),
                        )
                    )
                next_at += self.interval
                if next_at < got:  # a slow answer: don't burst to catch up
                    next_at = got
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            session.close()

    def stop(self) -> ProbeSummary:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.request_timeout + 1)
        self._stopped_at = time.monotonic()
        return self.summary()

    def summary(self) -> ProbeSummary:
        with self._lock:
            samples = list(self.samples)
        end = self._stopped_at if self._stopped_at is not None else time.monotonic()
        return summarize_samples(self.url, self._started_at, samples, self.interval, end - self._t0)

    def __enter__(self) -> HttpProbe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
