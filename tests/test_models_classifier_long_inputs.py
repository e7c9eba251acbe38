"""``--max-length`` past what a model has positions for: clamped with one line, never a crash."""

from __future__ import annotations

import json

from conftest import easy_rows, run_cli
from fastmt.tasks.demo import write_tsv


def test_max_length_past_the_position_table_is_clamped(tiny_task, tiny_encoders, tmp_path):
    """The tiny encoders have positions for 64 tokens; rows of 150+ tokens with --max-length 100000
    train, distil, evaluate and predict, each command saying once what it clamped to."""
    rows = easy_rows(60, 11)
    rows[3] = (" ".join(["the film was good"] * 40), "good")  # 160 words
    rows[40] = (" ".join(["the film was bad"] * 40), "bad")
    write_tsv(rows, tmp_path / "long.tsv")
    common = ["--train", tmp_path / "long.tsv", "--dev", tmp_path / "long.tsv", "--epochs", "1", "--max-length", "100000",
              "--no-progress", "--precision", "fp32"]
    r = run_cli("cofinetune", "--teacher", tiny_encoders["a"], "--teacher", tiny_encoders["b"], *common,
                "--out", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    line = "--max-length 100000: teacher " + str(tiny_encoders["a"]) + " has positions for 64 tokens; texts are truncated to 64"
    assert r.stderr.count("--max-length 100000") == 1 and line in r.stderr and "Traceback" not in r.stderr
    assert json.loads((tmp_path / "t" / "config.json").read_text())["run"]["max_length"] == 64  # what ran
    r = run_cli("distill", "--teachers", tmp_path / "t", "--student-layers", "1", *common, "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("--max-length 100000") == 1 and "has positions for 64 tokens" in r.stderr
    r = run_cli("eval", "--model", tmp_path / "s", "--data", tmp_path / "long.tsv")  # the run's (clamped) length
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    for model in ("s", "t"):
        r = run_cli("predict", "--model", tmp_path / model, "--data", tmp_path / "long.tsv", "--out", tmp_path / f"{model}.tsv",
                    "--max-length", "100000")
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("has positions for 64 tokens; texts are truncated to 64") == 1, r.stderr
