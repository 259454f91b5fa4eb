"""stop/start plans, table-tested without any peer: order, records, idempotence, refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fabflows.procedures.environment_power import (
    DOWN_ORDER,
    UP_ORDER,
    hourly_cost,
    plan_start_environment,
    plan_stop_environment,
    stopped_capacity,
)
from tasks.aws.autoscaling import AutoScalingGroup
from tasks.aws.ec2 import Server
from tasks.aws.ec2_writes import STOPPED_TAG, RunRecord
from tasks.aws.group_sizes import CACHE_TAG, SIZES_TAG, CacheRecord, SizesRecord
from tasks.aws.pricing import compute_savings, price_table

NOW = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
NIGHT = NOW - timedelta(hours=12)
GROUP = "myproject-staging-ag"


def server(iid: str, role: str, state: str = "running", itype: str = "m1.small", **tags) -> Server:
    return Server(
        instance_id=iid,
        name=f"{role}-{iid}",
        role=role,
        deployment="myproject",
        environment="staging",
        instance_type=itype,
        state=state,
        private_ip_address=f"10.0.0.{len(iid)}",
        tags=tags,
    )


def group(sizes=(1, 2, 4), ids=("i-w1", "i-w2"), **tags) -> AutoScalingGroup:
    return AutoScalingGroup(
        auto_scaling_group_name=GROUP,
        min_size=sizes[0],
        desired_capacity=sizes[1],
        max_size=sizes[2],
        instance_ids=list(ids),
        launch_template="myproject-staging-web",
        tags=tags,
    )


def stopped(iid: str, role: str, **kw) -> Server:
    record = RunRecord(run="r1", flow="stop-environment", since=NIGHT)
    return server(iid, role, "stopped", **{STOPPED_TAG: record.to_json()}, **kw)


RUNNING = [
    server("i-w1", "web"),
    server("i-w2", "web"),
    server("i-wk", "worker"),
    server("i-r", "db-replica"),
    server("i-p", "db-primary"),
    server("i-c", "cache", itype="t1.micro"),
]
SIZES = SizesRecord(min=1, desired=2, max=4, since=NIGHT, run="r1")


def stop_plan(servers=RUNNING, grp=None, **kw):
    args = dict(group_configured=GROUP, cache_strategy="stop", now=NOW)
    return plan_stop_environment("myproject/staging", servers, grp or group(), **(args | kw))


def actions(plan) -> list[tuple[str, str, str]]:
    return [(p.role, s.instance_id, s.action) for p in plan.phases for s in p.servers]


def test_stop_order_and_group_first() -> None:
    plan = stop_plan()
    assert plan.group.target == (0, 0, 0) and plan.group.recorded is None
    assert [s.instance_id for s in plan.quiet] == ["i-wk"]
    assert actions(plan) == [
        ("worker", "i-wk", "stop"),
        ("db-replica", "i-r", "stop"),
        ("db-primary", "i-p", "stop"),
        ("cache", "i-c", "stop"),
    ]
    assert [p.role for p in plan.phases] == [r for r in DOWN_ORDER if r != "web"]
    assert plan.changed and not plan.problems


def test_stop_twice_is_a_noop_and_keeps_the_first_record() -> None:
    down = [
        stopped("i-wk", "worker"),
        stopped("i-r", "db-replica"),
        stopped("i-p", "db-primary"),
        stopped("i-c", "cache"),
    ]
    plan = stop_plan(down, group((0, 0, 0), (), **{SIZES_TAG: SIZES.to_json()}))
    assert not plan.changed and plan.group.target is None and plan.group.recorded == SIZES
    assert {a for _, _, a in actions(plan)} == {"none"} and not plan.quiet


def test_half_stopped_environment_finishes() -> None:
    half = [
        server("i-wk", "worker", "stopped"),
        server("i-r", "db-replica"),
        server("i-p", "db-primary"),
        server("i-c", "cache"),
    ]
    plan = stop_plan(half, group((0, 0, 0), (), **{SIZES_TAG: SIZES.to_json()}))
    assert actions(plan)[0] == ("worker", "i-wk", "none")
    assert ("db-primary", "i-p", "stop") in actions(plan)


def test_group_at_zero_without_record_warns() -> None:
    plan = stop_plan(RUNNING[2:], group((0, 0, 0), ()))
    assert plan.group.target is None and "no recorded sizes" in plan.warnings[0]


def test_standalone_web_servers_stop_first() -> None:
    plan = stop_plan([*RUNNING, server("i-solo", "web")])
    assert actions(plan)[0] == ("web", "i-solo", "stop")


def test_missing_group_is_refused() -> None:
    plan = plan_stop_environment(
        "x", RUNNING[2:], None, group_configured=GROUP, cache_strategy="stop", now=NOW
    )
    assert "does not exist" in plan.problems[0]


@pytest.mark.parametrize(
    ("queued", "drop", "problem", "warning"),
    [
        ({"celery": 0}, False, None, "empties Redis"),
        ({"celery": 5, "mail": 1}, False, "drops 6 queued message(s): celery (5), mail (1)", None),
        ({"celery": 5}, True, None, "5 queued message(s) will be dropped"),
        (None, False, None, "no RabbitMQ found"),
    ],
)
def test_cache_terminate_says_what_is_lost(queued, drop, problem, warning) -> None:
    plan = stop_plan(
        cache_strategy="terminate-and-recreate",
        queued_messages=queued,
        drop_queued_messages=drop,
        cache_subnet_id="subnet-1",
    )
    assert ("cache", "i-c", "terminate") in actions(plan)
    assert plan.cache_record.ip == "10.0.0.3" and plan.cache_record.subnet == "subnet-1"
    if problem:
        assert any(problem in p for p in plan.problems)
    else:
        assert not plan.problems
    if warning:
        assert any(warning in w for w in plan.warnings)


def test_cache_terminate_of_a_stopped_cache_needs_consent() -> None:
    servers = [*RUNNING[:5], server("i-c", "cache", "stopped")]
    plan = stop_plan(servers, cache_strategy="terminate-and-recreate")
    assert "queues cannot be read" in plan.problems[0]
    ok = stop_plan(servers, cache_strategy="terminate-and-recreate", drop_queued_messages=True)
    assert not ok.problems


def test_cache_terminate_needs_the_group_for_its_record() -> None:
    plan = plan_stop_environment(
        "x",
        RUNNING[2:],
        None,
        group_configured=None,
        cache_strategy="terminate-and-recreate",
        now=NOW,
    )
    assert "has none" in plan.problems[0]


def start_plan(servers, grp, **kw):
    args = dict(group_configured=GROUP, cache_strategy="stop", cache_launch_template=None)
    return plan_start_environment("myproject/staging", servers, grp, **(args | kw))


DOWN = [
    stopped("i-wk", "worker"),
    stopped("i-r", "db-replica"),
    stopped("i-p", "db-primary"),
    stopped("i-c", "cache", itype="t1.micro"),
]


def test_start_reverse_order_restores_recorded_sizes() -> None:
    plan = start_plan(DOWN, group((0, 0, 0), (), **{SIZES_TAG: SIZES.to_json()}))
    assert [p.role for p in plan.phases] == [r for r in UP_ORDER if r != "web"]
    assert actions(plan) == [
        ("cache", "i-c", "start"),
        ("db-primary", "i-p", "start"),
        ("db-replica", "i-r", "start"),
        ("worker", "i-wk", "start"),
    ]
    assert plan.group.target == (1, 2, 4) and plan.changed


def test_start_twice_only_checks() -> None:
    plan = start_plan(RUNNING, group())
    assert not plan.changed and plan.group.target is None
    assert {a for _, _, a in actions(plan)} == {"check"}


def test_start_without_record_leaves_the_group_and_says_so() -> None:
    plan = start_plan(DOWN, group((0, 0, 0), ()))
    assert plan.group.target is None and "left as it is" in plan.warnings[0]


def test_start_relaunches_a_terminated_cache() -> None:
    record = CacheRecord(ip="10.0.0.9", subnet="subnet-1", type="t1.micro", since=NIGHT)
    grp = group((0, 0, 0), (), **{SIZES_TAG: SIZES.to_json(), CACHE_TAG: record.to_json()})
    plan = start_plan(
        DOWN[:3],
        grp,
        cache_strategy="terminate-and-recreate",
        cache_launch_template="myproject-cache",
    )
    assert plan.cache_recreate.record == record and "new SSH host key" in plan.warnings[0]
    missing = start_plan(DOWN[:3], grp, cache_strategy="terminate-and-recreate")
    assert "no cache_launch_template" in missing.problems[0]
    # a cache already relaunched (a second start) is not launched again
    again = start_plan(
        [*DOWN[:3], server("i-c2", "cache")],
        grp,
        cache_strategy="terminate-and-recreate",
        cache_launch_template="t",
    )
    assert again.cache_recreate is None


def test_savings_from_the_records() -> None:
    grp = group((0, 0, 0), (), **{SIZES_TAG: SIZES.to_json()})
    plan = start_plan(DOWN, grp)
    capacity = stopped_capacity(plan, NOW, "m1.small")
    assert [(c.what, c.count, c.hours) for c in capacity] == [
        ("i-c", 1, 12.0),
        ("i-p", 1, 12.0),
        ("i-r", 1, 12.0),
        ("i-wk", 1, 12.0),
        (f"{GROUP} (autoscaling group)", 2, 12.0),
    ]
    savings = compute_savings(capacity, price_table({"m1.small": 0.05}))
    # 12 h x (t1.micro 0.02 + 3 x 0.05 + 2 web x 0.05)
    assert savings.total_usd == pytest.approx(12 * (0.02 + 0.15 + 0.10))
    unknown = compute_savings(capacity, {})
    assert unknown.total_usd == 0 and unknown.unpriced_types == ["m1.small", "t1.micro"]


def test_hourly_cost_of_a_stop() -> None:
    assert hourly_cost(stop_plan(), price_table(), "m1.small") == pytest.approx(
        0.044 * 3 + 0.02 + 0.044 * 2
    )
