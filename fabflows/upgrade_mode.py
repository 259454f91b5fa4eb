"""Moved to :mod:`fabflows.procedures.upgrade_window` (the upgrade window procedure, shared by
several runbooks); this name stays an alias of it so that old imports keep working."""

import sys

from fabflows.procedures import upgrade_window as _moved

sys.modules[__name__] = _moved
