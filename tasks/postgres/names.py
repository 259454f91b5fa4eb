"""Names and durable markers of the databases a reload creates (pure: no I/O).

A reload keeps its state **on the target database server itself**, in the catalog, so that it
survives the flow process (SIGKILL, a lost worker) and moves atomically with the databases:

- the side database is ``<live>__reload`` while production is copied into it;
- at the swap, the live database becomes ``<live>__prev_<UTC yyyymmddHHMMSS>`` and the side
  database becomes ``<live>``, both renames in one transaction;
- every database the run touches carries a JSON comment (``COMMENT ON DATABASE``, transactional,
  kept across renames) saying which run made it and in which state it is: ``side`` (being copied or
  masked, not live), ``swapped`` (live, migrations not confirmed), ``migrated`` (live, migrations
  done), ``previous`` (the database that was live before).

Recovery reads these markers to repair a dead run's leftovers (:func:`plan_recovery` in the flow).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MARKER_KIND = "fabflows:reload-production-db"
SIDE_SUFFIX = "__reload"
PREVIOUS_INFIX = "__prev_"
FAILED_INFIX = "__failed_"
MAX_NAME = 63
"""PostgreSQL truncates identifiers to 63 bytes."""

MarkerState = Literal["side", "swapped", "migrated", "previous"]


class Marker(BaseModel):
    """What a database's comment says about the reload that made or moved it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["fabflows:reload-production-db"] = MARKER_KIND
    run: str = Field(description="Flow run id of the reload.")
    live: str = Field(description="Name of the live database this reload is for.")
    state: MarkerState
    source: str = Field(default="", description="deployment/environment copied from.")
    previous: str | None = Field(
        default=None, description="After the swap: the name the old live database got."
    )
    since: str = Field(description="When the database reached this state (UTC, ISO 8601).")

    def to_comment(self) -> str:
        return self.model_dump_json(exclude_none=True)

    def moved(self, state: MarkerState, **changes: object) -> Marker:
        return self.model_copy(update={"state": state, "since": now_text(), **changes})


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_marker(comment: str | None) -> Marker | None:
    """The marker in a database comment, or None (no comment, or someone else's comment)."""
    if not comment or MARKER_KIND not in comment:
        return None
    try:
        data = json.loads(comment)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("kind") != MARKER_KIND:
        return None
    try:
        return Marker.model_validate(data)
    except ValueError:
        return None


def _check(name: str) -> str:
    if len(name.encode()) > MAX_NAME:
        raise ValueError(
            f"database name {name!r} would be {len(name.encode())} bytes; PostgreSQL allows {MAX_NAME}"
        )
    return name


def side_name(live: str) -> str:
    """``myproject_staging`` -> ``myproject_staging__reload``."""
    return _check(live + SIDE_SUFFIX)


def previous_name(live: str, at: datetime) -> str:
    """``myproject_staging`` -> ``myproject_staging__prev_20261126061900``."""
    return _check(f"{live}{PREVIOUS_INFIX}{at.astimezone(UTC):%Y%m%d%H%M%S}")


def failed_name(live: str, at: datetime) -> str:
    """Where a new database goes when the swap is rolled back (dropped right after)."""
    return _check(f"{live}{FAILED_INFIX}{at.astimezone(UTC):%Y%m%d%H%M%S}")


_PREVIOUS_RE = re.compile(r"^(?P<live>.+)__prev_(?P<stamp>\d{14})$")


def previous_of(name: str, live: str) -> str | None:
    """The timestamp part if ``name`` is a previous copy of ``live``, else None."""
    m = _PREVIOUS_RE.match(name)
    if m and m.group("live") == live:
        return m.group("stamp")
    return None


def check_names(live: str) -> None:
    """Raise ValueError if the names derived from ``live`` would be too long for PostgreSQL."""
    side_name(live)
    previous_name(live, datetime(2000, 1, 1, tzinfo=UTC))
    failed_name(live, datetime(2000, 1, 1, tzinfo=UTC))
