"""Maintenance windows and schedules, in the environment's time zone."""

from __future__ import annotations

from datetime import time
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from config.models.base import Strict

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class MaintenanceWindow(Strict):
    """A weekly window in the environment's time zone, e.g. weeknights 20:00 to 23:30."""

    days: list[Weekday] = Field(
        default_factory=lambda: list(WEEKDAYS),
        min_length=1,
        description="Days the window opens on (mon..sun).",
    )
    start: time = Field(description="Local time the window opens (HH:MM).")
    end: time = Field(
        description="Local time the window closes (HH:MM); earlier than start means it ends the next day."
    )

    @model_validator(mode="after")
    def _not_empty(self) -> MaintenanceWindow:
        if self.start == self.end:
            raise ValueError("start and end are equal: the window would be empty")
        return self


class ScheduleSpec(Strict):
    """A cron schedule for one flow's deployment in one environment."""

    cron: str = Field(description="Five-field cron expression, in the environment's time zone.")
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Parameters for the scheduled runs."
    )

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"{v!r} is not a five-field cron expression")
        return v
