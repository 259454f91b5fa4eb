"""After a server starts (the original's ``mount_encrypted``), before it stops, and its broker.

Fleet steps (``step(remote, host) -> HostResult``, run with :func:`tasks.ssh.fleet.run_fleet`):

- :func:`post_start_step`: with ``fs_encrypt``, unlock the data volume (``cryptsetup luksOpen
  --key-file=-``: the passphrase from a Prefect Secret block goes on the command's **stdin**, never
  on its command line, and plans show only ``< stdin(passphrase from block <name>)``), mount it
  (FabulAWS' ``/mount-deferred.sh``) and ``swapon -a``; then make sure the role's services run.
  Each part checks first (``/dev/mapper/<name>`` exists, ``findmnt``, service states), so running it
  twice changes nothing the second time.
- :func:`quiet_step`: stop the services that must be quiet before instances stop (celery).
- :func:`broker_queues_step`: the messages queued in RabbitMQ (before a cache is terminated).

Services are supervisor groups (``name:*``) or programs when supervisor knows them (FabulAWS runs
the app under supervisor), else init services (``service <name> status|start|stop``, for
PostgreSQL, RabbitMQ and Redis on real servers). A name a server has in neither form is reported
in the host's message, not failed: roles do not all run everything.

:func:`wait_for_ssh` waits until started servers accept SSH with their known host key.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import paramiko
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from fabflows.progress import Waiting
from tasks.ssh.connection import HostKeyError, SshOptions, connect
from tasks.ssh.fleet import FleetHost, HostResult, Step
from tasks.ssh.remote import CommandError, Remote, exec_command, sudo_argv

_STATUS = re.compile(r"^(?P<name>\S+)\s+(?P<state>[A-Z]+)\b")
RUNNING_STATES = ("RUNNING", "STARTING", "BACKOFF")


class ReachableTimeout(TimeoutError):
    """Servers did not accept SSH in time; the message names them and the last error."""


class EncryptedVolume(BaseModel):
    """The LUKS data volume of FabulAWS servers with ``fs_encrypt`` on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = "/dev/xvdf"
    mapper_name: str = "crypt-xvdf"
    mount_command: list[str] = Field(default_factory=lambda: ["/mount-deferred.sh"])
    passphrase_block: str | None = Field(
        default=None, description="Secret block name (shown in plans instead of the passphrase)."
    )


# --------------------------------------------------------------------------- services


def supervisor_status(remote: Remote) -> dict[str, str] | None:
    """``supervisorctl status`` as {name: STATE}; None when supervisor is not running here."""
    result = remote.read(["supervisorctl", "status"], sudo=True, ok_codes=(0, 1, 2, 3, 4, 7))
    states = {}
    for line in result.stdout.splitlines():
        m = _STATUS.match(line)
        if m:
            states[m.group("name")] = m.group("state")
    if not states and result.exit_code not in (0, 3):
        return None
    return states


def _init_service(remote: Remote, name: str) -> bool | None:
    """Is init service ``name`` running (True/False), or None if there is no such service."""
    script = f"/etc/init.d/{name}"
    if remote.read(["test", "-x", script], ok_codes=(0, 1)).exit_code != 0:
        return None
    code = remote.read(["service", name, "status"], sudo=True, ok_codes=(0, 1, 2, 3, 4)).exit_code
    return code == 0


def _members(status: dict[str, str], name: str) -> dict[str, str]:
    """The programs ``name`` means: a group's members, or the program itself."""
    members = {k: v for k, v in status.items() if k.startswith(name + ":")}
    if not members and name in status:
        members = {name: status[name]}
    return members


