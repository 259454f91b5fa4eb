"""The per-environment lock, for real: 20 processes racing, SIGKILL/SIGSTOP of the holder, both backends."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from config.models import LockSettings
from fabflows import lock
from fabflows.lock import EnvironmentBusy, LockHolder, environment_lock

LABEL = "myproject/staging"


@pytest.fixture(params=["file", "postgres"])
def backend(request, tmp_path: Path) -> dict:
    """Settings for each backend (postgres: a fresh database in the session cluster)."""
    if request.param == "file":
        return {"settings": LockSettings(), "state_dir": str(tmp_path / "state")}
    cluster = request.getfixturevalue("pg_cluster")
    db = f"locks_{abs(hash(request.node.name)) % 10**8}"
    url = cluster.create_database(db)
    return {
        "settings": LockSettings(backend="postgres", postgres_url=url, dead_session_seconds=10),
        "state_dir": str(tmp_path / "state"),
    }


def _holder(name: str) -> LockHolder:
    return LockHolder(
        label=LABEL,
        flow_name=name,
        started_by="slack:U1",
        host="test",
        pid=os.getpid(),
        since=datetime.now(UTC),
    )


def _contender(index: int, settings_json: str, state_dir: str, out: str, barrier) -> None:
    settings = LockSettings.model_validate_json(settings_json)
    barrier.wait()
    with environment_lock(
        LABEL,
        settings=settings,
        state_dir=state_dir,
        poll=0.02,
        timeout=120,
        holder=_holder(f"contender-{index}"),
        on_wait=lambda *a: None,
    ):
        marker = Path(out).with_suffix(".inside")
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if someone is inside
        entered = time.monotonic()
        time.sleep(0.05)
        left = time.monotonic()
        os.close(fd)
        os.unlink(marker)
    with open(out, "a") as f:
        f.write(json.dumps([index, entered, left]) + "\n")
    os._exit(0)  # skip the forked pytest process's atexit handlers


def test_twenty_concurrent_attempts_never_two_holders(backend: dict, tmp_path: Path) -> None:
    out = tmp_path / "holds.jsonl"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(20)
    procs = [
        ctx.Process(
            target=_contender,
            args=(
                i,
                backend["settings"].model_dump_json(),
                backend["state_dir"],
                str(out),
                barrier,
            ),
        )
        for i in range(20)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 20, "a contender failed (two inside at once?)"
    holds = sorted(json.loads(line) for line in out.read_text().splitlines())
    assert len(holds) == 20
    spans = sorted((entered, left) for _, entered, left in holds)
    for (_, left), (entered, _) in zip(spans, spans[1:], strict=False):
        assert entered >= left, "two holders at the same time"


HOLD_SCRIPT = """
import json, sys, time, os
from datetime import UTC, datetime
from config.models import LockSettings
from fabflows.lock import LockHolder, environment_lock
settings = LockSettings.model_validate_json(sys.argv[1])
holder = LockHolder(label=sys.argv[3], flow_name="reload-production-db", flow_run_name="brave-otter",
                    started_by="slack:U1", host="test", pid=os.getpid(), since=datetime.now(UTC))
with environment_lock(sys.argv[3], settings=settings, state_dir=sys.argv[2], holder=holder, poll=0.05):
    print("held", flush=True)
    time.sleep(600)
"""


def _start_holder(backend: dict) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLD_SCRIPT,
            backend["settings"].model_dump_json(),
            backend["state_dir"],
            LABEL,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "held", f"holder did not get the lock: {line!r}"
    return proc


def _wait_for_lock(backend: dict, seen: list) -> float:
    """Acquire (blocking); returns the monotonic time it got the lock."""
    with environment_lock(
        LABEL,
        settings=backend["settings"],
        state_dir=backend["state_dir"],
        poll=0.05,
        timeout=150,
        holder=_holder("waiter"),
        on_wait=lambda label, holder, waited: seen.append(holder),
    ):
        return time.monotonic()


def test_sigkill_of_the_holder_releases_at_once_and_waiters_see_who_holds(backend: dict) -> None:
    proc = _start_holder(backend)
    try:
        seen: list = []
        with pytest.raises(
            EnvironmentBusy, match="reload-production-db run 'brave-otter'.*slack:U1"
        ):
            with environment_lock(
                LABEL,
                settings=backend["settings"],
                state_dir=backend["state_dir"],
                timeout=0.3,
                poll=0.05,
                on_wait=lambda label, holder, waited: seen.append(holder),
            ):
                pass
        assert seen and seen[0].flow_name == "reload-production-db"
        assert "started by slack:U1" in seen[0].describe()
        killed = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        got = _wait_for_lock(backend, [])
        released_after = got - killed
        print(
            f"\n{backend['settings'].backend}: lock acquired {released_after:.2f} s after SIGKILL"
        )
        assert released_after < 5
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_vanished_holder_is_released_by_the_database(backend: dict) -> None:
    """SIGSTOP: the process is alive but silent, like a machine that fell off the network."""
    proc = _start_holder(backend)
    try:
        stopped = time.monotonic()
        os.kill(proc.pid, signal.SIGSTOP)
        got = _wait_for_lock(backend, [])
        released_after = got - stopped
        print(f"\npostgres: silent holder's lock released after {released_after:.1f} s")
        assert released_after < backend["settings"].dead_session_seconds + 15
    finally:
        proc.kill()
        proc.wait()


def test_postgres_settings_need_a_url() -> None:
    with pytest.raises(ValueError, match="postgres_url"):
        LockSettings(backend="postgres")
    with pytest.raises(ValueError):
        LockSettings(backend="postgres", postgres_url="postgresql://u:secret@db/x")


def test_lock_key_is_stable_and_distinct() -> None:
    assert lock.lock_key("a/b") == lock.lock_key("a/b")
    assert lock.lock_key("a/b") != lock.lock_key("a/c")
    assert -(2**63) <= lock.lock_key("a/b") < 2**63
