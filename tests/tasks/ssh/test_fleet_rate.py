"""Rate control, pure: percentages, rounding, thresholds, and the bad values refused up front."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks.ssh.fleet import (
    FleetResult,
    HostResult,
    RateControl,
    concurrency_for,
    error_budget_for,
    parse_limit,
    threshold_crossed,
)


@pytest.mark.parametrize(
    ("value", "hosts", "expected"),
    [
        (1, 20, 1),
        (5, 20, 5),
        (50, 20, 20),  # capped at the number of hosts
        ("5", 20, 5),
        ("25%", 20, 5),
        ("25%", 3, 1),  # 0.75 rounds up
        ("10%", 21, 3),  # 2.1 rounds up
        ("1%", 5, 1),  # never below 1
        ("100%", 7, 7),
        (3, 0, 1),  # no hosts: still a valid pool size
    ],
)
def test_concurrency(value, hosts, expected) -> None:
    assert concurrency_for(value, hosts) == expected


@pytest.mark.parametrize(
    ("value", "hosts", "expected"),
    [
        (0, 20, 0),
        (2, 20, 2),
        ("2", 20, 2),
        ("10%", 20, 2),
        ("10%", 5, 0),  # 0.5 rounds down: the first error stops
        ("50%", 5, 2),
        ("100%", 4, 4),
        ("0%", 10, 0),
    ],
)
def test_error_budget(value, hosts, expected) -> None:
    assert error_budget_for(value, hosts) == expected


@pytest.mark.parametrize(
    ("errors", "budget", "crossed"),
    [(0, 0, False), (1, 0, True), (1, 1, False), (2, 1, True), (5, 4, True)],
)
def test_threshold(errors, budget, crossed) -> None:
    assert threshold_crossed(errors, budget) is crossed


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_concurrency", 0, "at least 1"),
        ("max_concurrency", "0%", "at least 1"),
        ("max_concurrency", -2, "negative"),
        ("max_concurrency", "150%", "more than 100%"),
        ("max_concurrency", "many", "not a number"),
        ("max_concurrency", "25 %", "not a number"),
        ("max_concurrency", True, "not a number"),
        ("max_errors", -1, "negative"),
        ("max_errors", "101%", "more than 100%"),
        ("max_errors", "1.5", "not a number"),
    ],
)
def test_bad_rate_refused(field, value, message) -> None:
    with pytest.raises(ValidationError, match=message):
        RateControl(**{field: value})


def test_parse_limit() -> None:
    assert parse_limit("30%", what="x") == (30, True)
    assert parse_limit(4, what="x") == (4, False)


def test_result_summary_and_rows() -> None:
    results = [
        HostResult(status="changed", host="a", address="10.0.0.1", dry_run=True, commands=["x"]),
        HostResult(status="unchanged", host="b", address="10.0.0.2", dry_run=True),
        HostResult(status="failed", host="c", address="10.0.0.3", message="unreachable: refused"),
        HostResult(status="skipped", host="d", address="10.0.0.4", message="not started"),
    ]
    r = FleetResult(
        name="step",
        dry_run=True,
        max_concurrency=2,
        error_budget=0,
        stopped=True,
        duration_s=1.0,
        results=results,
    )
    assert r.counts() == {"changed": 1, "unchanged": 1, "failed": 1, "skipped": 1}
    assert [row["status"] for row in r.rows()] == ["would change", "unchanged", "failed", "skipped"]
    assert "STOPPED" in r.summary()
    assert not r.ok
    with pytest.raises(RuntimeError, match=r"c \(10.0.0.3\): failed: unreachable: refused"):
        r.raise_for_errors()