def ensure_services(
    remote: Remote, names: Sequence[str], *, running: bool, settle_seconds: float = 120.0
) -> tuple[list[str], list[str]]:
    """Start (``running``) or stop the named services where they are not already so.

    A program supervisor is still STARTING (it just booted, or PostgreSQL is recovering) is not
    started again: it is waited for, like the ones started here, until RUNNING (at most
    ``settle_seconds``).

    Returns:
        (what was changed or would be, names this server does not have).

    Raises:
        CommandError: a start or stop failed, or a program did not reach RUNNING in time.
    """
    status = supervisor_status(remote) or {}
    changed: list[str] = []
    absent: list[str] = []
    settle: list[str] = []
    for name in names:
        members = _members(status, name)
        if members:
            target = f"{name}:*" if name not in status else name
            states = list(members.values())
            if running:
                needed = any(s not in ("RUNNING", "STARTING") for s in states)
                if any(s != "RUNNING" for s in states):
                    settle.append(name)
            else:
                needed = any(s in RUNNING_STATES for s in states)
            if needed:
                remote.write(["supervisorctl", "start" if running else "stop", target], sudo=True)
                changed.append(target)
            continue
        is_running = _init_service(remote, name)
        if is_running is None:
            absent.append(name)
        elif is_running != running:
            remote.write(["service", name, "start" if running else "stop"], sudo=True)
            changed.append(name)
    if running and settle and not remote.dry_run:
        deadline = time.monotonic() + settle_seconds
        while True:
            after = supervisor_status(remote) or {}
            bad = [
                f"{k} {v}"
                for name in settle
                for k, v in _members(after, name).items()
                if v != "RUNNING"
            ]
            if not bad:
                break
            if time.monotonic() >= deadline:
                raise CommandError(
                    remote.host,
                    "supervisorctl status",
                    None,
                    f"not running after {settle_seconds:.0f} s: " + ", ".join(bad),
                )
            time.sleep(0.5)
    return changed, absent


# --------------------------------------------------------------------------- the encrypted volume


def unlock_command(volume: EncryptedVolume) -> list[str]:
    """The exact command that unlocks the volume; the passphrase comes on its stdin."""
    return ["cryptsetup", "luksOpen", "--key-file=-", volume.device, volume.mapper_name]


def unlock_volume(remote: Remote, volume: EncryptedVolume, passphrase: SecretStr | None) -> bool:
    """Unlock the LUKS volume unless ``/dev/mapper/<name>`` exists. Returns True if it acted.

    The passphrase is written to cryptsetup's stdin; the recorded command shows the block's name
    instead (not even a digest: passphrases can be short enough to guess from one).
    """
    mapper = f"/dev/mapper/{volume.mapper_name}"
    if remote.read(["test", "-e", mapper], ok_codes=(0, 1)).exit_code == 0:
        return False
    argv = sudo_argv(unlock_command(volume))
    shown = f"{shlex.join(argv)} < stdin(passphrase from block {volume.passphrase_block or '?'})"
    remote.commands.append(shown)
    if remote.dry_run:
        return True
    if passphrase is None:
        raise ValueError(
            "the data volume is locked and no LUKS passphrase is configured "
            "(fabflows.environments.<env>.luks_passphrase_block)"
        )
    code, _out, err = exec_command(
        remote.conn,
        shlex.join(argv),
        stdin=passphrase.get_secret_value().encode(),
        timeout=remote.command_timeout,
        channel_timeout=remote.channel_timeout,
    )
    if code != 0:
        raise CommandError(remote.host, shown, code, err.decode("utf-8", "replace"), code is None)
    return True


def mount_volume(remote: Remote, volume: EncryptedVolume) -> bool:
    """Mount the unlocked volume (and swap) unless it is mounted. Returns True if it acted."""
    mapper = f"/dev/mapper/{volume.mapper_name}"
    if remote.read(["findmnt", "--source", mapper], ok_codes=(0, 1)).exit_code == 0:
        return False
    remote.write(list(volume.mount_command), sudo=True)
    remote.write(["swapon", "-a"], sudo=True)
    return True


# --------------------------------------------------------------------------- fleet steps


