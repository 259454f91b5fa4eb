"""begin-upgrade, upgrade-status, upgrade-packages joining, end-upgrade: the original's §2.12
sequence for real (moto, test hosts' nginx checked over HTTP, Prefect harness)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from config import load_config
from fabflows.runtime.journal import Journal
from fabflows.testing.aws_fixtures import boto_client
from fabflows.testing.upgrade_lab import make_lab, serve_test_repo
from flows.begin_upgrade import begin_upgrade
from flows.end_upgrade import end_upgrade
from flows.upgrade_packages import upgrade_packages
from flows.upgrade_status import upgrade_status
from tasks.aws.autoscaling import UPGRADE_MODE_TAG

pytestmark = [pytest.mark.hosts, pytest.mark.flow]

GROUP = "myproject-staging-ag"


@pytest.fixture(scope="module")
def repo(test_network, tmp_path_factory) -> Iterator:
    r = serve_test_repo(tmp_path_factory.mktemp("apt-repo"), test_network)
    yield r
    r.stop()


@pytest.fixture
def lab(aws, test_network, make_hosts, repo, tmp_path: Path):
    return make_lab(tmp_path, aws.endpoint, test_network, make_hosts, repo)


def _asg(aws) -> dict:
    return boto_client(aws, "autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[GROUP]
    )["AutoScalingGroups"][0]


def _suspended(aws) -> list[str]:
    return sorted(p["ProcessName"] for p in _asg(aws)["SuspendedProcesses"])


def _status(ip: str, path: str = "/") -> int:
    return requests.get(f"http://{ip}{path}", timeout=5, allow_redirects=False).status_code


def test_begin_status_packages_joined_end(prefect_server, lab, aws) -> None:
    cfg = str(lab.config_path)
    boto_client(aws, "autoscaling").suspend_processes(
        AutoScalingGroupName=GROUP, ScalingProcesses=["AddToLoadBalancer"]
    )
    before = _suspended(aws)

    dry = begin_upgrade(environment="staging", config=cfg)
    assert dry.dry_run and "mode: fresh" in dry.plan_text
    assert dry.plan_text.count("page on") == 2
    assert "suspend Launch, Terminate" in dry.plan_text
    assert _suspended(aws) == before
    assert all(_status(h.ip) == 200 for h in lab.web)

    on = begin_upgrade(environment="staging", config=cfg, dry_run=False)
    assert [s.state for s in on.steps] == ["done"] and on.details["Mode"] == "fresh"
    assert "IN UPGRADE MODE on 2 of 2 web server(s)" in on.details["Upgrade mode"]
    for h in lab.web:
        assert _status(h.ip) == 503 and _status(h.ip, "/healthcheck.html") == 200
    assert "Launch" in _suspended(aws) and "AddToLoadBalancer" in _suspended(aws)
    entry = Journal.for_environment("myproject/staging", load_config(cfg)).entry(on.run_id)
    on_data = entry.step("upgrade-mode-on").data  # journaled: what recover would undo
    assert on_data["checks"] == [503, 200, 503, 200, 503, 200]  # + the site URL
    assert entry.state == "done" and on_data["mode"] == "fresh"

    state = upgrade_status(environment="staging", config=cfg, return_state=True)
    status = state.result()
    assert status.in_upgrade_mode and status.holder.flow == "begin-upgrade"
    # begin-upgrade's run has ended and holds upgrade mode on purpose: said, not warned about
    assert "until end-upgrade" in status.holder_state and "NOT running" not in status.describe()
    run, warnings = _run_tags_and_warnings(state.state_details.flow_run_id)
    assert warnings == [], warnings
    assert "env:myproject/staging" in run.tags
    assert any(t.startswith("started-by:") for t in run.tags), run.tags
    assert "AddToLoadBalancer" not in status.recorded.suspended  # not ours
    assert "IN UPGRADE MODE on 2 of 2 web server(s)" in status.describe()
    assert "suspended by others: AddToLoadBalancer" in status.describe()

    again = begin_upgrade(environment="staging", config=cfg, dry_run=False)
    assert again.outcome == "nothing to change" and not again.steps  # already on everywhere
    assert "mode: joined" in again.plan_text

    # upgrade-packages inside begin-upgrade's window: joins it and leaves upgrade mode on
    report = upgrade_packages(
        environment="staging", config=cfg, dry_run=False, roles=["db-primary"]
    )
    db = lab.servers[0]  # named with its instance id (two servers may share a Name tag)
    assert report.details["Upgraded"] == f"{db.name} ({db.instance_id})"
    assert "left on: begin-upgrade holds it" in report.details["Upgrade mode"]
    assert all(_status(h.ip) == 503 for h in lab.web)

    end_dry = end_upgrade(environment="staging", config=cfg)
    assert end_dry.dry_run and "begun by begin-upgrade" in end_dry.plan_text
    assert all(_status(h.ip) == 503 for h in lab.web)

    end = end_upgrade(environment="staging", config=cfg, dry_run=False)
    assert "not in upgrade mode" in end.details["Upgrade mode"]
    assert _suspended(aws) == before
    assert UPGRADE_MODE_TAG not in {t["Key"] for t in _asg(aws)["Tags"]}
    for h in lab.web:
        assert _status(h.ip) == 200 and _status(h.ip, "/healthcheck.html") == 200

    # safe at any time: nothing to end, the site is still checked
    end_again = end_upgrade(environment="staging", config=cfg, dry_run=False)
    assert "note: not in upgrade mode" in end_again.plan_text
    assert [s.state for s in end_again.steps] == ["done"]
    assert "2 unchanged" in end_again.steps[0].summary, end_again.steps[0].summary


def test_begin_upgrade_undoes_itself_when_a_web_server_cannot_be_switched(
    prefect_server, lab, aws, test_network
) -> None:
    before = _suspended(aws)
    broken, fine = lab.web
    broken.exec(["rm", "-rf", "/home/deploy/services/nginx/html"])  # not a web server any more
    state = begin_upgrade(
        environment="staging", config=str(lab.config_path), dry_run=False, return_state=True
    )
    assert state.is_failed()
    assert "nginx document root /home/deploy/services/nginx/html does not exist" in state.message
    assert _suspended(aws) == before
    assert UPGRADE_MODE_TAG not in {t["Key"] for t in _asg(aws)["Tags"]}
    assert _status(fine.ip) == 200


def _run_tags_and_warnings(run_id) -> tuple:
    """The flow run as Prefect stored it, and its WARNING-or-worse log lines."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel
    from prefect.logging.handlers import APILogHandler

    async def read() -> tuple:
        await APILogHandler.aflush()
        async with get_client() as client:
            run = await client.read_flow_run(run_id)
            logs = await client.read_logs(
                log_filter=LogFilter(
                    flow_run_id=LogFilterFlowRunId(any_=[run_id]),
                    level=LogFilterLevel(ge_=30),
                )
            )
            return run, [log.message for log in logs]

    return asyncio.run(read())


