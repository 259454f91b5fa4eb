"""Give isolated test hosts (sandbox/testhosts.py) the shape of FabulAWS servers.

- :func:`provision_web`: nginx with FabulAWS's upgrade-mode logic (procedures.md §2.0) for an
  environment's document root, proxying to an app on the environment's port, and a tiny app behind
  it (Python's http.server under supervisor, answering 200 for ``/`` and ``/healthcheck.html``).
  The reload-production-db work replaces that app with a real Django one.
- :func:`point_apt_at`: the host's only apt source becomes a local repository (test hosts have no
  route out; see fabflows/testing/apt_repo.py).

Used by the test fixtures, the sandbox and the benchmarks; it runs commands in the hosts as root
through ``TestHost.exec`` (provisioning, not the code under test).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from typing import Protocol

NGINX_SITE = """\
# FabulAWS's nginx upgrade-mode logic (fabulaws templates/nginx.conf, procedures.md §2.0):
# 1. a requested file that exists in the document root is served;
# 2. else, if 503.html exists in the root, the answer is 503 with that page;
# 3. else the request goes to the app.
server {{
    listen 80 default_server;
    server_name _;
    root {root};
    error_page 503 @upgrade;

    location / {{
        try_files $uri @app;
    }}
    location @app {{
        if (-f $document_root/503.html) {{
            return 503;
        }}
        proxy_pass http://127.0.0.1:{port};
        proxy_set_header Host $host;
    }}
    location @upgrade {{
        rewrite ^ /503.html break;
    }}
}}
"""

APP_PROGRAM = """\
[program:app]
command=/usr/bin/python3 -m http.server {port} --bind 127.0.0.1 --directory /srv/fabflows-app
autorestart=true
startsecs=0
redirect_stderr=true
stdout_logfile=/var/log/supervisor/app.log
"""

APP_INDEX = "<!doctype html><title>app</title><p>the app answers</p>\n"


class Host(Protocol):
    """What provisioning needs from a test host (``sandbox.testhosts.TestHost``)."""

    name: str
    ip: str

    def exec(
        self,
        argv: Sequence[str],
        check: bool = True,
        *,
        input: str | None = None,
        timeout: float | None = 60,
    ): ...


def nginx_site(nginx_root: str, app_port: int) -> str:
    """The nginx site for ``nginx_root`` proxying to the app on ``app_port``."""
    if not nginx_root.startswith("/") or any(c in nginx_root for c in " ;{}'\"\n"):
        raise ValueError(f"unusable nginx root {nginx_root!r}")
    return NGINX_SITE.format(root=nginx_root.rstrip("/"), port=int(app_port))


def _write(host: Host, path: str, content: str, mode: str = "0644") -> None:
    script = f"mkdir -p -- $(dirname -- {shlex.quote(path)}) && cat > {shlex.quote(path)} && chmod {mode} {shlex.quote(path)}"
    host.exec(["sh", "-c", script], input=content)


def provision_web(
    host: Host, nginx_root: str, app_port: int = 8000, owner: str = "deploy", wait: float = 15.0
) -> None:
    """Make ``host`` a FabulAWS-like web server: nginx site + the app behind it, both running.

    Waits (up to ``wait`` seconds) until ``http://<host>/`` answers 200 through nginx and the app.
    """
    _write(host, "/etc/nginx/sites-available/fabflows", nginx_site(nginx_root, app_port))
    _write(host, "/srv/fabflows-app/index.html", APP_INDEX)
    _write(host, "/srv/fabflows-app/healthcheck.html", "app ok\n")
    _write(host, "/etc/supervisor/conf.d/50-app.conf", APP_PROGRAM.format(port=int(app_port)))
    root = shlex.quote(nginx_root.rstrip("/"))
    host.exec(
        [
            "sh",
            "-c",
            "set -e; rm -f /etc/nginx/sites-enabled/default; "
            "ln -sf /etc/nginx/sites-available/fabflows /etc/nginx/sites-enabled/fabflows; "
            f"mkdir -p {root}; chown {shlex.quote(owner)}: {root}; "
            "nginx -t -q; nginx -s reload; "
            "supervisorctl reread >/dev/null; supervisorctl update >/dev/null",
        ]
    )
    wait_for_http(host.ip, 200, timeout=wait)


def wait_for_http(ip: str, status: int, path: str = "/", timeout: float = 15.0) -> None:
    """Wait until ``http://ip{path}`` answers ``status``; raise with the last answer otherwise."""
    import requests

    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"http://{ip}{path}", timeout=1, allow_redirects=False)
            if r.status_code == status:
                return
            last = r.status_code
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise RuntimeError(
        f"http://{ip}{path} did not answer {status} within {timeout} s (last: {last})"
    )


def point_apt_at(host: Host, repo_url: str) -> None:
    """Make ``repo_url`` (a flat repository, ``deb [trusted=yes] URL ./``) the host's only source."""
    if not repo_url.startswith("http://") or any(c in repo_url for c in " \n'\""):
        raise ValueError(f"unusable repository URL {repo_url!r}")
    host.exec(
        ["sh", "-c", "rm -f /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources"]
    )
    _write(host, "/etc/apt/sources.list", f"deb [trusted=yes] {repo_url.rstrip('/')}/ ./\n")
