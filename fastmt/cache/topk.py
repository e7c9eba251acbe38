"""Causal-LM teachers computed once: their top-k next-token log-probabilities, per token.

A causal LM's full next-token distribution is ``V`` floats a token (512 kB at V = 128k): too much to
keep for a corpus. What the distillation loss on cached teachers (``fastmt.losses.lm_topk_kl_loss``)
reads is, per token and teacher, a fixed number of bytes:

- ``ids.bin``: the ``k`` most likely next tokens (int32 ``[B, T, L, k]``),
- ``logprobs.bin``: their log-probabilities at the run's temperature (float32 ``[B, T, L, k]``),
- ``tail.bin``: the log of the mass outside them (float32 ``[B, T, L]``; ``-inf`` when there is none),
  computed from the full distribution, so the tail cell is exact rather than ``1 - sum`` of rounded
  probabilities,
- ``target.bin``: the untempered log-probability of the actual next token (float32 ``[B, T, L]``), for
  the confidence weights,

for ``B`` blocks of ``L`` tokens (the packed training sequences), memory-mapped. ``filled.bin`` marks the
blocks stored and ``sums.bin`` holds a CRC-32 per block and file, checked on every read: a block whose
bytes changed is reported once and read as missing, so it is computed again. ``manifest.json`` says what
the cache was made from (``lm_fingerprint``: the teachers' files, the data's bytes, the tokenizer's files,
the block length, ``k`` and the temperature); a cache made from anything else is rebuilt, with a line
naming what differs. Making or rebuilding happens under ``DIR.lock`` beside it, as for
``fastmt.cache.teachers``, whose keys and lock this reuses.
"""

from __future__ import annotations

import json
import logging
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch

from fastmt.cache.teachers import _creation_lock, _dir_digest, _file_sha256, _size, _write_manifest

log = logging.getLogger("fastmt")

FORMAT = 1
_FILES = ("ids.bin", "logprobs.bin", "tail.bin", "target.bin")


def lm_fingerprint(teacher_dirs: list[str], data: str | None, tokenizer_dir: str, block_len: int, k: int,
                   temperature: float, data_digest: str | None = None) -> dict:
    """What a top-k cache's contents depend on; it is reused only when all of it matches. The data
    enters as its file's bytes, or as ``data_digest`` (``distill-lm``: a digest of the packed tokens,
    which serves any data source)."""
    return {
        "format": FORMAT,
        "teacher_files": [_dir_digest(d) for d in teacher_dirs],
        "data": data_digest if data_digest is not None else _file_sha256(data),
        "tokenizer_files": _dir_digest(tokenizer_dir),
        "block_len": int(block_len),
        "k": int(k),
        "temperature": float(temperature),
    }


_WHAT = {"format": "the cache format", "teacher_files": "the teachers", "data": "the training data",
         "tokenizer_files": "the tokenizer", "block_len": "the block length (--max-length)", "k": "k",
         "temperature": "the temperature", "blocks": "the number of blocks", "teachers": "the number of teachers",
         "precision": "the precision"}


