"""``fastmt.cache.topk``: the top-k teacher cache for causal LMs, and the loss read from it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fastmt.cache import topk as lm_cache
from fastmt.losses import lm_kl_loss, lm_topk_kl_loss


@pytest.fixture()
def inputs(tmp_path):
    """Two teachers' dirs, a data file and a tokenizer dir: what the fingerprint reads."""
    dirs = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(name.encode() * 10)
        dirs.append(str(d))
    data = tmp_path / "train.txt"
    data.write_text("some text\n")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    return dirs, str(data), str(tok)


def _blocks(b, t, length, v, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(b, t, length, v, generator=g)
    targets = torch.randint(0, v, (b, length), generator=g)
    targets[:, 0] = -100
    return logits, targets


def _fill(cache, logits, targets, k, tau):
    for b in range(logits.shape[0]):
        cache.put([b], *(x[None] for x in lm_cache.topk_from_logits(logits[b], targets[b], k, tau)))


def test_stored_blocks_read_back_and_give_the_loss(inputs, tmp_path):
    """Round trip of every file; with k = V the loss read from the cache is the full-logit loss, and
    with k < V it never exceeds it."""
    dirs, data, tok = inputs
    b, t, length, v = 3, 2, 5, 12
    logits, targets = _blocks(b, t, length, v, seed=1)
    s = torch.randn(length, v, generator=torch.Generator().manual_seed(2))
    for k in (v, 4):
        fp = lm_cache.lm_fingerprint(dirs, data, tok, length, k, 2.0)
        cache = lm_cache.TopKCache.open(tmp_path / f"c{k}", fp, b, t)
        _fill(cache, logits, targets, k, 2.0)
        ids, lp, tail, target = cache.get([1, 2])
        want = lm_cache.topk_from_logits(logits[2], targets[2], k, 2.0)
        assert torch.equal(ids[1], want[0].long()) and torch.equal(lp[1], want[1])
        assert torch.equal(tail[1], want[2]) and torch.equal(target[1], want[3])
        got = lm_topk_kl_loss(s, ids[0], lp[0], targets[1], "paper", 2.0, target_logprobs=target[0],
                              tail_logprobs=tail[0])
        full = lm_kl_loss(s, logits[1], targets[1], "paper", 2.0)
        if k == v:
            assert got.item() == pytest.approx(full.item(), rel=1e-5)
        else:
            assert 0 < got.item() <= full.item() * (1 + 1e-6)


def test_fixed_bytes_per_token(inputs, tmp_path):
    dirs, data, tok = inputs
    fp = lm_cache.lm_fingerprint(dirs, data, tok, 16, 8, 1.0)
    cache = lm_cache.TopKCache.open(tmp_path / "c", fp, 10, 2)
    sizes = sum((tmp_path / "c" / name).stat().st_size for name in lm_cache.TopKCache.SUMMED)
    assert sizes == 10 * 16 * lm_cache.TopKCache.bytes_per_token(2, 8) == 10 * 16 * 2 * (8 * 8 + 8)
    assert cache.get([0]) is None  # nothing stored yet


def test_reused_when_nothing_changed_and_rebuilt_naming_what_did(inputs, tmp_path, caplog):
    dirs, data, tok = inputs
    logits, targets = _blocks(2, 2, 4, 10, seed=3)

    def now(tau=1.0):  # the fingerprint of the files as they are
        return lm_cache.lm_fingerprint(dirs, data, tok, 4, 3, tau)

    _fill(lm_cache.TopKCache.open(tmp_path / "c", now(), 2, 2), logits, targets, 3, 1.0)
    assert lm_cache.TopKCache.open(tmp_path / "c", now(), 2, 2).get([0, 1]) is not None  # reused
    changes = {
        "the temperature": lambda: None,
        "the tokenizer": lambda: (tmp_path / "tok" / "tokenizer.json").write_text('{"v": 2}'),
        "the training data": lambda: (tmp_path / "train.txt").write_text("other text\n"),
        "the teachers": lambda: (tmp_path / "a" / "model.safetensors").write_bytes(b"retrained"),
    }
    for what, change in changes.items():
        _fill(lm_cache.TopKCache.open(tmp_path / "c", now(), 2, 2), logits, targets, 3, 1.0)
        change()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fastmt"):
            cache = lm_cache.TopKCache.open(tmp_path / "c", now(2.0 if what == "the temperature" else 1.0), 2, 2)
        said = [r.message for r in caplog.records if "rebuilding" in r.message]
        assert len(said) == 1 and f"({what} differ)" in said[0], (what, said)
        assert cache.get([0]) is None  # rebuilt: empty


def test_changed_bytes_are_found_and_recomputed(inputs, tmp_path, caplog):
    dirs, data, tok = inputs
    logits, targets = _blocks(2, 2, 4, 10, seed=4)
    fp = lm_cache.lm_fingerprint(dirs, data, tok, 4, 3, 1.0)
    cache = lm_cache.TopKCache.open(tmp_path / "c", fp, 2, 2)
    _fill(cache, logits, targets, 3, 1.0)
    cache.flush()
    raw = np.memmap(tmp_path / "c" / "logprobs.bin", dtype=np.float32, mode="r+")
    raw[2 * 4 * 3 + 5] += 0.5  # block 1: valid floats, wrong value
    raw.flush()
    with caplog.at_level(logging.WARNING, logger="fastmt"):
        assert cache.get([0]) is not None
        assert cache.get([1]) is None and cache.get([1]) is None
    assert sum("logprobs.bin changed on disk" in r.message for r in caplog.records) == 1
    cache.put([1], *(x[None] for x in lm_cache.topk_from_logits(logits[1], targets[1], 3, 1.0)))  # recomputed
    assert cache.get([1]) is not None