def post_start_step(
    services: Sequence[str],
    *,
    volume: EncryptedVolume | None = None,
    passphrase: SecretStr | None = None,
) -> Step:
    """The step run on each server of a role after it starts: volume (if ``volume``), services."""

    def step(remote: Remote, host: FleetHost) -> HostResult:
        done: list[str] = []
        if volume is not None:
            if unlock_volume(remote, volume, passphrase):
                done.append("unlocked the data volume")
            if mount_volume(remote, volume):
                done.append("mounted it")
        started, absent = ensure_services(remote, services, running=True)
        if started:
            done.append("started " + ", ".join(started))
        note = f" (not on this server: {', '.join(absent)})" if absent else ""
        if not done:
            return HostResult(status="unchanged", message="already in service" + note)
        return HostResult(status="changed", message="; ".join(done) + note)

    return step


def quiet_step(services: Sequence[str]) -> Step:
    """The step that stops ``services`` (if running) before a server is stopped."""

    def step(remote: Remote, host: FleetHost) -> HostResult:
        stopped, absent = ensure_services(remote, services, running=False)
        note = f" (not on this server: {', '.join(absent)})" if absent else ""
        if not stopped:
            return HostResult(status="unchanged", message="already quiet" + note)
        return HostResult(status="changed", message="stopped " + ", ".join(stopped) + note)

    return step


def parse_queues(text: str) -> dict[str, int]:
    """``rabbitmqctl -q list_queues name messages`` output -> {queue: messages}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[-1].isdigit():
            out[" ".join(parts[:-1])] = int(parts[-1])
    return out


def broker_queues_step(vhost: str) -> Step:
    """Read the queued messages per queue in ``vhost`` (``output``: dict, or None: no RabbitMQ)."""

    def step(remote: Remote, host: FleetHost) -> HostResult:
        probe = remote.read(["sh", "-c", "command -v rabbitmqctl"], ok_codes=(0, 1, 127))
        if probe.exit_code != 0:
            return HostResult(status="unchanged", message="no RabbitMQ on this server", output=None)
        result = remote.read(
            ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "messages"], sudo=True
        )
        queues = parse_queues(result.stdout)
        total = sum(queues.values())
        return HostResult(
            status="unchanged",
            message=f"{total} message(s) queued in {len(queues)} queue(s) of {vhost}",
            output=queues,
        )

    return step


# --------------------------------------------------------------------------- reachability


class Reachable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    address: str
    waited_s: float


def _wait_one(host: FleetHost, opts: SshOptions, deadline: float, poll: float) -> Reachable:
    started = time.monotonic()
    last = "no attempt"
    while True:
        try:
            conn = connect(host.address, opts)
        except HostKeyError:
            raise  # a changed or unknown key is not "not up yet"
        except (OSError, TimeoutError, paramiko.SSHException, EOFError) as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            conn.close()
            return Reachable(
                host=host.name, address=host.address, waited_s=round(time.monotonic() - started, 2)
            )
        if time.monotonic() >= deadline:
            raise ReachableTimeout(f"{host.name} ({host.address}) did not accept SSH: {last}")
        time.sleep(min(poll, max(0.05, deadline - time.monotonic())))


@task(name="wait-for-ssh", cache_policy=NO_CACHE, retries=0)
def wait_for_ssh(
    hosts: list[FleetHost], opts: SshOptions, *, timeout: float, poll: float = 2.0
) -> list[Reachable]:
    """Wait until every host accepts an SSH login with its known host key.

    Raises:
        ReachableTimeout: a host did not answer within ``timeout`` (all are waited for first).
        HostKeyError: a host answered with an unknown or changed host key.
    """
    if not hosts:
        return []
    deadline = time.monotonic() + timeout
    with (
        Waiting(f"{len(hosts)} server(s) to accept SSH", timeout) as waiting,
        ThreadPoolExecutor(max_workers=min(16, len(hosts)), thread_name_prefix="ssh-wait") as ex,
    ):
        futures = [ex.submit(_wait_one, h, opts, deadline, poll) for h in hosts]
        waiting.until_done(futures, "answered")
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result())
            except (ReachableTimeout, HostKeyError) as exc:
                errors.append(exc)
    if errors:
        if any(isinstance(e, HostKeyError) for e in errors):
            raise next(e for e in errors if isinstance(e, HostKeyError))
        raise ReachableTimeout("; ".join(str(e) for e in errors))
    return results
