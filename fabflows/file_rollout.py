"""Moved to :mod:`fabflows.procedures.file_rollout` (shared by several runbooks); this name stays an
alias of it so that old imports keep working."""

import sys

from fabflows.procedures import file_rollout as _moved

sys.modules[__name__] = _moved
