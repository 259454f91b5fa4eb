"""Fault injection for crash tests (test lab only, not shipped).

``install()`` registers a step-boundary observer that, when ``$FABFLOWS_TEST_PAUSE_AT`` names a
boundary, writes ``$FABFLOWS_TEST_PAUSE_MARKER`` and sleeps, so the test can SIGKILL the run exactly
there. A boundary is ``<step>`` (before the step) or ``<step>:after``; ``<flow>/`` may prefix it.

A crash test starts the run in a subprocess as::

    python -c "from fabflows.testing import faults; faults.install(); \
               from fabflows.cli import main; import sys; sys.exit(main(sys.argv[1:]))" run ...
"""

from __future__ import annotations

import os
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
