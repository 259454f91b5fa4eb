"""Tables for terminals and the UI: cells read as people read them."""

from __future__ import annotations

from fabflows.report import cell, markdown_table, text_table

ROWS = [
    {"step": "swap", "downtime": True, "seconds": 1.5, "note": None},
    {"step": "copy", "downtime": False, "seconds": 30, "note": "side database"},
]


def test_booleans_read_yes_no_and_none_is_empty() -> None:
    assert [cell(v) for v in (True, False, None, 0, "x")] == ["yes", "no", "", "0", "x"]
    text = text_table(ROWS)
    md = markdown_table(ROWS)
    for out in (text, md):
        assert "True" not in out and "False" not in out and "None" not in out
    assert text.splitlines()[2].split()[:3] == ["swap", "yes", "1.5"]
    assert "| copy | no | 30 | side database |" in md
