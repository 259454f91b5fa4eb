"""fabflows server start/status/stop on a real `prefect server start`, with API auth on."""

from __future__ import annotations

from pathlib import Path

import httpx

from fabflows import server
from fabflows.testing.pgcluster import free_port


def test_start_status_stop_with_auth(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "server"
    started = server.start(
        port=port, directory=state, extra_env={"PREFECT_SERVER_API_AUTH_STRING": "admin:s3cret-pw"}
    )
    try:
        assert started.healthy and started.info is not None
        api = started.info.api_url
        assert server.status(state).healthy
        assert server.start(port=port, directory=state).info.pid == started.info.pid  # idempotent
        # the API refuses clients without the shared credential; health stays open
        assert httpx.post(f"{api}/flows/filter", json={}).status_code == 401
        assert (
            httpx.post(f"{api}/flows/filter", json={}, auth=("admin", "s3cret-pw")).status_code
            == 200
        )
        assert httpx.get(f"{api}/health").status_code == 200
        assert "running: pid" in server.status(state).text()
    finally:
        assert server.stop(state)
    assert not server.status(state).running
    assert server.status(state).text() == "not running"
    assert not server.stop(state)


def test_cli_entry_points(tmp_path: Path, capsys) -> None:
    assert server.main_server(["status", "--state-dir", str(tmp_path)]) == 1
    assert "not running" in capsys.readouterr().out
