"""Models shared by write tasks and plans (style guide §2): what a step did, or would do."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StepResult(BaseModel):
    """The outcome of one write task on one target.

    In a dry run the task reads for real and stops just before the write: ``changed`` then says
    whether it *would* change something, and ``summary`` reads "Would ...". Already in the wanted
    state is ``changed=False`` with a no-op summary.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    changed: bool = Field(description="Something was (or, in a dry run, would be) changed.")
    dry_run: bool = Field(description="Only read; nothing was written.")
    summary: str = Field(description="One line for operators: what was done or would be done.")


class RunRecord(BaseModel):
    """Which run did something, and since when: kept in a tag as compact JSON, so a later run (or
    a person) knows what to undo after a crash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str = Field(description="Flow run id (local-<uuid> outside Prefect).")
    flow: str = Field(description="The flow that did it.")
    since: datetime = Field(description="When it was done (UTC).")

    @field_validator("since")
    @classmethod
    def _utc_seconds(cls, v: datetime) -> datetime:
        """Stored to the second in UTC, so a record read back equals the one written."""
        if v.tzinfo is None:
            raise ValueError("since must carry a time zone")
        return v.astimezone(UTC).replace(microsecond=0)

    def to_json(self) -> str:
        data = self.model_dump()
        data["since"] = self.since.strftime("%Y-%m-%dT%H:%M:%SZ")
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_tag(cls, text: str | None) -> RunRecord | None:
        """The record in a tag value; None when absent or unreadable."""
        if not text:
            return None
        try:
            return cls.model_validate_json(text)
        except ValueError:
            return None
