"""The one plan interface every runbook's pure ``plan`` returns.

A plan says what changes where, whether it destroys anything, the downtime it expects and what
stops it (problems), and renders itself for the UI (markdown) and the terminal (text). Its
``digest`` binds an approval to exactly this plan: the engine plans again under the lock and
refuses to apply when the digest differs.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from fabflows.report import markdown_table, text_table


class Change(BaseModel):
    """One thing a plan changes on one target."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description="Where: a server (name and instance id), group, bucket, ...")
    action: str = Field(description="What: 'restart gunicorn', 'suspend Launch, Terminate', ...")
    detail: str = Field(default="", description="Before -> after, or why.")
    step: str = Field(default="", description="The step that applies it.")


class RunbookPlan(BaseModel):
    """Base of every runbook's plan: changes, destructive, downtime, problems, digest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    DIGEST_EXCLUDE: ClassVar[set[str]] = set()
    """Fields that do not make the plan another plan (timestamps, measured figures)."""

    title: str = Field(description="One line: '<flow> on <deployment>/<environment>'.")
    environment: str = Field(description="deployment/environment")
    changes: list[Change] = Field(default_factory=list)
    noops: list[str] = Field(default_factory=list, description="What is already as wanted.")
    destructive: bool = Field(default=False, description="Loses data or capacity if wrong.")
    downtime_seconds: float | None = Field(
        default=None, description="Expected downtime; None: the site stays up."
    )
    problems: list[str] = Field(default_factory=list, description="Why it cannot be applied.")
    notes: list[str] = Field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    @property
    def downtime(self) -> timedelta | None:
        return None if self.downtime_seconds is None else timedelta(seconds=self.downtime_seconds)

    def digest(self) -> str:
        """sha256 of the plan's content (minus DIGEST_EXCLUDE), 16 hex digits."""
        data: dict[str, Any] = self.model_dump(mode="json", exclude=self.DIGEST_EXCLUDE)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def rows(self) -> list[dict[str, str]]:
        with_step = any(c.step for c in self.changes)
        return [
            ({"step": c.step} if with_step else {})
            | {"target": c.target, "action": c.action, "detail": c.detail}
            for c in self.changes
        ]

    def _downtime_text(self) -> str:
        if self.downtime_seconds is None:
            return "none (the site stays up)"
        return f"about {self.downtime_seconds:.0f} s"

    def render_markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        lines += [
            f"- **Changes:** {len(self.changes)}" + (" (destructive)" if self.destructive else ""),
            f"- **Expected downtime:** {self._downtime_text()}",
            f"- **Plan digest:** `{self.digest()}`",
        ]
        lines += [f"- **Problem:** {p}" for p in self.problems]
        lines += [f"- {n}" for n in self.notes]
        lines += ["", markdown_table(self.rows()) if self.changes else "_nothing to change_"]
        if self.noops:
            lines += ["", "Already as wanted:", ""] + [f"- {n}" for n in self.noops]
        return "\n".join(lines)

    def render_text(self) -> str:
        head = f"{self.title}: {len(self.changes)} change(s)"
        if self.destructive:
            head += " (destructive)"
        lines = [head, f"expected downtime: {self._downtime_text()}; digest {self.digest()}"]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        lines += [f"note: {n}" for n in self.notes]
        if self.changes:
            lines += ["", text_table(self.rows())]
        if self.noops:
            lines += ["", "already as wanted: " + "; ".join(self.noops)]
        return "\n".join(lines)


def diff_lines(before: str, after: str) -> list[str]:
    """What changed between two rendered plans, as unified diff lines (for a refusal message).

    Lines are compared with their runs of blanks collapsed and tables' rules shortened (a table
    whose columns widen does not turn every row into a change), and without the digest (it always
    differs; the refusal gives both).
    """
    import difflib
    import re

    def lines(text: str) -> list[str]:
        out = []
        for line in text.splitlines():
            line = " ".join(re.sub(r"; digest [0-9a-f]+$", "", line).split())
            out.append("---" if line and set(line) <= {"-", " "} else line)
        return out

    return [
        line
        for line in difflib.unified_diff(
            lines(before), lines(after), "approved plan", "plan now", lineterm="", n=0
        )
        if not line.startswith("@@")
    ]
