"""Settings of the sandbox app. Per-server values come from ``fabapp/local_settings.py``, rendered
by sandbox/provision.py as FabulAWS renders its local_settings (so ``manage.py`` run over SSH sees
the same settings as the processes under supervisor).

The database password is read from the deploy user's secret file (FabulAWS keeps one file per
secret at ``<home>/<name>``, mode 600), never from the environment or a command line.
"""

from pathlib import Path

try:
    from fabapp import local_settings as _local
except ImportError:  # not provisioned: defaults
    _local = None

ENVIRONMENT = getattr(_local, "ENVIRONMENT", "staging")
DEBUG = False
ALLOWED_HOSTS = ["*"]
SECRET_KEY = "sandbox-only-not-secret"
ROOT_URLCONF = "fabapp.urls"
WSGI_APPLICATION = "fabapp.wsgi.application"
INSTALLED_APPS = ["shop"]
MIDDLEWARE: list[str] = []
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_password_file = Path(getattr(_local, "DB_PASSWORD_FILE", "~/database_password")).expanduser()
# the login in use (rotate-credentials alternates <user> and <user>_alt), else the rendered one
_user_file = _password_file.with_name("database_user")

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": getattr(_local, "DB_NAME", f"myproject_{ENVIRONMENT}"),
        "USER": (
            _user_file.read_text().strip()
            if _user_file.exists()
            else getattr(_local, "DB_USER", "dbuser")
        ),
        "PASSWORD": _password_file.read_text().strip() if _password_file.exists() else "",
        "HOST": getattr(_local, "DB_HOST", "127.0.0.1"),
        "PORT": getattr(_local, "DB_PORT", "5432"),
        "CONN_MAX_AGE": 60,
        "OPTIONS": {"connect_timeout": 3},
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
