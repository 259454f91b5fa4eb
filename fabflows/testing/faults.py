"""Fault injection for crash tests (test lab only, not shipped).

``install()`` registers a step-boundary observer that, when ``$FABFLOWS_TEST_PAUSE_AT`` names a
boundary, writes ``$FABFLOWS_TEST_PAUSE_MARKER`` and sleeps, so the test can SIGKILL the run exactly
there. A boundary is ``<step>`` (before the step) or ``<step>:after``; ``<flow>/`` may prefix it.

A crash test starts the run in a subprocess as::

    python -c "from fabflows.testing import faults; faults.install(); \
               from fabflows.cli import main; import sys; sys.exit(main(sys.argv[1:]))" run ...
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fabflows import boundaries

PAUSE_ENV = "FABFLOWS_TEST_PAUSE_AT"
PAUSE_MARKER_ENV = "FABFLOWS_TEST_PAUSE_MARKER"

CLI_CODE = (
    "import sys; from fabflows.testing import faults; faults.install(); "
    "from fabflows.cli import main; sys.exit(main(sys.argv[1:]))"
)
"""``python -c CLI_CODE run FLOW ...``: the CLI with the pause observer installed."""


def matches(target: str, flow: str, step: str, when: str) -> bool:
    """Pure: does the boundary (flow, step, when) match ``target``?"""
    if "/" in target:
        want_flow, _, target = target.partition("/")
        if want_flow != flow:
            return False
    name, _, want_when = target.partition(":")
    return name == step and (want_when or "before") == when


def _pause(flow: str, step: str, when: str) -> None:
    target = os.environ.get(PAUSE_ENV)
    if not target or not matches(target, flow, step, when):
        return
    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker:
        Path(marker).write_text(f"{os.getpid()} {flow} {step} {when}\n")
    time.sleep(3600)


def install() -> None:
    boundaries.observe(_pause)


def run_until_paused(
    flow: str,
    target: str,
    cli_args: list[str],
    marker: Path,
    timeout: float = 180,
    env: dict[str, str] | None = None,
) -> None:
    """``fabflows run FLOW CLI_ARGS`` in a subprocess (the CLI with the pause observer), SIGKILLed
    (its whole process group) once it pauses at the step boundary ``target``. ``env`` adds to the
    environment; the Prefect API is the caller's."""
    from prefect.settings import PREFECT_API_URL

    environ = dict(os.environ) | (env or {})
    environ.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        FABFLOWS_TEST_PAUSE_AT=f"{flow}/{target}",
        FABFLOWS_TEST_PAUSE_MARKER=str(marker),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI_CODE, "run", flow, *cli_args],
        env=environ,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                assert proc.stderr is not None
                raise AssertionError(
                    f"{flow} ended before {target}: " + proc.stderr.read().decode()[-3000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{flow} never reached {target} in {timeout:.0f} s")
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):  # ended on its own: its error is shown
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
