"""Isolated Debian test hosts on one machine, without Docker.

Each host is an overlayfs (lower: a cached Debian bookworm image, upper: the host's own directory)
in its own network namespace (a veth on a bridge in the machine's namespace) and its own mount,
UTS, IPC and PID namespaces, chrooted, with supervisord as PID 1 (running nginx, and PostgreSQL on
the ``db`` image) and sshd started before it. Every host has its own IP address, ``/etc/passwd``,
hostname and SSH host key.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), util-linux ``unshare``/``nsenter``, iproute2,
overlayfs, and ``debootstrap`` to build the images. :func:`check_prerequisites` names what is
missing.

Typical use::

    net = TestNetwork(tmp / "hosts", prefix="ft", subnet="10.203.0")
    net.setup()
    web1, db1 = net.start([HostSpec("web1", "10.203.0.2"), HostSpec("db1", "10.203.0.3", "db")])
    subprocess.run(["ssh", "-F", net.ssh_config(), "web1", "hostname"])
    net.teardown()

Hosts die with the *thread* that launched them (``PR_SET_PDEATHSIG``), so call :meth:`start` and
:meth:`start_again` from the main thread of a process that lives as long as the hosts. Another
process can drive the same network through :meth:`TestNetwork.load`: stop, destroy, partition,
heal, kill_sshd and teardown act directly; start and start_again are queued in the state file and
carried out by the owning process, which must call :meth:`TestNetwork.serve` (or
:meth:`TestNetwork.serve_pending` regularly) from its main thread.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

DEFAULT_USER = "deploy"
DEFAULT_UID = 1000
SUITE = "bookworm"
IMAGES_DIR = Path(__file__).resolve().parent / "images"
BUILD_SCRIPT = IMAGES_DIR / "build-rootfs.sh"
INIT_SCRIPT = IMAGES_DIR / "init.sh"
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOCK_DIR = Path("/run/lock")
STATE_VERSION = 1

ImageVariant = Literal["base", "db", "app"]
IMAGE_VARIANTS: tuple[str, ...] = ("base", "db", "app")
DERIVED_VARIANTS: tuple[str, ...] = ("db", "app")
"""Variants built from a copy of ``base`` plus apt (about 10-20 s each)."""

_HOSTNAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_PR_SET_PDEATHSIG = 1


class TestHostError(RuntimeError):
    """A test host or network operation failed."""

    __test__ = False


class PrerequisiteError(TestHostError):
    """The machine lacks something the test hosts need (root, unshare, overlayfs, ...)."""


class HostCommandError(subprocess.CalledProcessError):
    """A command run inside a host with :meth:`TestHost.exec` failed; shows its output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout!r}\nstderr: {self.stderr!r}"


# --------------------------------------------------------------------------- prerequisites


def check_prerequisites(need_debootstrap: bool = True) -> list[str]:
    """Return what is missing on this machine for the test hosts; empty when all is there."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append(f"root (running as uid {os.geteuid()})")
    tools = ["unshare", "nsenter", "ip", "chroot", "mount", "cp"]
    if need_debootstrap:
        tools.append("debootstrap")
    for tool in tools:
        if shutil.which(tool, path=HOST_PATH + ":" + os.environ.get("PATH", "")) is None:
            missing.append(f"{tool} (not on PATH)")
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError:
        filesystems = ""
    if not re.search(r"\boverlay\b", filesystems):
        missing.append("overlayfs (no 'overlay' in /proc/filesystems; try `modprobe overlay`)")
    for script in (BUILD_SCRIPT, INIT_SCRIPT):
        if not script.is_file():
            missing.append(f"{script} (missing from the source tree)")
    return missing


def require_prerequisites(need_debootstrap: bool = True) -> None:
    """Raise :class:`PrerequisiteError` naming everything that is missing."""
    missing = check_prerequisites(need_debootstrap)
    if missing:
        raise PrerequisiteError(
            "isolated test hosts cannot run here; missing: " + "; ".join(missing)
        )


# --------------------------------------------------------------------------- small helpers


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        env={"PATH": HOST_PATH, "LANG": "C.UTF-8"},
    )
    if check and proc.returncode != 0:
        raise TestHostError(
            f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout


@contextmanager
def _flock(path: Path, timeout: float | None = None, what: str = "") -> Iterator[int]:
    """Hold an exclusive flock on ``path``; wait at most ``timeout`` seconds (None: forever)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, timeout, what)
        yield fd
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, timeout: float | None, what: str) -> None:
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = ""
                try:
                    holder = Path(path).read_text().strip()
                except OSError:
                    pass
                raise TestHostError(
                    f"{what or path} is locked by another process ({holder or 'unknown'}); "
                    f"gave up after {timeout:.0f} s"
                ) from None
            time.sleep(0.2)


