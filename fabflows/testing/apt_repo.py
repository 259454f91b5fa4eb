"""A local apt repository for test hosts (they have no route out): real .debs, a real index.

Packages are built with ``dpkg-deb``, indexed with ``dpkg-scanpackages --multiversion`` (a flat
repository: ``deb [trusted=yes] http://<bridge>:<port>/ ./``) plus a Release file with checksums,
and served by a threaded HTTP server bound to the test network's bridge address only.

    repo = AptRepo(tmp / "repo", bind="10.214.0.1").start()
    repo.add(DebSpec("fabflows-demo", "2.0"))
    repo.publish()
    point_apt_at(host, repo.url)       # sandbox.provision
    ...
    repo.stop()

Needs ``dpkg-deb`` and ``dpkg-scanpackages`` (Debian package ``dpkg-dev``).
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from email.utils import formatdate
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class AptRepoError(RuntimeError):
    """The repository could not be built or served (names the missing tool or failing command)."""


@dataclass(frozen=True)
class DebSpec:
    """A tiny package: one file recording its version, an optional postinst script."""

    name: str
    version: str
    postinst: str | None = None
    depends: tuple[str, ...] = ()
    description: str = "fabflows test package"
    files: dict[str, str] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version}_all.deb"


def require_tools() -> None:
    missing = [t for t in ("dpkg-deb", "dpkg-scanpackages") if shutil.which(t) is None]
    if missing:
        raise AptRepoError(
            f"the local apt repository needs {', '.join(missing)} (apt-get install dpkg-dev)"
        )


def _run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AptRepoError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def build_deb(spec: DebSpec, out_dir: Path) -> Path:
    """Build ``spec`` into ``out_dir`` with dpkg-deb; returns the .deb path."""
    require_tools()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "pkg"
        (root / "DEBIAN").mkdir(parents=True)
        control = [
            f"Package: {spec.name}",
            f"Version: {spec.version}",
            "Architecture: all",
            "Maintainer: fabflows tests <tests@fabflows.invalid>",
            "Section: misc",
            "Priority: optional",
        ]
        if spec.depends:
            control.append("Depends: " + ", ".join(spec.depends))
        control.append(f"Description: {spec.description}")
        (root / "DEBIAN" / "control").write_text("\n".join(control) + "\n")
        if spec.postinst:
            script = root / "DEBIAN" / "postinst"
            script.write_text(spec.postinst)
            script.chmod(0o755)
        files = {f"usr/share/fabflows-test/{spec.name}.version": spec.version + "\n"}
        files.update(spec.files)
        for rel, content in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        out = out_dir / spec.filename
        _run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", str(root), str(out)])
    return out


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class AptRepo:
    """A flat apt repository in ``directory`` served at ``http://{bind}:{port}/``."""

    def __init__(self, directory: Path, bind: str, port: int = 0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.bind = bind
        self.port = port
        self.requests = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise AptRepoError("the repository is not being served (call start())")
        return f"http://{self.bind}:{self._server.server_address[1]}/"

    def add(self, *specs: DebSpec) -> list[Path]:
        """Build packages into the repository (call :meth:`publish` to index them)."""
        return [build_deb(s, self.directory / "pool") for s in specs]

    def remove(self, name: str, version: str) -> None:
        (self.directory / "pool" / f"{name}_{version}_all.deb").unlink(missing_ok=True)

    def deb(self, name: str, version: str) -> Path:
        return self.directory / "pool" / f"{name}_{version}_all.deb"

    def publish(self) -> None:
        """(Re)write Packages, Packages.gz and Release from the pool."""
        require_tools()
        (self.directory / "pool").mkdir(exist_ok=True)
        packages = _run(
            ["dpkg-scanpackages", "--multiversion", "pool", "/dev/null"], self.directory
        )
        (self.directory / "Packages").write_text(packages)
        with gzip.open(self.directory / "Packages.gz", "wt") as fh:
            fh.write(packages)
        lines = [
            "Origin: fabflows-test",
            "Label: fabflows-test",
            "Suite: stable",
            "Codename: fabflows",
            f"Date: {formatdate(usegmt=True)}",
            "Architectures: all amd64 arm64",
        ]
        for title, algo in (("MD5Sum", hashlib.md5), ("SHA256", hashlib.sha256)):
            lines.append(f"{title}:")
            for name in ("Packages", "Packages.gz"):
                data = (self.directory / name).read_bytes()
                lines.append(f" {algo(data).hexdigest()} {len(data)} {name}")
        (self.directory / "Release").write_text("\n".join(lines) + "\n")

    def start(self) -> AptRepo:
        handler = partial(_QuietHandler, directory=str(self.directory))
        try:
            self._server = ThreadingHTTPServer((self.bind, self.port), handler)
        except OSError as exc:
            raise AptRepoError(
                f"cannot serve the apt repository on {self.bind}:{self.port}: {exc}"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="apt-repo", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
