"""Files that are never half-written: everything goes to a temporary name and is renamed into place.

This is also the one place where a failed read or write becomes a one-line error: :func:`reading`
turns a file that cannot be read (missing, truncated, damaged) into a :class:`UsageError` naming the
file and what to do, and every writer here turns an OS error (a full disk above all, also from the
native writers of safetensors and tokenizers, which report it as text) into :class:`WriteFailed`,
naming the path and the space needed, after dropping its temporary files.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import tempfile
from datetime import datetime, timezone
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from fastmt.errors import FastmtError, UsageError, WriteFailed


def os_error_of(e: BaseException) -> OSError | None:
    """The OS error behind a failed write: an ``OSError``, or the ``(os error N)`` that the Rust
    writers (safetensors, tokenizers) put in their messages. None for any other failure."""
    if isinstance(e, WriteFailed):
        return e.error
    if isinstance(e, OSError) and e.errno is not None:
        return e
    m = re.search(r"\(os error (\d+)\)", str(e))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    return None


def write_failure(e: BaseException, path: str | Path, need: int | None = None) -> WriteFailed | None:
    """``e`` as a :class:`WriteFailed` for ``path`` (None when ``e`` is not an OS error). A
    WriteFailed from a file inside ``path`` is renamed after ``path`` and keeps its size if none is given."""
    err = os_error_of(e)
    if err is None:
        return None
    if isinstance(e, WriteFailed):
        if Path(path) == e.path:
            return e
        need = need or e.need
    return WriteFailed(path, err, need)


def first_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).strip().splitlines()[:1]) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_problem(e: BaseException) -> str:
    """What is wrong with a file that could not be read, in a few words."""
    if isinstance(e, FileNotFoundError):
        return "is missing"
    if isinstance(e, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EIO, errno.ENOTDIR, errno.ELOOP):
        return f"cannot be read ({e.strerror})"  # the file system's answer, not the file's content
    if isinstance(e, json.JSONDecodeError):
        return f"is not valid JSON ({e.msg}: line {e.lineno} column {e.colno}): damaged or truncated"
    if isinstance(e, UnicodeDecodeError):
        return f"is not text (bytes that are not UTF-8 at byte {e.start}): damaged, or not this kind of file"
    return f"is damaged or truncated ({first_line(e)})"


@contextmanager
def reading(path: str | Path, fix: str) -> Iterator[None]:
    """Any failure of the reads inside becomes one line: ``PATH <what is wrong>; <fix>`` (exit status 2)."""
    try:
        yield
    except FastmtError:
        raise
    except Exception as e:
        raise UsageError(f"{path} {read_problem(e)}; {fix}") from e


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(path: Path, directory: bool = False) -> None:
    """Give a file made by ``mkstemp`` (0600) or a dir made by ``mkdtemp`` (0700) the mode an ordinary
    ``open``/``mkdir`` would have given it (0644/0755 under the usual umask), so that another user
    or a serving container can read what fastmt writes."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | Path, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary path in the same directory; on success it replaces `path` in one rename.

    An OS error while writing (a full disk) removes the temporary file and is raised as
    :class:`WriteFailed` naming `path` and `need`, the size of what was being written."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        usual_mode(tmp)  # after the writer: some (safetensors) create the file anew with their own mode
        os.replace(tmp, path)
    except Exception as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # before the error is raised: the space it took is free again
        failed = write_failure(e, path, need)
        if failed is None or failed is e:
            raise
        raise failed from e
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    with atomic_path(path, need=len(text.encode())) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path, need=len(text.encode())) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one line, stamped with the wall-clock ``time`` (UTC, ISO 8601) unless it has one; a
    line is written with a single write call, so a kill cannot tear earlier lines. A line the disk
    has no room for is taken back whole (:class:`WriteFailed`)."""
    if "time" not in row:
        row = {**row, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
    data = (json.dumps(row) + "\n").encode("utf-8")
    try:
        with open(path, "ab", buffering=0) as f:
            start = f.seek(0, os.SEEK_END)
            try:
                done = 0
                while done < len(data):  # a raw write may take part of the line, then fail
                    done += f.write(data[done:])
            except OSError:
                try:
                    f.truncate(start)
                except OSError:
                    pass
                raise
    except OSError as e:
        raise WriteFailed(path, e, len(data)) from e


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nest of dicts, lists and tuples: what saving it takes on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared or non-contiguous storage; a copy per tensor is cheap next to the write.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    header = 8 + sum(len(k) + 80 for k in flat) + len(json.dumps(metadata or {}))
    with atomic_path(path, need=tensor_bytes(flat) + header) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, fix: str = "restore it, or write it again") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, truncated or damaged one is one line naming it."""
    with reading(path, fix):
        return load_file(str(path))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it in (old copy removed only after the swap)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    usual_mode(tmp, directory=True)
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


STAGING = ".staging"
_COMPLETE = ".complete"


@contextmanager
def staged_set(out_dir: str | Path, need: int | None = None) -> Iterator[Path]:
    """Write a set of files and dirs that belong together (a model's weights, tokenizer and config)
    into a staging dir; on exit they replace their namesakes in ``out_dir`` as one unit.

    A kill before the set is complete leaves the old set (the staging dir is dropped later); a kill
    while it is being moved into place is finished by :func:`recover`, which every reader and
    writer of a run dir calls first. So a reader sees the old set or the new one, never a mix.
    An OS error while the set is written (a full disk) drops the staging dir, keeps the old set and
    is raised as :class:`WriteFailed` naming ``out_dir`` and ``need``, the set's size.
    """
    out_dir = Path(out_dir)
    stage = out_dir / STAGING
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        recover(out_dir)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        yield stage
        with atomic_path(stage / _COMPLETE) as tmp:
            tmp.write_text("complete\n", encoding="utf-8")
    except BaseException as e:
        if not (stage / _COMPLETE).is_file():
            shutil.rmtree(stage, ignore_errors=True)
        failed = write_failure(e, out_dir, need) if isinstance(e, Exception) else None
        if failed is None or failed is e:
            raise
        raise failed from e
    _roll_forward(out_dir)


def recover(out_dir: str | Path) -> None:
    """Finish a set that was complete when its writer was killed, or drop one that was not."""
    out_dir = Path(out_dir)
    stage = out_dir / STAGING
    if not stage.is_dir():
        return
    if (stage / _COMPLETE).is_file():
        _roll_forward(out_dir)
    else:
        shutil.rmtree(stage, ignore_errors=True)


def _roll_forward(out_dir: Path) -> None:
    stage, trash = out_dir / STAGING, out_dir / ".trash"
    trash.mkdir(exist_ok=True)
    names = sorted((p.name for p in stage.iterdir() if p.name != _COMPLETE), key=lambda n: (n == "config.json", n))
    for name in names:  # idempotent: a second run after a kill picks up where the first stopped
        src, dst, old = stage / name, out_dir / name, trash / name
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        if dst.exists():
            os.replace(dst, old)
        os.replace(src, dst)
        _fault_in_commit(name)
    shutil.rmtree(stage, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)


def _fault_in_commit(name: str) -> None:
    """Fault injection for tests: ``FASTMT_FAULT_KILL_IN_COMMIT=NAME`` dies right after NAME is moved."""
    if os.environ.get("FASTMT_FAULT_KILL_IN_COMMIT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def save_pretrained_files(obj, out_dir: str | Path) -> None:
    """``obj.save_pretrained`` into ``out_dir`` file by file, each file renamed into place whole."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save.", suffix=".tmp", dir=out_dir))
    try:
        obj.save_pretrained(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
