"""The warm runner: ``fabflows run`` without paying Prefect's import time on every call.

A background process imports Prefect, the config models and every registered runbook once, then
waits on a Unix socket. For each ``fabflows run``/``fabflows flows`` the thin client
(``fabflows.entry``) sends its argv, environment and working directory plus its terminal's file
descriptors; the warm process forks a child that *is* that CLI call (same stdin/stdout/stderr, so
progress bars, ``--json`` and exit codes behave exactly as in a cold run) and reports its exit status.
Flows still run as ordinary Prefect flow runs against the Prefect server: this only removes ~1-2 s of
imports per call. No threads run in the warm process (fork-safe); it exits by itself when any of the
project's source files change, and the client then falls back to a cold run.

Started by ``fabflows server start`` and ``fabflows demo``; ``fabflows warm start|stop|status``.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = ("fabflows", "flows", "tasks", "blocks", "config", "deployments", "sandbox")
MAX_FDS = 3


def state_dir() -> Path:
    base = os.environ.get("FABFLOWS_STATE_DIR") or os.path.expanduser("~/.local/state/fabflows")
    return Path(base)


def socket_path() -> Path:
    return state_dir() / "warm.sock"


def pid_path() -> Path:
    return state_dir() / "warm.pid"


def _source_mtimes() -> dict[str, float]:
    out = {}
    for pkg in PACKAGES:
        for path in (PROJECT / pkg).rglob("*.py"):
            try:
                out[str(path)] = path.stat().st_mtime
            except FileNotFoundError:
                pass
    return out


def _send_json(conn: socket.socket, data: dict) -> None:
    body = json.dumps(data).encode()
    conn.sendall(struct.pack("!I", len(body)) + body)


def _recv_json(conn: socket.socket) -> dict | None:
    head = _recv_exact(conn, 4)
    if head is None:
        return None
    body = _recv_exact(conn, struct.unpack("!I", head)[0])
    return json.loads(body) if body is not None else None


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


# ---------------------------------------------------------------------- server side


LAZY_IMPORTS = (
    # imported by Prefect or the CLI only when a run needs them (measured: ~0.2 s per child)
    "fastapi.encoders",
    "prefect.utilities.visualization",
    "anyio._backends._asyncio",
    "opentelemetry.metrics",
    "opentelemetry._logs",
    "pydantic.color",
)
AWS_SERVICES = ("ec2", "autoscaling", "elb", "elbv2", "s3", "sts")


def _share_botocore_data() -> None:
    """Every botocore session of the process shares one data loader, primed here.

    A boto3 session parses the service models (ec2's is megabytes of JSON) the first time each of
    its clients is made; each child would pay that again (~0.2 s for ec2). The loader only caches
    botocore's own read-only data files, so sharing it changes nothing else.
    """
    import functools

    import botocore.loaders
    import botocore.session

    botocore.session.create_loader = functools.lru_cache(maxsize=None)(
        botocore.loaders.create_loader
    )
    session = botocore.session.get_session()
    for service in AWS_SERVICES:
        # the client class and its endpoint rules, built once: no request is made
        session.create_client(
            service,
            region_name="us-east-1",
            endpoint_url="http://127.0.0.1:9",
            aws_access_key_id="warm",
            aws_secret_access_key="warm",
        )


def _preload() -> None:
    """Import everything a run needs, without starting any thread or client."""
    import prefect.flow_engine  # noqa: F401
    import prefect.task_engine  # noqa: F401

    import fabflows.cli
    from fabflows.registry import FLOWS

    for target in FLOWS.values():
        importlib.import_module(target.partition(":")[0])
    fabflows.cli.build_parser()  # imports the subcommands' modules
    for name in LAZY_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:  # another Prefect version: that run imports what it needs itself
            pass
    _share_botocore_data()


def _prefect_env(env: os._Environ[str] | dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("PREFECT_")}


def _settings_may_differ(parent_env: dict[str, str], parent_cwd: str) -> bool:
    """Whether the caller's Prefect settings can differ from ours (we are in its environment and
    directory now): its PREFECT_* variables, or the settings files Prefect reads in a directory."""
    if _prefect_env(os.environ) != parent_env:
        return True
    if os.getcwd() == parent_cwd:
        return False
    return any(os.path.exists(name) for name in (".env", "prefect.toml", "pyproject.toml"))


def _child(conn: socket.socket, request: dict, fds: list[int], gate: int) -> None:
    """In the forked child: become the client's CLI call (once the parent has sent our pid)."""
    os.read(gate, 1)
    os.close(gate)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for target, fd in zip((0, 1, 2), fds, strict=False):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    parent = (_prefect_env(os.environ), os.getcwd())
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    if _settings_may_differ(*parent):
        # Prefect read its settings (and set up logging) from *our* environment at import:
        # read them again from the caller's
        import prefect.context
        from prefect.logging.configuration import setup_logging

        prefect.context.refresh_global_settings_context()
        setup_logging()
    from fabflows.cli import main

    try:
        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        code = 130
    except BaseException as exc:  # report, never leave the client hanging
        print(f"fabflows: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    # what a normal interpreter exit does: Prefect stops its temporary server in an atexit hook
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        _send_json(conn, {"exit": code})
    except OSError:
        pass
    os._exit(code)


def serve(idle_timeout: float | None = None) -> int:
    """Run the warm process in the foreground (``fabflows warm start`` daemonizes it)."""
    _preload()
    sources = _source_mtimes()
    path = socket_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    os.chmod(path, 0o600)
    srv.listen(16)
    srv.settimeout(1.0)
    pid_path().write_text(str(os.getpid()))
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    last = time.monotonic()
    restart = False
    try:
        while not stopping:
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass
            if idle_timeout and time.monotonic() - last > idle_timeout:
                break
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                if stopping:
                    break
                raise
            last = time.monotonic()
            with conn:
                conn.settimeout(10)
                try:
                    msg, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, MAX_FDS)
                except OSError:
                    continue
                try:
                    request = json.loads(msg.decode())
                except ValueError:
                    for fd in fds:
                        os.close(fd)
                    continue
                if _source_mtimes() != sources or request.get("version") != 1:
                    # the code changed: this call runs cold, and we restart with the new code
                    _send_json(conn, {"stale": True})
                    for fd in fds:
                        os.close(fd)
                    print("source changed: this call runs cold; restarting", flush=True)
                    restart = True
                    break
                gate_r, gate_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    srv.close()
                    os.close(gate_w)
                    conn.settimeout(None)
                    _child(conn, request, fds, gate_r)
                os.close(gate_r)
                for fd in fds:
                    os.close(fd)
                print(f"pid {pid}: fabflows {' '.join(request['argv'])}", flush=True)
                try:
                    _send_json(conn, {"pid": pid})
                finally:
                    os.write(gate_w, b"x")
                    os.close(gate_w)
    finally:
        srv.close()
        path.unlink(missing_ok=True)
        pid_path().unlink(missing_ok=True)
    if restart:
        os.execv(sys.executable, [sys.executable, "-m", "fabflows.warm", "serve"])
    return 0


