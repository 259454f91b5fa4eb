"""The data plane moto does not have: a load balancer that really forwards HTTP.

moto keeps a classic ELB's registrations but routes no traffic. :class:`ElbProxy` does: an HTTP
reverse proxy on a local port that forwards each request, round robin, to the instances the ELB has
registered and *InService* (re-read every ``refresh`` seconds), at the instance's private address.
With :func:`fabflows.testing.moto_fidelity.elb_health_checks` on, InService means the instance
passed the ELB's health check, as on AWS (``health_check=True`` makes the proxy check by itself
instead). A backend that fails gets a 502, as an ELB answers, and no backend at all a 503. So a probe through it sees what users behind a real ELB would see while
runbooks register, deregister, restart and replace servers.
"""

from __future__ import annotations

import http.client
import itertools
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3


class ElbProxy:
    """Reverse proxy in front of the InService instances of one classic ELB in moto."""

    def __init__(
        self,
        endpoint: str,
        load_balancer_name: str,
        region: str = "us-east-1",
        bind: str = "127.0.0.1",
        backend_port: int = 80,
        refresh: float = 0.1,
        timeout: float = 5.0,
        health_path: str = "/healthcheck.html",
        healthy_threshold: int = 2,
        unhealthy_threshold: int = 2,
        health_check: bool = False,
    ):
        self.endpoint = endpoint
        self.name = load_balancer_name
        self.region = region
        self.backend_port = backend_port
        self.refresh = refresh
        self.timeout = timeout
        self.backends: list[str] = []
        self.health_check = health_check
        self.health_path = health_path
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self._checks: dict[str, list[int]] = {}  # ip -> [successes in a row, failures in a row]
        self._healthy: set[str] = set()
        self.requests = 0
        self.errors = 0
        self._ips: dict[str, str] = {}
        self._cycle = itertools.cycle([None])
        self._lock = threading.Lock()
        self._confirm_lock = threading.Lock()
        self._confirm_clients: tuple[Any, Any] | None = None
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer((bind, 0), self._handler())
        self._server.daemon_threads = True
        self.host, self.port = self._server.server_address[:2]
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def _clients(self) -> tuple[Any, Any]:
        kw = dict(
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        return boto3.client("elb", **kw), boto3.client("ec2", **kw)

    def refresh_backends(self, elb: Any = None, ec2: Any = None) -> list[str]:
        """Re-read the ELB's InService instances and their addresses."""
        if elb is None:
            elb, ec2 = self._clients()
        states = elb.describe_instance_health(LoadBalancerName=self.name)["InstanceStates"]
        ids = sorted(s["InstanceId"] for s in states if s["State"] == "InService")
        unknown = [i for i in ids if i not in self._ips]
        if unknown:
            for r in ec2.describe_instances(InstanceIds=unknown)["Reservations"]:
                for inst in r["Instances"]:
                    if inst.get("PrivateIpAddress"):
                        self._ips[inst["InstanceId"]] = inst["PrivateIpAddress"]
        registered = [self._ips[i] for i in ids if i in self._ips]
        backends = [ip for ip in registered if not self.health_check or self._health_check(ip)]
        with self._lock:
            if backends != self.backends:
                self.backends = backends
                self._cycle = itertools.cycle(backends or [None])
        return backends

    def _health_check(self, ip: str) -> bool:
        """One health check of ``ip``; True while it counts as healthy (thresholds applied)."""
        ok = False
        try:
            conn = http.client.HTTPConnection(ip, self.backend_port, timeout=1.0)
            conn.request("GET", self.health_path)
            ok = conn.getresponse().status == 200
            conn.close()
        except OSError:
            ok = False
        counts = self._checks.setdefault(ip, [0, 0])
        if ok:
            counts[0], counts[1] = counts[0] + 1, 0
            if counts[0] >= self.healthy_threshold:
                self._healthy.add(ip)
        else:
            counts[0], counts[1] = 0, counts[1] + 1
            if counts[1] >= self.unhealthy_threshold:
                self._healthy.discard(ip)
        return ip in self._healthy

    def _refresher(self) -> None:
        elb, ec2 = self._clients()
        while not self._stop.wait(self.refresh):
            try:
                self.refresh_backends(elb, ec2)
            except Exception:  # noqa: BLE001 - keep the last known backends; retry next tick
                continue

    def taken_out(self, backend: str) -> bool:
        """Re-read the ELB now: is ``backend`` no longer one of its InService instances?"""
        with self._confirm_lock:
            if self._confirm_clients is None:
                self._confirm_clients = self._clients()
            try:
                backends = self.refresh_backends(*self._confirm_clients)
            except Exception:  # noqa: BLE001 - moto unreachable: answer as the last view says
                return False
        return backend not in backends

    def next_backend(self) -> str | None:
        with self._lock:
            return next(self._cycle)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                return

            def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                proxy.requests += 1
                backend = proxy.next_backend()
                for _ in range(3):
                    if backend is None:
                        proxy.errors += 1
                        self._answer(503, b"no healthy backend\n")
                        return
                    try:
                        conn = http.client.HTTPConnection(
                            backend, proxy.backend_port, timeout=proxy.timeout
                        )
                        conn.request(
                            "GET", self.path, headers={"Host": self.headers.get("Host", "")}
                        )
                        resp = conn.getresponse()
                        body = resp.read()
                        conn.close()
                        break
                    except OSError:
                        # An ELB never sends a request to an instance it has already taken out;
                        # this proxy only learns that every `refresh` seconds (later on a loaded
                        # machine). Ask now: gone -> the next backend; still InService -> 502.
                        if not proxy.taken_out(backend):
                            proxy.errors += 1
                            self._answer(502, b"bad gateway\n")
                            return
                        backend = proxy.next_backend()
                else:
                    proxy.errors += 1
                    self._answer(502, b"bad gateway\n")
                    return
                keep = {
                    k: v
                    for k, v in resp.getheaders()
                    if k.lower() in ("content-type", "cache-control", "x-served-by")
                }
                keep["X-Backend"] = backend
                self._answer(resp.status, body, keep)

            do_HEAD = do_GET

        return Handler

    def start(self) -> ElbProxy:
        try:
            self.refresh_backends()
        except Exception:  # noqa: BLE001 - the load balancer may not exist yet: next tick
            pass
        for target in (self._server.serve_forever, self._refresher):
            t = threading.Thread(target=target, daemon=True, name=f"elb-proxy-{self.name}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ElbProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CapacitySampler:
    """Samples, every 50 ms while in its ``with`` block, how many web servers ``proxy`` really
    forwards to (``seen``): serving capacity during a rolling refresh."""

    def __init__(self, proxy: ElbProxy):
        self.proxy = proxy
        self.seen: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.seen.append(len(self.proxy.backends))

    def __enter__(self) -> CapacitySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
