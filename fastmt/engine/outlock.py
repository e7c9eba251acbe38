"""A run owns its ``--out``: an advisory lock beside the folder, held from the first check to the end.

A second run into the same folder (or a ``--resume`` of it) while the first is alive is refused in
one line naming the other process. The lock is the kernel's (``flock``), so it is released on any
exit, a SIGKILL included; the small file it lives in (``.NAME.fastmt-lock`` next to the folder, with
the owner's pid and command) is removed on a normal end, and one left by a process that died is taken
over with a line saying so. The file sits beside the folder, not in it: saving a run replaces the
folder as one unit.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

from fastmt.errors import UsageError

log = logging.getLogger("fastmt")

_held: dict[Path, int] = {}  # folder -> open descriptor of its lock file, in this process


def lock_path(out: Path) -> Path:
    out = Path(out).resolve()
    return out.parent / f".{out.name}.fastmt-lock"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 65536).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


def hold(out: str | Path, flag: str = "--out") -> None:
    """Take the lock of ``out`` for this process (again: nothing to do), or refuse in one line."""
    key = Path(out).resolve()
    if key in _held:
        return
    path = lock_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _read(fd)
        os.close(fd)
        who = f"process {owner.get('pid', '?')}"
        if owner.get("command"):
            cmd = owner["command"]
            who += f" ({cmd if len(cmd) <= 160 else cmd[:157] + '...'})"
        raise UsageError(f"{flag} {out}: another fastmt run is using it ({who}); wait for it to end, "
                         "or choose another dir") from None
    before = _read(fd)
    if before.get("pid") not in (None, os.getpid()):
        log.warning("%s %s: took over the lock left by process %s, which is no longer running", flag, out, before["pid"])
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps({"pid": os.getpid(), "command": " ".join(["fastmt", *sys.argv[1:]])[:300],
                             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())
    _held[key] = fd


def release(out: str | Path) -> None:
    """Give the lock back (the file goes first, so nobody reads a stale owner)."""
    key = Path(out).resolve()
    fd = _held.pop(key, None)
    if fd is None:
        return
    try:
        lock_path(key).unlink(missing_ok=True)
    finally:
        os.close(fd)


def released(fn):
    """``fn`` (a task) gives back whatever --out lock it took, however it ends: a run refused after
    the check, or one that failed, does not keep its folder from the next run in this process or another."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        before = set(_held)
        try:
            return fn(*args, **kwargs)
        finally:
            for key in set(_held) - before:
                release(key)

    return run
