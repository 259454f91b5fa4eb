"""A moto server (real HTTP, boto3 talks to it with endpoint_url) with a fault-injecting middleware.

Used by the test suite and by the sandbox. Faults are queued per (service, action) with
``POST /_faults`` (JSON list of {"service", "action", "code", "status", "count"}) or ``queue_fault()``;
the next matching request gets a protocol-correct error body, so botocore's retry logic sees a real
throttle.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from io import BytesIO
from typing import Any

os.environ.setdefault("MOTO_DISABLE_GLOBAL_CORS", "1")
logging.getLogger("werkzeug").setLevel(logging.ERROR)

_SCOPE = re.compile(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/")
_READS = ("Describe", "Get", "List")
# The servers of this process by endpoint, so that code following EC2 states in the same process
# (test hosts mirroring instances) can tell whether anything changed since it last looked.
_SERVERS: dict[str, MotoServer] = {}


class ChangeWatch:
    """Whether moto's state may have changed since the last look: a change counter, not a poll.

    Following instance states by calling DescribeInstances every few hundred milliseconds costs
    about 45 ms of CPU a call in the test process (moto serializes every instance). Every state
    change comes from a request that is not a read, and this process's server counts those, so a
    follower asks :meth:`due` and describes only when it says so. At least every ``fallback``
    seconds it says so anyway; for a server not in this process it always does.
    """

    def __init__(self, endpoint: str, fallback: float = 2.0):
        self._server = _SERVERS.get(endpoint.rstrip("/"))
        self.fallback = fallback
        self._seen = -1
        self._last = 0.0

    def due(self) -> bool:
        if self._server is None:
            return True
        now = time.monotonic()
        count = self._server.injector.changes
        if count != self._seen or now - self._last >= self.fallback:
            self._seen, self._last = count, now
            return True
        return False


class FaultInjector:
    """WSGI middleware in front of moto's app."""

    def __init__(self, app: Any):
        self.app = app
        self.faults: deque[dict[str, Any]] = deque()
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.changes = 0  # requests answered that may have changed a state (see ChangeWatch)

    def queue(
        self, service: str, action: str, code: str = "Throttling", status: int = 400, count: int = 1
    ) -> None:
        with self.lock:
            for _ in range(count):
                self.faults.append(
                    {"service": service, "action": action, "code": code, "status": status}
                )

    def _take(self, service: str, action: str) -> dict[str, Any] | None:
        with self.lock:
            for f in list(self.faults):
                if f["service"] == service and f["action"] in (action, "*"):
                    self.faults.remove(f)
                    return f
        return None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == "/_faults" and environ["REQUEST_METHOD"] == "POST":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            for f in json.loads(environ["wsgi.input"].read(size) or b"[]"):
                self.queue(
                    f["service"],
                    f["action"],
                    f.get("code", "Throttling"),
                    f.get("status", 400),
                    f.get("count", 1),
                )
            start_response("204 No Content", [])
            return [b""]
        match = _SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
        service = match.group(1) if match else ""
        action = ""
        size = int(environ.get("CONTENT_LENGTH") or 0)
        if size:
            body = environ["wsgi.input"].read(size)
            environ["wsgi.input"] = BytesIO(body)
            m = re.search(rb"(?:^|&)Action=([A-Za-z0-9]+)", body)
            action = m.group(1).decode() if m else ""
        if not action and service == "s3":
            action = environ["REQUEST_METHOD"]
        with self.lock:
            self.requests.append((service, action))
        fault = self._take(service, action) if self.faults else None
        if fault is None:
            try:
                return self.app(environ, start_response)
            finally:  # counted once answered: a follower that sees the count sees the change
                if not action.startswith(_READS) or environ.get("PATH_INFO", "").startswith(
                    "/moto-api"
                ):
                    with self.lock:
                        self.changes += 1
        rid = str(uuid.uuid4())
        code, msg = fault["code"], "Injected fault"
        if service == "ec2":
            body = f"<Response><Errors><Error><Code>{code}</Code><Message>{msg}</Message></Error></Errors><RequestID>{rid}</RequestID></Response>"
        elif service == "s3":
            body = f"<Error><Code>{code}</Code><Message>{msg}</Message><RequestId>{rid}</RequestId></Error>"
        else:
            body = f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{msg}</Message></Error><RequestId>{rid}</RequestId></ErrorResponse>"
        status = fault["status"]
        start_response(
            f"{status} Error", [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))]
        )
        return [body.encode()]


class MotoServer:
    """moto's WSGI app behind FaultInjector, served by werkzeug in a thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        self.injector = FaultInjector(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            host, port, self.injector, threaded=True, request_handler=MotoRequestHandler
        )
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="moto")

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> MotoServer:
        self._thread.start()
        _SERVERS[self.endpoint] = self
        return self

    def reset(self) -> None:
        import requests

        requests.post(self.endpoint + "/moto-api/reset", timeout=10).raise_for_status()
        with self.injector.lock:
            self.injector.faults.clear()
            self.injector.requests.clear()

    def queue_fault(
        self, service: str, action: str, code: str = "Throttling", status: int = 400, count: int = 1
    ) -> None:
        self.injector.queue(service, action, code, status, count)

    def stop(self) -> None:
        _SERVERS.pop(self.endpoint, None)
        self._server.shutdown()
        self._server.server_close()
