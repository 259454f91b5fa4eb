"""Exceptions with a meaning for operators (and for the CLI's exit status)."""


class BadInput(ValueError):
    """A parameter or input file is wrong; raised before anything is changed (CLI exit 2)."""


class Refused(RuntimeError):  # noqa: N818 - "refused" is what operators read
    """The runbook declines to act now (outside its window, approval rejected, environment locked,
    production not allowed). Nothing was changed (CLI exit 3)."""