def topk_from_logits(logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float = 1.0):
    """``(ids, logprobs, tail, target)`` of teacher logits ``[T, L, V]`` for next tokens ``targets [L]``
    (``-100``: none; its target log-probability is stored as 0): what ``TopKCache.put`` stores."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    top, ids = lp.topk(k, dim=-1)
    rest = lp.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1)
    index = torch.where(targets >= 0, targets, 0).long()
    full = torch.log_softmax(logits.float(), dim=-1)
    target = full.gather(-1, index.view(1, -1, 1).expand(logits.shape[0], -1, 1))[..., 0]
    target = torch.where(targets >= 0, target, 0.0)
    return ids.to(torch.int32), top, tail, target


class TopKCache:
    """``B`` blocks of ``L`` tokens, ``T`` teachers, the top ``k`` of each; see the module docstring."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        b, t, length, k = manifest["blocks"], manifest["teachers"], manifest["block_len"], manifest["k"]
        shapes = {"ids.bin": (np.int32, (b, t, length, k)), "logprobs.bin": (np.float32, (b, t, length, k)),
                  "tail.bin": (np.float32, (b, t, length)), "target.bin": (np.float32, (b, t, length))}
        self.data = {name: np.memmap(path / name, dtype=dt, mode="r+", shape=shape) for name, (dt, shape) in shapes.items()}
        self.filled = np.memmap(path / "filled.bin", dtype=np.uint8, mode="r+", shape=(b,))
        self.sums = np.memmap(path / "sums.bin", dtype=np.uint32, mode="r+", shape=(b, len(_FILES)))
        self.warned: set[str] = set()

    @staticmethod
    def bytes_per_token(t: int, k: int) -> int:
        return t * (8 * k + 8)

    @classmethod
    def open(cls, path: str | Path, fp: dict, blocks: int, teachers: int) -> "TopKCache":
        """The cache at ``path``: reused when its manifest matches, else made afresh (an old one is
        replaced, with a line naming what differs)."""
        path = Path(path)
        manifest = {**fp, "blocks": int(blocks), "teachers": int(teachers)}
        per_block = {"ids.bin": 4 * teachers * fp["block_len"] * fp["k"], "logprobs.bin": 4 * teachers * fp["block_len"] * fp["k"],
                     "tail.bin": 4 * teachers * fp["block_len"], "target.bin": 4 * teachers * fp["block_len"]}
        sizes = {name: blocks * n for name, n in per_block.items()}
        sizes.update({"filled.bin": blocks, "sums.bin": 4 * len(_FILES) * blocks})
        with _creation_lock(path):
            mpath = path / "manifest.json"
            if mpath.exists():
                try:
                    old = json.loads(mpath.read_text())
                except (OSError, ValueError):
                    old = {}
                changed = [_WHAT.get(key, key) for key, v in manifest.items() if old.get(key) != v]
                damaged = [name for name, size in sizes.items() if _size(path / name) != size]
                if not changed and not damaged:
                    cache = cls(path, manifest)
                    log.info("top-k teacher cache %s: %d of %d blocks stored", path, int(cache.filled.sum()), blocks)
                    return cache
                if changed:
                    log.warning("top-k teacher cache %s was made for other inputs (%s differ): rebuilding it", path,
                                ", ".join(changed))
                else:
                    log.warning("top-k teacher cache %s is damaged (%s): rebuilding it", path, ", ".join(damaged))
                shutil.rmtree(path)
            path.mkdir(parents=True, exist_ok=True)
            for name, size in sizes.items():
                with open(path / name, "wb") as f:
                    f.truncate(size)
            _write_manifest(mpath, manifest)
            log.info("top-k teacher cache %s: new, %.2f GB for %d blocks of %d tokens (%d bytes a token)", path,
                     sum(sizes.values()) / 1e9, blocks, fp["block_len"], cls.bytes_per_token(teachers, fp["k"]))
            return cls(path, manifest)

    def _crc(self, b: int) -> np.ndarray:
        return np.array([zlib.crc32(self.data[name][b].tobytes()) for name in _FILES], dtype=np.uint32)

    def put(self, blocks, ids, logprobs, tail, target) -> None:
        """Store blocks ``blocks [b]``: ``ids``/``logprobs`` ``[b, T, L, k]``, ``tail``/``target``
        ``[b, T, L]`` (``topk_from_logits`` per block). Data first, then its checksum, then the mark."""
        arrays = {"ids.bin": ids, "logprobs.bin": logprobs, "tail.bin": tail, "target.bin": target}
        for j, b in enumerate(int(x) for x in blocks):
            for name, x in arrays.items():
                self.data[name][b] = x[j].detach().cpu().numpy()
            self.sums[b] = self._crc(b)
            self.filled[b] = 1

    def get(self, blocks, device: torch.device | str = "cpu"):
        """``(ids, logprobs, tail, target)`` for ``blocks``, or None when any of them is not stored (or
        its bytes no longer match its checksum: said once per file, and the block is marked missing)."""
        idx = [int(x) for x in blocks]
        if not all(self.filled[b] for b in idx):
            return None
        for b in idx:
            bad = self._crc(b) != self.sums[b]
            if bad.any():
                for name in (n for n, x in zip(_FILES, bad) if x):
                    if name not in self.warned:
                        self.warned.add(name)
                        log.warning("top-k teacher cache: %s changed on disk since it was written; the teachers "
                                    "recompute what it held", self.path / name)
                self.filled[b] = 0
                return None
        out = [torch.from_numpy(np.ascontiguousarray(self.data[name][idx])).to(device) for name in _FILES]
        out[0] = out[0].long()
        return tuple(out)

    def flush(self) -> None:
        for x in (*self.data.values(), self.filled, self.sums):
            x.flush()