# ---------------------------------------------------------------------- client side


def try_run(argv: list[str]) -> int | None:
    """Hand ``argv`` to the warm process; None if there is none (or it is stale): run cold."""
    path = socket_path()
    if os.environ.get("FABFLOWS_NO_WARM") or not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        request = {"version": 1, "argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
        first = _recv_json(conn)
    except OSError:
        conn.close()
        return None
    if not first or "pid" not in first:
        conn.close()
        return None
    child = first["pid"]

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        done = _recv_json(conn)
    finally:
        conn.close()
    if not done:
        print("fabflows: the run's process ended without reporting", file=sys.stderr)
        return 1
    return int(done["exit"])


def running_pid() -> int | None:
    try:
        pid = int(pid_path().read_text())
        os.kill(pid, 0)
        return pid if socket_path().exists() else None
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def start(wait: float = 30) -> int | None:
    """Start the warm process in the background (no-op if running); its pid, or None."""
    import subprocess

    pid = running_pid()
    if pid:
        return pid
    state_dir().mkdir(parents=True, exist_ok=True)
    log = open(state_dir() / "warm.log", "ab")  # noqa: SIM115
    subprocess.Popen(
        [sys.executable, "-m", "fabflows.warm", "serve"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=PROJECT,
    )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        pid = running_pid()
        if pid:
            return pid
        time.sleep(0.1)
    return None


def stop() -> bool:
    pid = running_pid()
    if not pid:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while running_pid() and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    action = args[0] if args else "status"
    if action == "serve":
        return serve()
    if action == "start":
        pid = start()
        print(f"warm runner: running (pid {pid})" if pid else "warm runner: failed to start")
        return 0 if pid else 1
    if action == "stop":
        print("warm runner: stopped" if stop() else "warm runner: not running")
        return 0
    pid = running_pid()
    if pid:
        print(f"warm runner: running (pid {pid}), socket {socket_path()}")
    else:
        print("warm runner: not running")
    return 0 if pid else 1


if __name__ == "__main__":
    sys.exit(main())