def _status_with(holder):
    from datetime import UTC, datetime

    from fabflows.procedures.upgrade_window import UpgradeStatus
    from tasks.aws.autoscaling import RecordedUpgradeMode

    return UpgradeStatus(
        environment="myproject/staging",
        checked_at=datetime.now(UTC),
        auto_scaling_group=GROUP,
        suspended_processes=["Launch"] if holder else [],
        recorded=RecordedUpgradeMode(record=holder, suspended=["Launch"]) if holder else None,
        hosts=[],
    )


def test_end_upgrade_refuses_a_holder_that_may_be_alive_unless_forced() -> None:
    from datetime import UTC, datetime

    from fabflows.procedures.upgrade_window import UpgradeModeBusy, process_tag
    from flows.end_upgrade import check_holder
    from tasks.aws.autoscaling import UpgradeModeRecord

    since = datetime(2026, 11, 26, 20, 0, tzinfo=UTC)

    def rec(flow: str, by: str) -> UpgradeModeRecord:
        return UpgradeModeRecord(run="local-x", flow=flow, since=since, by=by)

    here = process_tag().split(":")[0]
    assert check_holder(_status_with(None), force=False) == "not in upgrade mode"
    assert "begun by begin-upgrade" in check_holder(
        _status_with(rec("begin-upgrade", "ops:1:1")), force=False
    )
    dead = rec("upgrade-packages", f"{here}:{2**22 + 1}:1")
    assert "no longer running" in check_holder(_status_with(dead), force=False)
    elsewhere = rec("upgrade-packages", "worker-7:4242:1")  # another machine, unknown to Prefect
    with pytest.raises(UpgradeModeBusy, match="may still be running"):
        check_holder(_status_with(elsewhere), force=False)
    assert check_holder(_status_with(elsewhere), force=True).startswith("FORCED")
    alive = rec("upgrade-packages", process_tag())
    with pytest.raises(UpgradeModeBusy, match="is still running"):
        check_holder(_status_with(alive), force=False)
