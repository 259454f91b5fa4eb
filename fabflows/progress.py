"""Progress of long steps: a Prefect progress artifact in the UI and a bar with time left in the CLI.

    progress = Progress("copy-database", total=size_bytes, unit="B", description="Copying production")
    for chunk in ...:
        progress.update(done)
    progress.finish()

The artifact is updated at most once a second; the CLI bar is drawn on stderr when the flow runs
under ``fabflows run`` (which sets ``FABFLOWS_PROGRESS_BAR=1``) and stderr is a terminal or the
variable is ``force``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
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
