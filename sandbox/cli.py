"""``fabflows sandbox up|down|status`` and ``fabflows demo``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sandbox.daemon import default_state_dir


def _read(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / "daemon.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def running(state_dir: Path | None = None) -> dict[str, Any] | None:
    """The daemon's status if it is running and ready, else None."""
    state_dir = state_dir or default_state_dir()
    data = _read(state_dir)
    if data and _alive(data.get("pid")) and data.get("status") == "ready":
        return data
    return None


def up(state_dir: Path, timeout: float = 900) -> int:
    data = _read(state_dir)
    if data and _alive(data.get("pid")):
        print(f"sandbox already running (pid {data['pid']}, {data['status']})")
        return status(state_dir)
    if os.geteuid() != 0:
        print("fabflows sandbox: needs root (network namespaces, overlay mounts)", file=sys.stderr)
        return 1
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "daemon.json").unlink(missing_ok=True)
    log = open(state_dir / "daemon.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox.daemon", "--state-dir", str(state_dir)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < timeout:
        data = _read(state_dir) or {}
        st = data.get("status", "starting")
        if st != last:
            print(f"sandbox: {st} ({time.monotonic() - started:.0f}s)", flush=True)
            last = st
        if st == "ready":
            return status(state_dir)
        if proc.poll() is not None or st == "failed":
            print("sandbox: the daemon failed; last lines of its log:", file=sys.stderr)
            print(_tail(state_dir / "daemon.log"), file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(
        f"sandbox: not ready after {timeout:.0f}s; see {state_dir / 'daemon.log'}", file=sys.stderr
    )
    return 1


def down(state_dir: Path, timeout: float = 60) -> int:
    data = _read(state_dir)
    pid = data.get("pid") if data else None
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    # whatever the daemon left (it may have crashed): hosts, namespaces, links
    from sandbox.testhosts import TestNetwork

    hosts_dir = state_dir / "hosts"
    if (hosts_dir / "state.json").exists():
        try:
            net = TestNetwork.load(hosts_dir)
            net.reap_stale()
        except Exception as exc:  # report, but still remove the state
            print(f"sandbox: cleanup: {exc}", file=sys.stderr)
    (state_dir / "daemon.json").unlink(missing_ok=True)
    print("sandbox: down")
    return 0


def status(state_dir: Path) -> int:
    data = _read(state_dir)
    if not data or not _alive(data.get("pid")):
        print("sandbox: not running (`fabflows sandbox up` starts it)")
        return 1
    print(f"sandbox: {data['status']} (pid {data['pid']})")
    print(f"  AWS (moto server): {data['endpoint']}")
    print(f"  config:            {data['config']}")
    print(f"  ssh:               ssh -F {data['ssh_config']} <host>")
    try:
        instances = json.loads((state_dir / "instances.json").read_text())
        hosts = json.loads((state_dir / "hosts" / "state.json").read_text()).get("hosts", {})
    except (FileNotFoundError, json.JSONDecodeError):
        instances, hosts = {}, {}
    hosts_by_name = {h["name"]: h for h in (hosts.values() if isinstance(hosts, dict) else hosts)}
    for iid, name in sorted(instances.items(), key=lambda kv: kv[1]):
        h = hosts_by_name.get(name, {})
        print(
            f"  {iid}  {name:<28} {h.get('ip', '?'):<14} {'running' if h.get('pid') else 'stopped'}"
        )
    return 0


def main(action: str, state_dir: str | None) -> int:
    sd = Path(state_dir).resolve() if state_dir else default_state_dir()
    return {"up": up, "down": down, "status": status}[action](sd)


def demo() -> int:
    """Bring the sandbox up, make sure a Prefect server runs, describe myproject/staging."""
    state_dir = default_state_dir()
    if up(state_dir) != 0:
        return 1
    config = str(state_dir / "fabflows.yaml")
    from fabflows import server, warm

    ui = None
    try:
        ui = (
            server.start().info.api_url
        )  # kept running: the UI, and the fast path for `fabflows run`
        warm.start()
    except RuntimeError as exc:
        print(f"fabflows demo: no Prefect server ({exc}); using a temporary one", file=sys.stderr)
    from fabflows.cli import main as cli_main

    print("\n$ fabflows run describe-environment --environment staging --config " + config)
    code = cli_main(["run", "describe-environment", "--environment", "staging", "--config", config])
    if ui:
        base = ui.removesuffix("/api")
        print(f"\nSee the run in the Prefect UI: {base}/runs (flow 'describe-environment').")
        print("The server and the warm runner keep running: `fabflows server stop` stops them.")
    else:
        print(
            "\n(The run used a temporary Prefect server; `fabflows server start` keeps one with a UI.)"
        )
    from fabflows.cli import next_commands

    print(next_commands(Path(config)))
    return code
