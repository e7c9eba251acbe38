"""Errors that reach the user as one line (see ``fastmt.cli``): never a traceback for a user mistake."""


class FastmtError(Exception):
    """A runtime failure the user should read about in one line (exit status 1)."""

    exit_code = 1


class UsageError(FastmtError):
    """A bad flag, path or input file (exit status 2). The message names what to fix."""

    exit_code = 2
