"""A local PEP 503 package index of tiny sdists built here, served over HTTP (tests and benchmarks
of refresh-sdists never reach the public index).

Each sdist carries its own in-tree PEP 517 backend (``backend-path = ["."]``, no build
requirements), so ``pip download --no-binary :all:`` can prepare its metadata without fetching
setuptools from anywhere.
"""

from __future__ import annotations

import functools
import html
import io
import tarfile
import threading
from collections.abc import Iterable
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from packaging.utils import canonicalize_name

_BACKEND = '''"""In-tree build backend of a fabflows test package: metadata only."""
import os

NAME, VERSION = {name!r}, {version!r}


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = NAME.replace("-", "_") + "-" + VERSION + ".dist-info"
    os.makedirs(os.path.join(metadata_directory, info))
    with open(os.path.join(metadata_directory, info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: " + NAME + "\\nVersion: " + VERSION + "\\n")
    return info


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise RuntimeError("fabflows test package: no wheel")


def build_sdist(sdist_directory, config_settings=None):
    raise RuntimeError("fabflows test package: sdist only")
'''


def build_sdist(directory: Path, name: str, version: str) -> Path:
    """Write ``<name>-<version>.tar.gz`` (normalized file name, as setuptools does today)."""
    base = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    files = {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\n'
        'backend-path = ["."]\n',
        "backend.py": _BACKEND.format(name=name, version=version),
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{base}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for filename, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{base}/{filename}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class PackageIndex:
    """``/simple/<project>/`` pages linking the sdists, served by a thread on 127.0.0.1."""

    def __init__(self, root: Path, packages: Iterable[tuple[str, str]] = ()):
        self.root = root
        self.simple = root / "simple"
        self.simple.mkdir(parents=True, exist_ok=True)
        for name, version in packages:
            self.add(name, version)
        handler = functools.partial(_QuietHandler, directory=str(root))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/simple/"

    def add(self, name: str, version: str) -> Path:
        project = self.simple / canonicalize_name(name)
        path = build_sdist(project, name, version)
        self._write_pages()
        return path

    def _write_pages(self) -> None:
        projects = sorted(p for p in self.simple.iterdir() if p.is_dir())
        for project in projects:
            links = "".join(
                f'<a href="{html.escape(f.name)}">{html.escape(f.name)}</a>\n'
                for f in sorted(project.iterdir())
                if f.name != "index.html"
            )
            (project / "index.html").write_text(
                f"<!DOCTYPE html><html><body>\n{links}</body></html>"
            )
        index = "".join(f'<a href="{p.name}/">{p.name}</a>\n' for p in projects)
        (self.simple / "index.html").write_text(
            f"<!DOCTYPE html><html><body>\n{index}</body></html>"
        )

    def start(self) -> PackageIndex:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass
