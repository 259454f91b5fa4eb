"""Slack's servers replaced at the network boundary: a local HTTP server that records what fabflows
posts to incoming webhooks and response URLs, and helpers that sign requests like Slack does."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlencode


class FakeSlack:
    def __init__(self) -> None:
        self.posts: list[tuple[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size)
                try:
                    data: Any = json.loads(body)
                except ValueError:
                    data = body.decode(errors="replace")
                outer.posts.append((self.path, data))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> FakeSlack:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, path: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p, data in self.posts:
                if p == path:
                    return data
            time.sleep(0.1)
        raise AssertionError(f"nothing posted to {path}; posts: {self.posts}")


def signed(secret: str, form: dict[str, str], timestamp: int | None = None) -> tuple[bytes, dict]:
    """Body and headers of a Slack request signed with ``secret`` (v0 scheme)."""
    body = urlencode(form).encode()
    ts = str(int(time.time()) if timestamp is None else timestamp)
    base = f"v0:{ts}:".encode() + body
    signature = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return body, {
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": signature,
        "Content-Type": "application/x-www-form-urlencoded",
    }
