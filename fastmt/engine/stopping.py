"""Stopping a run when asked: SIGTERM (what a scheduler or a preemptible VM sends before it kills) and
SIGINT (Ctrl-C).

While :func:`catch_stop` is active, either signal only sets a flag. The training loop reads it after
each step: it finishes that step, writes a checkpoint, says how to go on (the same command with
``--resume``) and exits with 128 + the signal's number. A second Ctrl-C stops at once, as Ctrl-C
usually does. Only a run in one process catches them: data-parallel processes would each see the
signal after a different step, and torchrun already stops them all.
"""

from __future__ import annotations

import shlex
import signal
import threading
from contextlib import contextmanager

_asked: list[int] = []  # the signals received while catching, in order
command_line: list[str] | None = None  # the CLI's arguments (set by ``fastmt.cli``), for the --resume line


def requested() -> int | None:
    """The signal that asked the run to stop (its number), or None."""
    return _asked[0] if _asked else None


def _handler(signum, frame):
    _asked.append(signum)
    if signum == signal.SIGINT and _asked.count(signal.SIGINT) > 1:
        raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the checkpoint


@contextmanager
def catch_stop(enabled: bool = True):
    """SIGTERM and SIGINT set the flag :func:`requested` reads, inside; the old handlers come back after."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    _asked.clear()
    old = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _asked.clear()


def name(signum: int) -> str:
    return signal.Signals(signum).name


def resume_hint() -> str:
    """How to go on: the same command with ``--resume`` (``--overwrite`` dropped), or its Python form."""
    if command_line is None:
        return "run it again with resume=True"
    argv = [a for a in command_line if a != "--overwrite"]
    if "--resume" not in argv:
        argv.append("--resume")
    return "fastmt " + shlex.join(argv)
