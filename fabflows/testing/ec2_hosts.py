"""Test hosts that follow EC2 instance states, as the sandbox daemon does, inside one test.

The sandbox daemon (``sandbox/daemon.py``) reconciles every second; tests that stop and start
instances need the same behaviour without a second process:

- a running instance with an address in the test subnet gets a host at that address (the ``db``
  image for database roles), and ``on_new_host(host, role)`` runs once on it (what an AMI's boot
  would do: e.g. a health-check page on a web server);
- a stopped instance's host is stopped (its disk, the overlay's upper layer, is kept);
- a started instance's host is started again with its disk; a terminated one is destroyed;
- a rebooted instance's host (RebootInstances, seen by the gate below) is stopped and started
  again with its disk: new PID 1, fresh /run, its services started by its supervisord.

Hosts must be started from the main thread (they die with the thread that launched them), so
:meth:`Ec2HostMirror.run` runs the code under test in a worker thread while the main thread
reconciles, looking every ``interval`` seconds whether moto's state changed
(:class:`~fabflows.testing.moto_server.ChangeWatch`).

moto's state changes are immediate: ``stopped`` right after StopInstances. A runbook that stops and
at once starts an instance again (a resize) would otherwise race the mirror and talk to the host
it is about to stop. :meth:`Ec2HostMirror.attach` puts a small WSGI layer in front of the moto
server that holds StopInstances' answer (inside :meth:`run`) until the mirror has really stopped
those hosts, so "stopped" means down, as on EC2.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections.abc import Callable
from io import BytesIO
from typing import Any, TypeVar
from urllib.parse import parse_qs

import boto3

from fabflows.testing.moto_server import ChangeWatch
from sandbox.testhosts import HostSpec, TestHost, TestNetwork

T = TypeVar("T")
DB_ROLES = ("db-primary", "db-replica")


class Ec2HostMirror:
    def __init__(
        self,
        network: TestNetwork,
        endpoint: str,
        subnet: str,
        region: str = "us-east-1",
        on_new_host: Callable[[TestHost, str], None] | None = None,
        name_prefix: str = "m",
    ):
        self.network = network
        self.endpoint = endpoint
        self.cidr = ipaddress.ip_network(f"{subnet}.0/24")
        self.region = region
        self.on_new_host = on_new_host
        self.name_prefix = name_prefix
        self.hosts: dict[str, str] = {}  # instance id -> host name
        self.created: list[str] = []
        self._stops: list[tuple[list[str], threading.Event]] = []
        self._stops_lock = threading.Lock()
        self._reboots: list[str] = []
        self._running = False
        self._attached: Any = None
        self.events: list[tuple[float, str, str]] = []  # (time, instance id, what happened)
        self._ec2 = boto3.client(
            "ec2",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def adopt(self, instance_id: str, host: TestHost) -> None:
        """Tie an instance to a host the test made already."""
        self.hosts[instance_id] = host.name

    def _instances(self) -> list[dict[str, Any]]:
        out = []
        for page in self._ec2.get_paginator("describe_instances").paginate():
            for r in page["Reservations"]:
                out.extend(r["Instances"])
        return out

    # ------------------------------------------------------------------ StopInstances gate

    def attach(self, moto_server: Any) -> None:
        """Hold StopInstances' answers until the hosts are down (see the module docstring)."""
        injector = moto_server.injector
        inner = injector.app
        mirror = self

        def gate(environ: dict[str, Any], start_response: Any) -> Any:
            size = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(size) if size else b""
            environ["wsgi.input"] = BytesIO(body)
            status: list[str] = []

            def capture(code: str, headers: Any, *rest: Any) -> Any:
                status.append(code)
                return start_response(code, headers, *rest)

            result = inner(environ, capture)
            stopped = status and status[0].startswith("200")
            if (
                stopped
                and mirror._running
                and re.search(rb"(?:^|&)Action=StopInstances(?:&|$)", body)
            ):
                form = parse_qs(body.decode())
                ids = [v[0] for k, v in form.items() if k.startswith("InstanceId.")]
                done = threading.Event()
                with mirror._stops_lock:
                    mirror._stops.append((ids, done))
                done.wait(60)
            if stopped and re.search(rb"(?:^|&)Action=RebootInstances(?:&|$)", body):
                form = parse_qs(body.decode())
                with mirror._stops_lock:  # EC2 answers at once and reboots afterwards
                    mirror._reboots += [
                        v[0] for k, v in form.items() if k.startswith("InstanceId.")
                    ]
            return result

        injector.app = gate
        self._attached = (injector, inner)

    def detach(self) -> None:
        if self._attached is not None:
            injector, inner = self._attached
            injector.app = inner
            self._attached = None

    def _serve_stops(self) -> None:
        with self._stops_lock:
            stops, self._stops = self._stops, []
        for ids, done in stops:
            try:
                for iid in ids:
                    host = self.network.hosts.get(self.hosts.get(iid, ""))
                    if host is not None and host.running:
                        self.network.stop(host.name)
                        self.events.append((time.monotonic(), iid, "stopped"))
            finally:
                done.set()

    def _serve_reboots(self) -> None:
        with self._stops_lock:
            reboots, self._reboots = self._reboots, []
        for iid in reboots:
            host = self.network.hosts.get(self.hosts.get(iid, ""))
            if host is not None and host.running:
                self.network.stop(host.name)
                self.network.start_again(host.name)
                self.events.append((time.monotonic(), iid, "rebooted"))

    def reconcile(self) -> None:
        self._serve_stops()
        self._serve_reboots()
        new: list[tuple[HostSpec, str]] = []
        for inst in self._instances():
            iid, state = inst["InstanceId"], inst["State"]["Name"]
            ip = inst.get("PrivateIpAddress")
            if not ip or ipaddress.ip_address(ip) not in self.cidr:
                continue
            tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
            name = self.hosts.get(iid)
            host = self.network.hosts.get(name) if name else None
            if state in ("pending", "running"):
                if host is None and iid not in self.hosts:
                    role = tags.get("role", "web")
                    name = f"{self.name_prefix}{iid[-8:]}"
                    self.hosts[iid] = name
                    image = "db" if role in DB_ROLES else "base"
                    new.append((HostSpec(name=name, ip=ip, image=image), role))
                elif host is not None and not host.running:
                    self.network.start_again(host.name)
                    self.events.append((time.monotonic(), iid, "started"))
            elif state in ("stopping", "stopped"):
                if host is not None and host.running:
                    self.network.stop(host.name)
                    self.events.append((time.monotonic(), iid, "stopped"))
            elif state in ("shutting-down", "terminated") and host is not None:
                self.network.destroy(host.name)
                self.events.append((time.monotonic(), iid, "destroyed"))
        if new:
            started = self.network.start([spec for spec, _ in new])
            for host, (_, role) in zip(started, new, strict=True):
                self.created.append(host.name)
                self.events.append((time.monotonic(), host.name, "created"))
                if self.on_new_host is not None:
                    self.on_new_host(host, role)

    def run(self, fn: Callable[..., T], *args: Any, interval: float = 0.2, **kwargs: Any) -> T:
        """Call ``fn`` in a worker thread, reconciling from this (main) thread until it returns."""
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # re-raised in the caller's thread
                result["error"] = exc

        worker = threading.Thread(target=target, name="under-test")
        watch = ChangeWatch(self.endpoint)
        self._running = True
        try:
            worker.start()
            while worker.is_alive():
                if watch.due() or self._stops or self._reboots:
                    self.reconcile()
                worker.join(interval)
        finally:
            self._running = False
            self._serve_stops()
        self.reconcile()
        if "error" in result:
            raise result["error"]
        return result["value"]

    def destroy_created(self) -> None:
        """Destroy the hosts this mirror created (not the adopted ones); detach the gate."""
        self.detach()
        for name in self.created:
            if name in self.network.hosts:
                self.network.destroy(name)
