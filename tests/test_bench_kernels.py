"""The kernel benchmark script keeps working (CPU interpreter smoke; its numbers say nothing of speed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))

import bench_kernels  # noqa: E402
import plot_kernels  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

FIELDS = {"op", "provider", "mode", "dtype", "shape", "ms_p50", "ms_p20", "ms_p80", "gbps", "peak_mb", "device",
          "torch", "triton", "git_sha"}


def test_bench_rows_and_plot(tmp_path):
    out = tmp_path / "kernels.jsonl"
    bench_kernels.main(["--device", "cpu", "--quick", "--providers", "fused,eager", "--modes", "fwd,full",
                        "--out", str(out)])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == (2 + 1) * 2 * 2  # (the KL at temperatures 1 and 2, the hidden loss) x providers x modes
    assert sorted(r["temperature"] for r in rows if r["op"] == "mt_kl_loss") == [1.0] * 4 + [2.0] * 4
    for r in rows:
        assert FIELDS <= set(r)
        assert r["ms_p50"] > 0 and r["gbps"] > 0
        # Bandwidth is the op's bytes over its median time.
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms_p50"] * 1e-3) / 1e9, rel=1e-9)
    assert {r["op"] for r in rows} == {"mt_kl_loss", "mt_hidden_loss"}
    assert len(plot_kernels.load(out)) == len(rows)  # one temperature's rows do not hide the other's
    png = plot_kernels.plot(plot_kernels.load(out), tmp_path / "k.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_bytes_moved_counts_each_tensor_once():
    case = bench_kernels.Case("mt_kl_loss", {"T": 3, "N": 10, "C": 7}, torch.bfloat16)
    assert bench_kernels.bytes_moved(case, "fwd") == 4 * 70 * 2  # logits in
    assert bench_kernels.bytes_moved(case, "full") == (4 * 70 + 70) * 2  # ... and the gradient out
    # The fused design reads the logits twice (forward, backward), keeping nothing N x C in between.
    assert bench_kernels.bytes_fused(case, "full") == (2 * 4 * 70 + 70) * 2
    hid = bench_kernels.Case("mt_hidden_loss", {"T": 3, "K": 4, "R": 8192, "Ds": 768, "Dt": 768}, torch.bfloat16)
    assert bench_kernels.flops(hid, "full") == 3 * 2 * 3 * 4 * 8192 * 768 * 768  # ~174 GFLOP


def test_fused_kl_interpreter_benchmark(benchmark):
    import fastmt.kernels as fused

    s = torch.randn(16, 101, requires_grad=True)
    t = torch.randn(3, 16, 101)
    labels = torch.randint(0, 101, (16,))

    def step():
        s.grad = None
        fused.mt_kl_loss(s, t, "paper", temperature=2.0, labels=labels).backward()
        return s.grad

    grad = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    assert torch.isfinite(grad).all()


def test_bad_temperature_is_one_line():
    with pytest.raises(SystemExit) as e:
        bench_kernels.main(["--device", "cpu", "--quick", "--temperature", "1,zero", "--out", ""])
    assert e.value.code == 2
