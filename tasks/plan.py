"""Models shared by write tasks and plans (style guide §2): what a step did, or would do."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
