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
    from fastmt.config.settings import DistillArgs, TrainArgs
    from fastmt.tasks.classification.cofinetune import cofinetune
    from fastmt.tasks.classification.distill import distill
    from fastmt.tasks.classification.evaluate import evaluate_dir

    data = SHARED / "data" / "rotten_tomatoes"
    _slice(data / "train.tsv", tmp_path / "train.tsv", 160)
    _slice(data / "dev.tsv", tmp_path / "dev.tsv", 64)
    l6, l3 = str(SHARED / "models" / "minilm-l6-h384"), str(SHARED / "models" / "minilm-l3-h384")
    common = dict(train=str(tmp_path / "train.tsv"), dev=str(tmp_path / "dev.tsv"), epochs=1, batch_size=16,
                  max_length=48, progress=False, log_every=5, precision="fp32")
    co = cofinetune([l6, l3], TrainArgs(out=str(tmp_path / "teachers"), lr=5e-5, **common))
    assert co.steps == 10
    st = distill(DistillArgs(out=str(tmp_path / "student"), teachers=str(tmp_path / "teachers"), student_layers=3,
                                 student_init="teacher:0", lr=1e-4, **common))
    hf = json.loads((tmp_path / "student" / "config.json").read_text())
    cfg = hf["fastmt"]
    assert cfg["layer_maps"] == [[2, 4, 6], [1, 2, 3]]
    # Sentence-transformers folders that mean-pool: the default pooling is mean, which no stock class
    # computes, so the student dir is in transformers' remote-code form with the encoder's config inside.
    assert cfg["pooling"] == "mean" and hf["model_type"] == "fastmt-classifier" and hf["pooling"] == "mean"
    assert hf["encoder"]["num_hidden_layers"] == 3 and hf["encoder"]["hidden_size"] == 384
    rows = [json.loads(x) for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["event"] == "train"]
    assert train_rows and all(math.isfinite(r["loss_hidden"]) and r["loss_hidden"] > 0 for r in train_rows)
    t = evaluate_dir(str(tmp_path / "teachers"), str(tmp_path / "dev.tsv"))
    s = evaluate_dir(str(tmp_path / "student"), str(tmp_path / "dev.tsv"))
    assert len(t["teachers"]) == 2 and t["n"] == 64 and s["n"] == 64
    assert s["accuracy"] == pytest.approx(st.best_dev_accuracy)


def test_reproduction_script_records_and_resumes(tmp_path):
    """benches/reproduce_rt.py on a slice of the reviews: the JSON holds what ran (teachers, each run
    with its dev predictions), the report has the table and the bootstrap, and a second call skips
    every finished run (it resumes from the results file)."""
    import subprocess
    import sys

    from conftest import REPO

    fake = tmp_path / "shared"
    (fake / "data" / "rotten_tomatoes").mkdir(parents=True)
    (fake / "models").symlink_to(SHARED / "models")
    data = SHARED / "data" / "rotten_tomatoes"
    _slice(data / "train.tsv", fake / "data" / "rotten_tomatoes" / "train.tsv", 64)
    _slice(data / "dev.tsv", fake / "data" / "rotten_tomatoes" / "dev.tsv", 32)
    results = tmp_path / "rt.json"
    cmd = [sys.executable, "benches/reproduce_rt.py", "--shared", str(fake), "--work", str(tmp_path / "work"),
           "--results", str(results), "--markdown", str(tmp_path / "rt.md"), "--png", str(tmp_path / "rt.png"),
           "--rows", "48", "--val-rows", "16", "--epochs", "1", "--variants", "kd_t2,mtbert", "--no-sweep",
           "--seeds", "1,2", "--max-length", "16", "--n-boot", "200"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(results.read_text())
    assert {"machine", "git_sha", "settings", "runs", "chosen"} <= set(out)
    runs = out["runs"]
    assert set(runs) == {"teachers", "kd_t2-s1", "kd_t2-s2", "mtbert-s1", "mtbert-s2"}
    assert len(runs["teachers"]["dev_correct"]) == 4  # three teachers and their ensemble
    for name, rec in runs.items():
        bits = rec["dev_correct"] if name == "teachers" else [rec["dev_correct"]]
        accs = rec["dev_acc"] if name == "teachers" else [rec["dev_acc"]]
        for b, acc in zip(bits, accs):
            assert len(b) == 32 and acc == b.count("1") / 32
    assert "--teacher-subset 2" in runs["kd_t2-s1"]["cmd"] and runs["mtbert-s2"]["seed"] == 2
    md = (tmp_path / "rt.md").read_text()
    assert "`kd_t2`" in md and "mtbert − kd_t" in md and (tmp_path / "rt.png").stat().st_size > 0
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "every run is in" in again.stdout
    assert "cofinetune" not in again.stdout and "] mtbert-s1:" not in again.stdout  # nothing ran again
    assert json.loads(results.read_text())["runs"] == out["runs"]
