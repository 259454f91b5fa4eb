"""Names and markers of a reload's databases (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tasks.postgres.names import (
    Marker,
    check_names,
    failed_name,
    now_text,
    parse_marker,
    previous_name,
    previous_of,
    side_name,
)


def test_names() -> None:
    at = datetime(2026, 11, 26, 6, 19, 0, tzinfo=UTC)
    assert side_name("myproject_staging") == "myproject_staging__reload"
    assert previous_name("myproject_staging", at) == "myproject_staging__prev_20261126061900"
    assert failed_name("db", at) == "db__failed_20261126061900"
    assert (
        previous_of("myproject_staging__prev_20261126061900", "myproject_staging")
        == "20261126061900"
    )
    assert previous_of("other__prev_20261126061900", "myproject_staging") is None
    assert previous_of("myproject_staging__reload", "myproject_staging") is None


def test_names_too_long_for_postgres() -> None:
    check_names("x" * 40)
    with pytest.raises(ValueError, match="63"):
        check_names("x" * 41)


@pytest.mark.parametrize(
    ("comment", "state"),
    [
        (None, None),
        ("", None),
        ("the team's scratch database", None),
        ('{"kind": "something else"}', None),
        ('{"kind": "fabflows:reload-production-db", "run": 1}', None),  # damaged: ignored
        (
            Marker(
                run="r", live="db", state="swapped", previous="p", since=now_text()
            ).to_comment(),
            "swapped",
        ),
    ],
)
def test_parse_marker(comment, state) -> None:
    marker = parse_marker(comment)
    assert (marker.state if marker else None) == state


def test_marker_round_trip_and_move() -> None:
    m = Marker(run="r1", live="db", state="side", source="myproject/production", since=now_text())
    assert parse_marker(m.to_comment()) == m
    moved = m.moved("swapped", previous="db__prev_1")
    assert moved.state == "swapped" and moved.previous == "db__prev_1" and moved.run == "r1"