def _proc_stat(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    head, _, rest = data.rpartition(")")
    return [head.split(" (", 1)[0], head.split(" (", 1)[1], *rest.split()]


def _alive(pid: int | None, starttime: int | None = None) -> bool:
    """True if ``pid`` exists and is not a zombie (and started at ``starttime`` if given)."""
    if not pid:
        return False
    st = _proc_stat(pid)
    if st is None or st[2] in ("Z", "X"):
        return False
    return starttime is None or int(st[21]) == starttime


def _starttime(pid: int) -> int | None:
    st = _proc_stat(pid)
    return int(st[21]) if st else None


def _age(pid: int) -> float | None:
    """Seconds since ``pid`` started, or None if it is gone."""
    st = _proc_stat(pid)
    if st is None:
        return None
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - int(st[21]) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    except OSError:
        pass
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st and int(st[3]) == pid:
                kids.append(int(entry.name))
    return kids


def _kill(pid: int | None, sig: int = signal.SIGKILL) -> None:
    if not pid:
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _set_pdeathsig() -> None:
    """preexec_fn: the launched host gets SIGKILL when the launching thread dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _mounted_under(path: Path) -> list[str]:
    """Mount points in this mount namespace at or below ``path``."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target == prefix or target.startswith(prefix + "/"):
            found.append(target)
    return found


def _rmtree(path: Path) -> None:
    """Delete a host or build directory, but never through a live mount."""
    if not path.exists():
        return
    mounts = _mounted_under(path)
    if mounts:
        raise TestHostError(f"refusing to delete {path}: still mounted: {', '.join(mounts)}")
    shutil.rmtree(path)


def _write_file(path: Path, data: str | bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, raw)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _write_file(tmp, text, mode)
    os.replace(tmp, path)


def _upper_dirs(lower: Path, upper: Path, rel: str) -> Path:
    """Create ``upper/rel`` with the owner and mode of ``lower/rel``, one component at a time.

    A directory in the upper layer hides the attributes of the lower one in the merged view, so
    it must carry the same owner and mode (``/home/deploy/.ssh`` must stay deploy's, 0700).
    """
    cur_l, cur_u = lower, upper
    for part in Path(rel).parts:
        cur_l, cur_u = cur_l / part, cur_u / part
        if not cur_u.exists():
            st = cur_l.stat()
            cur_u.mkdir()
            os.chown(cur_u, st.st_uid, st.st_gid)
            os.chmod(cur_u, stat.S_IMODE(st.st_mode))
    return cur_u


def _new_ed25519(comment: str) -> tuple[bytes, str]:
    """A new ed25519 key: (OpenSSH private key file bytes, ``ssh-ed25519 AAAA... comment``)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, f"{public.decode()} {comment}"


# --------------------------------------------------------------------------- images


def image_cache_dir(cache: Path | None = None) -> Path:
    """Where images are kept: ``cache``, ``$FABFLOWS_TESTHOSTS_CACHE`` or the user's cache."""
    if cache is not None:
        return Path(cache)
    env = os.environ.get("FABFLOWS_TESTHOSTS_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "fabflows" / "testhosts"


def image_tag() -> str:
    """First 12 hex digits of the sha256 of the build scripts (everything in images/ but init.sh)."""
    digest = hashlib.sha256()
    for path in sorted(IMAGES_DIR.rglob("*")):
        if path.is_file() and path != INIT_SCRIPT and "__pycache__" not in path.parts:
            digest.update(path.relative_to(IMAGES_DIR).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def image_dir(variant: ImageVariant, cache: Path | None = None) -> Path:
    """The directory of one image: ``rootfs/`` (the tree), ``.complete``, ``build.log``."""
    return image_cache_dir(cache) / f"{SUITE}-{variant}-{image_tag()}"


def ensure_image(variant: ImageVariant, cache: Path | None = None) -> Path:
    """Return the rootfs of the ``variant`` image, building it first if it is not cached.

    Images live in ``~/.cache/fabflows/testhosts/bookworm-<variant>-<tag>/rootfs`` with a
    ``.complete`` marker beside ``rootfs``; ``<tag>`` hashes the build scripts, so editing them
    rebuilds. ``base`` is built with debootstrap (about 35-60 s), ``db`` (PostgreSQL 15) and ``app``
    (Django, gunicorn, pgbouncer) from a copy of ``base`` plus apt (about 10-20 s each). Builds are
    serialized across processes with a lock file.
    """
    if variant not in IMAGE_VARIANTS:
        raise ValueError(f"unknown image {variant!r}; expected one of {IMAGE_VARIANTS}")
    final = image_dir(variant, cache)
    rootfs = final / "rootfs"
    if (final / ".complete").exists():
        return rootfs
    base_rootfs = ensure_image("base", cache) if variant in DERIVED_VARIANTS else None
    cache_dir = image_cache_dir(cache)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _flock(cache_dir / f".{final.name}.lock", what=f"image build {final.name}"):
        if (final / ".complete").exists():
            return rootfs
        require_prerequisites(need_debootstrap=True)
        started = time.monotonic()
        log.info("building test host image %s in %s", variant, final)
        tmp = cache_dir / f"{final.name}.tmp"
        _rmtree(tmp)
        tmp.mkdir()
        tmp_root = tmp / "rootfs"
        if base_rootfs is not None:
            _run(["cp", "-a", "--reflink=auto", str(base_rootfs), str(tmp_root)])
        build_log = tmp / "build.log"
        with build_log.open("w") as out:
            proc = subprocess.run(
                ["unshare", "--mount", "--propagation", "private"]
                + ["sh", str(BUILD_SCRIPT), variant, str(tmp_root)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={"PATH": HOST_PATH, "LANG": "C.UTF-8", "HOME": "/root"},
            )
        if proc.returncode != 0:
            tail = "\n".join(build_log.read_text(errors="replace").splitlines()[-30:])
            raise TestHostError(
                f"building the {variant} test host image failed (exit {proc.returncode}); "
                f"full log in {build_log}; last lines:\n{tail}"
            )
        os.chmod(tmp_root, 0o755)
        seconds = time.monotonic() - started
        (tmp / ".complete").write_text(
            json.dumps({"variant": variant, "tag": image_tag(), "build_seconds": round(seconds, 1)})
        )
        _rmtree(final)
        os.rename(tmp, final)
        log.info("built test host image %s in %.1f s", variant, seconds)
    return rootfs


def prune_images(cache: Path | None = None) -> list[Path]:
    """Delete cached images whose tag is not the current one; return what was deleted.

    Not called automatically: a test run on another checkout may still use an older image.
    """
    current = image_tag()
    removed = []
    for path in image_cache_dir(cache).glob(f"{SUITE}-*"):
        if path.is_dir() and not path.name.endswith(current):
            _rmtree(path)
            removed.append(path)
    return removed


# --------------------------------------------------------------------------- hosts


@dataclass(frozen=True)
class HostSpec:
    """What to start: a hostname, an address in the network's /24 (not .1) and an image."""

    name: str
    ip: str
    image: ImageVariant = "base"


@dataclass
class TestHost:
    """One isolated host. ``pid`` is its PID 1 (supervisord) as seen from the machine."""

    __test__ = False  # not a pytest test class

    name: str
    ip: str
    image: str
    dir: Path
    pid: int | None = None
    host_key: str = ""  # "ssh-ed25519 AAAA... root@name": the known_hosts key
    index: int = 0
    netns: str = ""
    veth: str = ""
    lower: str = ""  # the image rootfs the upper layer belongs to; kept across start_again
    launcher_pid: int | None = None  # `unshare`, the parent of PID 1
    launcher_starttime: int | None = None
    partitioned: bool = False

    @property
    def running(self) -> bool:
        return self.pid is not None and _alive(self.launcher_pid, self.launcher_starttime)

    @property
    def upper(self) -> Path:
        """The host's disk: its changes over the image."""
        return self.dir / "upper"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    def root(self) -> Path:
        """The host's filesystem as seen from the machine (``/proc/<pid>/root``)."""
        if not self.running:
            raise TestHostError(f"host {self.name} is not running")
        return Path(f"/proc/{self.pid}/root")

    def exec(
        self,
        argv: Sequence[str],
        check: bool = True,
        *,
        input: str | None = None,
        timeout: float | None = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the host as root, in all its namespaces, without SSH."""
        if not self.running:
            raise TestHostError(f"host {self.name} is not running")
        cmd = ["nsenter", "-t", str(self.pid), "-a", "-r", "-w", "--"]
        cmd += ["/usr/bin/env", "-i", f"PATH={HOST_PATH}", "HOME=/root", "LANG=C.UTF-8"]
        proc = subprocess.run(
            cmd + list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": HOST_PATH},
        )
        if check and proc.returncode != 0:
            raise HostCommandError(proc.returncode, list(argv), proc.stdout, proc.stderr)
        return proc

    def wait_for_port(self, port: int, timeout: float = 15.0) -> float:
        """Wait until ``ip:port`` accepts a TCP connection; return the seconds waited."""
        started = time.monotonic()
        deadline = started + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.ip, port), timeout=0.5):
                    return time.monotonic() - started
            except OSError as exc:
                last = exc
                time.sleep(0.05)
        raise TestHostError(
            f"{self.name} ({self.ip}) port {port} not open after {timeout} s: {last}"
        )


def _host_to_json(host: TestHost) -> dict[str, Any]:
    data = asdict(host)
    data["dir"] = str(host.dir)
    return data


def _host_from_json(data: dict[str, Any]) -> TestHost:
    known = {f.name for f in fields(TestHost)}
    kwargs = {k: v for k, v in data.items() if k in known}
    kwargs["dir"] = Path(kwargs["dir"])
    return TestHost(**kwargs)


# --------------------------------------------------------------------------- the network


class TestNetwork:
    """A bridge, a client key and any number of isolated hosts, all named after ``prefix``.

    Names: netns ``{prefix}-{host}``, veth ``{prefix}v{index}``, bridge ``{prefix}br0`` with
    ``{subnet}.1/24``. Files in ``state_dir``: ``id_ed25519`` (client key), ``known_hosts``,
    ``ssh_config``, ``state.json`` and ``hosts/<name>/`` (upper layer, console log).
    One process at a time owns a prefix (a lock in /run/lock); it is the one that calls setup().
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        state_dir: Path,
        prefix: str = "ft",
        subnet: str = "10.203.0",
        image_cache: Path | None = None,
        *,
        images: Sequence[ImageVariant] = IMAGE_VARIANTS,
        lock_timeout: float = 600.0,
        host_timeout: float = 30.0,
    ) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(
                f"prefix {prefix!r} must match {_PREFIX_RE.pattern} (names <= 15 chars)"
            )
        self.network = ipaddress.ip_network(f"{subnet}.0/24")
        self.state_dir = Path(state_dir).resolve()
        self.prefix = prefix
        self.subnet = subnet
        self.image_cache = image_cache_dir(image_cache)
        self.images = tuple(images)
        self.lock_timeout = lock_timeout
        self.host_timeout = host_timeout
        self.bridge = f"{prefix}br0"
        self.bridge_ip = f"{subnet}.1"
        self.known_hosts = self.state_dir / "known_hosts"
        self.client_key = self.state_dir / "id_ed25519"
        self.state_file = self.state_dir / "state.json"
        self.hosts_dir = self.state_dir / "hosts"
        self.hosts: dict[str, TestHost] = {}
        self.owner_pid: int | None = None
        self._next_index = 1
        self._popens: dict[str, subprocess.Popen[bytes]] = {}
        self._prefix_lock_fd: int | None = None
        self._previous_owner = ""
        self._rlock = threading.RLock()
        self._state_fd: int | None = None
        self._state_depth = 0

    # ---------------------------------------------------------------- cross-process state

    @property
    def is_owner(self) -> bool:
        return self.owner_pid == os.getpid()

    @property
    def prefix_lock(self) -> Path:
        return LOCK_DIR / f"fabflows-testhosts-{self.prefix}.lock"

    @classmethod
    def load(cls, state_dir: Path) -> TestNetwork:
        """Attach to a network set up by another process (for example the sandbox daemon)."""
        state_file = Path(state_dir) / "state.json"
        try:
            data = json.loads(state_file.read_text())
        except FileNotFoundError:
            raise TestHostError(f"no test network state in {state_dir}") from None
        net = cls(
            Path(state_dir),
            prefix=data["prefix"],
            subnet=data["subnet"],
            image_cache=Path(data["image_cache"]),
        )
        net._apply_state(data)
        return net

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize read-modify-write of state.json across threads and processes."""
        with self._rlock:
            if self._state_depth == 0:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.state_dir / ".state.lock", os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._state_fd = fd
                self._refresh()
            self._state_depth += 1
            try:
                yield
            finally:
                self._state_depth -= 1
                if self._state_depth == 0 and self._state_fd is not None:
                    os.close(self._state_fd)
                    self._state_fd = None

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None

    def _refresh(self) -> None:
        data = self._read_state()
        if data is not None:
            self._apply_state(data)

    def _apply_state(self, data: dict[str, Any]) -> None:
        """Update self.hosts in place, so TestHost objects handed out stay current."""
        self.owner_pid = data.get("owner_pid")
        self._next_index = data.get("next_index", self._next_index)
        seen = set()
        for name, raw in data.get("hosts", {}).items():
            seen.add(name)
            fresh = _host_from_json(raw)
            if name in self.hosts:
                for f in fields(TestHost):
                    setattr(self.hosts[name], f.name, getattr(fresh, f.name))
            else:
                self.hosts[name] = fresh
        for name in list(self.hosts):
            if name not in seen:
                del self.hosts[name]

    def _state(self, **extra: Any) -> dict[str, Any]:
        data = self._read_state() or {}
        data.update(
            version=STATE_VERSION,
            prefix=self.prefix,
            subnet=self.subnet,
            image_cache=str(self.image_cache),
            owner_pid=self.owner_pid,
            bridge=self.bridge,
            known_hosts=str(self.known_hosts),
            client_key=str(self.client_key),
            ssh_config=str(self.state_dir / "ssh_config"),
            next_index=self._next_index,
            hosts={name: _host_to_json(h) for name, h in self.hosts.items()},
        )
        data.setdefault("requests", [])
        data.setdefault("results", {})
        data.setdefault("torn_down", False)
        data.update(extra)
        return data

    def _save(self, **extra: Any) -> None:
        """Write state.json, known_hosts and ssh_config from self.hosts (atomically)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.state_file, json.dumps(self._state(**extra), indent=2) + "\n")
        self._write_known_hosts()
        self._write_ssh_config()

    def _write_known_hosts(self) -> None:
        lines = [
            f"{h.ip} {' '.join(h.host_key.split()[:2])}\n"
            for h in sorted(self.hosts.values(), key=lambda h: h.index)
            if h.host_key
        ]
        _atomic_write(self.known_hosts, "".join(lines))

    def _write_ssh_config(self) -> Path:
        path = self.state_dir / "ssh_config"
        blocks = [f"# Written by sandbox/testhosts.py for the {self.prefix!r} test network.\n"]
        for h in sorted(self.hosts.values(), key=lambda h: h.index):
            blocks.append(
                f"Host {h.name}\n"
                f"  HostName {h.ip}\n"
                f"  User {DEFAULT_USER}\n"
                f"  IdentityFile {self.client_key}\n"
                f"  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {self.known_hosts}\n"
                f"  GlobalKnownHostsFile /dev/null\n"
                f"  StrictHostKeyChecking yes\n"
                f"  BatchMode yes\n"
                f"  ConnectTimeout 5\n"
                f"  LogLevel ERROR\n"
            )
        _atomic_write(path, "\n".join(blocks))
        return path

    def ssh_config(self) -> Path:
        """Write and return an OpenSSH client config with one ``Host`` entry per host."""
        with self._locked():
            return self._write_ssh_config()

    # ---------------------------------------------------------------- setup / teardown

    def setup(self) -> None:
        """Take the prefix, reap leftovers, ensure images, create the bridge and the client key."""
        require_prerequisites(need_debootstrap=True)
        started = time.monotonic()
        self._take_prefix()
        try:
            self._reap_locked()
            self._check_subnet_free()
            for variant in self.images:
                ensure_image(variant, self.image_cache)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.hosts_dir.mkdir(exist_ok=True)
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "link", "set", self.bridge, "address", self._mac(self.bridge_ip)])
            _run(["ip", "addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            if not self.client_key.exists():
                private, public = _new_ed25519(f"fabflows-testhosts-{self.prefix}")
                _write_file(self.client_key, private, 0o600)
                _write_file(self.client_key.with_name("id_ed25519.pub"), public + "\n", 0o644)
            with self._locked():
                self.owner_pid = os.getpid()
                self.hosts.clear()
                self._next_index = 1
                self._save(requests=[], results={}, torn_down=False)
        except BaseException:
            self._release_prefix()
            raise
        log.info("test network %s ready in %.2f s", self.prefix, time.monotonic() - started)

    def _take_prefix(self) -> None:
        if self._prefix_lock_fd is not None:
            return
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.prefix_lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _acquire(
                fd, self.prefix_lock, self.lock_timeout, f"test network prefix {self.prefix!r}"
            )
        except BaseException:
            os.close(fd)
            raise
        previous = os.pread(fd, 4096, 0).decode(errors="replace")
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, json.dumps({"pid": os.getpid(), "state_dir": str(self.state_dir)}).encode(), 0
        )
        self._prefix_lock_fd = fd
        self._previous_owner = previous

    def _release_prefix(self) -> None:
        if self._prefix_lock_fd is not None:
            os.close(self._prefix_lock_fd)
            self._prefix_lock_fd = None

    def _check_subnet_free(self) -> None:
        out = _run(["ip", "-o", "-4", "addr", "show"])
        for line in out.splitlines():
            parts = line.split()
            dev, addr = parts[1], parts[3]
            iface = ipaddress.ip_interface(addr)
            if dev != self.bridge and (
                iface.ip in self.network or self.network.overlaps(iface.network)
            ):
                raise TestHostError(
                    f"subnet {self.network} clashes with {addr} on {dev}; choose another subnet"
                )

    def reap_stale(self) -> None:
        """Remove leftovers of a crashed run with this prefix: processes, netns, veths, bridge, dirs.

        Takes the prefix lock first, so it never touches a network another live process owns
        (and releases it again unless this instance holds it from :meth:`setup`).
        """
        held = self._prefix_lock_fd is not None
        self._take_prefix()
        try:
            self._reap_locked()
        finally:
            if not held:
                self._release_prefix()

    def _reap_locked(self) -> None:
        self._reap_netns_and_links()
        dirs = {self.hosts_dir}
        try:
            prev = json.loads(self._previous_owner or "{}")
            if prev.get("state_dir"):
                dirs.add(Path(prev["state_dir"]) / "hosts")
        except ValueError:
            pass
        for d in dirs:
            state = d.parent / "state.json"
            ours = d == self.hosts_dir
            if not ours and state.exists():
                try:
                    ours = json.loads(state.read_text()).get("prefix") == self.prefix
                except ValueError:
                    ours = False
            if ours and d.exists():
                _rmtree(d)

    def _list_netns(self) -> list[str]:
        out = _run(["ip", "netns", "list"], check=False)
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [n for n in names if n.startswith(f"{self.prefix}-")]

    def _list_links(self, pattern: str) -> list[str]:
        out = _run(["ip", "-o", "link", "show"], check=False)
        rx = re.compile(rf"^{pattern}$")
        found = []
        for line in out.splitlines():
            name = line.split(":", 2)[1].strip().split("@", 1)[0]
            if rx.match(name):
                found.append(name)
        return found

    def _wait_netns_empty(self, names: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for ns in names:
            while _run(["ip", "netns", "pids", ns], check=False).split():
                if time.monotonic() > deadline:
                    raise TestHostError(f"processes in netns {ns} survived SIGKILL")
                time.sleep(0.02)

    def teardown(self) -> None:
        """Remove everything this network made: processes, netns, veths, bridge, host dirs."""
        with self._locked():
            for host in self.hosts.values():
                _kill(
                    host.launcher_pid
                    if _alive(host.launcher_pid, host.launcher_starttime)
                    else None
                )
                _kill(host.pid if host.pid and _alive(host.pid) else None)
            for host in self.hosts.values():
                self._wait_stopped(host, timeout=10)
                host.pid = host.launcher_pid = host.launcher_starttime = None
            for host in self.hosts.values():
                _run(["ip", "link", "del", host.veth], check=False)
                _run(["ip", "netns", "del", host.netns], check=False)
            # Anything left with our prefix (a host half-created by a failed start).
            self._reap_netns_and_links()
            self.hosts.clear()
            _rmtree(self.hosts_dir)
            self._save(torn_down=True, requests=[])
        self._release_prefix()

    def _reap_netns_and_links(self) -> None:
        for ns in self._list_netns():
            for pid in _run(["ip", "netns", "pids", ns], check=False).split():
                _kill(int(pid))
        self._wait_netns_empty(self._list_netns(), timeout=10)
        for veth in self._list_links(rf"{re.escape(self.prefix)}v\d+"):
            _run(["ip", "link", "del", veth], check=False)
        for ns in self._list_netns():
            _run(["ip", "netns", "del", ns], check=False)
        if self._list_links(re.escape(self.bridge)):
            _run(["ip", "link", "del", self.bridge], check=False)

    # ---------------------------------------------------------------- starting hosts

    def _mac(self, ip: str) -> str:
        """A fixed MAC per IP, so a reused IP never meets a stale ARP entry on the bridge."""
        a, b, c, d = (int(x) for x in ip.split("."))
        return f"02:fb:{a:02x}:{b:02x}:{c:02x}:{d:02x}"

    def _validate(self, specs: Sequence[HostSpec]) -> None:
        names, ips = set(), set()
        for spec in specs:
            if not _HOSTNAME_RE.match(spec.name):
                raise ValueError(
                    f"host name {spec.name!r} is not a valid hostname label "
                    "(lowercase letters, digits and '-', at most 63 chars)"
                )
            if spec.image not in IMAGE_VARIANTS:
                raise ValueError(f"host {spec.name}: unknown image {spec.image!r}")
            ip = ipaddress.ip_address(spec.ip)
            if ip not in self.network or ip in (
                self.network.network_address,
                self.network.broadcast_address,
                ipaddress.ip_address(self.bridge_ip),
            ):
                raise ValueError(
                    f"host {spec.name}: {spec.ip} is not a host address in {self.network} "
                    f"other than the bridge's {self.bridge_ip}"
                )
            if spec.name in names or spec.name in self.hosts:
                raise ValueError(f"host name {spec.name!r} is already used")
            if spec.ip in ips or any(h.ip == spec.ip for h in self.hosts.values()):
                raise ValueError(f"address {spec.ip} is already used")
            names.add(spec.name)
            ips.add(spec.ip)

    def allocate_ip(self) -> str:
        """The lowest free host address in the subnet (for callers that don't care)."""
        used = {h.ip for h in self.hosts.values()}
        for n in range(2, 255):
            ip = f"{self.subnet}.{n}"
            if ip not in used:
                return ip
        raise TestHostError(f"no free address left in {self.network}")

    def start(self, specs: Sequence[HostSpec]) -> list[TestHost]:
        """Start hosts: launch them all from this thread, then wait for every SSH banner.

        Returns them in the order of ``specs``. If any fails, all of this call's hosts are
        destroyed and the error names the failed hosts with their console output.
        """
        specs = list(specs)
        if not self.is_owner:
            self._request("start", specs=[asdict(s) for s in specs])
            return [self.hosts[s.name] for s in specs]
        self._warn_if_not_main_thread()
        started = time.monotonic()
        with self._locked():
            self._validate(specs)
            lowers = {v: ensure_image(v, self.image_cache) for v in {s.image for s in specs}}
            hosts = []
            for spec in specs:
                index = self._next_index
                self._next_index += 1
                host = TestHost(
                    name=spec.name,
                    ip=spec.ip,
                    image=spec.image,
                    dir=self.hosts_dir / spec.name,
                    index=index,
                    netns=f"{self.prefix}-{spec.name}",
                    veth=f"{self.prefix}v{index}",
                    lower=str(lowers[spec.image]),
                )
                self.hosts[spec.name] = host
                hosts.append(host)
            try:
                self._create_links(hosts)
                for host in hosts:
                    self._provision(host)
                self._save()
                for host in hosts:
                    self._launch(host)
                self._save()
                self._wait_ready(hosts)
            except BaseException:
                for host in hosts:
                    self._destroy_locked(host.name)
                self._save()
                raise
            self._save()
        log.info("started %d host(s) in %.2f s", len(hosts), time.monotonic() - started)
        return hosts

    def _create_links(self, hosts: Sequence[TestHost]) -> None:
        batch = []
        for h in hosts:
            batch.append(f"netns add {h.netns}")
            batch.append(
                f"link add {h.veth} type veth peer name eth0 address {self._mac(h.ip)} "
                f"netns {h.netns}"
            )
            batch.append(f"link set {h.veth} master {self.bridge} up")
        _run(["ip", "-batch", "-"], input="\n".join(batch) + "\n")
        for h in hosts:
            inner = [
                "link set lo up",
                f"addr add {h.ip}/24 dev eth0",
                "link set eth0 up",
                f"route add default via {self.bridge_ip}",
            ]
            _run(["ip", "-n", h.netns, "-batch", "-"], input="\n".join(inner) + "\n")

    def _provision(self, host: TestHost) -> None:
        """First boot only: write host key, hostname, hosts and authorized_keys into the upper."""
        lower = Path(host.lower)
        for sub in ("upper", "work", "merged"):
            (host.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(host.dir / "upper", 0o755)
        up = host.upper
        ssh_dir = _upper_dirs(lower, up, "etc/ssh")
        private, public = _new_ed25519(f"root@{host.name}")
        _write_file(ssh_dir / "ssh_host_ed25519_key", private, 0o600)
        _write_file(ssh_dir / "ssh_host_ed25519_key.pub", public + "\n", 0o644)
        host.host_key = public
        _write_file(up / "etc" / "hostname", f"{host.name}\n", 0o644)
        _write_file(
            up / "etc" / "hosts",
            f"127.0.0.1\tlocalhost\n{host.ip}\t{host.name}\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n",
            0o644,
        )
        dot_ssh = _upper_dirs(lower, up, f"home/{DEFAULT_USER}/.ssh")
        client_pub = self.client_key.with_name("id_ed25519.pub").read_text()
        _write_file(
            dot_ssh / "authorized_keys", client_pub, 0o600, uid=DEFAULT_UID, gid=DEFAULT_UID
        )

    def _launch(self, host: TestHost) -> None:
        for path in (host.lower, str(host.dir)):
            if any(ch in path for ch in ",:"):
                raise TestHostError(f"overlayfs cannot use a path containing ',' or ':': {path}")
        console = host.console_log.open("ab")
        try:
            console.write(f"--- start {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            console.flush()
            proc = subprocess.Popen(
                ["ip", "netns", "exec", host.netns]
                + ["unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--kill-child"]
                + ["--propagation", "private"]
                + ["sh", str(INIT_SCRIPT), host.lower, str(host.dir), host.name],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env={"PATH": HOST_PATH, "LANG": "C.UTF-8"},
                start_new_session=True,
                preexec_fn=_set_pdeathsig,  # deliberately: the host dies with this thread
            )
        finally:
            console.close()
        self._popens[host.name] = proc
        host.launcher_pid = proc.pid
        host.launcher_starttime = _starttime(proc.pid)
        host.pid = None

    def _wait_ready(self, hosts: Sequence[TestHost]) -> None:
        """Wait for each host's SSH banner and for its PID 1 to be supervisord in the chroot."""
        deadline = time.monotonic() + self.host_timeout
        pending = {h.name: h for h in hosts}
        failed: dict[str, str] = {}
        while pending:
            for name, host in list(pending.items()):
                if not _alive(host.launcher_pid, host.launcher_starttime):
                    failed[name] = "exited during boot"
                    del pending[name]
                elif self._banner(host.ip) and self._find_pid1(host):
                    del pending[name]
            if pending:
                if time.monotonic() > deadline:
                    for name in pending:
                        failed[name] = f"no SSH banner after {self.host_timeout:.0f} s"
                    break
                time.sleep(0.02)
        if failed:
            details = []
            for name, why in failed.items():
                tail = self.hosts[name].console_log.read_text(errors="replace")[-2000:]
                details.append(f"{name}: {why}; console:\n{tail}")
            raise TestHostError("test host(s) failed to start:\n" + "\n".join(details))

    @staticmethod
    def _banner(ip: str) -> bool:
        try:
            with socket.create_connection((ip, 22), timeout=0.5) as sock:
                sock.settimeout(2.0)
                return sock.recv(64).startswith(b"SSH-2.0")
        except OSError:
            return False

    @staticmethod
    def _find_pid1(host: TestHost) -> bool:
        """Set host.pid to the host's PID 1 once it has exec'd into the chroot."""
        if host.launcher_pid is None:
            return False
        machine_root = os.stat("/").st_dev
        for pid in _children(host.launcher_pid):
            try:
                if os.stat(f"/proc/{pid}/root").st_dev != machine_root:  # on the overlay
                    host.pid = pid
                    return True
            except OSError:
                pass
        return False

    def _warn_if_not_main_thread(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "test hosts started from a non-main thread die when that thread exits "
                "(PR_SET_PDEATHSIG)",
                RuntimeWarning,
                stacklevel=3,
            )

    # ---------------------------------------------------------------- lifecycle

    def _get(self, name: str) -> TestHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise TestHostError(f"no host named {name!r} in test network {self.prefix}") from None

    def _wait_stopped(self, host: TestHost, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        popen = self._popens.get(host.name)
        while time.monotonic() < deadline:
            if popen is not None and popen.poll() is not None:
                self._popens.pop(host.name, None)
                return True
            if not _alive(host.launcher_pid, host.launcher_starttime):
                if popen is None:
                    return True
            time.sleep(0.01)
        return False

    def stop(self, name: str, timeout: float = 15.0, *, graceful: bool = True) -> None:
        """Like an EC2 stop: processes end, the disk (upper layer) stays.

        ``graceful`` (the default, about 1.2 s): supervisord stops every program cleanly first
        (see :meth:`_terminate`), SIGKILL after ``timeout``. ``graceful=False`` is a power cut
        (about 0.05 s): everything gets SIGKILL, PostgreSQL recovers at the next start.
        The veth goes down, so the address stops answering (connects time out).
        """
        with self._locked():
            host = self._get(name)
            if _alive(host.launcher_pid, host.launcher_starttime):
                if not graceful or not self._terminate(host, timeout):
                    _kill(host.launcher_pid)
                    if not self._wait_stopped(host, 10):
                        raise TestHostError(f"host {name} did not stop")
            host.pid = host.launcher_pid = host.launcher_starttime = None
            self._popens.pop(name, None)
            _run(["ip", "link", "set", host.veth, "down"], check=False)
            self._save()

    def _terminate(self, host: TestHost, timeout: float) -> bool:
        """Shut the host down cleanly; False if it is still there after ``timeout``.

        First ``supervisorctl stop all`` inside the host: supervisord answers RPC at once and
        returns when every program has stopped with its own stopsignal (PostgreSQL gets SIGINT, a
        fast shutdown). Then the launcher gets SIGKILL, which ends PID 1 and with it sshd and the
        namespaces. A SIGTERM to supervisord would do the same but slowly: it only looks at
        signals once per 1 s tick, and once more to see each program exit.

        If supervisorctl fails, SIGTERM goes to PID 1, repeated: the kernel drops signals sent
        from outside to a PID namespace's init until it has a handler.

        Either way a host is first given until it is 2 s old: supervisord spawns its programs at
        its first tick, about 1 s after it starts, and a stop request handled in that tick reaches
        nginx between fork and exec, where it is lost (supervisord then waits stopwaitsecs, 10 s).
        """
        age = _age(host.pid) if host.pid else None
        if age is not None and age < 2.0:
            time.sleep(2.0 - age)
        deadline = time.monotonic() + timeout
        try:
            host.exec(["supervisorctl", "stop", "all"], timeout=timeout)
        except (subprocess.SubprocessError, TestHostError) as exc:
            log.warning("%s: supervisorctl stop all failed (%s); sending SIGTERM", host.name, exc)
        else:
            _kill(host.launcher_pid)
            return self._wait_stopped(host, max(1.0, deadline - time.monotonic()))
        while time.monotonic() < deadline:
            _kill(host.pid, signal.SIGTERM)
            if self._wait_stopped(host, min(0.5, max(0.0, deadline - time.monotonic()))):
                return True
        return False

    def start_again(self, name: str) -> TestHost:
        """Like an EC2 start: same upper layer, host key, IP and MAC; nothing is re-provisioned."""
        if not self.is_owner:
            self._request("start_again", name=name)
            return self.hosts[name]
        self._warn_if_not_main_thread()
        with self._locked():
            host = self._get(name)
            if _alive(host.launcher_pid, host.launcher_starttime):
                raise TestHostError(f"host {name} is already running")
            if not host.partitioned:
                _run(["ip", "link", "set", host.veth, "up"])
            self._launch(host)
            self._save()
            try:
                self._wait_ready([host])
            except BaseException:
                _kill(host.launcher_pid)
                self._wait_stopped(host, 10)
                host.pid = host.launcher_pid = host.launcher_starttime = None
                self._save()
                raise
            self._save()
            return host

    def destroy(self, name: str) -> None:
        """Like an EC2 terminate: kill, delete its netns, veth and directory, forget its key."""
        with self._locked():
            self._get(name)
            self._destroy_locked(name)
            self._save()

    def _destroy_locked(self, name: str) -> None:
        host = self.hosts[name]
        if _alive(host.launcher_pid, host.launcher_starttime):
            _kill(host.launcher_pid)
            if not self._wait_stopped(host, 10):
                raise TestHostError(f"host {name} did not die")
        self._popens.pop(name, None)
        for pid in _run(["ip", "netns", "pids", host.netns], check=False).split():
            _kill(int(pid))
        self._wait_netns_empty([host.netns], timeout=10)
        _run(["ip", "link", "del", host.veth], check=False)
        _run(["ip", "netns", "del", host.netns], check=False)
        _rmtree(host.dir)
        del self.hosts[name]

    def partition(self, name: str) -> None:
        """Cut the host off the network (veth down on the machine's side): connects time out."""
        with self._locked():
            host = self._get(name)
            _run(["ip", "link", "set", host.veth, "down"])
            host.partitioned = True
            self._save()

    def heal(self, name: str) -> None:
        """Undo :meth:`partition` (the link comes back up if the host is running)."""
        with self._locked():
            host = self._get(name)
            host.partitioned = False
            if _alive(host.launcher_pid, host.launcher_starttime):
                _run(["ip", "link", "set", host.veth, "up"])
            self._save()

    def _host_pids(self, host: TestHost) -> list[int]:
        """PIDs of the processes in the host's PID namespace."""
        if host.pid is None:
            return []
        try:
            pidns = os.readlink(f"/proc/{host.pid}/ns/pid")
        except OSError:
            return []
        pids = []
        for raw in _run(["ip", "netns", "pids", host.netns], check=False).split():
            try:
                if os.readlink(f"/proc/{raw}/ns/pid") == pidns:
                    pids.append(int(raw))
            except OSError:
                pass
        return pids

    def kill_sshd(self, name: str, sig: int = signal.SIGKILL) -> list[int]:
        """Kill every sshd of that host (listener and sessions); return the PIDs signalled."""
        with self._locked():
            host = self._get(name)
            killed = []
            for pid in self._host_pids(host):
                st = _proc_stat(pid)
                if st and st[1] == "sshd":
                    _kill(pid, sig)
                    killed.append(pid)
        if sig == signal.SIGKILL:
            # Gone, not only signalled: until the listener exits, a connection can still be
            # accepted and then reset instead of refused.
            deadline = time.monotonic() + 10
            while any(_alive(pid) for pid in killed) and time.monotonic() < deadline:
                time.sleep(0.01)
        return killed

    def start_sshd(self, name: str) -> None:
        """Start sshd again inside a running host (after :meth:`kill_sshd`)."""
        host = self._get(name)
        host.exec(["/usr/sbin/sshd"])
        deadline = time.monotonic() + 10
        while not self._banner(host.ip):
            if time.monotonic() > deadline:
                raise TestHostError(f"sshd on {name} did not come back")
            time.sleep(0.02)

    # ---------------------------------------------------------------- serving other processes

    def _request(self, op: str, timeout: float = 120.0, **args: Any) -> None:
        """Queue an operation for the owning process and wait for its result."""
        req_id = uuid.uuid4().hex
        with self._locked():
            if not _alive(self.owner_pid):
                raise TestHostError(
                    f"{op} must run in the process that owns test network {self.prefix} "
                    f"(pid {self.owner_pid}), and that process is gone"
                )
            data = self._state()
            data["requests"].append({"id": req_id, "op": op, **args})
            _atomic_write(self.state_file, json.dumps(data, indent=2) + "\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self._read_state() or {}
            result = data.get("results", {}).get(req_id)
            if result is not None:
                self._apply_state(data)
                if not result["ok"]:
                    raise TestHostError(f"{op} failed in the owning process: {result['error']}")
                return
            if not _alive(self.owner_pid):
                raise TestHostError(f"owner process {self.owner_pid} died while running {op}")
            time.sleep(0.05)
        raise TestHostError(
            f"owner process {self.owner_pid} did not run {op} within {timeout:.0f} s "
            "(does it call TestNetwork.serve()?)"
        )

    def serve_pending(self) -> bool:
        """Owner only: run start/start_again requests queued by other processes, reap exits.

        Returns False once the network has been torn down (by any process).
        """
        if not self.is_owner:
            raise TestHostError("serve_pending() runs only in the process that called setup()")
        for name, popen in list(self._popens.items()):
            if popen.poll() is not None:
                del self._popens[name]
        with self._locked():
            data = self._read_state() or {}
            if data.get("torn_down"):
                self._release_prefix()
                return False
            requests = data.get("requests", [])
            if requests:
                self._save(requests=[])
        for req in requests:
            try:
                if req["op"] == "start":
                    self.start([HostSpec(**s) for s in req["specs"]])
                elif req["op"] == "start_again":
                    self.start_again(req["name"])
                else:
                    raise TestHostError(f"unknown request {req['op']!r}")
                result = {"ok": True, "error": ""}
            except Exception as exc:  # reported to the requesting process
                log.exception("request %s failed", req)
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            with self._locked():
                data = self._state()
                data["results"][req["id"]] = result
                _atomic_write(self.state_file, json.dumps(data, indent=2) + "\n")
        return True

    def serve(self, stop: threading.Event | None = None, interval: float = 0.1) -> None:
        """Owner only, main thread: serve requests until ``stop`` is set or the network is torn
        down (for a daemon such as the local sandbox)."""
        while stop is None or not stop.is_set():
            if not self.serve_pending():
                return
            if stop is not None:
                stop.wait(interval)
            else:
                time.sleep(interval)


# --------------------------------------------------------------------------- command line


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m sandbox.testhosts build|bench|reap``: build images, time hosts, clean up."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m sandbox.testhosts")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find) the images and print their paths")
    b.add_argument("variants", nargs="*", default=list(IMAGE_VARIANTS))
    bench = sub.add_parser("bench", help="time host start, stop, start_again and teardown")
    bench.add_argument("--prefix", default="tt")
    bench.add_argument("--subnet", default="10.204.0")
    bench.add_argument("-n", type=int, nargs="*", default=[1, 10])
    r = sub.add_parser("reap", help="remove leftovers of a crashed run with this prefix")
    r.add_argument("prefix")
    r.add_argument("--subnet", default="10.203.0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.cmd == "build":
        for variant in args.variants:
            t = time.monotonic()
            print(variant, ensure_image(variant), f"{time.monotonic() - t:.1f} s")
        return 0
    if args.cmd == "reap":
        with tempfile.TemporaryDirectory() as tmp:
            TestNetwork(Path(tmp), prefix=args.prefix, subnet=args.subnet).reap_stale()
        return 0
    with tempfile.TemporaryDirectory(prefix="testhosts-bench-") as tmp:
        net = TestNetwork(Path(tmp), prefix=args.prefix, subnet=args.subnet)
        t = time.monotonic()
        net.setup()
        print(f"setup (images cached): {time.monotonic() - t:.2f} s")
        try:
            for n in args.n:
                specs = [HostSpec(f"b{i}", f"{args.subnet}.{10 + i}") for i in range(n)]
                t = time.monotonic()
                net.start(specs)
                print(f"start {n} host(s): {time.monotonic() - t:.2f} s")
                t = time.monotonic()
                net.stop(specs[0].name)
                print(f"stop 1: {time.monotonic() - t:.2f} s")
                t = time.monotonic()
                net.start_again(specs[0].name)
                print(f"start_again 1: {time.monotonic() - t:.2f} s")
                t = time.monotonic()
                net.stop(specs[0].name, graceful=False)
                print(f"stop 1 (power cut): {time.monotonic() - t:.2f} s")
                net.start_again(specs[0].name)
                t = time.monotonic()
                for s in specs:
                    net.destroy(s.name)
                print(f"destroy {n}: {time.monotonic() - t:.2f} s")
            net.start([HostSpec("d0", f"{args.subnet}.9", "db")])
            for n in args.n:
                specs = [HostSpec(f"c{n}-{i}", f"{args.subnet}.{100 + n + i}") for i in range(n)]
                net.start(specs)
        finally:
            t = time.monotonic()
            net.teardown()
            print(f"teardown ({len(args.n)} batches + 1 db host): {time.monotonic() - t:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
