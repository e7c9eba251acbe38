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
    assert "vs ref" in r.stdout


def test_bench_rejects_unknown_mode_and_preset():
    r = run_cli("bench", "--modes", "warp")
    assert r.returncode == 2 and "--modes warp" in r.stderr
    r = run_cli("bench", "--preset", "huge")
    assert r.returncode == 2 and "--preset huge" in r.stderr
