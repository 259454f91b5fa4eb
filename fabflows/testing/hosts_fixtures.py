"""pytest fixtures for isolated test hosts (``sandbox/testhosts.py``).

Load with ``pytest_plugins = ["fabflows.testing.hosts_fixtures"]`` in ``tests/conftest.py``.

- ``test_network`` (session): one bridge ``ftbr0`` on 10.203.0.1/24, a client key, known_hosts
  and ssh_config, for the whole test run. Images are built on first use (about 50 s) and cached.
- ``make_hosts`` (function): ``make_hosts([HostSpec("web1", "10.203.0.2"), ...])`` starts hosts
  (about 0.1 s each) and destroys them after the test, so every test gets fresh hosts. Plain names
  are accepted too: ``make_hosts(["web1", "web2"])`` picks free addresses on the base image.

A missing prerequisite (not root, no unshare, no overlayfs, no debootstrap) fails the test with a
message naming what is missing; it is never a skip.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import pytest

from sandbox.testhosts import (
    HostSpec,
    TestHost,
    TestHostError,
    TestNetwork,
    check_prerequisites,
)

# Each engineer / CI job can take its own network so test runs on one machine never collide.
TEST_PREFIX = os.environ.get("FABFLOWS_TEST_NET_PREFIX", "ft")
TEST_SUBNET = os.environ.get("FABFLOWS_TEST_NET_SUBNET", "10.203.0")

MakeHosts = Callable[[Sequence[HostSpec | str]], list[TestHost]]


def fail_without_prerequisites() -> None:
    """Fail (not skip) the current test if the machine cannot run isolated test hosts."""
    missing = check_prerequisites()
    if missing:
        pytest.fail(
            "isolated test hosts need: " + "; ".join(missing) + " (`make test` installs "
            "them: .ci/install-system-packages)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def test_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestNetwork]:
    """The session's test network (prefix ``ft``, 10.203.0.0/24); torn down at the end."""
    fail_without_prerequisites()
    net = TestNetwork(tmp_path_factory.mktemp("testhosts"), prefix=TEST_PREFIX, subnet=TEST_SUBNET)
    try:
        net.setup()
    except TestHostError as exc:
        pytest.fail(f"test network could not be set up: {exc}", pytrace=False)
    try:
        yield net
    finally:
        net.teardown()


@pytest.fixture
def make_hosts(test_network: TestNetwork) -> Iterator[MakeHosts]:
    """Factory: start hosts for this test; they are destroyed when the test ends."""
    made: list[str] = []

    def make(specs: Sequence[HostSpec | str]) -> list[TestHost]:
        resolved: list[HostSpec] = []
        taken = {h.ip for h in test_network.hosts.values()}
        for item in specs:
            if isinstance(item, str):
                ip = next(
                    f"{TEST_SUBNET}.{n}" for n in range(2, 255) if f"{TEST_SUBNET}.{n}" not in taken
                )
                taken.add(ip)
                item = HostSpec(item, ip)
            resolved.append(item)
        hosts = test_network.start(resolved)
        made.extend(h.name for h in hosts)
        return hosts

    yield make
    for name in reversed(made):
        if name in test_network.hosts:
            test_network.destroy(name)
