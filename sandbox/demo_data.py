"""What the README's examples need from the sandbox, beyond servers: sysadmins' keys and packages.

- **A users directory** at ``deployment/users`` in the checkout (FabulAWS's layout, and the path the
  sample config's ``ssh_keys`` names): two sysadmins, ``alice`` (with a GECOS file) and ``bob``,
  with generated ed25519 keys. Their private keys go to the sandbox's state dir, so a person can
  log in as them once update-sysadmin-users has been applied. An existing directory is kept.
- **A local apt repository** (``fabflows.testing.upgrade_lab``'s test packages), served on the test
  network's bridge; every host's apt points at it (the image's Debian mirror is out of reach) and
  has version 1 of the packages installed as if from its image, so upgrade-packages has upgrades
  to plan and apply (and the config's app-server packages are the repository's, to install).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fabflows.testing.apt_repo import AptRepo
from fabflows.testing.sshkeys import ed25519_pair, write_users_dir
from fabflows.testing.upgrade_lab import (
    APP_SERVER_PACKAGES,
    install_image_packages,
    populate_repo,
)
from sandbox.provision import point_apt_at

log = logging.getLogger("fabflows.sandbox")

CHECKOUT = Path(__file__).resolve().parents[1]
USERS_DIR = CHECKOUT / "deployment" / "users"
SYSADMINS = {"alice": "Alice Example", "bob": None}
__all__ = ["APP_SERVER_PACKAGES", "USERS_DIR", "ensure_users_dir", "prepare_apt", "start_apt_repo"]


def ensure_users_dir(private_dir: Path, users_dir: Path = USERS_DIR) -> Path:
    """The sandbox's sysadmins in ``users_dir`` (made once; an existing one is left as it is)."""
    if users_dir.is_dir() and any(p for p in users_dir.iterdir() if not p.name.startswith(".")):
        return users_dir
    private_dir.mkdir(parents=True, exist_ok=True)
    private_dir.chmod(0o700)
    pairs = {name: ed25519_pair(f"{name}@sandbox") for name in SYSADMINS}
    for name, pair in pairs.items():
        pair.write_private(private_dir / name)
    gecos = {name: text for name, text in SYSADMINS.items() if text}
    write_users_dir(users_dir, pairs, gecos)
    log.info(
        "users directory %s: %s (private keys in %s)", users_dir, ", ".join(pairs), private_dir
    )
    return users_dir


def start_apt_repo(directory: Path, network: Any) -> AptRepo:
    """The test packages, built, indexed and served on the test network's bridge address."""
    repo = AptRepo(directory, bind=network.bridge_ip).start()
    try:
        populate_repo(repo)
    except BaseException:
        repo.stop()
        raise
    log.info("apt repository at %s", repo.url)
    return repo


def prepare_apt(host: Any, repo: AptRepo) -> None:
    """apt pointed at the sandbox's repository, version 1 of its packages installed."""
    point_apt_at(host, repo.url)
    install_image_packages(host, repo)
