"""``--cache-teachers``: the teachers' outputs stored once give the same distillation as running them."""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pytest
import torch

from conftest import run_args
from fastmt.cache import teachers as C
from fastmt.config.settings import DistillArgs
from fastmt.tasks.classification.distill import distill
from fastmt.tasks.classification.step import DistillStep


def _args(tiny_task, out, **kw):
    return run_args(tiny_task, out, **{"epochs": 2, "log_every": 1, "cache_teachers": None, **kw})  # no cache unless asked


def _losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "train"]


@pytest.mark.parametrize("hidden_loss", ["tokens", "cls"])
def test_cached_distillation_equals_uncached(hidden_loss, teachers_dir, tiny_task, tmp_path, monkeypatch):
    """Two epochs with and without the cache: the same loss terms at every step (fp32, CPU); a third
    run on the full cache never runs a teacher and still gives the same losses."""
    common = dict(teachers=str(teachers_dir), student_layers=1, hidden_loss=hidden_loss, temperature=2.0)
    distill(DistillArgs(**_args(tiny_task, tmp_path / "plain"), **common))
    cache_dir = tmp_path / "cache"
    distill(DistillArgs(**_args(tiny_task, tmp_path / "cached", cache_teachers=str(cache_dir)), **common))
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["hidden_loss"] == hidden_loss and manifest["n"] == 256
    assert np.fromfile(cache_dir / "filled.bin", dtype=np.uint8).all()

    def no_teachers(self, inputs):
        raise AssertionError("a teacher ran although every output is cached")

    monkeypatch.setattr(DistillStep, "teacher_outputs", no_teachers)
    distill(DistillArgs(**_args(tiny_task, tmp_path / "reused", cache_teachers=str(cache_dir)), **common))
    plain, cached, reused = (_losses(tmp_path / k) for k in ("plain", "cached", "reused"))
    assert len(plain) == len(cached) == len(reused) == 16  # 2 epochs x 8 batches
    for a, b, c in zip(plain, cached, reused):
        for key in ("loss", "loss_task", "loss_kd", "loss_hidden"):
            # Epoch 1 of the cached run computes the teachers itself; later steps read what another
            # batch composition computed (other padding: float32 noise only).
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
            assert c[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_cache_made_for_other_inputs_is_rebuilt(teachers_dir, tiny_task, tmp_path, caplog):
    common = dict(teachers=str(teachers_dir), student_layers=1)
    cache = str(tmp_path / "cache")
    distill(DistillArgs(**_args(tiny_task, tmp_path / "r1", epochs=1, cache_teachers=cache), **common))
    first = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    other = tmp_path / "train-other.tsv"
    lines = tiny_task["train"].read_text().splitlines()
    other.write_text("\n".join(lines[:1] + lines[2:] + lines[1:2]) + "\n")  # same rows, another order
    with caplog.at_level(logging.WARNING, logger="fastmt"):
        distill(DistillArgs(**_args(tiny_task, tmp_path / "r2", train=str(other), epochs=1, cache_teachers=cache),
                                **common))
    assert "made for other inputs (the training data differ): rebuilding" in caplog.text
    second = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert second["train_data"] != first["train_data"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastmt"):
        distill(DistillArgs(**_args(tiny_task, tmp_path / "r3", train=str(other), max_length=12, epochs=1,
                                      cache_teachers=cache), **common))
    assert "--max-length differ" in caplog.text


def test_cache_over_budget_is_not_used(teachers_dir, tiny_task, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fastmt"):
        distill(DistillArgs(**_args(tiny_task, tmp_path / "r", epochs=1, cache_teachers=str(tmp_path / "cache")),
                                teachers=str(teachers_dir), student_layers=1, cache_budget_gb=1e-6))
    assert "over --cache-budget-gb" in caplog.text and "--hidden-loss cls" in caplog.text
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_token_states_round_trip(tmp_path, dtype):
    """Token states of examples of different lengths come back exactly, padded with zeros to the
    batch's width, in the dtype they were stored from; a batch with one example not stored misses."""
    n, t, c, k, d = 5, 2, 3, 2, 4
    lengths = np.array([3, 1, 4, 2, 4])
    fp = {"format": C.FORMAT, "teacher_files": "x", "train_data": "y", "max_length": 8, "teacher_subset": None,
          "hidden_loss": "tokens", "layer_maps": [[1, 2]], "precision": "bf16"}
    cache = C.TeacherCache.open(tmp_path / "c", fp, n, t, c, k, d, lengths, 1e9)
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([4, 1, 2])
    logits = torch.randn(t, 3, c, generator=g).to(dtype)
    hidden = torch.randn(t, k, 3, 4, d, generator=g).to(dtype)
    assert cache.get(idx, 4, torch.device("cpu")) is None
    cache.put(idx, logits, hidden)
    got_l, got_h, _ = cache.get(torch.tensor([2, 4]), 6, torch.device("cpu"))
    assert got_l.dtype == got_h.dtype == dtype and got_h.shape == (t, k, 2, 6, d)
    assert torch.equal(got_l, logits[:, [2, 0]])
    assert torch.equal(got_h[:, :, 0, :4], hidden[:, :, 2, :4]) and torch.equal(got_h[:, :, 1, :4], hidden[:, :, 0, :4])
    assert not got_h[:, :, :, 4:].any()  # past the longest example: zeros
    # Example 1 has one token: that token back, zeros after it (its neighbour in the batch has four).
    short_l, short_h, _ = cache.get(torch.tensor([1, 4]), 4, torch.device("cpu"))
    assert torch.equal(short_l, logits[:, [1, 0]])
    assert torch.equal(short_h[:, :, 0, :1], hidden[:, :, 1, :1]) and not short_h[:, :, 0, 1:].any()
    assert torch.equal(short_h[:, :, 1], hidden[:, :, 0])
    assert cache.get(torch.tensor([2, 0]), 4, torch.device("cpu")) is None  # example 0 was never stored
    # Reopened by a later run: the same contents.
    again = C.TeacherCache.open(tmp_path / "c", fp, n, t, c, k, d, lengths, 1e9)
    assert again.count == 3 and torch.equal(again.get(idx, 4, torch.device("cpu"))[0], logits)


def _lse_fp(kind="none"):
    return {"format": C.FORMAT, "teacher_files": "x", "train_data": "y", "max_length": 8, "teacher_subset": None,
            "hidden_loss": kind, "layer_maps": None, "precision": "bf16"}


def test_cache_stores_the_teachers_log_sum_exps_at_the_runs_temperature(tmp_path, caplog):
    """``lse.bin`` holds ``fastmt.losses.teacher_lse`` of the stored logits at the run's temperature; a
    run at another temperature recomputes them from the stored logits (no teacher runs, nothing lost)
    and says so; the same temperature again recomputes nothing."""
    from fastmt.losses import teacher_lse

    n, t, c = 7, 3, 11
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(t, 5, c, generator=g)).to(torch.bfloat16)
    idx = torch.tensor([6, 0, 3, 2, 5])
    cache = C.TeacherCache.open(tmp_path / "c", _lse_fp(), n, t, c, 0, 0, None, 1e9, temperature=2.0)
    cache.put(idx[:2], logits[:, :2], None)  # computed by the cache
    cache.put(idx[2:], logits[:, 2:], None, teacher_lse(logits[:, 2:], 2.0))  # given by the step
    got_l, got_h, got_lse = cache.get(idx, 4, torch.device("cpu"))
    assert got_h is None and torch.equal(got_l, logits)
    assert got_lse.dtype == torch.float32 and got_lse.shape == (2, t, 5)
    assert torch.equal(got_lse, teacher_lse(logits, 2.0))
    with caplog.at_level(logging.INFO, logger="fastmt"):
        warm = C.TeacherCache.open(tmp_path / "c", _lse_fp(), n, t, c, 0, 0, None, 1e9, temperature=0.5)
    assert "log-sum-exps recomputed for temperature 0.5 (stored at 2)" in caplog.text
    assert warm.count == 5 and json.loads((tmp_path / "c" / "manifest.json").read_text())["lse_temperature"] == 0.5
    _, _, lse = warm.get(idx, 4, torch.device("cpu"))
    torch.testing.assert_close(lse, teacher_lse(logits, 0.5), rtol=1e-6, atol=1e-6)
    assert torch.equal(lse[1], got_lse[1])  # the untempered row does not depend on the temperature
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastmt"):
        C.TeacherCache.open(tmp_path / "c", _lse_fp(), n, t, c, 0, 0, None, 1e9, temperature=0.5)
    assert "recomputed" not in caplog.text


def test_cache_of_an_older_format_is_rebuilt(tmp_path, caplog):
    """A cache from before the log-sum-exps were stored (format 1: no lse.bin) is rebuilt, said so."""
    n, t, c = 4, 2, 3
    C.TeacherCache.open(tmp_path / "c", _lse_fp(), n, t, c, 0, 0, None, 1e9).put(torch.tensor([0]), torch.randn(t, 1, c), None)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["format"] = 1
    del manifest["lse_temperature"]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "c" / "lse.bin").unlink()
    with caplog.at_level(logging.WARNING, logger="fastmt"):
        again = C.TeacherCache.open(tmp_path / "c", _lse_fp(), n, t, c, 0, 0, None, 1e9)
    assert "made for other inputs (the cache format differ): rebuilding it" in caplog.text
    assert again.count == 0 and (tmp_path / "c" / "lse.bin").stat().st_size == 4 * n * 2 * t


def test_fused_kl_reads_the_cached_log_sum_exps(teachers_dir, tiny_task, tmp_path, monkeypatch):
    """With the fused kernels and a cache, every KL call is given the teachers' log-sum-exps (cached
    or computed on a miss), equal to ``teacher_lse`` of the logits it gets at the run's temperature,
    and the losses equal a fused run without a cache; the reference losses are never given them."""
    import fastmt.kernels as K
    from fastmt import losses as R

    seen = []
    fused = K.mt_kl_loss

    @functools.wraps(fused)
    def recording(student_logits, teacher_logits, *a, teacher_lse=None, **kw):
        seen.append(None if teacher_lse is None else
                    (teacher_lse - R.teacher_lse(teacher_logits, kw["temperature"])).abs().max().item())
        return fused(student_logits, teacher_logits, *a, teacher_lse=teacher_lse, **kw)

    monkeypatch.setattr(K, "mt_kl_loss", recording)
    common = dict(teachers=str(teachers_dir), student_layers=1, hidden_loss="none", temperature=2.0, kernels="fused")
    distill(DistillArgs(**_args(tiny_task, tmp_path / "plain"), **common))
    assert seen and all(x is None for x in seen)  # no cache: nothing given
    seen.clear()
    distill(DistillArgs(**_args(tiny_task, tmp_path / "cached", cache_teachers=str(tmp_path / "cache")), **common))
    assert len(seen) == 16 and all(x is not None and x == 0 for x in seen)
    for a, b in zip(_losses(tmp_path / "plain"), _losses(tmp_path / "cached")):
        for key in ("loss", "loss_task", "loss_kd"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


def _cli_distill(tiny_task, teachers_dir, out, cache, *extra):
    return ["distill", "--teachers", teachers_dir, "--student-layers", "1", "--train", tiny_task["train"], "--dev",
            tiny_task["dev"], "--out", out, "--epochs", "2", "--batch-size", "32", "--max-length", "16", "--lr", "1e-3",
            "--precision", "fp32", "--hidden-loss", "cls", "--log-every", "1", "--no-progress", "--cache-teachers", cache,
            *extra]


def test_cache_changed_on_disk_is_found_and_recomputed(teachers_dir, tiny_task, tmp_path):
    """logits.bin overwritten in place with valid floats of the same size: the next run says so in one
    line naming the file, recomputes those examples from the teachers, and trains as without a cache."""
    from conftest import run_cli

    cache = tmp_path / "cache"
    r = run_cli(*_cli_distill(tiny_task, teachers_dir, tmp_path / "plain", "off"))
    assert r.returncode == 0, r.stderr
    r = run_cli(*_cli_distill(tiny_task, teachers_dir, tmp_path / "fill", cache))
    assert r.returncode == 0, r.stderr
    logits = np.fromfile(cache / "logits.bin", dtype=np.float32)
    (cache / "logits.bin").write_bytes((logits[::-1] * 3 + 1).astype(np.float32).tobytes())  # same size, wrong values
    r = run_cli(*_cli_distill(tiny_task, teachers_dir, tmp_path / "again", cache))
    assert r.returncode == 0, r.stderr
    warned = [x for x in r.stderr.splitlines() if "changed on disk after" in x]
    assert len(warned) == 1 and f"teacher cache {cache}: logits.bin changed on disk after it was stored" in warned[0]
    assert "256 example(s) found changed on disk and recomputed" in r.stderr
    for a, b in zip(_losses(tmp_path / "plain"), _losses(tmp_path / "again")):
        for key in ("loss", "loss_kd", "loss_hidden"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    r = run_cli(*_cli_distill(tiny_task, teachers_dir, tmp_path / "third", cache))  # repaired: no warning
    assert r.returncode == 0 and "changed on disk" not in r.stderr, r.stderr


def test_two_runs_filling_one_cache_at_once_leave_it_correct(teachers_dir, tiny_task, tmp_path):
    """Two processes start on an empty cache at the same time; afterwards every example is stored,
    matches its checksum, and a run on it trains as without a cache."""
    import subprocess
    import sys

    from conftest import REPO, run_cli

    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-m", "fastmt", *map(str, _cli_distill(tiny_task, teachers_dir, tmp_path / f"r{i}",
                                                                                       cache, "--seed", str(i)))],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert not any("changed on disk" in e for e in errs)
    assert np.fromfile(cache / "filled.bin", dtype=np.uint8).all()
    cached = C.TeacherCache(cache, json.loads((cache / "manifest.json").read_text()), None)
    assert cached.count == 256 and cached._verified(np.arange(256))  # every example's bytes match its checksums
    r = run_cli(*_cli_distill(tiny_task, teachers_dir, tmp_path / "plain", "off"))
    assert r.returncode == 0, r.stderr
    r = run_cli(*_cli_distill(tiny_task, teachers_dir, tmp_path / "reused", cache))
    assert r.returncode == 0 and "changed on disk" not in r.stderr and "(teachers skipped)" in r.stderr, r.stderr
    for a, b in zip(_losses(tmp_path / "plain"), _losses(tmp_path / "reused")):
        for key in ("loss", "loss_kd", "loss_hidden"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
