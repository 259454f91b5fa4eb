"""Give isolated test hosts (sandbox/testhosts.py) the shape of FabulAWS servers.

- :func:`provision_web`: nginx with FabulAWS's upgrade-mode logic for an
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
# FabulAWS's nginx upgrade-mode logic (its templates/nginx.conf):
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
            f"mkdir -p {root}; chown {shlex.quote(owner)}: {root}; nginx -t -q",
        ]
    )
    reload_nginx(host, timeout=max(wait, 15.0))
    host.exec(["sh", "-c", "supervisorctl reread >/dev/null; supervisorctl update >/dev/null"])
    wait_for_http(host.ip, 200, timeout=wait)


# nginx's master is running and has written its pid file (it sets up its signal handlers first)
_NGINX_UP = 'p=$(cat /run/nginx.pid 2>/dev/null || true); [ -n "$p" ] && kill -0 "$p" 2>/dev/null'


def reload_nginx(host: Host, timeout: float = 15.0) -> None:
    """``nginx -s reload`` once nginx is up, retried until ``timeout``.

    A host that has just started (a new instance, or a stopped one started again) runs nginx about
    a second after boot, under supervisord: a reload before nginx has written its pid file fails
    (``invalid PID number "" in "/run/nginx.pid"``) and would leave the host serving the old
    config. If nginx is still not up at the end, supervisord restarts it (it reads the new config).
    """
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        done = host.exec(["sh", "-c", f"{_NGINX_UP} && nginx -s reload"], check=False)
        if done.returncode == 0:
            return
        last = (done.stderr or done.stdout).strip() or "nginx not running yet"
        time.sleep(0.2)
    restarted = host.exec(["supervisorctl", "restart", "nginx"], check=False)
    if restarted.returncode != 0 or "ERROR" in restarted.stdout:
        raise RuntimeError(
            f"{host.name}: nginx did not reload within {timeout:.0f} s ({last}) and supervisord "
            f"could not restart it: {(restarted.stdout + restarted.stderr).strip()}"
        )


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


# --------------------------------------------------------------------------- the Django app
# (reload-production-db, issue 8): the web and worker hosts of an environment run the small Django
# app in sandbox/app/ under supervisor, behind nginx (web) and through pgbouncer, as FabulAWS's
# servers do: supervisor groups <env>-web (program <env>-server, gunicorn on
# server_ports[env]), <env>-celery (a worker stand-in) and <env>-pgbouncer; the database password in
# the deploy user's secret file <home>/database_password (mode 600).

APP_SOURCE = __import__("pathlib").Path(__file__).resolve().parent / "app"

APP_PROGRAMS = {
    "server": """
[program:{env}-server]
command=/usr/bin/gunicorn --bind 127.0.0.1:{port} --workers 2 --timeout 30 --graceful-timeout 5 fabapp.wsgi:application
directory={code_root}
user={user}
environment=HOME="{home}"
autostart=true
autorestart=true
startsecs=1
stopasgroup=true
redirect_stderr=true
stdout_logfile=/var/log/supervisor/{env}-server.log
""",
    "celery": """
[program:{env}-celery-main]
command=/usr/bin/python3 manage.py run_worker --interval 2
directory={code_root}
user={user}
environment=HOME="{home}",PYTHONUNBUFFERED="1"
autostart=true
autorestart=true
startsecs=1
stopasgroup=true
redirect_stderr=true
stdout_logfile=/var/log/supervisor/{env}-celery.log
""",
    "pgbouncer": """
[program:{env}-pgbouncer]
command=/usr/sbin/pgbouncer {services}/pgbouncer/pgbouncer-{env}.ini
user={user}
autostart=true
autorestart=true
startsecs=1
redirect_stderr=true
stdout_logfile=/var/log/supervisor/{env}-pgbouncer.log
""",
}

APP_GROUPS = {
    "web": """
[group:{env}-web]
programs={env}-server

[group:{env}-pgbouncer]
programs={env}-pgbouncer
""",
    "worker": """
[group:{env}-celery]
programs={env}-celery-main

[group:{env}-pgbouncer]
programs={env}-pgbouncer
""",
}

ROLE_PROGRAMS = {"web": ("server", "pgbouncer"), "worker": ("celery", "pgbouncer")}

LOCAL_SETTINGS = """\
# Written by sandbox/provision.py for the {env} environment.
ENVIRONMENT = {env!r}
DB_NAME = {db_name!r}
DB_USER = {db_user!r}
DB_HOST = "127.0.0.1"
DB_PORT = {pgbouncer_port!r}
DB_PASSWORD_FILE = {password_file!r}
"""


PGBOUNCER_INI = """\
[databases]
{db_name} = host={db_host} port=5432 dbname={db_name}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {pgbouncer_port}
; the admin console: the user pgbouncer, over this private socket, from pgbouncer's own UID only
unix_socket_dir = {services}/pgbouncer/socket
unix_socket_mode = 0700
admin_users = pgbouncer
auth_type = md5
auth_file = {services}/pgbouncer/userlist-{env}.txt
; transaction pooling: PAUSE completes once running transactions end (the app keeps its
; connections, CONN_MAX_AGE), so a reload swaps the database under a held, not refused, app
pool_mode = transaction
server_login_retry = 1
server_connect_timeout = 3
ignore_startup_parameters = extra_float_digits
logfile =
pidfile =
"""


def _quoted_userlist_entry(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def write_secret_file(host: Host, home: str, name: str, value: str, owner: str = "deploy") -> None:
    """FabulAWS's server secret file ``<home>/<name>``: mode 600, owned by the deploy user."""
    path = f"{home.rstrip('/')}/{name}"
    script = (
        f"umask 077; mkdir -p -- {shlex.quote(home)}; cat > {shlex.quote(path)}; "
        f"chown {shlex.quote(owner)}: {shlex.quote(path)}; chmod 600 {shlex.quote(path)}"
    )
    host.exec(["sh", "-c", script], input=value)


