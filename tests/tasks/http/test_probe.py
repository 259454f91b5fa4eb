"""The HTTP checks and the downtime probe, against a real HTTP server on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect.logging import disable_run_logger

from tasks.http.probe import (
    HttpCheckFailed,
    HttpProbe,
    ProbeSample,
    check_site_up,
    check_upgrade_mode,
    summarize_samples,
    wait_for_status,
)


class Switchable:
    """A web server whose answer the test changes: ``status`` for /, 200 for /healthcheck.html."""

    def __init__(self) -> None:
        self.status = 200
        self.page = b"upgrading"
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                code = 200 if self.path == "/healthcheck.html" else outer.status
                body = outer.page if code == 503 else b"ok"
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def web() -> Iterator[Switchable]:
    s = Switchable()
    yield s
    s.close()


def _samples(statuses: list[int | None], step: float = 0.1) -> list[ProbeSample]:
    return [
        ProbeSample(t=round(i * step, 3), status=s, latency_s=0.01) for i, s in enumerate(statuses)
    ]


@pytest.mark.parametrize(
    ("statuses", "non_200", "outages", "total"),
    [
        ([200, 200, 200], 0, [], 0.0),
        ([200, 503, 503, 200], 2, [(0.1, 0.3)], 0.2),
        ([503, 200, None, 502, 200], 3, [(0.0, 0.1), (0.2, 0.4)], 0.3),
        ([200, 503, 503], 2, [(0.1, 0.2)], 0.1),  # still down at the end: up to the last poll
        ([], 0, [], 0.0),
    ],
    ids=["up", "one-outage", "two-outages-and-no-answer", "down-at-end", "no-samples"],
)
def test_summarize_samples(statuses, non_200, outages, total) -> None:
    s = summarize_samples("http://x/", datetime.now(UTC), _samples(statuses), 0.1, 1.0)
    assert s.non_200 == non_200
    assert [(o.start_s, o.end_s) for o in s.outages] == outages
    assert s.total_downtime_s == pytest.approx(total)
    if outages:
        assert s.longest_outage_s == max(round(b - a, 3) for a, b in outages)


def test_probe_measures_a_real_outage(web: Switchable) -> None:
    with HttpProbe(web.url, interval=0.1) as probe:
        time.sleep(0.35)
        web.status = 503
        time.sleep(0.6)
        web.status = 200
        time.sleep(0.35)
    s = probe.summary()
    assert 10 <= s.samples <= 15  # every 100 ms over ~1.3 s
    assert len(s.outages) == 1 and s.outages[0].statuses == [503]
    assert 0.4 <= s.total_downtime_s <= 0.9
    assert 4 <= s.non_200 <= 8
    assert "downtime" in s.describe()


def test_probe_counts_no_answer_as_down() -> None:
    with HttpProbe("http://127.0.0.1:9/", interval=0.1, request_timeout=0.2) as probe:
        time.sleep(0.3)
    s = probe.summary()
    assert s.samples >= 2 and s.non_200 == s.samples
    assert s.outages[0].statuses == [None]


def test_probe_refuses_a_non_http_url() -> None:
    with pytest.raises(ValueError, match="not an http"):
        HttpProbe("ftp://example/")


def test_wait_for_status_waits_for_the_change(web: Switchable) -> None:
    web.status = 503
    threading.Timer(0.5, lambda: setattr(web, "status", 200)).start()
    check = wait_for_status(web.url, 200, timeout=5)
    assert check.ok and 0.4 <= check.waited_s < 3


def test_wait_for_status_gives_up_with_what_it_got(web: Switchable) -> None:
    check = wait_for_status(web.url, 503, timeout=0.5)
    assert not check.ok and check.status == 200
    assert "expected 503, got 200" in check.describe()


def test_upgrade_mode_and_site_checks(web: Switchable) -> None:
    with disable_run_logger():
        with pytest.raises(HttpCheckFailed, match="expected 503, got 200"):
            check_upgrade_mode.fn([web.url], "/healthcheck.html", b"upgrading", timeout=0.3)
        web.status = 503
        checks = check_upgrade_mode.fn([web.url], "/healthcheck.html", b"upgrading", timeout=1)
        assert [c.status for c in checks] == [503, 200]
        with pytest.raises(HttpCheckFailed, match="not the expected page"):
            check_upgrade_mode.fn([web.url], "/healthcheck.html", b"other page", timeout=0.3)
        with pytest.raises(HttpCheckFailed, match="the site does not answer 200"):
            check_site_up.fn([web.url], "/healthcheck.html", timeout=0.3)
        web.status = 200
        assert all(c.ok for c in check_site_up.fn([web.url], "/healthcheck.html", timeout=1))
