"""The warm runner: ``fabflows run`` without paying Prefect's import time on every call.

A background process imports Prefect, the config models and every registered runbook once, then
waits on a Unix socket. For each ``fabflows run``/``fabflows flows`` the thin client
(``fabflows.entry``) sends its argv, environment and working directory plus its terminal's file
descriptors; the warm process forks a child that *is* that CLI call (same stdin/stdout/stderr, so
progress bars, ``--json`` and exit codes behave exactly as in a cold run) and reports its exit status.
Flows still run as ordinary Prefect flow runs against the Prefect server: this only removes ~1-2 s of
imports per call. No threads run in the warm process (fork-safe); it exits by itself when any of the
project's source files change, and the client then falls back to a cold run.

Started by ``fabflows server start`` and ``fabflows demo``; ``fabflows warm start|stop|status``;
``fabflows server stop`` stops it too.

One warm runner per user *and installation*: its socket, pid and lock files are named after the
path of the fabflows package it runs (``warm-<id>.sock`` in the per-user state directory), and it
serves only callers of that same installation and version. A second checkout's ``fabflows run``
therefore never runs the first checkout's code: it finds its own runner, or runs cold. A lock file
held for the runner's whole life makes a second ``start`` (``fabflows demo`` and ``server start``
racing) wait for the first instead of starting a twin that would take over its files.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import signal
import socket
import struct
import sys
import time
import zlib
from pathlib import Path

INSTALLATION = Path(__file__).resolve().parent
"""The fabflows package this code is: the identity a caller must share to be served."""
PROJECT = INSTALLATION.parent
PACKAGES = ("fabflows", "flows", "tasks", "blocks", "config", "deployments", "sandbox")
MAX_FDS = 3
PROTOCOL = 2


def installed_version() -> str:
    """fabflows' version as installed for this interpreter (the first ``fabflows-*.dist-info`` on
    sys.path, as importlib.metadata finds it, without its ~30 ms of imports)."""
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.startswith("fabflows-") and name.endswith((".dist-info", ".egg-info")):
                return name.removeprefix("fabflows-").rsplit(".", 1)[0]
    return "unknown"


def installation_id() -> str:
    """Names this installation's files (crc32: hashlib's OpenSSL import costs the thin client ~5 ms;
    a collision is harmless, as the runner checks the caller's installation path itself)."""
    return f"{zlib.crc32(str(INSTALLATION).encode()):08x}"


def state_dir() -> Path:
    base = os.environ.get("FABFLOWS_STATE_DIR") or os.path.expanduser("~/.local/state/fabflows")
    return Path(base)


def socket_path() -> Path:
    return state_dir() / f"warm-{installation_id()}.sock"


def pid_path() -> Path:
    return state_dir() / f"warm-{installation_id()}.pid"


def lock_path() -> Path:
    return state_dir() / f"warm-{installation_id()}.lock"


def _identity() -> dict[str, str]:
    return {"installation": str(INSTALLATION), "fabflows_version": installed_version()}


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
    if _LOCK_FD is not None:  # a long run must not keep the runner's lock after it is gone
        os.close(_LOCK_FD)
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


_LOCK_FD: int | None = None


def _take_lock() -> int | None:
    """The runner's lock (held until the process ends), or None if another runner holds it."""
    lock_path().parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _lock_held() -> bool:
    """Is a runner of this installation running or starting?"""
    fd = _take_lock()
    if fd is None:
        return True
    os.close(fd)
    return False


def serve(idle_timeout: float | None = None) -> int:
    """Run the warm process in the foreground (``fabflows warm start`` daemonizes it)."""
    global _LOCK_FD
    _LOCK_FD = _take_lock()
    if _LOCK_FD is None:
        print(f"another warm runner of {INSTALLATION} is running: not starting", flush=True)
        return 0
    pid_path().write_text(str(os.getpid()))  # from now on `stop` finds us, even while preloading
    identity = _identity()
    _preload()
    sources = _source_mtimes()
    path = socket_path()
    path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    os.chmod(path, 0o600)
    ours = path.stat().st_ino
    srv.listen(16)
    srv.settimeout(1.0)
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
                if path.stat().st_ino != ours:
                    raise FileNotFoundError
            except FileNotFoundError:  # our socket was removed: no caller can reach us any more
                print("socket gone: exiting", flush=True)
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
                caller = {k: request.get(k) for k in identity}
                if request.get("version") != PROTOCOL or caller != identity:
                    # another installation or version: never run our code for it
                    _send_json(conn, {"mismatch": identity})
                    for fd in fds:
                        os.close(fd)
                    print(f"refused a caller of {caller}: runs cold", flush=True)
                    continue
                if _source_mtimes() != sources:
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
        try:
            if path.stat().st_ino == ours:
                path.unlink()
        except FileNotFoundError:
            pass
        if _read_pid(pid_path()) == os.getpid():
            pid_path().unlink(missing_ok=True)
    if restart:  # the lock (close-on-exec) is taken again by the new image
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
        request = {
            "version": PROTOCOL,
            **_identity(),
            "argv": argv,
            "env": dict(os.environ),
            "cwd": os.getcwd(),
        }
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


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def running_pid() -> int | None:
    """The pid of this installation's runner if it is serving (socket up), else None."""
    pid = _read_pid(pid_path())
    return pid if pid and _alive(pid) and socket_path().exists() else None


def start(wait: float = 120) -> int | None:
    """Start the warm process in the background (no-op if running); its pid, or None.

    A runner that is still starting (its lock held) is waited for, never started twice.
    """
    import subprocess

    pid = running_pid()
    if pid:
        return pid
    state_dir().mkdir(parents=True, exist_ok=True)
    if not _lock_held():
        log = open(state_dir() / f"warm-{installation_id()}.log", "ab")  # noqa: SIM115
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


def _stop_pid(pid_file: Path, timeout: float = 10) -> bool:
    """End the runner recorded in ``pid_file`` (SIGTERM, then SIGKILL); True if one was running."""
    pid = _read_pid(pid_file)
    if not pid or not _alive(pid):
        pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        while _alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.1)
    pid_file.unlink(missing_ok=True)
    pid_file.with_suffix(".sock").unlink(missing_ok=True)
    return True


def stop() -> bool:
    """Stop this installation's runner (waits until its process has ended)."""
    return _stop_pid(pid_path())


def stop_all() -> int:
    """Stop every warm runner of this user (all installations): ``fabflows server stop``."""
    return sum(_stop_pid(p) for p in sorted(state_dir().glob("warm*.pid")))


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
    if action != "status":
        print("usage: fabflows warm [start|stop|status]", file=sys.stderr)
        return 2
    pid = running_pid()
    if pid:
        print(f"warm runner: running (pid {pid}) for {INSTALLATION}, socket {socket_path()}")
    elif _lock_held():
        print(f"warm runner: starting (pid {_read_pid(pid_path())}) for {INSTALLATION}")
    else:
        print(f"warm runner: not running for {INSTALLATION}")
    return 0 if pid else 1


if __name__ == "__main__":
    sys.exit(main())