def provision_app(
    host: Host,
    *,
    role: str,
    environment: str,
    db_host: str,
    db_name: str,
    db_user: str,
    db_password: str,
    home: str = "/home/deploy",
    server_port: int = 8000,
    pgbouncer_port: int = 5432,
    owner: str = "deploy",
    wait: float = 20.0,
) -> None:
    """Make ``host`` a FabulAWS-like ``web`` or ``worker`` server running the Django app.

    Web: nginx with upgrade mode (:func:`provision_web`), gunicorn on ``server_port`` in group
    ``<env>-web``, pgbouncer in ``<env>-pgbouncer``. Worker: the worker stand-in in ``<env>-celery``
    and pgbouncer. The code goes to ``<home>/www/<env>/code_root`` (FabulAWS's layout), so
    ``python3 manage.py migrate --noinput`` runs there as the deploy user. With ``wait`` > 0, waits
    until a web server's site answers 200, which needs the database migrated (:func:`migrate_app`
    on a worker first).
    """
    import shutil

    if role not in APP_GROUPS:
        raise ValueError(f"provision_app: role {role!r} is not web or worker")
    home = home.rstrip("/")
    code_root = f"{home}/www/{environment}/code_root"
    services = f"{home}/services"
    if role == "web":
        provision_web(
            host, f"{services}/nginx/html", server_port, owner=owner, wait=max(wait, 15.0)
        )
    # The code: copied straight into the host's filesystem (its overlay, seen through /proc).
    root = host.root() if hasattr(host, "root") else None  # type: ignore[attr-defined]
    if root is None:
        raise ValueError("provision_app needs a test host with root()")
    target = root / code_root.lstrip("/")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(APP_SOURCE, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    write_secret_file(host, home, "database_password", db_password, owner=owner)
    fmt = dict(
        env=environment,
        port=int(server_port),
        code_root=code_root,
        user=owner,
        home=home,
        db_name=db_name,
        db_user=db_user,
        db_host=db_host,
        pgbouncer_port=int(pgbouncer_port),
        services=services,
    )
    _write(
        host,
        f"{code_root}/fabapp/local_settings.py",
        LOCAL_SETTINGS.format(
            **{
                **fmt,
                "pgbouncer_port": str(pgbouncer_port),
                "password_file": f"{home}/database_password",
            }
        ),
    )
    _write(
        host,
        f"{services}/pgbouncer/pgbouncer-{environment}.ini",
        PGBOUNCER_INI.format(**fmt),
        "0600",
    )
    _write(
        host,
        f"{services}/pgbouncer/userlist-{environment}.txt",
        f"{_quoted_userlist_entry(db_user)} {_quoted_userlist_entry(db_password)}\n",
        "0600",
    )
    conf = "; Written by sandbox/provision.py: the app processes (FabulAWS's groups).\n"
    conf += "".join(APP_PROGRAMS[p].format(**fmt) for p in ROLE_PROGRAMS[role])
    conf += APP_GROUPS[role].format(**fmt)
    _write(host, f"/etc/supervisor/conf.d/60-{environment}.conf", conf)
    host.exec(
        [
            "sh",
            "-c",
            "set -e; rm -f /etc/supervisor/conf.d/50-app.conf; "
            f"mkdir -p -m 0700 {shlex.quote(services)}/pgbouncer/socket; "
            f"chown -R {shlex.quote(owner)}: {shlex.quote(home + '/www')} {shlex.quote(services)}/pgbouncer; "
            "supervisorctl reread >/dev/null; supervisorctl update >/dev/null",
        ]
    )
    if role == "web" and wait > 0:
        wait_for_http(host.ip, 200, timeout=wait)


def migrate_app(
    host: Host, environment: str, home: str = "/home/deploy", owner: str = "deploy"
) -> str:
    """Run the app's migrations on a worker as the deploy user (what the flow's migrate step runs)."""
    code_root = f"{home.rstrip('/')}/www/{environment}/code_root"
    proc = host.exec(
        [
            "runuser",
            "-u",
            owner,
            "--",
            "env",
            f"HOME={home}",
            "sh",
            "-c",
            'cd "$1" && python3 manage.py migrate --noinput',
            "sh",
            code_root,
        ],
        timeout=120,
    )
    return proc.stdout


def provision_environment_app(
    db: Host,
    webs: Sequence[Host],
    workers: Sequence[Host],
    *,
    environment: str,
    db_name: str,
    db_user: str,
    db_password: str,
    home: str = "/home/deploy",
    server_port: int = 8000,
    pgbouncer_port: int = 5432,
    owner: str = "deploy",
) -> None:
    """One environment's app tier as FabulAWS builds it: the password file on its db-primary, the
    app on every worker, migrations on the first worker, then the app on every web server (each
    checked to answer 200)."""
    write_secret_file(db, home, "database_password", db_password, owner=owner)
    common = dict(
        environment=environment,
        db_host=db.ip,
        db_name=db_name,
        db_user=db_user,
        db_password=db_password,
        home=home,
        server_port=server_port,
        pgbouncer_port=pgbouncer_port,
        owner=owner,
    )
    for worker in workers:
        provision_app(worker, role="worker", **common)
    if workers:
        migrate_app(workers[0], environment, home=home, owner=owner)
    for web in webs:
        provision_app(web, role="web", **common)
