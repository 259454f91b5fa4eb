"""The warm runner: CLI calls run in a forked, pre-imported process with the caller's terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FABFLOWS = str(Path(sys.executable).parent / "fabflows")


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
        _wait_for(tmp_path / "warm.sock")
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
        _wait_for(tmp_path / "warm.sock")
        assert warm.poll() is None  # re-exec'd in place, same pid
    finally:
        warm.terminate()
        warm.wait(10)
    assert not (tmp_path / "warm.sock").exists()
