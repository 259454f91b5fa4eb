"""Running commands on one host: quoted argv, stdin for content, timeouts, and a dry form.

A :class:`Remote` wraps one checked Fabric connection (from :mod:`tasks.ssh.connection`) for one
fleet step on one host. Commands are argv lists joined with :func:`shlex.join`; user input is never
pasted into a shell string. Content (keys, files) travels on the command's stdin, never on its
command line, so it does not show in ``ps`` on the host, in logs or in the plan.

- :meth:`Remote.read` always runs (facts are read for real even in a dry run, like Ansible's check
  mode).
- :meth:`Remote.write` records the exact command and, unless ``dry_run``, runs it. In a dry run it
  returns ``None`` before anything starts on the host.

Why not ``Connection.run``: invoke mirrors a non-tty ``in_stream`` one byte per 10 ms loop (a 400-byte
key took 4 s), and its timeout starts only after the channel is open. Commands here run on a paramiko
channel of the same connection, opened with ``channel_timeout`` and read with a deadline, so a hung
or partitioned host fails after its timeout instead of hanging the run.
"""

from __future__ import annotations

import hashlib
import select
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from fabric import Connection

DEFAULT_COMMAND_TIMEOUT = 120.0

ATOMIC_WRITE_SCRIPT = (
    'set -eu; dir=$(dirname -- "$5"); '
    't=$(mktemp "$dir/.fabflows.XXXXXXXX"); '
    "trap 'rm -f \"$t\"' EXIT; "
    'if [ "$4" -gt 0 ]; then dd bs="$4" count=1 iflag=fullblock status=none of="$t"; fi; '
    '[ "$(stat -c %s "$t")" = "$4" ] || { echo "short input: expected $4 bytes" >&2; exit 1; }; '
    'chown -- "$1:$2" "$t"; chmod -- "$3" "$t"; mv -f -- "$t" "$5"; trap - EXIT'
)
"""sh script: exactly ``$4`` bytes of stdin -> temp file beside the target -> owner, group, mode ->
rename (atomic).

Positional arguments: ``$1`` owner, ``$2`` group, ``$3`` octal mode, ``$4`` the content's size in
bytes, ``$5`` the target path (last, so the command line ends with what it writes). Reading exactly that many bytes (``dd iflag=fullblock`` never reads past them) lets
several writes share one stdin in a batch, and a short input fails instead of leaving a truncated
file. The temp file is removed if any step fails; readers never see a half-written or wrongly owned
file."""

BATCH_FAILED = "fabflows-batch: step "


class CommandError(RuntimeError):
    """A remote command exited non-zero (or timed out). The message names host and command."""

    def __init__(
        self, host: str, command: str, exit_code: int | None, stderr: str, timed_out: bool = False
    ):
        self.host = host
        self.command = command
        self.exit_code = exit_code
        self.stderr = stderr
        self.timed_out = timed_out
        what = "timed out" if timed_out else f"exited {exit_code}"
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        super().__init__(f"{host}: `{command}` {what}" + (f": {detail}" if detail else ""))


@dataclass(frozen=True)
class CommandResult:
    """What a remote command returned."""

    command: str
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float


def sudo_argv(argv: Sequence[str]) -> list[str]:
    """``sudo -n -- argv``: as root, never prompting (a missing NOPASSWD rule fails at once)."""
    return ["sudo", "-n", "--", *argv]


def sh_argv(script: str, *args: str) -> list[str]:
    """``sh -c SCRIPT sh ARGS...``: a constant script, with the variable parts as ``$1``, ``$2``..."""
    return ["sh", "-c", script, "sh", *args]


