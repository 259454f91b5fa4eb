"""The plan interface's diff (what a refusal of a changed plan says), pure."""

from __future__ import annotations

from fabflows.runtime.plan import Change, RunbookPlan, diff_lines


def plan(*changes: tuple[str, str]) -> RunbookPlan:
    return RunbookPlan(
        title="resize-environment on myproject/staging",
        environment="myproject/staging",
        changes=[Change(target=t, action=a, step="resize") for t, a in changes],
    )


def test_diff_names_the_changed_rows_only() -> None:
    before = plan(("worker (i-1)", "m3.large -> m5.xlarge"), ("web (i-2)", "m1.small -> m5.large"))
    # a longer target widens the table's columns: the unchanged rows are not reported
    after = plan(
        ("worker (i-1)", "m3.large -> m5.xlarge"),
        ("web (i-2)", "m1.small -> m5.large"),
        ("myproject_staging_web (i-0123456789abcdef0)", "m1.small -> m5.large"),
    )
    assert before.digest() != after.digest()
    assert diff_lines(before.render_text(), after.render_text())[2:] == [
        "-resize-environment on myproject/staging: 2 change(s)",
        "+resize-environment on myproject/staging: 3 change(s)",
        "+resize myproject_staging_web (i-0123456789abcdef0) m1.small -> m5.large",
    ]


def test_diff_of_one_changed_type_leaves_out_the_digest() -> None:
    before = plan(("worker (i-1)", "m3.large -> m5.xlarge"))
    after = plan(("worker (i-1)", "m3.xlarge -> m5.xlarge"))
    assert diff_lines(before.render_text(), after.render_text())[2:] == [
        "-resize worker (i-1) m3.large -> m5.xlarge",
        "+resize worker (i-1) m3.xlarge -> m5.xlarge",
    ]
    assert diff_lines(before.render_text(), before.render_text()) == []
