"""A real local stack for the end-to-end tests: prefect server, workers, fabflows deploy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fabflows import server
from fabflows.testing.pgcluster import free_port

REPO = Path(__file__).resolve().parents[2]
FLOWS_UNDER_TEST = {
    "hold-environment-lock": "fabflows.testing.lock_probe:hold_environment_lock",
    "approval-probe": "fabflows.testing.lock_probe:approval_probe",
}


class Stack:
    def __init__(self, base: Path, database_url: str | None = None):
        self.base = base
        self.port = free_port()
        self.database_url = database_url
        self.workers: dict[str, subprocess.Popen] = {}

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start_server(self) -> None:
        server.start(port=self.port, database_url=self.database_url, directory=self.base / "server")

    def stop_server(self) -> None:
        server.stop(self.base / "server")

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PREFECT_API_URL=self.api,
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_WORKER_PREFETCH_SECONDS="5",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_HOME=str(self.base / "client-home"),
        )
        return env

    def deploy(self, config: Path, flows: dict[str, str]) -> dict:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from deployments.apply import deploy

        with temporary_settings({PREFECT_API_URL: self.api}):
            return deploy(str(config), flows=flows)

    def start_worker(
        self, name: str, limit: int | None = None, timeout: float = 30
    ) -> subprocess.Popen:
        path = self.base / f"worker-{name}.log"
        offset = path.stat().st_size if path.exists() else 0
        log = open(path, "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "worker",
                "start",
                "--pool",
                "fabflows",
                "--name",
                name,
                *(["--limit", str(limit)] if limit else []),
            ],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: killing it kills its flow processes
            cwd=REPO,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.workers[name] = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"started" in path.read_bytes()[offset:]:
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(
            f"worker {name} did not start: {(self.base / f'worker-{name}.log').read_text()[-2000:]}"
        )

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.workers.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def close(self) -> None:
        from fabflows.testing.prefect_fixtures import restart_prefect_senders

        for name in list(self.workers):
            self.kill_worker(name)
        restart_prefect_senders()  # later events of this process go to the harness, not here
        self.stop_server()
