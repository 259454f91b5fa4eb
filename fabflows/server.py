"""A local ``prefect server start`` kept running in the background.

    fabflows server start [--port 4200] [--host 127.0.0.1] [--database-url postgresql+asyncpg://...]
    fabflows server status
    fabflows server stop       (also stops the warm runners)

One server per user, shared by every checkout (each checkout gets its own warm runner:
``fabflows.warm``). State lives in ``~/.local/state/fabflows/server`` (``$FABFLOWS_SERVER_STATE`` overrides it):
``server.json`` (pid, URL, database), ``server.log`` and, for SQLite, ``home/prefect.db``. The server
runs in its own session, so it outlives the command that started it; ``stop`` ends exactly the
process group it recorded.

Auth: when ``PREFECT_SERVER_API_AUTH_STRING`` is set (``user:password``) the server refuses API
calls without it; clients then need ``PREFECT_API_AUTH_STRING``. Prefect OSS lets any API client
read block secrets, so anything but a throwaway local server must have it, on a private network.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

DEFAULT_STATE = "~/.local/state/fabflows/server"


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    return Path(explicit or os.environ.get("FABFLOWS_SERVER_STATE") or DEFAULT_STATE).expanduser()


@dataclass
class ServerInfo:
    pid: int
    host: str
    port: int
    api_url: str
    database: str
    log: str
    started_at: float


@dataclass
class ServerStatus:
    running: bool
    healthy: bool
    info: ServerInfo | None

    def text(self) -> str:
        if self.info is None:
            return "not running"
        state = "running" if self.healthy else ("starting or unhealthy" if self.running else "dead")
        return (
            f"{state}: pid {self.info.pid}, API {self.info.api_url}, UI "
            f"{self.info.api_url.removesuffix('/api')}, database {self.info.database}, log {self.info.log}"
        )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _healthy(api_url: str, timeout: float = 5.0) -> bool:
    try:
        return httpx.get(api_url + "/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _read(directory: Path) -> ServerInfo | None:
    try:
        return ServerInfo(**json.loads((directory / "server.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def status(directory: str | os.PathLike[str] | None = None) -> ServerStatus:
    info = _read(state_dir(directory))
    if info is None:
        return ServerStatus(False, False, None)
    running = _alive(info.pid)
    return ServerStatus(running, running and _healthy(info.api_url), info)


def _redacted(url: str) -> str:
    from fabflows.logfilter import redact

    return redact(url)


def start(
    host: str = "127.0.0.1",
    port: int = 4200,
    database_url: str | None = None,
    directory: str | os.PathLike[str] | None = None,
    wait: float = 180.0,
    extra_env: dict[str, str] | None = None,
) -> ServerStatus:
    """Start the server in the background (no-op if the recorded one is healthy) and wait for it.

    Raises:
        RuntimeError: it did not become healthy within ``wait`` seconds (the log's tail is included).
    """
    directory = state_dir(directory)
    current = status(directory)
    if current.healthy:
        return current
    if current.running and current.info is not None:
        stop(directory)
    directory.mkdir(parents=True, exist_ok=True)
    home = directory / "home"
    home.mkdir(exist_ok=True)
    log = directory / "server.log"
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": host,
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_UI_API_URL": f"http://{host}:{port}/api",
        }
    )
    env.pop("PREFECT_API_URL", None)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    env.update(extra_env or {})
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                host,
                "--port",
                str(port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=directory,
        )
    api_url = f"http://{host}:{port}/api"
    info = ServerInfo(
        pid=process.pid,
        host=host,
        port=port,
        api_url=api_url,
        database=_redacted(database_url) if database_url else str(home / "prefect.db"),
        log=str(log),
        started_at=time.time(),
    )
    (directory / "server.json").write_text(json.dumps(asdict(info)))
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if _healthy(api_url):
            return ServerStatus(True, True, info)
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:]
    stop(directory)
    raise RuntimeError(f"prefect server did not become healthy on {api_url}; log tail:\n{tail}")


def stop(directory: str | os.PathLike[str] | None = None, timeout: float = 20.0) -> bool:
    """Stop the recorded server (its process group). True if something was stopped."""
    directory = state_dir(directory)
    info = _read(directory)
    if info is None:
        return False
    stopped = False
    if _alive(info.pid):
        try:
            os.killpg(info.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while _alive(info.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(info.pid):
            try:
                os.killpg(info.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stopped = True
    (directory / "server.json").unlink(missing_ok=True)
    return stopped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fabflows server start|stop|status`` arguments, for the CLI to register."""
    sub = parser.add_subparsers(dest="server_command", required=True)
    p_start = sub.add_parser("start", help="start a local Prefect server in the background")
    p_start.add_argument("--host", default="127.0.0.1")
    p_start.add_argument("--port", type=int, default=4200)
    p_start.add_argument(
        "--database-url",
        default=os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL"),
        help="postgresql+asyncpg://... (default: SQLite in the state directory)",
    )
    p_start.add_argument("--state-dir", default=None, help=f"default {DEFAULT_STATE}")
    for name, text in (("stop", "stop it"), ("status", "is it running?")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--state-dir", default=None)


def run(args: argparse.Namespace) -> int:
    if args.server_command == "start":
        try:
            result = start(args.host, args.port, args.database_url, args.state_dir)
        except RuntimeError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        print(result.text())
        from fabflows import warm

        pid = warm.start()
        print(f"warm runner: {'running (pid %d)' % pid if pid else 'not started'}")  # noqa: UP031
        print(f"export PREFECT_API_URL={result.info.api_url}" if result.info else "")
        return 0
    if args.server_command == "stop":
        from fabflows import warm

        # the warm runners (every checkout's) go with the server: nothing fabflows started
        # in the background is left running
        runners = warm.stop_all()
        print("stopped" if stop(args.state_dir) else "not running")
        print(f"warm runner: {'stopped' if runners else 'not running'}")
        return 0
    current = status(args.state_dir)
    print(current.text())
    return 0 if current.healthy else 1


def main_server(argv: list[str] | None = None) -> int:
    """Entry point: ``main_server(["start", "--port", "4200"])``."""
    parser = argparse.ArgumentParser(prog="fabflows server")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def running_url(directory: str | os.PathLike[str] | None = None) -> str | None:
    """The API URL of the recorded server if it is healthy, else None (used by ``fabflows run``)."""
    current = status(directory)
    return current.info.api_url if current.healthy and current.info else None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fabflows server start|stop|status`` on the CLI (dispatched through ``handler``)."""
    parser = subparsers.add_parser("server", help="a local Prefect server in the background")
    add_arguments(parser)
    parser.set_defaults(handler=run)


if __name__ == "__main__":
    sys.exit(main_server())
