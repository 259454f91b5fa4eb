"""After `fabflows demo`, the README's "Using it" commands work as printed, from the checkout.

A sandbox of its own (state directory, network prefix and subnet, moto port) and a Prefect server of
its own, so neither the developer's sandbox nor another test's is touched.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fabflows import server
from fabflows.cli import DEMO_COMMANDS

pytestmark = pytest.mark.hosts
ROOT = Path(__file__).resolve().parents[2]
FABFLOWS = str(Path(sys.executable).parent / "fabflows")
# Its own network, apart from the test workers' (FABFLOWS_TEST_NET_*), so two checkouts can differ.
PREFIX = os.environ.get("FABFLOWS_TEST_DEMO_PREFIX", "tdr")
SUBNET = os.environ.get("FABFLOWS_TEST_DEMO_SUBNET", "10.207.0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_commands() -> list[str]:
    """The shell block of the README's "Using it" section, one command a line, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using it", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no sh block in the README's Using it section"
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines() if line]


def test_readme_commands_parse() -> None:
    commands = readme_commands()
    assert commands[0] == ". .venv/bin/activate"
    for command in DEMO_COMMANDS:  # what the demo tells a new user is in the README
        assert command in commands


def test_readme_commands_work_after_the_demo(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the sandbox needs root (network namespaces, overlay mounts)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    for name in ("FABFLOWS_CONFIG", "FABFLOWS_NO_WARM"):
        env.pop(name, None)
    env |= {
        "FABFLOWS_SANDBOX_DIR": str(tmp_path / "sandbox"),
        "FABFLOWS_SANDBOX_PREFIX": PREFIX,
        "FABFLOWS_SANDBOX_SUBNET": SUBNET,
        "FABFLOWS_SANDBOX_PORT": str(_free_port()),
        "FABFLOWS_SERVER_STATE": str(tmp_path / "server"),
        "FABFLOWS_STATE_DIR": str(tmp_path / "state"),
    }
    # the demo keeps a Prefect server running: this test's own, on a free port, found by the demo
    server.start(port=_free_port(), directory=tmp_path / "server")
    try:
        demo = subprocess.run(
            [FABFLOWS, "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
        )
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        for command in DEMO_COMMANDS:
            assert f"    {command}\n" in demo.stdout, demo.stdout[-2000:]
        activate, *commands = readme_commands()
        for command in commands:
            done = subprocess.run(
                ["bash", "-ec", f"{activate}\n{command}"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, (
                f"$ {command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            )
            if command.startswith(("fabflows config", "fabflows run ")) and "--help" not in command:
                assert "using the sandbox's" in done.stderr, (command, done.stderr[-1000:])
    finally:
        subprocess.run(
            [FABFLOWS, "sandbox", "down"], cwd=ROOT, env=env, capture_output=True, timeout=300
        )
        subprocess.run(
            [FABFLOWS, "server", "stop"], cwd=ROOT, env=env, capture_output=True, timeout=120
        )
