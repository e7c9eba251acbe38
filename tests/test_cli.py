"""End to end through the real command line: cofinetune -> distill -> eval, and errors as one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import run_cli

COMMON = ["--epochs", "3", "--batch-size", "16", "--max-length", "16", "--no-progress", "--seed", "0"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pipeline(tiny_task, tiny_encoders, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    r = run_cli("cofinetune", "--teacher", tiny_encoders["a"], "--teacher", tiny_encoders["b"],
                "--train", tiny_task["train"], "--dev", tiny_task["dev"], "--out", out / "teachers", "--lr", "2e-3", *COMMON)
    assert r.returncode == 0, r.stderr
    r = run_cli("distill", "--teachers", out / "teachers", "--student-layers", "1", "--student-init", "teacher:0",
                "--temperature", "2", "--train", tiny_task["train"], "--dev", tiny_task["dev"], "--out", out / "student",
                "--lr", "2e-3", *COMMON)
    assert r.returncode == 0, r.stderr
    return out


def test_run_dirs_hold_what_spec_says(pipeline):
    for d in ("teachers", "student"):
        for f in ("config.json", "metrics.jsonl", "model.safetensors"):
            assert (pipeline / d / f).is_file(), f"{d}/{f}"
    cfg = json.loads((pipeline / "teachers" / "config.json").read_text())
    assert cfg["label_names"] == ["bad", "good"]
    assert [t["num_layers"] for t in cfg["teachers"]] == [2, 3]
    assert cfg["run"]["lr"] == 2e-3 and cfg["run"]["epochs"] == 3
    for i in range(2):
        assert (pipeline / "teachers" / f"teacher_{i}" / "config.json").is_file()
    scfg = json.loads((pipeline / "student" / "config.json").read_text())
    assert scfg["layer_maps"] == [[2], [3]]
    assert scfg["run"]["temperature"] == 2.0 and scfg["run"]["weighting"] == "paper"
    rows = _rows(pipeline / "student" / "metrics.jsonl")
    events = [r["event"] for r in rows]
    assert events.count("eval") == 3 and events[-1] == "done"
    train_rows = [r for r in rows if r["event"] == "train"]
    assert train_rows and {"loss_task", "loss_kd", "loss_hidden"} <= set(train_rows[0])


def test_teachers_and_student_beat_chance(pipeline, tiny_task, tmp_path):
    r = run_cli("eval", "--model", pipeline / "teachers", "--data", tiny_task["dev"], "--json", tmp_path / "t.json")
    assert r.returncode == 0, r.stderr
    t = json.loads((tmp_path / "t.json").read_text())
    assert len(t["teachers"]) == 2 and t["ensemble"]["n"] == 96
    assert t["ensemble"]["accuracy"] > 0.8
    r = run_cli("eval", "--model", pipeline / "student", "--data", tiny_task["dev"], "--json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["n"] == 96 and s["accuracy"] > 0.8  # chance is 0.5
    # The saved model is the best epoch: eval reproduces the best dev accuracy logged during training.
    done = _rows(pipeline / "student" / "metrics.jsonl")[-1]
    assert s["accuracy"] == pytest.approx(done["best_dev_accuracy"], abs=1e-9)


def test_saved_student_reloads_to_identical_predictions(pipeline, tiny_task, tmp_path):
    from fastmt.data import encode, read_dataset
    from fastmt.models import Student

    a, cfg = Student.load(pipeline / "student")
    a.save(tmp_path / "copy", cfg["run"], cfg["label_names"])
    b, _ = Student.load(tmp_path / "copy")
    enc = encode(a.tokenizer, read_dataset(tiny_task["dev"]), 16)
    ids = torch.tensor([x + [0] * (16 - len(x)) for x in enc.input_ids])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        za, _ = a.eval()(batch)
        zb, _ = b.eval()(batch)
    assert torch.equal(za, zb)
    assert za.std() > 0


def test_malformed_row_is_one_line_with_file_and_line(tiny_task, tiny_encoders, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nthe film was good\tgood\nthe film was bad\tbad\textra\n")
    r = run_cli("cofinetune", "--teacher", tiny_encoders["a"], "--train", bad, "--dev", tiny_task["dev"],
                "--out", tmp_path / "o", *COMMON)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"{bad}:3:" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["distill", "--teachers", "nowhere", "--student-layers", "1", "--train", "x", "--dev", "x", "--out", "o"], "--teachers nowhere"),
        (["cofinetune", "--teacher", "a", "--train", "t", "--dev", "d", "--out", "o", "--bogus"], "--bogus"),
        (["eval", "--model", "nowhere", "--data", "x"], "--model nowhere"),
        (["cofinetune", "--teacher", "a", "--train", "t", "--dev", "d", "--out", "o", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_user_mistakes_are_one_line(args, needle, tmp_path):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_spec_flags_exist():
    spec = {
        "cofinetune": "--teacher --train --dev --out --epochs --batch-size --lr --max-length --seed --device --precision",
        "distill": "--teachers --student-layers --train --dev --out --student-init --temperature --weighting "
                   "--hidden-loss --kernels --compile --no-compile --cuda-graphs --no-cuda-graphs --epochs "
                   "--batch-size --lr --max-length --seed --device --precision",
        "eval": "--model --data --json",
        "check": "--device",
        "bench": "--device --preset --json",
        "memory": "--device --preset --out",
    }
    for cmd, flags in spec.items():
        r = run_cli(cmd, "--help")
        assert r.returncode == 0, r.stderr
        found = set(re.findall(r"--[a-z][a-z-]*", r.stdout))
        missing = set(flags.split()) - found
        assert not missing, f"{cmd}: {missing}"
