"""Sandbox provisioning against real test hosts: a web host is provisioned right after it starts,
every time (nginx is started by supervisord about a second after boot; a reload before it has
written its pid file used to fail and leave the host without the app)."""

from __future__ import annotations

import time

import pytest
import requests

from sandbox.provision import APP_INDEX, provision_web

pytestmark = pytest.mark.hosts

NGINX_ROOT = "/var/www/fabflows"


def _front_page(ip: str) -> tuple[int, str]:
    r = requests.get(f"http://{ip}/", timeout=5, allow_redirects=False)
    return r.status_code, r.text


def test_web_host_provisioned_right_after_each_of_ten_stop_start_cycles(
    make_hosts, test_network
) -> None:
    """As the sandbox daemon does for a web host it has just started: provision at once."""
    [host] = make_hosts(["pv-web"])
    provision_web(host, NGINX_ROOT, 8000)  # right after the first boot
    assert _front_page(host.ip) == (200, APP_INDEX)
    took = []
    for cycle in range(10):
        test_network.stop(host.name, graceful=cycle % 2 == 0)  # clean stops and power cuts
        started = time.monotonic()
        test_network.start_again(host.name)
        # nginx is not up yet here: no pid file on the fresh /run
        provision_web(host, NGINX_ROOT, 8000)
        took.append(time.monotonic() - started)
        assert _front_page(host.ip) == (200, APP_INDEX), f"cycle {cycle + 1}"
        pid = host.exec(["cat", "/run/nginx.pid"]).stdout.strip()
        assert pid and host.exec(["kill", "-0", pid], check=False).returncode == 0
    assert len(took) == 10 and max(took) < 20, took
