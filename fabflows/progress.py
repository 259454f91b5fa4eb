"""Progress of long steps: a Prefect progress artifact in the UI and a bar with time left in the CLI.

    progress = Progress("copy-database", total=size_bytes, unit="B", description="Copying production")
    for chunk in ...:
        progress.update(done)
    progress.finish()

The artifact is updated at most once a second; the CLI bar is drawn on stderr when the flow runs
under ``fabflows run`` (which sets ``FABFLOWS_PROGRESS_BAR=1``) and stderr is a terminal or the
variable is ``force``.

Waits with a limit (an instance to start, a site to answer) say what they wait for, how long so far
and the limit, at most every ~10 s, in the run log and, under ``fabflows run``, on stderr::

    with Waiting("the site and 2 web servers to answer 200", limit=900) as wait:
        while not done():
            wait.tick("1 of 3 answer")          # prints only when ``every`` seconds have passed
            time.sleep(1)
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from types import TracebackType
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from fabflows.report import artifact_key, in_flow_run


def human(n: float, unit: str) -> str:
    if unit == "B":
        for u in ("B", "KB", "MB", "GB", "TB"):
            if abs(n) < 1024 or u == "TB":
                return f"{n:.0f} {u}" if u == "B" else f"{n:.1f} {u}"
            n /= 1024
    return f"{n:,.0f} {unit}".rstrip()


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "estimating"
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m left"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s left"
    return f"{seconds}s left"


class Progress:
    """Track ``done`` out of ``total``; estimate the time left from the rate so far."""

    def __init__(self, key: str, total: float, unit: str = "", description: str = ""):
        self.key = artifact_key(key)
        self.total = max(float(total), 1.0)
        self.unit = unit
        self.description = description
        self.started = time.monotonic()
        self.done = 0.0
        self._last_push = 0.0
        self._lock = threading.Lock()
        self._artifact: UUID | None = None
        mode = os.environ.get("FABFLOWS_PROGRESS_BAR", "")
        self._bar = mode == "force" or (mode == "1" and sys.stderr.isatty())
        if in_flow_run():
            self._artifact = create_progress_artifact(
                progress=0.0, key=self.key, description=description or key
            )

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total)

    def seconds_left(self) -> float | None:
        elapsed = time.monotonic() - self.started
        if self.done <= 0 or elapsed < 0.5:
            return None
        rate = self.done / elapsed
        return (self.total - self.done) / rate if rate > 0 else None

    def line(self) -> str:
        width = 30
        filled = int(width * self.fraction)
        return (
            f"{self.description or self.key} [{'#' * filled}{'.' * (width - filled)}] "
            f"{self.fraction * 100:5.1f}%  {human(self.done, self.unit)} / "
            f"{human(self.total, self.unit)}  {eta_text(self.seconds_left())}"
        )

    def update(self, done: float, force: bool = False) -> None:
        with self._lock:
            self.done = min(float(done), self.total)
            now = time.monotonic()
            if not force and now - self._last_push < 1.0:
                return
            self._last_push = now
        if self._artifact is not None:
            update_progress_artifact(
                artifact_id=self._artifact,
                progress=round(self.fraction * 100, 1),
                description=f"{self.description}: {eta_text(self.seconds_left())}",
            )
        if self._bar:
            sys.stderr.write("\r" + self.line())
            sys.stderr.flush()

    def finish(self) -> None:
        self.update(self.total, force=True)
        if self._bar:
            sys.stderr.write("\n")
            sys.stderr.flush()


def duration_text(seconds: float) -> str:
    """``42 s``, ``3m05s``, ``1h02m``."""
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds} s"


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run (or in a thread without its context)
        return logging.getLogger("fabflows.progress")


def _console_shows_info() -> bool:
    """``fabflows run --verbose``: run log lines already reach the terminal."""
    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if handler.name == "console":
                return handler.level <= logging.INFO
    return False


def report_every() -> float:
    """Seconds between two lines about one wait (``FABFLOWS_WAIT_REPORT_SECONDS``, default 10)."""
    try:
        return max(0.1, float(os.environ.get("FABFLOWS_WAIT_REPORT_SECONDS", "10")))
    except ValueError:
        return 10.0


class Waiting:
    """A wait with a limit that tells people about itself.

    Every ``every`` seconds at most (``report_every()``) (and not before the first ``every`` seconds: short waits stay
    silent), ``tick()`` writes ``waiting for WHAT: 1m10s of 15m00s (DETAIL)`` to the run log and,
    when the flow runs under ``fabflows run`` (``FABFLOWS_PROGRESS_BAR`` set) and the terminal does
    not already show the run log (no ``--verbose``), to stderr. Thread-safe.
    """

    def __init__(self, what: str, limit: float, every: float | None = None):
        self.what = what
        self.limit = limit
        self.every = every if every is not None else report_every()
        self.started = time.monotonic()
        self._last = self.started
        self._lock = threading.Lock()
        self.lines: list[str] = []  # what was said, in order
        self._terminal = bool(os.environ.get("FABFLOWS_PROGRESS_BAR")) and not _console_shows_info()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def line(self, detail: str = "") -> str:
        return (
            f"waiting for {self.what}: {duration_text(self.elapsed)} of "
            f"{duration_text(self.limit)}" + (f" ({detail})" if detail else "")
        )

    def tick(self, detail: str = "") -> bool:
        """Say where the wait stands if ``every`` seconds passed since it last did. True if said."""
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.every:
                return False
            self._last = now
        self._say(self.line(detail))
        return True

    def until_done(self, futures: Sequence[Future], noun: str = "done") -> None:
        """Block until every future is done (results are left in them), ticking about every second
        with ``k of n <noun>``."""
        pending = set(futures)
        while pending:
            _, pending = wait_futures(pending, timeout=min(1.0, self.every))
            if pending:
                self.tick(f"{len(futures) - len(pending)} of {len(futures)} {noun}")

    def _say(self, text: str) -> None:
        self.lines.append(text)
        _run_logger().info("%s", text)
        if self._terminal:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def finish(self, ok: bool = True) -> None:
        """A wait people were told about says how it ended (a short one stays silent)."""
        if self.lines:
            how = "done" if ok else "gave up"
            self._say(f"{how} waiting for {self.what} after {duration_text(self.elapsed)}")

    def __enter__(self) -> Waiting:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish(ok=exc_type is None)
