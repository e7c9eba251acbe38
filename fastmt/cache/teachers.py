"""Frozen teachers computed once: ``fastmt distill --cache-teachers DIR|auto``.

A frozen teacher in eval mode gives the same outputs for an example every time it sees it, so the
first pass over the training data stores what the distillation losses read, per example, and every
later step, epoch and run reads it back instead of running the teachers:

- the teachers' logits (``[T, C]`` per example), always;
- their log-sum-exps (``[2, T]`` per example: at the run's temperature and at 1, as
  ``fastmt.losses.teacher_lse`` gives them), so the fused KL kernel reads them instead of computing
  them each step; a run at another temperature recomputes them from the stored logits;
- for ``--hidden-loss cls`` the mapped layers' first-token states (``[T, K, D]``);
- for ``--hidden-loss tokens`` every real token's states (``[L_i, T, K, D]``, padding is not stored:
  the loss masks it), when the whole cache fits ``--cache-budget-gb``; otherwise there is nothing
  worth caching (the teachers would still run for the hidden states) and the run says so.

Layout of the cache dir (``fastmt.cache.store``: the manifest, the creation lock ``DIR.lock``, the
flags and checksums, rebuilding and reuse): a row per training example in ``logits.bin``, ``lse.bin``
and ``hidden.bin`` (float32), ``filled.bin`` (stored or not) and ``sums.bin`` (a CRC-32 of each of the
three data files: an example whose bytes changed on disk since it was stored is recomputed from the
teachers and stored again, with one warning naming the file). An interrupted first pass leaves a
partial cache that the next run completes; runs may fill one cache at the same time. A cache made for
other teachers (any file of the teachers dir changed), other training data (its bytes), another max
length, teacher subset, hidden-loss kind or layer map, or another precision does not match the
manifest: it is rebuilt, and the run says which of those changed. Data-parallel runs do not use the
cache (each process would need its shard's).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from fastmt.cache.store import CacheStore, creation_lock, dir_digest, file_sha256
from fastmt.losses import teacher_lse

log = logging.getLogger("fastmt")

FORMAT = 3  # 2: the teachers' log-sum-exps stored beside their logits; 3: a checksum per example and file
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def fingerprint(teachers_dir: str, train: str, max_length: int, teacher_subset, hidden_loss: str, maps,
                precision: str) -> dict:
    """What a cache's contents depend on; a cache is reused only when all of it matches."""
    return {
        "format": FORMAT,
        "teacher_files": dir_digest(teachers_dir),
        "train_data": file_sha256(train),
        "max_length": int(max_length),
        "teacher_subset": list(teacher_subset) if teacher_subset is not None else None,
        "hidden_loss": hidden_loss,
        "layer_maps": [list(m) for m in maps] if hidden_loss != "none" else None,
        "precision": precision,
    }


