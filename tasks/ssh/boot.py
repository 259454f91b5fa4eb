"""Which boot a server is in, and waiting for a reboot to finish (read tasks).

A boot is told apart by the kernel's ``boot_id`` and the start time of PID 1: both change when
the machine reboots (on EC2 the first; in the isolated test hosts, which share the host kernel,
the second). ``/var/run/reboot-required`` lives on a tmpfs and is gone after a reboot.
"""

from __future__ import annotations

import shlex
import time

import paramiko
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from tasks.ssh.connection import HostKeyError, SshOptions, connect
from tasks.ssh.fleet import FleetHost
from tasks.ssh.remote import exec_command

BOOT_SCRIPT = (
    "cat /proc/sys/kernel/random/boot_id; cut -d' ' -f22 /proc/1/stat; "
    "if [ -e /var/run/reboot-required ]; then echo required; else echo none; fi"
)


class RebootTimeout(TimeoutError):
    """A server did not come back from a reboot in time (the message names it)."""


class BootState(BaseModel):
    """One server's current boot."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(description="The server's name.")
    boot: str = Field(description="boot_id and PID 1's start time: changes with every reboot.")
    reboot_required: bool = Field(description="/var/run/reboot-required exists.")


def parse_boot(host: str, text: str) -> BootState:
    """Pure: the boot script's three lines -> BootState."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 3 or lines[2] not in ("required", "none"):
        raise ValueError(f"{host}: unexpected boot information: {text[:200]!r}")
    return BootState(
        host=host, boot=f"{lines[0]}/{lines[1]}", reboot_required=lines[2] == "required"
    )


def _read(host: FleetHost, opts: SshOptions) -> BootState:
    conn = connect(host.address, opts)
    try:
        code, out, err = exec_command(conn, f"sh -c {shlex.quote(BOOT_SCRIPT)}", timeout=30)
    finally:
        conn.close()
    if code == -1:
        # the session ended without an exit status: the server went down under it (a reboot
        # starting or its sshd being stopped), which a wait for the reboot keeps waiting through
        raise ConnectionError(f"{host.name}: the connection ended before the boot was read")
    if code != 0:
        raise RuntimeError(f"{host.name}: reading the boot failed ({code}): {err.decode()[-300:]}")
    return parse_boot(host.name, out.decode())


@task(
    cache_policy=NO_CACHE,
    name="read-boot",
    task_run_name="read-boot-{host.name}",
    retries=2,
    retry_delay_seconds=2,
)
def read_boot(host: FleetHost, opts: SshOptions) -> BootState:
    """The server's current boot, over a new SSH connection."""
    return _read(host, opts)


@task(
    name="wait-for-reboot",
    task_run_name="wait-for-reboot-{host.name}",
    cache_policy=NO_CACHE,
    retries=0,
)
def wait_for_reboot(
    host: FleetHost, opts: SshOptions, before: str, *, timeout: float, poll: float = 2.0
) -> BootState:
    """Wait until the server answers SSH in a boot other than ``before``.

    Raises:
        RebootTimeout: still the old boot, or not answering, after ``timeout`` seconds.
        HostKeyError: it came back with another host key (refused, as everywhere).
    """
    started = time.monotonic()
    deadline = started + timeout
    last = "no answer yet"
    while True:
        try:
            state = _read(host, opts)
        except HostKeyError:
            raise
        except (OSError, TimeoutError, paramiko.SSHException, EOFError, ConnectionError) as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            if state.boot != before:
                get_run_logger().info(
                    "%s is back after %.1f s (new boot)", host.name, time.monotonic() - started
                )
                return state
            last = "still the boot it had before the reboot"
        if time.monotonic() >= deadline:
            raise RebootTimeout(
                f"{host.name} ({host.address}) not back from its reboot after {timeout:.0f} s: {last}"
            )
        time.sleep(min(poll, max(0.05, deadline - time.monotonic())))
