"""The price table and the savings arithmetic (pure)."""

from __future__ import annotations

import pytest

from tasks.aws.pricing import DEFAULT_PRICES, StoppedCapacity, compute_savings, price_table


def test_config_prices_override_and_extend_the_defaults() -> None:
    table = price_table({"m1.small": 0.1, "x9.huge": 9.0})
    assert table["m1.small"] == 0.1 and table["x9.huge"] == 9.0
    assert table["t3.micro"] == DEFAULT_PRICES["t3.micro"]
    # the FabulAWS sample config's types all have a default price
    for itype in ("t1.micro", "m1.small", "m3.large", "m3.xlarge", "c3.large"):
        assert itype in DEFAULT_PRICES


def test_savings_rows_totals_and_unpriced_types() -> None:
    report = compute_savings(
        [
            StoppedCapacity(what="i-1", role="worker", instance_type="m3.large", hours=10),
            StoppedCapacity(
                what="web group", role="web", instance_type="c3.large", count=2, hours=10
            ),
            StoppedCapacity(what="i-2", role="cache", instance_type="z1.odd", hours=10),
        ],
        price_table(),
    )
    assert [r.saved_usd for r in report.rows] == [1.33, 2.1, None]
    assert report.total_usd == pytest.approx(3.43)
    assert report.unpriced_types == ["z1.odd"]
    text = report.markdown()
    assert "$3.43" in text and "fabflows.prices" in text and "EBS" in text
