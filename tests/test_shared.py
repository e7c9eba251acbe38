"""The pipeline on real pre-trained encoders and real reviews (skipped where ../shared is absent)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import SHARED

pytestmark = pytest.mark.shared("models/minilm-l6-h384", "models/minilm-l3-h384", "data/rotten_tomatoes")


def _slice(src, dst, n):
    lines = src.read_text(encoding="utf-8").splitlines()
    dst.write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")


def test_two_minilm_teachers_on_reviews(tmp_path):
    from fastmt import train as T

    data = SHARED / "data" / "rotten_tomatoes"
    _slice(data / "train.tsv", tmp_path / "train.tsv", 160)
    _slice(data / "dev.tsv", tmp_path / "dev.tsv", 64)
    l6, l3 = str(SHARED / "models" / "minilm-l6-h384"), str(SHARED / "models" / "minilm-l3-h384")
    common = dict(train=str(tmp_path / "train.tsv"), dev=str(tmp_path / "dev.tsv"), epochs=1, batch_size=16,
                  max_length=48, progress=False, log_every=5)
    co = T.cofinetune([l6, l3], T.TrainArgs(out=str(tmp_path / "teachers"), lr=5e-5, **common))
    assert co.steps == 10
    st = T.distill(T.DistillArgs(out=str(tmp_path / "student"), teachers=str(tmp_path / "teachers"), student_layers=3,
                                 student_init="teacher:0", lr=1e-4, **common))
    hf = json.loads((tmp_path / "student" / "config.json").read_text())
    cfg = hf["fastmt"]
    assert cfg["layer_maps"] == [[2, 4, 6], [1, 2, 3]]
    assert hf["num_hidden_layers"] == 3 and hf["hidden_size"] == 384
    rows = [json.loads(x) for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["event"] == "train"]
    assert train_rows and all(math.isfinite(r["loss_hidden"]) and r["loss_hidden"] > 0 for r in train_rows)
    t = T.evaluate_dir(str(tmp_path / "teachers"), str(tmp_path / "dev.tsv"))
    s = T.evaluate_dir(str(tmp_path / "student"), str(tmp_path / "dev.tsv"))
    assert len(t["teachers"]) == 2 and t["n"] == 64 and s["n"] == 64
    assert s["accuracy"] == pytest.approx(st.best_dev_accuracy)


def test_reproduction_script_records_and_resumes(tmp_path):
    """benches/reproduce_rt.py on a 48-review slice: the JSON holds what ran, and a second call
    skips every finished run (it resumes from the results file)."""
    import subprocess
    import sys

    from conftest import REPO

    fake = tmp_path / "shared"
    (fake / "data" / "rotten_tomatoes").mkdir(parents=True)
    (fake / "models").symlink_to(SHARED / "models")
    data = SHARED / "data" / "rotten_tomatoes"
    _slice(data / "train.tsv", fake / "data" / "rotten_tomatoes" / "train.tsv", 48)
    _slice(data / "dev.tsv", fake / "data" / "rotten_tomatoes" / "dev.tsv", 32)
    results = tmp_path / "rt.json"
    cmd = [sys.executable, "benches/reproduce_rt.py", "--shared", str(fake), "--work", str(tmp_path / "work"),
           "--results", str(results), "--markdown", str(tmp_path / "rt.md"), "--png", str(tmp_path / "rt.png"),
           "--only", "cofinetuned_l3,kd_l3", "--seeds", "0,1", "--max-length", "16", "--precision", "fp32"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(results.read_text())
    assert {"machine", "git_sha", "commands", "rows"} <= set(out)
    rows = {row["variant"]: row for row in out["rows"]}
    # The co-finetuning run gives all three cofinetuned rows; kd_l3 ran once per seed.
    assert set(rows) == {"cofinetuned_l6", "cofinetuned_l3", "cofinetuned_ensemble", "kd_l3"}
    assert rows["kd_l3"]["seeds"] == [0, 1] and len(rows["kd_l3"]["dev_acc"]) == len(rows["kd_l3"]["train_s"]) == 2
    assert all(0 <= a <= 1 for row in rows.values() for a in row["dev_acc"])
    assert any("--teacher-subset 1" in c for c in out["commands"])
    assert (tmp_path / "rt.png").stat().st_size > 0 and "`kd_l3`" in (tmp_path / "rt.md").read_text()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "every run is in" in again.stdout
    assert json.loads(results.read_text()) == out
