"""The pipeline on real pre-trained encoders and real reviews (skipped where ../shared is absent)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import SHARED

pytestmark = pytest.mark.skipif(not (SHARED / "models" / "minilm-l6-h384").is_dir(), reason="../shared is not here")


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
    cfg = json.loads((tmp_path / "student" / "config.json").read_text())
    assert cfg["layer_maps"] == [[2, 4, 6], [1, 2, 3]]
    assert cfg["encoder"]["num_hidden_layers"] == 3 and cfg["encoder"]["hidden_size"] == 384
    rows = [json.loads(x) for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["event"] == "train"]
    assert train_rows and all(math.isfinite(r["loss_hidden"]) and r["loss_hidden"] > 0 for r in train_rows)
    t = T.evaluate_dir(str(tmp_path / "teachers"), str(tmp_path / "dev.tsv"))
    s = T.evaluate_dir(str(tmp_path / "student"), str(tmp_path / "dev.tsv"))
    assert len(t["teachers"]) == 2 and t["n"] == 64 and s["n"] == 64
    assert s["accuracy"] == pytest.approx(st.best_dev_accuracy)
