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
naming what differs; the manifest, the flags and checksums, the lock and rebuilding are
``fastmt.cache.store``'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fastmt.cache.store import CacheStore, creation_lock, dir_digest, file_sha256

log = logging.getLogger("fastmt")

FORMAT = 1


def lm_fingerprint(teacher_dirs: list[str], data: str | None, tokenizer_dir: str, block_len: int, k: int,
                   temperature: float, data_digest: str | None = None) -> dict:
    """What a top-k cache's contents depend on; it is reused only when all of it matches. The data
    enters as its file's bytes, or as ``data_digest`` (``distill-lm``: a digest of the packed tokens,
    which serves any data source)."""
    return {
        "format": FORMAT,
        "teacher_files": [dir_digest(d) for d in teacher_dirs],
        "data": data_digest if data_digest is not None else file_sha256(data),
        "tokenizer_files": dir_digest(tokenizer_dir),
        "block_len": int(block_len),
        "k": int(k),
        "temperature": float(temperature),
    }


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


class TopKCache(CacheStore):
    """``B`` blocks of ``L`` tokens, ``T`` teachers, the top ``k`` of each; see the module docstring."""

    LABEL = "top-k teacher cache"
    SUMMED = ("ids.bin", "logprobs.bin", "tail.bin", "target.bin")
    WHAT = {"format": "the cache format", "teacher_files": "the teachers", "data": "the training data",
            "tokenizer_files": "the tokenizer", "block_len": "the block length (--max-length)", "k": "k",
            "temperature": "the temperature", "blocks": "the number of blocks", "teachers": "the number of teachers",
            "precision": "the precision"}

    def __init__(self, path: Path, manifest: dict):
        super().__init__(path, manifest, manifest["blocks"])
        self.data = {name: np.memmap(self.path / name, dtype=dt, mode="r+", shape=shape)
                     for name, (dt, shape) in self.shapes(manifest).items()}

    @staticmethod
    def shapes(manifest: dict) -> dict[str, tuple]:
        """Each data file's element type and shape."""
        b, t, length, k = manifest["blocks"], manifest["teachers"], manifest["block_len"], manifest["k"]
        return {"ids.bin": (np.int32, (b, t, length, k)), "logprobs.bin": (np.float32, (b, t, length, k)),
                "tail.bin": (np.float32, (b, t, length)), "target.bin": (np.float32, (b, t, length))}

    def _row_views(self, b: int):
        return tuple(self.data[name][b] for name in self.SUMMED)

    def _data_files(self) -> list[np.memmap]:
        return list(self.data.values())

    def _warn_changed(self, name: str, row: int) -> None:
        log.warning("top-k teacher cache: %s changed on disk since it was written; the teachers recompute what it held",
                    self.path / name)

    @staticmethod
    def bytes_per_token(t: int, k: int) -> int:
        return t * (8 * k + 8)

    @classmethod
    def file_sizes(cls, blocks: int, teachers: int, block_len: int, k: int) -> dict[str, int]:
        """Every file of the cache dir and its size in bytes."""
        per_block = {"ids.bin": 4 * teachers * block_len * k, "logprobs.bin": 4 * teachers * block_len * k,
                     "tail.bin": 4 * teachers * block_len, "target.bin": 4 * teachers * block_len}
        return {**{name: blocks * n for name, n in per_block.items()}, **cls.bookkeeping(blocks)}

    @classmethod
    def open(cls, path: str | Path, fp: dict, blocks: int, teachers: int) -> "TopKCache":
        """The cache at ``path``: reused when its manifest matches, else made afresh (an old one is
        replaced, with a line naming what differs)."""
        path = Path(path)
        manifest = {**fp, "blocks": int(blocks), "teachers": int(teachers)}
        sizes = cls.file_sizes(blocks, teachers, fp["block_len"], fp["k"])
        with creation_lock(path):
            if cls.reusable(path, manifest, sizes) is not None:
                cache = cls(path, manifest)
                log.info("top-k teacher cache %s: %d of %d blocks stored", path, cache.count, blocks)
                return cache
            cls.make_dir(path, sizes, manifest)
            log.info("top-k teacher cache %s: new, %.2f GB for %d blocks of %d tokens (%d bytes a token)", path,
                     sum(sizes.values()) / 1e9, blocks, fp["block_len"], cls.bytes_per_token(teachers, fp["k"]))
            return cls(path, manifest)

    def put(self, blocks, ids, logprobs, tail, target) -> None:
        """Store blocks ``blocks [b]``: ``ids``/``logprobs`` ``[b, T, L, k]``, ``tail``/``target``
        ``[b, T, L]`` (``topk_from_logits`` per block). Data first, then its checksums, then the marks."""
        idx = np.asarray([int(x) for x in blocks], dtype=np.int64)
        for name, x in zip(self.SUMMED, (ids, logprobs, tail, target)):
            self.data[name][idx] = x.detach().cpu().numpy()
        self._commit(idx)

    def get(self, blocks, device: torch.device | str = "cpu"):
        """``(ids, logprobs, tail, target)`` for ``blocks``, or None when any of them is not stored (or
        its bytes no longer match its checksums: said once per file, and the block is marked missing)."""
        idx = np.asarray([int(x) for x in blocks], dtype=np.int64)
        if not self._stored(idx):
            return None
        out = [torch.from_numpy(np.ascontiguousarray(self.data[name][idx])).to(device) for name in self.SUMMED]
        out[0] = out[0].long()
        return tuple(out)