def atomic_write_argv(path: str, *, owner: str, group: str, mode: int, size: int) -> list[str]:
    """The argv that writes ``size`` bytes of stdin to ``path`` atomically, owner and mode explicit."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    return sh_argv(ATOMIC_WRITE_SCRIPT, owner, group, f"{mode:04o}", str(size), path)


def batch_script(steps: Sequence[tuple[Sequence[str], bytes | None]]) -> tuple[str, bytes]:
    """One sh script running ``steps`` in order, stopping at the first failure, and its stdin.

    Each step is its exact quoted command line; steps with content read exactly their bytes from the
    shared stdin (see :data:`ATOMIC_WRITE_SCRIPT`), the others read /dev/null. On failure the
    script names the step on stderr (``fabflows-batch: step N failed``).
    """
    lines = [
        "set -e",
        f'trap \'rc=$?; [ "$rc" -eq 0 ] || echo "{BATCH_FAILED}$s failed" >&2\' EXIT',
    ]
    stdin = b""
    for n, (argv, data) in enumerate(steps, 1):
        command = shlex.join(list(argv))
        if data is None:
            lines.append(f"s={n}; {command} </dev/null")
        else:
            lines.append(f"s={n}; {command}")
            stdin += data
    lines.append("s=done")
    return "\n".join(lines) + "\n", stdin


def describe_stdin(data: bytes | None) -> str:
    """How a command's stdin appears in plans and logs: its size and digest, never its content."""
    if not data:
        return ""
    digest = hashlib.sha256(data).hexdigest()[:12]
    return f" < stdin({len(data)} bytes, sha256 {digest})"


EOF_GRACE = 1.0
"""Seconds a command's output may still arrive after its exit status (see exec_command)."""


def exec_command(
    conn: Connection,
    command: str,
    *,
    stdin: bytes | None = None,
    timeout: float = DEFAULT_COMMAND_TIMEOUT,
    channel_timeout: float = 10.0,
) -> tuple[int | None, bytes, bytes]:
    """Run ``command`` on an open connection; returns (exit code or None on timeout, stdout, stderr).

    The channel is opened with ``channel_timeout``; the command's output is read until it exits or
    ``timeout`` seconds have passed, whichever comes first (on timeout the channel is closed).
    """
    transport = conn.client.get_transport()
    if transport is None or not transport.is_active():
        raise ConnectionError(f"{conn.host}: connection is closed")
    chan = transport.open_session(timeout=channel_timeout)
    try:
        chan.exec_command(command)
        if stdin:
            chan.settimeout(timeout)
            try:
                chan.sendall(stdin)
            except OSError:
                # The command ended without reading all of its input (sudo refusing, say): its
                # exit status and stderr say why, so read them instead of failing on the send.
                if not (chan.closed or chan.exit_status_ready() or chan.eof_received):
                    raise
        if not chan.closed:
            chan.shutdown_write()
        chan.settimeout(0.0)
        out: list[bytes] = []
        err: list[bytes] = []
        deadline = time.monotonic() + timeout
        exited_at: float | None = None
        while True:
            got = False
            while chan.recv_ready():
                out.append(chan.recv(65536))
                got = True
            while chan.recv_stderr_ready():
                err.append(chan.recv_stderr(65536))
                got = True
            if chan.exit_status_ready() and exited_at is None:
                exited_at = time.monotonic()
            # sshd may send the exit status before the last of the output (it reports the exit as
            # soon as the command ends, and sends what is still in the pipe after it): the output
            # is complete at EOF. A command that leaves a background process holding its output
            # open never sends EOF, so after the exit status wait for it only a moment.
            complete = (
                chan.eof_received or chan.closed or time.monotonic() - exited_at >= EOF_GRACE
                if exited_at is not None
                else False
            )
            if complete and not chan.recv_ready() and not chan.recv_stderr_ready():
                return chan.recv_exit_status(), b"".join(out), b"".join(err)
            if chan.closed and not got:
                # closed without an exit status (connection lost)
                raise ConnectionError(f"{conn.host}: channel closed before `{command}` finished")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, b"".join(out), b"".join(err)
            if not got:
                if chan.eof_received:
                    chan.status_event.wait(min(remaining, 0.25))  # output done, exit status next
                else:
                    select.select([chan], [], [], min(remaining, 0.25))
    finally:
        chan.close()


