"""Test-only: a disk that fills up, for a fastmt subprocess started with this dir on PYTHONPATH.

``FASTMT_TEST_FULL_DISK=DIR:NAME:N``: DIR runs out of space when the Nth file whose name contains
NAME is opened for writing there (a temporary name counts: ``.model.safetensors.x1y2.tmp``). From
then on every write under DIR fails as on a full disk: ``OSError(ENOSPC)`` from Python's files,
the ``SafetensorError`` that safetensors raises, and ``shutil.disk_usage`` reports no free space.
Used where a small tmpfs cannot be mounted; nothing in fastmt knows about it.
"""

import builtins
import errno
import io
import os
import shutil

_SPEC = os.environ.get("FASTMT_TEST_FULL_DISK")

if _SPEC:
    _root, _name, _nth = _SPEC.rsplit(":", 2)
    _root, _nth = os.path.realpath(_root), int(_nth)
    _state = {"seen": 0, "full": False}
    _open, _disk_usage = builtins.open, shutil.disk_usage

    def _inside(path) -> bool:
        try:
            p = os.path.realpath(os.fspath(path))
        except TypeError:  # a file descriptor
            return False
        return p == _root or p.startswith(_root + os.sep)

    def _opened_for_writing(path) -> None:
        if _state["full"] or not _inside(path):
            return
        if _name in os.path.basename(os.fspath(path)):
            _state["seen"] += 1
            if _state["seen"] >= _nth:
                _state["full"] = True

    def _no_space():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class _FullFile:
        """A file under DIR: writes fail once the disk is full."""

        def __init__(self, f):
            self._f = f

        def write(self, data):
            if _state["full"]:
                raise _no_space()
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __iter__(self):
            return iter(self._f)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def _patched_open(file, mode="r", *args, **kwargs):
        f = _open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and _inside(file):
            _opened_for_writing(file)
            return _FullFile(f)  # opening works on a full disk; writing does not
        return f

    def _patched_disk_usage(path):
        usage = _disk_usage(path)
        if _state["full"] and _inside(path):
            return usage._replace(free=0)
        return usage

    builtins.open = io.open = _patched_open
    shutil.disk_usage = _patched_disk_usage

    import safetensors
    import safetensors.torch

    _save_file = safetensors.torch.save_file

    def _patched_save_file(tensors, filename, metadata=None):
        if _inside(filename):
            _opened_for_writing(filename)
            if _state["full"]:
                with _open(filename, "wb"):
                    pass
                raise safetensors.SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)")
        return _save_file(tensors, filename, metadata=metadata)

    safetensors.torch.save_file = _patched_save_file
