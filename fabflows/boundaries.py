"""Step boundaries: observers called before and after every step of every runbook.

The engine (and reload-production-db's own phases) call ``reached(flow, step, when)`` with
``when`` "before" or "after". The engine also calls ``reached(flow, "lock", "before")`` once per
applying run: after the approval, before it takes the environment's lock and gathers again (what
changes there is what the re-gather must catch). Observers are how something outside a run
watches it step by step without the run knowing them: the test lab's fault injection pauses a run
here to kill it at an exact boundary. An observer must be quick and must not raise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

When = Literal["before", "after"]
Observer = Callable[[str, str, When], None]

_OBSERVERS: list[Observer] = []


def observe(fn: Observer) -> Observer:
    """Register ``fn(flow, step, when)``; returns it (usable as a decorator)."""
    _OBSERVERS.append(fn)
    return fn


def forget(fn: Observer) -> None:
    if fn in _OBSERVERS:
        _OBSERVERS.remove(fn)


def reached(flow: str, step: str, when: When) -> None:
    for fn in list(_OBSERVERS):
        fn(flow, step, when)
