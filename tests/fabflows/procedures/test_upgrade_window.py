"""The shared upgrade window: decisions table-tested; the window for real (moto, test hosts' nginx,
Prefect harness), including a failing body, a dead holder to recover and a live one to refuse."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from prefect import flow

from config import load_config
from fabflows.errors import BadInput
from fabflows.procedures.upgrade_window import (
    BEGIN_UPGRADE,
    DEFAULT_PAGE,
    UpgradeModeBusy,
    decide_window,
    judge_holder,
    load_upgrade_pages,
    process_tag,
    upgrade_window,
)
from fabflows.runbook import load_context
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.configs import write_config
from fabflows.testing.upgrade_lab import make_lab, serve_test_repo
from tasks.aws.autoscaling import (
    UPGRADE_MODE_SUSPENDED_TAG,
    UPGRADE_MODE_TAG,
    UpgradeModeRecord,
)

NOW = datetime(2026, 11, 26, 22, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(hours=1)


def _holder(flow: str, run: str = "run-old") -> UpgradeModeRecord:
    return UpgradeModeRecord(run=run, flow=flow, since=EARLIER, by="ops:1:1")


@pytest.mark.parametrize(
    ("holder", "flow", "alive", "mode", "record_run", "since"),
    [
        (None, "upgrade-packages", None, "fresh", "run-new", NOW),
        (
            _holder("upgrade-packages", "run-new"),
            "upgrade-packages",
            None,
            "recovered",
            "run-new",
            EARLIER,
        ),
        (_holder(BEGIN_UPGRADE), "upgrade-packages", True, "joined", "run-old", EARLIER),
        (_holder(BEGIN_UPGRADE), BEGIN_UPGRADE, None, "joined", "run-old", EARLIER),
        (_holder("unknown"), "upgrade-packages", None, "joined", "run-old", EARLIER),
        (_holder("upgrade-packages"), "upgrade-packages", False, "recovered", "run-new", EARLIER),
        (_holder("reload-production-db"), BEGIN_UPGRADE, False, "recovered", "run-new", EARLIER),
    ],
    ids=[
        "fresh",
        "same-run",
        "join-begin-upgrade",
        "begin-again",
        "damaged-record",
        "take-over-dead-run",
        "begin-over-dead-run",
    ],
)
def test_decide_window(holder, flow, alive, mode, record_run, since) -> None:
    d = decide_window(holder, "run-new", flow, "me:2:2", alive, NOW)
    assert (d.mode, d.record.run, d.record.since) == (mode, record_run, since)
    if mode == "recovered" and record_run == "run-new":
        assert d.record.flow == flow and d.record.by == "me:2:2"


@pytest.mark.parametrize("alive", [True, None], ids=["alive", "unknown"])
def test_decide_window_refuses_a_live_holder(alive) -> None:
    with pytest.raises(UpgradeModeBusy, match="held by upgrade-packages run run-old"):
        decide_window(_holder("upgrade-packages"), "run-new", "upgrade-packages", "me", alive, NOW)


def test_pages_from_config_or_default(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, static_html={}))
    pages = load_upgrade_pages(cfg)
    assert pages.page == DEFAULT_PAGE and pages.page_source == "fabflows default page"

    (tmp_path / "html").mkdir()
    (tmp_path / "html" / "503.html").write_text("<h1>custom</h1>")
    (tmp_path / "html" / "health.html").write_text("fine")
    path = write_config(
        tmp_path,
        static_html={
            "upgrade_message": "html/503.html",
            "healthcheck_override": "html/health.html",
        },
    )
    pages = load_upgrade_pages(load_config(path), str(path))  # relative to the config file
    assert pages.page == b"<h1>custom</h1>" and pages.healthcheck == b"fine"


@pytest.mark.parametrize(
    ("html", "message"),
    [
        (
            {"upgrade_message": "nope/503.html"},
            "static_html.upgrade_message: nope/503.html not found",
        ),
        (
            {"healthcheck_override": "empty.html"},
            "static_html.healthcheck_override: .*empty.html is empty",
        ),
    ],
)
def test_bad_pages_are_refused_before_anything(tmp_path: Path, html, message) -> None:
    (tmp_path / "empty.html").write_text("  \n")
    path = write_config(tmp_path, static_html=html)
    with pytest.raises(BadInput, match=message):
        load_upgrade_pages(load_config(path), str(path))


def test_the_sample_configs_pages_are_reported_missing(tmp_path: Path) -> None:
    """FabulAWS's sample names deployment/templates/html/503.html: a clear error, not a crash."""
    with pytest.raises(BadInput, match="deployment/templates/html/503.html not found"):
        load_upgrade_pages(load_config(write_config(tmp_path)))


# --------------------------------------------------------------------------- the window, for real


@pytest.fixture(scope="module")
def repo(test_network, tmp_path_factory) -> Iterator:
    r = serve_test_repo(tmp_path_factory.mktemp("apt-repo"), test_network)
    yield r
    r.stop()


@pytest.fixture
def lab(aws, test_network, make_hosts, repo, tmp_path: Path):
    return make_lab(tmp_path, aws.endpoint, test_network, make_hosts, repo, roles=("web",))


class Boom(RuntimeError):
    pass


@flow(name="window-test")
def window_flow(config: str, fail: bool = False) -> dict:
    ctx = load_context("staging", config=config)
    seen: dict = {}
    try:
        with upgrade_window(ctx, config_path=config) as window:
            seen["mode"] = window.decision.mode
            seen["inside"] = [
                requests.get(f"http://{s}/", timeout=5).status_code for s in _web_ips(ctx)
            ]
            time.sleep(0.4)  # a window of a few probe intervals: the probe surely sees the page
            if fail:
                raise Boom("the maintenance failed")
    except Boom:
        seen["raised"] = True
    seen["report"] = window.report
    return seen


