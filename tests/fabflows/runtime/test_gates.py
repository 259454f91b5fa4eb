"""Every registered runbook goes through the engine's gates, from what it declares: a new flow
cannot forget the window, because it never checks it itself."""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from config import load_config, resolve_environment
from config.models import MaintenanceWindow
from fabflows import guard
from fabflows.cli import load_flow
from fabflows.registry import FLOWS
from fabflows.runtime.engine import Runbook, runbook_of, window_gate
from fabflows.testing.configs import SAMPLE

NOT_ON_ENGINE: set[str] = set()
"""Flows that run their own phases: none (a new flow must not be added here)."""

RESUMES = {"resume-run"}
"""Runs the journaled run's own runbook through the engine (with that runbook's gates)."""

BASE = resolve_environment(load_config(SAMPLE), "staging")
CLOSED = [MaintenanceWindow(days=["sun"], start=time(2), end=time(3))]
NOW = datetime(2026, 12, 2, 12, tzinfo=UTC)  # a Wednesday noon: the Sunday window is closed


def _engine_runbooks() -> list[tuple[str, Runbook]]:
    out = []
    for name in sorted(FLOWS):
        rb = runbook_of(load_flow(name))
        if rb is not None:
            out.append((name, rb))
    return out


def test_every_flow_is_on_the_engine_or_listed() -> None:
    on = {name for name, _ in _engine_runbooks()}
    assert on | NOT_ON_ENGINE | RESUMES == set(FLOWS)
    assert not on & NOT_ON_ENGINE, (
        f"on the engine now, drop from NOT_ON_ENGINE: {on & NOT_ON_ENGINE}"
    )
    for name, rb in _engine_runbooks():
        assert rb.name == name
        assert load_flow(name).name == name


@pytest.mark.parametrize(
    ("name", "runbook"), _engine_runbooks(), ids=lambda v: getattr(v, "name", v)
)
def test_window_gate_from_what_the_runbook_declares(name: str, runbook: Runbook) -> None:
    params = runbook.Params.model_construct()
    for protected in (False, True):
        env = BASE.model_copy(update={"windows": CLOSED, "protected": protected})
        required = runbook.window_required(env, params)
        if runbook.read_only:
            assert not required
            continue
        if protected or runbook.may_take_site_down:
            assert required, f"{name} applies in a protected environment or takes the site down"
        if required:
            with pytest.raises(guard.OutsideWindow, match="outside its maintenance window"):
                window_gate(runbook, env, params, dry_run=False, override_reason=None, now=NOW)
            dry = window_gate(runbook, env, params, dry_run=True, override_reason=None, now=NOW)
            assert not dry.allowed  # a dry run is planned anyway and says so
            ok = window_gate(
                runbook,
                env,
                params,
                dry_run=False,
                override_reason="the database is corrupt, fixing it now",
                now=NOW,
            )
            assert ok.allowed and ok.override_reason
        else:
            assert window_gate(
                runbook, env, params, dry_run=False, override_reason=None, now=NOW
            ).allowed
