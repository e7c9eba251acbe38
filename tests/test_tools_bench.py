"""``fastmt bench`` runs its ladder and writes the JSON the project's results use."""

import json
import math

import pytest

from conftest import run_cli


def test_bench_tiny_writes_the_schema(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--preset", "tiny", "--steps", "2", "--modes", "reference,fast", "--json", out)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert {"device", "preset", "torch", "git_sha", "modes"} <= set(result) and result["preset"] == "tiny"
    names = [m["name"] for m in result["modes"]]
    assert names == ["reference", "fast"]
    for m in result["modes"]:
        assert {"name", "samples_per_s", "tokens_per_s", "step_ms_p50", "step_ms_p20", "step_ms_p80", "compile_s",
                "peak_mb", "mfu"} <= set(m)
        # MFU divides by a matmul peak measured after the timed steps: on a shared machine one of the
        # two can land in a slow spell, so only its sign and finiteness are checked here.
        assert 0 < m["mfu"] < float("inf")
        # Throughput is the batch over the median step, not over some other statistic.
        shape = result["preset_shape"]
        assert m["samples_per_s"] == pytest.approx(shape["batch"] / (m["step_ms_p50"] / 1e3), rel=1e-9)
        assert m["tokens_per_s"] == pytest.approx(m["samples_per_s"] * shape["seq"], rel=1e-9)
        assert math.isfinite(m["final_loss"]) and math.isfinite(m["first_loss"])
    assert result["modes"][1]["compile"] and result["modes"][1]["precision"] == "bf16"
    assert [m["hidden_products"] for m in result["modes"]] == ["torch", "torch"]  # the CPU ladder: reference losses
    assert "hidden GEMMs" in r.stdout
    assert result["complete"] is True
    assert "vs ref" in r.stdout


def test_cuda_ladder_has_every_rung():
    import torch

    from fastmt.tools.bench import modes_for

    ladder = modes_for(torch.device("cuda"))
    assert list(ladder)[:3] == ["reference", "eager-fp16", "fast"]  # what the targets compare, first
    fast = ladder["fast"]
    assert fast.kernels == "fused" and fast.compile and fast.graphs and fast.precision == "fp16" and fast.stack
    assert {"fused", "fused+compile", "fused+compile+graphs", "stacked", "fast-bf16"} <= set(ladder)


def test_bench_rejects_unknown_mode_and_preset():
    r = run_cli("bench", "--modes", "warp")
    assert r.returncode == 2 and "--modes warp" in r.stderr
    r = run_cli("bench", "--preset", "huge")
    assert r.returncode == 2 and "--preset huge" in r.stderr


def test_memory_without_cuda_says_so_in_one_line():
    r = run_cli("memory", "--preset", "tiny")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and "CUDA" in r.stdout


def test_memory_phases_walk_a_whole_step(monkeypatch, tmp_path):
    """The phase bookkeeping on the CPU, with a stand-in for the CUDA allocator's counters."""
    import torch

    from fastmt.tools import memory
    from fastmt.tools.bench import PRESETS

    counter = {"n": 0}

    def fake_peak():
        counter["n"] += 1
        return counter["n"] * 2**20

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: fake_peak())
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    step, opt, scaler, inputs, labels = memory._setup(PRESETS["tiny"], "reference", torch.device("cpu"), tmp_path)
    before = [p.detach().clone() for p in step.student.parameters()]
    peaks = memory._phased_step(step, opt, scaler, inputs, labels)
    assert list(peaks) == list(memory.PHASES) and list(peaks.values()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert any(not torch.equal(a, b) for a, b in zip(before, step.student.parameters()))  # the step ran


def test_bench_deals_steps_round_robin(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--preset", "tiny", "--steps", "5", "--rounds", "2", "--modes", "reference,stacked", "--json", out)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["rounds"] == 2 and result["complete"] is True
    assert [m["timed_steps"] for m in result["modes"]] == [5, 5]
    assert "round-robin in 2 rounds" in r.stdout
    r = run_cli("bench", "--rounds", "0")
    assert r.returncode == 2 and "--rounds 0" in r.stderr and "Traceback" not in r.stderr


def _linear(fixed_mb, per_row_mb, oom_above=None):
    """A stand-in for one training step's peak: linear in the batch, out of memory past a size."""
    calls = []

    def peak_of(batch):
        calls.append(batch)
        if oom_above is not None and batch > oom_above:
            return None
        return fixed_mb + per_row_mb * batch

    return peak_of, calls


def test_batch_search_aims_at_the_budget_in_a_few_steps():
    from fastmt.tools.memory import search_largest

    peak_of, calls = _linear(2000.0, 37.5)
    s = search_largest(peak_of, 64, budget_mb=60000, cap=8192)
    # 2000 + 37.5 b <= 60000  ->  b <= 1546.7; in multiples of 16: 1536 fits, 1552 does not.
    assert s["largest_batch"] == 1536 and s["first_failing_batch"] == 1552 and s["stopped"] == "resolved"
    assert len(calls) <= 4 and calls[:2] == [64, 128]
    assert [p["batch"] for p in s["probes"]] == calls and all(b % 16 == 0 for b in calls)


def test_batch_search_survives_curvature_and_out_of_memory():
    from fastmt.tools.memory import search_largest

    def peak_of(b):
        calls.append(b)
        return None if b > 2600 else 1000 + 10 * b + 0.004 * b * b

    for budget in (9000.0, 30000.0, 40000.0):
        calls = []
        truth = max(b for b in range(16, 8193, 16) if b <= 2600 and 1000 + 10 * b + 0.004 * b * b <= budget)
        s = search_largest(peak_of, 64, budget_mb=budget, cap=8192, max_probes=10)
        assert s["largest_batch"] == truth and s["stopped"] == "resolved", (budget, calls)
        assert len(calls) <= 10 and len(set(calls)) == len(calls)


def test_batch_search_stops_at_the_cap_the_probe_limit_and_the_clock():
    from fastmt.tools.memory import search_largest

    peak_of, calls = _linear(100.0, 1.0)
    s = search_largest(peak_of, 64, budget_mb=1e9, cap=1000)
    assert s["largest_batch"] == 992 and s["stopped"] == "at the cap" and max(calls) <= 1000 and len(calls) <= 4

    peak_of, calls = _linear(100.0, 100.0)  # even the first batch is over budget
    s = search_largest(peak_of, 64, budget_mb=1000, cap=8192)
    assert s["largest_batch"] == 0 and s["first_failing_batch"] == 16 and calls == [64, 32, 16]

    peak_of, calls = _linear(0.0, 1.0, oom_above=50_000)
    s = search_largest(peak_of, 64, budget_mb=1e9, cap=10**6, max_probes=3)
    assert calls == [64, 128, 4096] and s["stopped"] == "max probes" and s["largest_batch"] == 4096  # 32x at most

    now = [0.0]

    def slow_peak(b):  # a step takes b/100 seconds
        now[0] += b / 100
        return 1.0 * b

    s = search_largest(slow_peak, 64, budget_mb=1e9, cap=10**6, time_limit_s=5.0, clock=lambda: now[0])
    assert s["stopped"] == "time limit" and now[0] <= 5.0 and s["largest_batch"] > 0


def test_snapshot_is_shrunk_to_fit():
    import pickle

    from fastmt.tools.memory import compact_snapshot

    def frames(i):
        return [{"filename": "/very/long/path/to/site-packages/torch/nn/modules/" + "x" * 40 + ".py",
                 "line": j, "name": "forward_" + str(j % 7)} for j in range(40)]

    snap = {"segments": [{"blocks": [{"size": 512, "frames": frames(i)} for i in range(200)]}],
            "device_traces": [[{"action": "alloc", "size": 512, "frames": frames(i)} for i in range(2000)]]}
    whole = len(pickle.dumps(snap))
    data, depth = compact_snapshot(snap, max_bytes=whole // 20)
    assert data is not None and len(data) <= whole // 20
    back = pickle.loads(data)
    assert len(back["device_traces"][0]) == 2000 and back["device_traces"][0][0]["action"] == "alloc"
    assert depth is None or len(back["device_traces"][0][0]["frames"]) == depth
    assert compact_snapshot(snap, max_bytes=100) == (None, None)


def test_memory_report_is_printed_and_written_as_it_goes(monkeypatch, tmp_path, capsys):
    """The whole report on the CPU: a stand-in allocator whose step peak is 100 MB + 2 MB per row."""
    import torch

    from fastmt.tools import memory
    from fastmt.tools.bench import Preset

    rows = {"n": 0}
    real_batch = memory._batch

    def batch_spy(preset, step, batch, device, seed=0):
        rows["n"] = batch
        return real_batch(preset, step, batch, device, seed)

    monkeypatch.setattr(memory, "_batch", batch_spy)
    monkeypatch.setattr(memory, "MODES", {"reference": ("reference", "fp32"), "fast": ("reference", "bf16")})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: (100 + 2 * rows["n"]) * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda *a: {"segments": [], "device_traces": [[]]})
    out = tmp_path / "mem"
    micro = Preset(teachers=2, teacher_layers=1, hidden=32, heads=2, student_layers=1, seq=8, batch=16, vocab=500)
    report = memory.measure(micro, "micro", torch.device("cpu"), out, budget_mb=300, search_s=300, max_batch=512)
    text = capsys.readouterr().out
    for mode in ("reference", "fast"):
        r = report["modes"][mode]
        assert r["largest_batch"] == 96 and r["search"]["first_failing_batch"] == 112  # 100 + 2 b <= 300
        assert len(r["search"]["probes"]) <= 5 and list(r["phases_mb"]) == list(memory.PHASES)
    on_disk = json.loads((out / "memory.json").read_text())
    assert on_disk["complete"] and on_disk["modes"]["fast"]["largest_batch"] == 96
    assert (out / "memory.png").stat().st_size > 0 and (out / "snapshot-fast.pickle").exists()
    assert sorted(p.name for p in out.iterdir()) == ["memory.json", "memory.png", "snapshot-fast.pickle"]
    # Printed in the order it became known: a mode's phases, then its search, then the next mode.
    order = [text.index(s) for s in ("reference (", "reference: largest batch", "fast (", "fast: largest batch",
                                      "whole step (abs.)")]
    assert order == sorted(order)


def test_memory_flags_are_checked_in_one_line():
    r = run_cli("memory", "--search-s", "-1")
    assert r.returncode == 2 and "--search-s -1" in r.stderr and "Traceback" not in r.stderr


def test_a_failing_mode_costs_only_its_own_row(monkeypatch, tmp_path, capsys):
    import pytest

    from fastmt.tools import bench
    from fastmt.errors import FastmtError

    def fake_run_mode(p, mode, device, steps, warmup, workdir, profile=False):
        if mode.name == "stacked":
            raise RuntimeError("accessing tensor output of CUDAGraphs that has been overwritten")
        return {"name": mode.name, "samples_per_s": 10.0, "tokens_per_s": 320.0, "step_ms_p50": 100.0,
                "step_ms_p20": 90.0, "step_ms_p80": 110.0, "compile_s": 1.0, "peak_mb": None, "mfu": 0.1,
                "first_loss": 0.7, "final_loss": 0.6}

    monkeypatch.setattr(bench, "run_mode", fake_run_mode)
    out = tmp_path / "b.json"
    with pytest.raises(FastmtError, match="mode\\(s\\) stacked failed"):
        bench.run_bench("cpu", "tiny", json_out=str(out), steps=2, modes="reference,stacked,bf16", rounds=1)
    result = json.loads(out.read_text())
    assert [m["name"] for m in result["modes"]] == ["reference", "stacked", "bf16"]
    assert "CUDAGraphs" in result["modes"][1]["error"] and result["complete"]
    printed = capsys.readouterr().out
    assert "stacked" in printed and "FAILED" in printed and "0.7000 -> 0.6000" in printed


def test_bench_profile_splits_the_step_into_phases(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--preset", "tiny", "--steps", "2", "--modes", "reference", "--rounds", "1", "--profile",
                "--json", out)
    assert r.returncode == 0, r.stderr
    prof = json.loads(out.read_text())["modes"][0]["profile"]
    assert [p["phase"] for p in prof["phases"]] == ["teachers' forward", "student forward", "losses", "backward",
                                                      "optimizer"]
    assert all(p["ms"] > 0 for p in prof["phases"]) and prof["clock"] == "wall clock"
    assert abs(sum(p["ms"] for p in prof["phases"]) - prof["step_ms"]) < 1e-6 * prof["step_ms"]
    assert abs(sum(p["share"] for p in prof["phases"]) - 1) < 1e-9
    assert prof["top"] and any("mm" in t["name"] for t in prof["top"])  # a step is mostly matmuls
    assert "profile of 'reference'" in r.stdout and "backward" in r.stdout


def test_profiled_step_is_the_training_step(tmp_path):
    """The phase-by-phase step computes what the timed step computes: two of each from the same
    start and the same random numbers leave the same student weights (fp32 reference on the CPU)."""
    import torch

    from fastmt.tools import bench
    from fastmt.tools.profile import _Clock, profiled_step

    dev = torch.device("cpu")
    a = bench.PreparedMode(bench.PRESETS["tiny"], bench.Mode("reference"), dev, 1, tmp_path)
    b = bench.PreparedMode(bench.PRESETS["tiny"], bench.Mode("reference"), dev, 1, tmp_path)
    clock = _Clock(dev)
    for k in range(2):
        torch.manual_seed(k)  # the same dropout masks for both
        a.one_step()
        torch.manual_seed(k)
        assert len(profiled_step(b, clock)) == 5
    pa, pb = dict(a.step.student.named_parameters()), dict(b.step.student.named_parameters())
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # ... and they trained: the weights moved from a fresh model's.
    c = bench.PreparedMode(bench.PRESETS["tiny"], bench.Mode("reference"), dev, 1, tmp_path)
    assert any(not torch.equal(pa[k], v) for k, v in c.step.student.named_parameters())


def test_percentiles_are_the_median_and_the_20th_and_80th():
    from fastmt.tools.bench import percentiles

    # 11 evenly spaced samples in shuffled order: the quantiles are order statistics, exactly.
    times = [7.0, 2.0, 10.0, 0.0, 5.0, 9.0, 1.0, 4.0, 8.0, 3.0, 6.0]
    assert percentiles(times) == pytest.approx((5.0, 2.0, 8.0), abs=1e-12)
    # Between order statistics they interpolate linearly: 4 samples, p20 at rank 0.6, p80 at rank 2.4.
    assert percentiles([10.0, 20.0, 30.0, 40.0]) == pytest.approx((25.0, 16.0, 34.0), abs=1e-12)
    with pytest.raises(ValueError):
        percentiles([])
