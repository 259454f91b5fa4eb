"""Upgrade pages on real nginx (FabulAWS's logic) in isolated test hosts, checked over HTTP."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import requests
from prefect.logging import disable_run_logger

from fabflows.testing.upgrade_lab import APP_PORT, NGINX_ROOT
from sandbox.provision import provision_web
from tasks.aws.autoscaling import UpgradeModeRecord
from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import FleetHost
from tasks.ssh.upgrade_mode import (
    UpgradePages,
    disable_upgrade_pages,
    enable_upgrade_pages,
    get_upgrade_pages,
    marker_path,
    parse_state,
)

PAGES = UpgradePages(
    page=b"<h1>back soon</h1>\n",
    healthcheck=b"OK\n",
    page_source="test",
    healthcheck_source="test",
)
RECORD = UpgradeModeRecord(
    run="run-1", flow="begin-upgrade", since=datetime(2026, 11, 26, 21, 0, tzinfo=UTC), by="x:1:2"
)


def test_marker_lives_next_to_the_document_root_not_in_it() -> None:
    assert (
        marker_path("/home/p/services/nginx/html/")
        == "/home/p/services/nginx/fabflows-upgrade-mode.json"
    )


@pytest.mark.parametrize(
    ("text", "page", "health", "record", "root"),
    [
        ("noroot\n", False, False, False, False),
        ("", False, False, False, True),
        ("file 503.html 1764190800 abc\n", True, False, False, True),
        (
            "file 503.html 1764190800 abc\nfile healthcheck.html 1764190800 def\nmarker "
            + RECORD.to_json()
            + "\n",
            True,
            True,
            True,
            True,
        ),
        ("marker {broken\n", False, False, True, True),
    ],
    ids=["no-root", "serving", "page-only", "full", "damaged-marker"],
)
def test_parse_state(text, page, health, record, root) -> None:
    s = parse_state("web1", "10.0.0.1", text)
    assert (s.page, s.healthcheck_override, s.record is not None, s.document_root) == (
        page,
        health,
        record,
        root,
    )
    if page:
        assert s.page_since == datetime(2025, 11, 26, 21, 0, tzinfo=UTC)


def _get(ip: str, path: str = "/") -> tuple[int, bytes]:
    r = requests.get(f"http://{ip}{path}", timeout=5, allow_redirects=False)
    return r.status_code, r.content


@pytest.mark.hosts
def test_pages_rhythm_over_http(make_hosts, test_network) -> None:
    hosts = make_hosts(["um1", "um2", "um3"])
    for h in hosts[:2]:
        h.wait_for_port(80)
        provision_web(h, NGINX_ROOT, APP_PORT)
    fleet = [FleetHost(name=h.name, address=h.ip, role="web") for h in hosts]
    opts = SshOptions(
        user="deploy",
        known_hosts_file=str(test_network.known_hosts),
        key_file=str(test_network.client_key),
        connect_timeout=2,
    )
    web, no_root = fleet[:2], fleet[2]
    with disable_run_logger(), ConnectionPool(opts) as pool:
        dry = enable_upgrade_pages.fn(web, pool, NGINX_ROOT, PAGES, RECORD, dry_run=True)
        assert [r.label for r in dry.results] == ["would change"] * 2
        assert "would write marker, healthcheck.html, 503.html" in dry.results[0].message
        assert all(_get(h.ip)[0] == 200 for h in hosts[:2])

        on = enable_upgrade_pages.fn(web, pool, NGINX_ROOT, PAGES, RECORD, dry_run=False)
        assert [r.status for r in on.results] == ["changed"] * 2
        for h in hosts[:2]:
            assert _get(h.ip) == (503, PAGES.page)
            assert _get(h.ip, "/anything/else") == (503, PAGES.page)
            assert _get(h.ip, "/healthcheck.html") == (200, b"OK\n")
            # the marker is not served: it is outside the document root
            assert _get(h.ip, "/fabflows-upgrade-mode.json")[0] == 503
        # marker first, then the health check override, then the page: the LB never sees a 503
        written = [c.split(" < stdin")[0].rsplit(" ", 1)[-1] for c in on.results[0].commands]
        assert written == [
            marker_path(NGINX_ROOT),
            f"{NGINX_ROOT}/healthcheck.html",
            f"{NGINX_ROOT}/503.html",
        ]

        again = enable_upgrade_pages.fn(web, pool, NGINX_ROOT, PAGES, RECORD, dry_run=False)
        assert [r.status for r in again.results] == ["unchanged"] * 2

        states = get_upgrade_pages.fn(fleet, pool, NGINX_ROOT)
        assert [s.in_upgrade_mode for s in states] == [True, True, False]
        assert states[0].record == RECORD
        assert not states[2].document_root

        failed = enable_upgrade_pages.fn([no_root], pool, NGINX_ROOT, PAGES, RECORD, dry_run=False)
        assert failed.results[0].status == "failed"
        assert "document root" in failed.results[0].message

        off_dry = disable_upgrade_pages.fn(web, pool, NGINX_ROOT, dry_run=True)
        assert off_dry.results[0].commands == [
            f"sudo -n -- rm -f -- {NGINX_ROOT}/503.html",
            f"sudo -n -- rm -f -- {NGINX_ROOT}/healthcheck.html",
            f"sudo -n -- rm -f -- {marker_path(NGINX_ROOT)}",
        ]
        assert _get(hosts[0].ip)[0] == 503

        off = disable_upgrade_pages.fn(fleet, pool, NGINX_ROOT, dry_run=False)
        assert [r.status for r in off.results] == ["changed", "changed", "unchanged"]
        for h in hosts[:2]:
            assert _get(h.ip)[0] == 200
            assert _get(h.ip, "/healthcheck.html") == (200, b"app ok\n")  # the app's, again
        assert not any(
            s.in_upgrade_mode or s.record for s in get_upgrade_pages.fn(web, pool, NGINX_ROOT)
        )
        off_again = disable_upgrade_pages.fn(web, pool, NGINX_ROOT, dry_run=False)
        assert [r.status for r in off_again.results] == ["unchanged"] * 2


@pytest.mark.hosts
def test_unreachable_web_server_is_reported_not_hidden(make_hosts, test_network) -> None:
    [h] = make_hosts(["um9"])
    h.wait_for_port(80)
    provision_web(h, NGINX_ROOT, APP_PORT)
    opts = SshOptions(
        user="deploy",
        known_hosts_file=str(test_network.known_hosts),
        key_file=str(test_network.client_key),
        connect_timeout=2,
    )
    test_network.kill_sshd(h.name)
    fleet = [FleetHost(name=h.name, address=h.ip, role="web")]
    with disable_run_logger(), ConnectionPool(opts) as pool:
        [state] = get_upgrade_pages.fn(fleet, pool, NGINX_ROOT)
        assert not state.reachable and "connection refused" in state.error
        off = disable_upgrade_pages.fn(fleet, pool, NGINX_ROOT, dry_run=False)
        assert off.results[0].status == "failed"
