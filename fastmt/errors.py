"""Errors that reach the user as one line (see ``fastmt.cli``): never a traceback for a user mistake."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class FastmtError(Exception):
    """A runtime failure the user should read about in one line (exit status 1)."""

    exit_code = 1


class UsageError(FastmtError):
    """A bad flag, path or input file (exit status 2). The message names what to fix."""

    exit_code = 2


class DataError(ValueError):
    """A problem with an input file.

    ``str(e)`` is one line: ``'<path>:<line>: <what is wrong> (<how to fix>)'``.  ``e.path`` and
    ``e.line`` hold the two location parts (``line`` is ``None`` when the file could not be opened).
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        message = " ".join(str(message).splitlines())
        super().__init__(message)
        self.path = path
        self.line = line


def data_error(path: str, line: int | None, what: str, fix: str | None = None) -> DataError:
    """The one-line :class:`DataError` of a data file or source: ``<path>:<line>: <what> (<fix>)``."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    message = f"{where}: {what}" + (f" ({fix})" if fix else "")
    return DataError(message, path=path, line=line)


# The OS errors that mean "this disk has no room for it": the message then gives the space needed.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def size_text(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop returns first


def free_bytes(path: str | Path) -> int | None:
    """Free space on the disk that holds ``path`` (its nearest existing parent), or None."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


class WriteFailed(FastmtError):
    """The OS refused a write (a full disk, a quota, a read-only dir): exit status 1.

    Every fastmt write goes to a temporary name first, so what was on disk before is still there;
    the temporary files are removed before this is raised. ``need`` is the size of what was being
    written, the space to free."""

    def __init__(self, path: str | Path, error: OSError, need: int | None = None):
        self.path, self.error, self.need = Path(path), error, need
        self.free = free_bytes(path)
        self.no_space = error.errno in NO_SPACE
        reason = error.strerror or os.strerror(error.errno or 0) or str(error)
        msg = f"cannot write {self.path}: {reason}"
        if self.no_space and need:
            msg += f" (it needs about {size_text(need)}"
            msg += f"; {size_text(self.free)} free there)" if self.free is not None else ")"
        super().__init__(msg)
