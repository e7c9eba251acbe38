"""Files that are never half-written: everything goes to a temporary name and is renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file


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
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same directory; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        usual_mode(tmp)  # after the writer: some (safetensors) create the file anew with their own mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one line, stamped with the wall-clock ``time`` (UTC, ISO 8601) unless it has one; a
    line is written with a single write call, so a kill cannot tear earlier lines."""
    if "time" not in row:
        row = {**row, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared or non-contiguous storage; a copy per tensor is cheap next to the write.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
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
def staged_set(out_dir: str | Path) -> Iterator[Path]:
    """Write a set of files and dirs that belong together (a model's weights, tokenizer and config)
    into a staging dir; on exit they replace their namesakes in ``out_dir`` as one unit.

    A kill before the set is complete leaves the old set (the staging dir is dropped later); a kill
    while it is being moved into place is finished by :func:`recover`, which every reader and
    writer of a run dir calls first. So a reader sees the old set or the new one, never a mix.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recover(out_dir)
    stage = out_dir / STAGING
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    with atomic_path(stage / _COMPLETE) as tmp:
        tmp.write_text("complete\n", encoding="utf-8")
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
        import signal

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