def _web_ips(ctx) -> list[str]:
    from tasks.aws.ec2 import describe_servers

    return [
        s.private_ip_address
        for s in describe_servers.fn(ctx.creds, "myproject", "staging", roles=["web"])
    ]


def _group(aws) -> dict:
    return boto_client(aws, "autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=["myproject-staging-ag"]
    )["AutoScalingGroups"][0]


def _suspended(aws) -> list[str]:
    return sorted(p["ProcessName"] for p in _group(aws)["SuspendedProcesses"])


def _tags(aws) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in _group(aws)["Tags"]}


def _put_record(aws, record: UpgradeModeRecord, suspended: str) -> None:
    boto_client(aws, "autoscaling").create_or_update_tags(
        Tags=[
            {
                "ResourceId": "myproject-staging-ag",
                "ResourceType": "auto-scaling-group",
                "Key": k,
                "Value": v,
                "PropagateAtLaunch": False,
            }
            for k, v in (
                (UPGRADE_MODE_TAG, record.to_json()),
                (UPGRADE_MODE_SUSPENDED_TAG, suspended),
            )
        ]
    )


@pytest.mark.hosts
@pytest.mark.flow
def test_window_restores_exactly_even_when_the_body_fails(prefect_server, lab, aws) -> None:
    boto_client(aws, "autoscaling").suspend_processes(
        AutoScalingGroupName="myproject-staging-ag", ScalingProcesses=["AZRebalance"]
    )
    seen = window_flow(str(lab.config_path), fail=True)
    assert seen["raised"] and seen["mode"] == "fresh"
    assert seen["inside"] == [503, 503]
    report = seen["report"]
    assert not report.left_on and report.problems == []
    assert set(report.processes_suspended) == {
        "Launch",
        "Terminate",
        "HealthCheck",
        "ReplaceUnhealthy",
        "AlarmNotification",
        "ScheduledActions",
        "InstanceRefresh",
    }  # AZRebalance was already suspended: not ours
    assert report.seconds_in_upgrade_mode > 0 and report.downtime.non_200 > 0
    assert _suspended(aws) == ["AZRebalance"]  # exactly as before
    assert UPGRADE_MODE_TAG not in _tags(aws)
    for h in lab.web:
        assert requests.get(f"http://{h.ip}/", timeout=5).status_code == 200


@pytest.mark.hosts
@pytest.mark.flow
def test_window_takes_over_a_dead_runs_upgrade_mode_and_ends_it(prefect_server, lab, aws) -> None:
    # a run on this machine whose process is gone (pid 2**22 + 1 cannot exist) left it all on
    host = process_tag().split(":")[0]
    dead = UpgradeModeRecord(
        run="local-dead", flow="upgrade-packages", since=EARLIER, by=f"{host}:{2**22 + 1}:1"
    )
    _put_record(aws, dead, "Launch,Terminate")
    boto_client(aws, "autoscaling").suspend_processes(
        AutoScalingGroupName="myproject-staging-ag", ScalingProcesses=["Launch", "Terminate"]
    )
    seen = window_flow(str(lab.config_path))
    assert seen["mode"] == "recovered"
    assert seen["report"].holder.since == EARLIER
    assert _suspended(aws) == [] and UPGRADE_MODE_TAG not in _tags(aws)


@pytest.mark.hosts
@pytest.mark.flow
def test_window_refuses_a_live_holder_and_joins_begin_upgrade(prefect_server, lab, aws) -> None:
    live = UpgradeModeRecord(
        run="local-live", flow="reload-production-db", since=EARLIER, by=process_tag()
    )
    _put_record(aws, live, "Launch")
    state = window_flow(str(lab.config_path), return_state=True)
    assert state.is_failed() and "which is still running" in state.message
    assert _tags(aws)[UPGRADE_MODE_TAG] == live.to_json()  # untouched
    assert all(requests.get(f"http://{h.ip}/", timeout=5).status_code == 200 for h in lab.web)

    begun = live.model_copy(update={"flow": BEGIN_UPGRADE, "by": f"ops:{os.getpid()}:x"})
    _put_record(aws, begun, "Launch")
    seen = window_flow(str(lab.config_path))
    assert seen["mode"] == "joined" and seen["inside"] == [503, 503]
    assert seen["report"].left_on
    # still in upgrade mode for end-upgrade to end: pages up, processes suspended, record kept
    assert all(requests.get(f"http://{h.ip}/", timeout=5).status_code == 503 for h in lab.web)
    assert "Launch" in _suspended(aws) and _tags(aws)[UPGRADE_MODE_TAG] == begun.to_json()


@pytest.mark.parametrize(
    ("flow_name", "alive", "warn", "says"),
    [
        (BEGIN_UPGRADE, False, False, "held by begin-upgrade run r1 since 2026-11-26 21:00:00Z until end-upgrade"),
        (BEGIN_UPGRADE, None, False, "until end-upgrade"),
        (BEGIN_UPGRADE, True, False, "(its run is still going)"),
        ("upgrade-packages", True, False, "which is running"),
        ("upgrade-packages", False, True, "upgrade-packages run r1 is NOT running but left upgrade mode on"),
        ("reload-production-db", None, True, "cannot tell whether that run is still going"),
    ],
)  # fmt: skip
def test_judge_holder_warns_only_about_holders_that_should_have_ended_it(
    flow_name: str, alive: bool | None, warn: bool, says: str
) -> None:
    """begin-upgrade holds upgrade mode on purpose after its run ends; other holders do not."""
    record = UpgradeModeRecord(run="r1", flow=flow_name, since=EARLIER, by="ops:1:1")
    warned, text = judge_holder(record, alive)
    assert warned is warn and says in text
