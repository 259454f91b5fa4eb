"""Telling boots apart and waiting for a reboot, on a real isolated test host that really restarts
(new PID namespace, fresh /run), as an EC2 reboot does."""

from __future__ import annotations

import threading
import time

import pytest
from prefect.logging import disable_run_logger

from tasks.ssh.boot import RebootTimeout, parse_boot, read_boot, wait_for_reboot
from tasks.ssh.connection import SshOptions
from tasks.ssh.fleet import FleetHost


@pytest.mark.parametrize(
    ("text", "boot", "required"),
    [
        ("b1f0\n123\nnone\n", "b1f0/123", False),
        ("b1f0\n123\nrequired\n", "b1f0/123", True),
        ("  b1f0 \n 9 \n required \n\n", "b1f0/9", True),
    ],
)
def test_parse_boot(text: str, boot: str, required: bool) -> None:
    state = parse_boot("h", text)
    assert (state.boot, state.reboot_required) == (boot, required)


@pytest.mark.parametrize("text", ["", "b1f0\n123\n", "b1f0\n123\nmaybe\n", "a\nb\nnone\nextra\n"])
def test_parse_boot_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="unexpected boot information"):
        parse_boot("h", text)


@pytest.mark.hosts
def test_a_restart_is_a_new_boot_and_clears_the_marker(make_hosts, test_network) -> None:
    (h,) = make_hosts(["boot1"])
    opts = SshOptions(
        user="deploy",
        known_hosts_file=str(test_network.known_hosts),
        key_file=str(test_network.client_key),
        connect_timeout=3,
    )
    target = FleetHost(name="boot1", address=h.ip)
    h.exec(["touch", "/var/run/reboot-required"])
    with disable_run_logger():
        before = read_boot.fn(target, opts)
        assert before.reboot_required
        assert read_boot.fn(target, opts).boot == before.boot  # stable within a boot

        # no reboot: the wait ends with a clear timeout, not a false "back"
        started = time.monotonic()
        with pytest.raises(RebootTimeout, match="still the boot it had before"):
            wait_for_reboot.fn(target, opts, before.boot, timeout=1.5, poll=0.3)
        assert time.monotonic() - started < 10

        # the host restarts while we wait (from the main thread, as the EC2 mirror does)
        result: dict = {}
        waiter = threading.Thread(
            target=lambda: result.update(
                state=wait_for_reboot.fn(target, opts, before.boot, timeout=60, poll=0.3)
            )
        )
        waiter.start()
        time.sleep(0.5)
        test_network.stop("boot1")
        test_network.start_again("boot1")
        waiter.join(90)
    after = result["state"]
    assert after.boot != before.boot and not after.reboot_required