@dataclass
class Remote:
    """One host's command runner for one fleet step.

    Attributes:
        conn: the checked Fabric connection (opened by the fleet's connection pool).
        host: the host's display name (for messages).
        dry_run: writes are only recorded, not run.
        commands: every write command of this step, in order, as shown to operators.
    """

    conn: Connection
    host: str
    dry_run: bool
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    channel_timeout: float = 10.0
    commands: list[str] = field(default_factory=list)

    def _run(
        self, argv: Sequence[str], *, sudo: bool, stdin: bytes | None, timeout: float | None
    ) -> CommandResult:
        full = sudo_argv(argv) if sudo else list(argv)
        command = shlex.join(full)
        started = time.monotonic()
        code, out, err = exec_command(
            self.conn,
            command,
            stdin=stdin,
            timeout=timeout or self.command_timeout,
            channel_timeout=self.channel_timeout,
        )
        stdout = out.decode("utf-8", "replace")
        stderr = err.decode("utf-8", "replace")
        if code is None:
            raise CommandError(self.host, display(full, stdin), None, stderr, timed_out=True)
        return CommandResult(display(full, stdin), code, stdout, stderr, time.monotonic() - started)

    def read(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        stdin: bytes | None = None,
        timeout: float | None = None,
        ok_codes: Sequence[int] = (0,),
    ) -> CommandResult:
        """Run a command that changes nothing, also in a dry run. Raises CommandError on other exit codes."""
        result = self._run(argv, sudo=sudo, stdin=stdin, timeout=timeout)
        if result.exit_code not in ok_codes:
            raise CommandError(self.host, result.command, result.exit_code, result.stderr)
        return result

    def write(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> CommandResult | None:
        """Record a changing command and run it unless this is a dry run (then return None).

        Raises:
            CommandError: the command exited non-zero or timed out.
        """
        full = sudo_argv(argv) if sudo else list(argv)
        self.commands.append(display(full, stdin))
        if self.dry_run:
            return None
        result = self._run(argv, sudo=sudo, stdin=stdin, timeout=timeout)
        if result.exit_code != 0:
            raise CommandError(self.host, result.command, result.exit_code, result.stderr)
        return result

    def write_file(
        self, path: str, content: bytes, *, owner: str, group: str, mode: int, sudo: bool = True
    ) -> CommandResult | None:
        """Write ``content`` to ``path`` atomically (temp file + rename) with explicit owner and mode."""
        argv = atomic_write_argv(path, owner=owner, group=group, mode=mode, size=len(content))
        return self.write(argv, sudo=sudo, stdin=content)

    def write_batch(
        self,
        steps: Sequence[tuple[Sequence[str], bytes | None]],
        *,
        sudo: bool = True,
        timeout: float | None = None,
    ) -> CommandResult | None:
        """Run several changing commands as one remote command (one session, one sudo).

        ``commands`` records each step's exact command line, as :meth:`write` would; the steps run
        in order in one ``sh`` and stop at the first failure, which is raised as a CommandError
        naming that step's command. In a dry run nothing runs.
        """
        shown = [display(sudo_argv(argv) if sudo else argv, data) for argv, data in steps]
        self.commands.extend(shown)
        if self.dry_run or not steps:
            return None
        script, stdin = batch_script(steps)
        result = self._run(sh_argv(script), sudo=sudo, stdin=stdin or None, timeout=timeout)
        if result.exit_code != 0:
            failed = result.command
            for line in result.stderr.splitlines():
                if line.startswith(BATCH_FAILED):
                    step = line[len(BATCH_FAILED) :].split()[0]
                    if step.isdigit() and 0 < int(step) <= len(shown):
                        failed = shown[int(step) - 1]
            stderr = "\n".join(
                ln for ln in result.stderr.splitlines() if not ln.startswith(BATCH_FAILED)
            )
            raise CommandError(self.host, failed, result.exit_code, stderr)
        return result


def display(argv: Sequence[str], stdin: bytes | None = None) -> str:
    """The command as operators see it: the exact quoted command line, plus a stdin digest."""
    return shlex.join(list(argv)) + describe_stdin(stdin)
