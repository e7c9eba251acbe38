"""``fastmt bench`` runs its ladder and writes the JSON the project's results use."""

import json

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
        assert m["step_ms_p20"] <= m["step_ms_p50"] <= m["step_ms_p80"] and 0 < m["mfu"] < 1
        assert m["final_loss"] == m["final_loss"]  # finite, not NaN
    assert result["modes"][1]["compile"] and result["modes"][1]["precision"] == "bf16"
    assert result["complete"] is True
    assert "vs ref" in r.stdout


def test_cuda_ladder_has_every_rung():
    import torch

    from fastmt.bench import modes_for

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

    from fastmt import memory
    from fastmt.bench import PRESETS

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