class TeacherCache(CacheStore):
    """Per-example teacher outputs on disk; ``get`` a batch's (all stored) or ``put`` them."""

    LABEL = "teacher cache"
    SUMMED = ("logits.bin", "lse.bin", "hidden.bin")
    WHAT = {"format": "the cache format", "teacher_files": "the teachers dir", "train_data": "the training data",
            "max_length": "--max-length", "teacher_subset": "--teacher-subset", "hidden_loss": "--hidden-loss",
            "layer_maps": "the layer map", "precision": "--precision"}
    FLUSH_EVERY = 64

    def __init__(self, path: Path, manifest: dict, lengths: np.ndarray | None):
        super().__init__(path, manifest, manifest["n"])
        path = self.path
        n, t, c = manifest["n"], manifest["teachers"], manifest["classes"]
        self.n, self.t, self.c = n, t, c
        self.kind = manifest["hidden_loss"]
        self.k, self.d = manifest["layers"], manifest["hidden"]
        self.logits = np.memmap(path / "logits.bin", dtype=np.float32, mode="r+", shape=(n, t, c))
        self.lse = np.memmap(path / "lse.bin", dtype=np.float32, mode="r+", shape=(n, 2, t))
        self.temperature = float(manifest["lse_temperature"])
        self.hidden = None
        self.offsets = None
        if self.kind == "cls":
            self.hidden = np.memmap(path / "hidden.bin", dtype=np.float32, mode="r+", shape=(n, t, self.k, self.d))
        elif self.kind == "tokens":
            assert lengths is not None
            self.lengths = lengths.astype(np.int64)
            self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
            rows = int(self.lengths.sum())
            self.hidden = np.memmap(path / "hidden.bin", dtype=np.float32, mode="r+",
                                    shape=(max(rows, 1), t, self.k, self.d))
        self.read_s = 0.0  # time spent in get(), checks included

    def _row_views(self, i: int):
        """Example ``i``'s bytes in each file of ``SUMMED`` (memmap views, not copies)."""
        if self.kind == "tokens":
            h = self.hidden[self.offsets[i]:self.offsets[i] + int(self.lengths[i])]
        elif self.kind == "cls":
            h = self.hidden[i]
        else:
            h = None
        return self.logits[i], self.lse[i], h

    def _data_files(self) -> list[np.memmap]:
        return [self.logits, self.lse] + ([self.hidden] if self.hidden is not None else [])

    def _warn_changed(self, name: str, row: int) -> None:
        log.warning("teacher cache %s: %s changed on disk after it was stored (example %d does not match its "
                    "checksum); recomputing what changed from the teachers", self.path, name, row)

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def file_sizes(cls, n: int, t: int, c: int, kind: str, k: int, d: int,
                   lengths: np.ndarray | None) -> dict[str, int]:
        """Every file of the cache dir and its size in bytes."""
        sizes = {**cls.bookkeeping(n), "logits.bin": 4 * n * t * c, "lse.bin": 4 * n * 2 * t}
        if kind == "cls":
            sizes["hidden.bin"] = 4 * n * t * k * d
        elif kind == "tokens":
            sizes["hidden.bin"] = 4 * max(int(lengths.sum()), 1) * t * k * d
        return sizes

    @classmethod
    def nbytes(cls, n: int, t: int, c: int, kind: str, k: int, d: int, lengths: np.ndarray | None) -> int:
        """The disk the cache takes (what ``--cache-budget-gb`` bounds)."""
        return sum(cls.file_sizes(n, t, c, kind, k, d, lengths).values())

    @classmethod
    def open(cls, path: str | Path, fp: dict, n: int, t: int, c: int, k: int, d: int,
             lengths: np.ndarray | None, budget_bytes: float, temperature: float = 1.0) -> "TeacherCache | None":
        """The cache at ``path`` for these shapes: reused when its manifest matches ``fp``, else made
        afresh (an old one is replaced, with a warning naming what differs). None, with a log line,
        when it would not fit ``budget_bytes``. ``temperature``: the run's, for the stored log-sum-exps
        (a cache made at another one keeps its logits and recomputes them)."""
        kind = fp["hidden_loss"]
        sizes = cls.file_sizes(n, t, c, kind, k, d, lengths)
        need = sum(sizes.values())
        if need > budget_bytes:
            hint = " (--hidden-loss cls caches in far less)" if kind == "tokens" else ""
            log.warning("teacher cache: needs %.2f GB, over --cache-budget-gb %.2f; the teachers run every step%s",
                        need / 1e9, budget_bytes / 1e9, hint)
            return None
        path = Path(path)
        manifest = {**fp, "n": n, "teachers": t, "classes": c, "layers": k, "hidden": d}
        with creation_lock(path):
            old = cls.reusable(path, manifest, sizes)
            if old is not None:
                stored = {"dtypes": old.get("dtypes"), "lse_temperature": old.get("lse_temperature")}
                cache = cls(path, {**manifest, **stored}, lengths)
                cache.retemper(temperature)
                log.info("teacher cache %s: %d of %d examples stored%s", path, cache.count, n,
                         " (teachers skipped)" if cache.count == n else "; the rest are stored as they are computed")
                return cache
            manifest.update(dtypes=None, lse_temperature=float(temperature))
            cls.make_dir(path, sizes, manifest)
            log.info("teacher cache %s: new, %.2f GB for %d examples; filled as the first epoch runs", path,
                     need / 1e9, n)
            return cls(path, manifest, lengths)

    @classmethod
    def _damaged_manifest(cls, stored: dict) -> list[str]:
        if not isinstance(stored.get("lse_temperature"), (int, float)):
            return ["manifest.json (no temperature for lse.bin)"]
        return []

    # -- use -----------------------------------------------------------------------------------

    def retemper(self, temperature: float) -> None:
        """Make the stored log-sum-exps those at ``temperature`` (from the stored logits, no teacher
        runs), when they were stored at another one."""
        temperature = float(temperature)
        if temperature == self.temperature:
            return
        rows = np.flatnonzero(np.asarray(self.filled))
        for start in range(0, len(rows), 4096):
            part = rows[start:start + 4096]
            logits = torch.from_numpy(np.ascontiguousarray(self.logits[part])).permute(1, 0, 2)
            self.lse[part] = teacher_lse(logits, temperature).permute(2, 0, 1).numpy()
        self.lse.flush()
        log.info("teacher cache %s: log-sum-exps recomputed for temperature %g (stored at %g)", self.path,
                 temperature, self.temperature)
        self.temperature = self.manifest["lse_temperature"] = temperature
        for i in rows:  # the lse column of each example's checksums
            self.sums[i, 1] = self._crc(int(i))[1]
        self.sums.flush()
        self.save_manifest()

    def get(self, index: torch.Tensor, width: int, device: torch.device):
        """``(logits [T,N,C], hidden [T,K,N,S,D] or None, lse [2,T,N] float32)`` for these examples,
        or None unless all are stored. ``width``: the batch's padded length (token states; zeros past
        each example). ``lse``: ``fastmt.losses.teacher_lse`` of the logits at the cache's temperature."""
        start = time.perf_counter()
        try:
            return self._get(index.cpu().numpy(), width, device)
        finally:
            self.read_s += time.perf_counter() - start

    def _get(self, idx: np.ndarray, width: int, device: torch.device):
        if self.manifest.get("dtypes") is None or not self._stored(idx):
            return None
        dl, dh = (_DTYPES[x] if x else None for x in self.manifest["dtypes"])
        logits = torch.from_numpy(np.ascontiguousarray(self.logits[idx])).permute(1, 0, 2)
        lse = torch.from_numpy(np.ascontiguousarray(self.lse[idx])).permute(1, 2, 0)
        hidden = None
        if self.kind == "cls":
            hidden = torch.from_numpy(np.ascontiguousarray(self.hidden[idx])).permute(1, 2, 0, 3).unsqueeze(3)
        elif self.kind == "tokens":
            out = torch.zeros(len(idx), width, self.t, self.k, self.d)
            for j, i in enumerate(idx):
                length = int(self.lengths[i])
                out[j, :length] = torch.from_numpy(np.asarray(self.hidden[self.offsets[i]:self.offsets[i] + length]))
            hidden = out.permute(2, 3, 0, 1, 4)
        logits = logits.to(device=device, dtype=dl).contiguous()
        if hidden is not None:
            hidden = hidden.to(device=device, dtype=dh).contiguous()
        return logits, hidden, lse.to(device=device).contiguous()

    def put(self, index: torch.Tensor, logits: torch.Tensor, hidden: torch.Tensor | None,
            lse: torch.Tensor | None = None) -> None:
        """Store these examples' outputs (``logits [T,N,C]``, ``hidden [T,K,N,S,D]``) and the logits'
        log-sum-exps (``lse [2,T,N]``: ``fastmt.losses.teacher_lse`` at the cache's temperature,
        computed here when not given)."""
        idx = index.cpu().numpy()
        if lse is None:
            lse = teacher_lse(logits.detach(), self.temperature)
        if self.manifest.get("dtypes") is None:
            self.manifest["dtypes"] = [str(logits.dtype).replace("torch.", ""),
                                       str(hidden.dtype).replace("torch.", "") if hidden is not None else None]
            self.save_manifest()
        self.logits[idx] = logits.detach().float().permute(1, 0, 2).cpu().numpy()
        self.lse[idx] = lse.detach().float().permute(2, 0, 1).cpu().numpy()
        if self.kind == "cls":
            self.hidden[idx] = hidden.detach().float()[:, :, :, 0].permute(2, 0, 1, 3).cpu().numpy()
        elif self.kind == "tokens":
            h = hidden.detach().float().permute(2, 3, 0, 1, 4).cpu().numpy()  # [N, S, T, K, D]
            for j, i in enumerate(idx):
                length = int(self.lengths[i])
                if length > h.shape[1]:
                    raise ValueError(f"example {i}: {length} tokens but the batch holds {h.shape[1]}")
                self.hidden[self.offsets[i]:self.offsets[i] + length] = h[j, :length]
        if self._commit(idx) and self.complete:
            log.info("teacher cache %s: all %d examples stored; later steps skip the teachers", self.path, self.n)

    def report(self) -> str:
        """What reading the cache cost, checksums apart, and what was found changed (one line)."""
        bad = sum(len(v) for v in self.bad.values())
        return (f"teacher cache {self.path}: reads took {self.read_s:.2f} s, of which checksums {self.verify_s:.2f} s"
                + (f"; {bad} example(s) found changed on disk and recomputed" if bad else ""))

