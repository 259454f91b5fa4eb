"""The warm runner: CLI calls run in a forked, pre-imported process with the caller's terminal."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config import load_config
from fabflows import server, warm
from fabflows.testing.configs import moto_section, write_config
from sandbox.aws_seed import seed

ROOT = Path(__file__).resolve().parents[2]
FABFLOWS = str(Path(sys.executable).parent / "fabflows")
SOCKET = f"warm-{warm.installation_id()}.sock"


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_calls_go_through_the_warm_process_and_keep_exit_codes(tmp_path: Path) -> None:
    env = os.environ | {"FABFLOWS_STATE_DIR": str(tmp_path)}
    env.pop("FABFLOWS_NO_WARM", None)
    log = open(tmp_path / "warm.log", "w")
    warm = subprocess.Popen(
        [sys.executable, "-m", "fabflows.warm", "serve"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for(tmp_path / SOCKET)
        listing = subprocess.run(
            [FABFLOWS, "flows"], env=env, capture_output=True, text=True, timeout=60
        )
        assert listing.returncode == 0, listing.stderr
        assert "describe-environment" in listing.stdout
        bad = subprocess.run(
            [
                FABFLOWS,
                "run",
                "describe-environment",
                "-e",
                "nowhere",
                "-c",
                str(ROOT / "sandbox/fabulaws-config.yaml"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2
        assert "unknown environment 'nowhere'" in bad.stderr
        text = (tmp_path / "warm.log").read_text()
        assert "fabflows flows" in text and "fabflows run describe-environment -e nowhere" in text

        # a changed source file: the call still works (cold) and the runner restarts on new code
        source = ROOT / "fabflows" / "registry.py"
        stat = source.stat()
        os.utime(source, (stat.st_atime, stat.st_mtime + 5))
        try:
            again = subprocess.run(
                [FABFLOWS, "flows"], env=env, capture_output=True, text=True, timeout=120
            )
        finally:
            os.utime(source, (stat.st_atime, stat.st_mtime))
        assert again.returncode == 0 and "describe-environment" in again.stdout
        assert "source changed" in (tmp_path / "warm.log").read_text()
        _wait_for(tmp_path / SOCKET)
        assert warm.poll() is None  # re-exec'd in place, same pid
    finally:
        warm.terminate()
        warm.wait(10)
    assert not (tmp_path / SOCKET).exists()


@pytest.mark.flow
@pytest.mark.usefixtures("prefect_server")
def test_a_warm_run_is_a_real_flow_run_with_the_callers_prefect_settings(
    tmp_path: Path, aws
) -> None:
    """The forked child runs the flow against the caller's Prefect API and settings, not the ones
    the warm process was started with (it imported Prefect under its own environment)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    config = write_config(
        tmp_path,
        fabflows=moto_section(aws.endpoint, staging={"target_groups": ["myproject-staging-web"]}),
    )
    seed(
        aws.endpoint,
        load_config(config),
        ["staging"],
        "10.250.0.0/24",
        (f"10.250.0.{i}" for i in itertools.count(10)),
    )
    api = str(PREFECT_API_URL.value())
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base |= {"FABFLOWS_STATE_DIR": str(tmp_path / "state")}
    base.pop("FABFLOWS_NO_WARM", None)
    log = open(tmp_path / "warm.log", "w")
    # the warm process knows another (unreachable) API: the caller's must win
    warm = subprocess.Popen(
        [sys.executable, "-m", "fabflows.warm", "serve"],
        env=base | {"PREFECT_API_URL": "http://127.0.0.1:9/api"},
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    run = [FABFLOWS, "run", "describe-environment", "-e", "staging", "-c", str(config), "--json"]
    try:
        _wait_for(tmp_path / "state" / SOCKET)
        outputs, logs = [], []
        for extra in ({}, {"PREFECT_LOGGING_LEVEL": "WARNING"}):
            done = subprocess.run(
                [*run, "--verbose"],
                env=base | {"PREFECT_API_URL": api} | extra,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            outputs.append(json.loads(done.stdout))
            logs.append(done.stderr)
    finally:
        warm.terminate()
        warm.wait(10)
    assert (tmp_path / "warm.log").read_text().count("fabflows run describe-environment") == 2
    for out in outputs:
        assert len(out["servers"]) == 6
    # --verbose shows the run's INFO logs, unless the caller's PREFECT_LOGGING_LEVEL says otherwise
    assert "Finished in state Completed" in logs[0], logs[0]
    assert "Finished in state Completed" not in logs[1], logs[1]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        ours = [r for r in runs if r.state and r.state.is_completed()]
        assert len([r for r in ours if "staging" in str(r.parameters.get("environment"))]) >= 2
        artifacts = client.read_artifacts()
    assert any(a.key and "describe" in a.key for a in artifacts)


def _serve(state: Path, log: Path, **env: str) -> subprocess.Popen:
    environ = os.environ | {"FABFLOWS_STATE_DIR": str(state)} | env
    environ.pop("FABFLOWS_NO_WARM", None)
    return subprocess.Popen(
        [sys.executable, "-m", "fabflows.warm", "serve"],
        env=environ,
        cwd=ROOT,
        stdout=open(log, "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )


def test_a_second_runner_does_not_start_and_server_stop_ends_the_runner(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Two starts racing (demo + server start) leave one runner; `server stop` ends it for real
    (the process, not only its files), so `warm status` never says "not running" about a live one."""
    monkeypatch.setenv("FABFLOWS_STATE_DIR", str(tmp_path))
    procs = {
        "first": _serve(tmp_path, tmp_path / "first.log"),
        "second": _serve(tmp_path, tmp_path / "second.log"),
    }
    first, second = procs["first"], procs["second"]
    try:
        # Either may take the lock first (both start at once); the other gives up at once, as the
        # lock is taken before the imports.
        deadline = time.monotonic() + 60
        while all(p.poll() is None for p in procs.values()):
            assert time.monotonic() < deadline, "neither runner gave up"
            time.sleep(0.05)
        loser = next(name for name, p in procs.items() if p.poll() is not None)
        runner = procs["second" if loser == "first" else "first"]
        assert procs[loser].returncode == 0
        assert "another warm runner" in (tmp_path / f"{loser}.log").read_text()
        _wait_for(tmp_path / SOCKET)
        assert runner.poll() is None
        assert warm.running_pid() == runner.pid
        assert warm.start() == runner.pid  # running: not started twice
        assert server.main_server(["stop", "--state-dir", str(tmp_path / "server")]) == 0
        assert "warm runner: stopped" in capsys.readouterr().out
        assert runner.wait(5) == 0
        assert warm.main(["status"]) == 1
        assert "not running" in capsys.readouterr().out
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_only_callers_of_the_same_installation_and_version_are_served(tmp_path: Path) -> None:
    """A second checkout runs its own code, never the first's; another version runs cold."""
    state = tmp_path / "state"
    runner = _serve(state, tmp_path / "warm.log")
    env = os.environ | {"FABFLOWS_STATE_DIR": str(state)}
    env.pop("FABFLOWS_NO_WARM", None)
    try:
        _wait_for(state / SOCKET)
        # another version of the same installation (its dist-info first on sys.path)
        other = tmp_path / "other-version"
        (other / "fabflows-9.9.0.dist-info").mkdir(parents=True)
        call = subprocess.run(
            [FABFLOWS, "flows"],
            env=env | {"PYTHONPATH": str(other)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert call.returncode == 0, call.stderr
        assert "describe-environment" in call.stdout
        log = (tmp_path / "warm.log").read_text()
        assert "refused a caller" in log and "9.9.0" in log
        assert "fabflows flows" not in log  # not forked: it ran cold

        # a second checkout of the project, whose `flows` listing says so
        checkout = tmp_path / "checkout"
        for package in warm.PACKAGES:
            shutil.copytree(
                ROOT / package, checkout / package, ignore=shutil.ignore_patterns("state")
            )
        cli = checkout / "fabflows" / "cli.py"
        cli.write_text(
            cli.read_text().replace(
                "def cmd_flows(args: argparse.Namespace) -> int:\n",
                "def cmd_flows(args: argparse.Namespace) -> int:\n    print('second checkout')\n",
            )
        )
        call = subprocess.run(
            [sys.executable, "-c", "import sys; from fabflows.entry import main; sys.exit(main())"]
            + ["flows"],
            env=env,
            cwd=checkout,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert call.returncode == 0, call.stderr
        assert "second checkout" in call.stdout
        assert "fabflows flows" not in (tmp_path / "warm.log").read_text()
        assert runner.poll() is None  # the first checkout's runner is untouched
    finally:
        runner.terminate()
        runner.wait(10)
