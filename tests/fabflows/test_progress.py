"""Long waits tell people about themselves: what is awaited, how long so far, the limit."""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from prefect.logging import disable_run_logger

from fabflows.progress import Waiting, duration_text
from tasks.http.probe import check_site_up


@pytest.fixture
def terminal(monkeypatch) -> None:
    """As under `fabflows run` without --verbose (the console shows warnings only), with a line
    every 0.3 s instead of 10 s."""
    monkeypatch.setenv("FABFLOWS_PROGRESS_BAR", "1")
    monkeypatch.setenv("FABFLOWS_WAIT_REPORT_SECONDS", "0.3")
    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if handler.name == "console":
                monkeypatch.setattr(handler, "level", logging.WARNING)


def test_duration_text() -> None:
    assert [duration_text(s) for s in (4.2, 70, 900, 3720)] == ["4 s", "1m10s", "15m00s", "1h02m"]


def test_a_wait_says_what_how_long_and_the_limit_at_most_every_interval(terminal, capsys) -> None:
    with Waiting("the site to answer 200", limit=900) as wait:
        said = [wait.tick("0 of 3") for _ in range(3)]  # nothing yet: the first interval runs
        time.sleep(0.35)
        said += [wait.tick("1 of 3"), wait.tick("1 of 3")]  # once per interval, not per poll
    assert said == [False, False, False, True, False]
    err = [line for line in capsys.readouterr().err.splitlines() if "waiting for" in line]
    assert err == [
        "waiting for the site to answer 200: 0 s of 15m00s (1 of 3)",
        "done waiting for the site to answer 200 after 0 s",
    ]


def test_a_short_wait_stays_silent_and_no_terminal_outside_fabflows_run(
    monkeypatch, capsys
) -> None:
    monkeypatch.setenv("FABFLOWS_WAIT_REPORT_SECONDS", "0.1")
    monkeypatch.delenv("FABFLOWS_PROGRESS_BAR", raising=False)
    with Waiting("x", limit=5) as wait:
        time.sleep(0.15)
        assert wait.tick()  # said in the run log (a deployment's worker has no terminal)
    assert wait.lines[0].startswith("waiting for x: 0 s of 5 s")
    assert capsys.readouterr().err == ""
    with Waiting("y", limit=5) as quick:
        pass
    assert quick.lines == []


class _SlowStart(http.server.BaseHTTPRequestHandler):
    ready_at = 0.0

    def do_GET(self) -> None:  # noqa: N802
        code = 200 if time.monotonic() >= self.ready_at else 503
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def slow_site() -> Iterator[str]:
    """A real HTTP server on loopback that answers 503 for 1.2 s, then 200."""
    _SlowStart.ready_at = time.monotonic() + 1.2
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowStart)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_waiting_for_the_site_prints_progress_in_the_terminal(terminal, slow_site, capsys) -> None:
    """start-environment's site check: lines on stderr while servers do not answer yet."""
    with disable_run_logger():
        checks = check_site_up.fn([slow_site], "/healthcheck.html", timeout=30)
    assert all(c.ok for c in checks)
    err = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.startswith(("waiting", "done"))
    ]
    assert len(err) >= 3, err  # ~1.2 s of waiting, a line every 0.3 s, then the end
    assert err[0].startswith("waiting for 1 web server(s) to answer 200: ")
    assert "of 30 s (0 of 2 URL(s) answered as expected)" in err[0]
    assert err[-1].startswith("done waiting for 1 web server(s) to answer 200 after ")
