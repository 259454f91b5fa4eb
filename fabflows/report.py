"""Artifacts and plain-text tables: how runs show up in the Prefect UI and in the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext

from config.models import slug


def in_flow_run() -> bool:
    return FlowRunContext.get() is not None


def artifact_key(*parts: str) -> str:
    """Artifact keys must be lowercase with dashes."""
    return slug("-".join(parts))


def publish_table(key: str, rows: Sequence[dict[str, Any]], description: str) -> None:
    """A table artifact (only inside a flow run; a no-op in plain function calls)."""
    if in_flow_run():
        create_table_artifact(key=key, table=[dict(r) for r in rows], description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    if in_flow_run():
        create_markdown_artifact(key=key, markdown=markdown, description=description)


def cell(value: Any) -> str:
    """A table cell as people read it: yes/no for booleans (not Python's True/False), '' for None."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Fixed-width text table for terminals and logs."""
    if not rows:
        return "(none)"
    cols = list(columns or rows[0].keys())
    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "_none_"
    cols = list(columns or rows[0].keys())
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(cell(r.get(c)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(out)
