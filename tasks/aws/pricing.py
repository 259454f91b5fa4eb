"""On-demand prices by instance type, and the savings of stopping an environment (pure).

The built-in table holds approximate us-east-1 Linux on-demand list prices (USD per hour) for the
types FabulAWS environments use (the sample config's m1/m3/c3/t1 generation included) and today's
common ones. Other regions, reserved instances and savings plans differ: set
``fabflows.prices`` to your own numbers; they override and extend this table. A stopped instance
still pays for its EBS volumes and Elastic IPs, which the report does not subtract.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PRICES: dict[str, float] = {
    # previous generations (the FabulAWS sample config's types)
    "t1.micro": 0.02,
    "m1.small": 0.044,
    "m1.medium": 0.087,
    "m1.large": 0.175,
    "m1.xlarge": 0.35,
    "m3.medium": 0.067,
    "m3.large": 0.133,
    "m3.xlarge": 0.266,
    "m3.2xlarge": 0.532,
    "c3.large": 0.105,
    "c3.xlarge": 0.21,
    "c3.2xlarge": 0.42,
    "m4.large": 0.10,
    "m4.xlarge": 0.20,
    "c4.large": 0.10,
    "c4.xlarge": 0.199,
    "r4.large": 0.133,
    # burstable
    "t2.nano": 0.0058,
    "t2.micro": 0.0116,
    "t2.small": 0.023,
    "t2.medium": 0.0464,
    "t2.large": 0.0928,
    "t3.nano": 0.0052,
    "t3.micro": 0.0104,
    "t3.small": 0.0208,
    "t3.medium": 0.0416,
    "t3.large": 0.0832,
    "t3.xlarge": 0.1664,
    "t3.2xlarge": 0.3328,
    "t3a.small": 0.0188,
    "t3a.medium": 0.0376,
    "t3a.large": 0.0752,
    "t4g.small": 0.0168,
    "t4g.medium": 0.0336,
    # general purpose
    "m5.large": 0.096,
    "m5.xlarge": 0.192,
    "m5.2xlarge": 0.384,
    "m6i.large": 0.096,
    "m6i.xlarge": 0.192,
    "m6i.2xlarge": 0.384,
    "m7i.large": 0.1008,
    "m7i.xlarge": 0.2016,
    "m6g.large": 0.077,
    "m7g.large": 0.0816,
    # compute
    "c5.large": 0.085,
    "c5.xlarge": 0.17,
    "c6i.large": 0.085,
    "c6i.xlarge": 0.17,
    "c7i.large": 0.0893,
    # memory
    "r5.large": 0.126,
    "r5.xlarge": 0.252,
    "r6i.large": 0.126,
    "r6i.xlarge": 0.252,
    "r7i.large": 0.1323,
}
"""Approximate us-east-1 Linux on-demand USD per hour (list prices; override in config)."""


def price_table(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """The built-in table with config's ``fabflows.prices`` on top."""
    return {**DEFAULT_PRICES, **dict(overrides or {})}


class StoppedCapacity(BaseModel):
    """Instances of one type that were off for some hours."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    what: str = Field(description="Instance id, or e.g. 'web (autoscaling group)'.")
    role: str
    instance_type: str
    count: int = Field(default=1, ge=0)
    hours: float = Field(ge=0)


class SavingsRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    what: str
    role: str
    instance_type: str
    count: int
    hours: float
    usd_per_hour: float | None = Field(description="None: not in the price table.")
    saved_usd: float | None


class SavingsReport(BaseModel):
    """Hours stopped x on-demand price, per instance (the start-environment artifact)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: list[SavingsRow]
    total_usd: float
    unpriced_types: list[str] = Field(description="Types missing from the table (not counted).")

    def markdown(self) -> str:
        from fabflows.report import markdown_table

        lines = [
            f"**Saved about ${self.total_usd:,.2f}** in on-demand compute while stopped "
            "(EBS volumes and Elastic IPs are still billed and not subtracted).",
            "",
            markdown_table([r.model_dump() for r in self.rows]),
        ]
        if self.unpriced_types:
            lines += [
                "",
                f"No price for {', '.join(self.unpriced_types)}: add them to `fabflows.prices`.",
            ]
        return "\n".join(lines)


def compute_savings(
    stopped: Sequence[StoppedCapacity], prices: Mapping[str, float]
) -> SavingsReport:
    """Pure: saved = hours x count x price, for every stopped capacity with a known price."""
    rows = []
    unpriced: set[str] = set()
    for s in stopped:
        price = prices.get(s.instance_type)
        if price is None:
            unpriced.add(s.instance_type)
        saved = None if price is None else round(price * s.hours * s.count, 2)
        rows.append(
            SavingsRow(
                what=s.what,
                role=s.role,
                instance_type=s.instance_type,
                count=s.count,
                hours=round(s.hours, 2),
                usd_per_hour=price,
                saved_usd=saved,
            )
        )
    total = round(sum(r.saved_usd or 0.0 for r in rows), 2)
    return SavingsReport(rows=rows, total_usd=total, unpriced_types=sorted(unpriced))
