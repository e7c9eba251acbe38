"""End to end through the real command line: cofinetune -> distill -> eval, and errors as one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import run_cli

# fp32 pinned: these tests are about the CLI and its run dirs, and eval (fp32) must reproduce the logged
# accuracy; `--precision auto` would pick bf16 on a CPU with AVX-512 BF16 and fp32 elsewhere.
COMMON = ["--epochs", "3", "--batch-size", "16", "--max-length", "16", "--no-progress", "--seed", "0", "--precision", "fp32"]


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
    scfg = json.loads((pipeline / "student" / "config.json").read_text())["fastmt"]
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
    from fastmt.data.dataset import encode, read_dataset
    from fastmt.models.classifier import Student

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
        (["distill", "--teachers", "t", "--student-layers", "1", "--train", "x", "--dev", "x", "--out", "o",
          "--weighting", "papper"], "--weighting"),
        (["distill", "--teachers", "t", "--student-layers", "1", "--train", "x", "--dev", "x", "--out", "o",
          "--hidden-loss", "token"], "--hidden-loss"),
        (["eval", "--model", "m", "--data", "x", "--device", "gpu"], "--device"),
        (["cofinetune", "--teacher", "a", "--train", "t", "--dev", "d", "--out", "o", "--metric", "auc"], "--metric"),
        (["predict", "--model", "nowhere", "--data", "x", "--out", "p.tsv"], "--model nowhere"),
        (["predict", "--model", "m", "--data", "x", "--out", "p.parquet"], "--out p.parquet"),
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


def test_help_shows_defaults_and_every_flag_says_what_it_does():
    import argparse

    from fastmt.cli import build_parser

    r = run_cli("--version")
    assert r.returncode == 0 and re.fullmatch(r"fastmt \d+\.\d+\.\d+\S*", r.stdout.strip()), r.stdout + r.stderr
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd, p in sub.choices.items():
        bare = [a.option_strings[0] for a in p._actions if a.option_strings and not a.help]
        assert not bare, f"{cmd}: flags without help: {bare}"
    for cmd in ("cofinetune", "distill"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0, r.stderr
        text = " ".join(r.stdout.split())
        assert "(default: 32)" in text and "(default: auto)" in text  # --batch-size, --device
        assert "{paper,softmax,uniform}" in text or cmd == "cofinetune"


def test_predict_writes_labels_and_probabilities(pipeline, tiny_task, tmp_path):
    rows = tiny_task["dev"].read_text().splitlines()
    unlabelled = tmp_path / "new.tsv"
    unlabelled.write_text("sentence\n" + "\n".join(r.split("\t")[0] for r in rows[1:11]) + "\n")
    r = run_cli("predict", "--model", pipeline / "student", "--data", unlabelled, "--out", tmp_path / "p.tsv")
    assert r.returncode == 0, r.stderr
    assert "10 predictions written" in r.stdout
    lines = (tmp_path / "p.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["text", "label", "p_bad", "p_good"]
    assert len(lines) == 11
    for ln in lines[1:]:
        text, label, pb, pg = ln.split("\t")
        assert label == ("good" if float(pg) > float(pb) else "bad")
        assert float(pb) + float(pg) == pytest.approx(1.0, abs=2e-6)
    # The same probabilities as the student's own forward (JSONL output, labelled input: gold kept).
    r = run_cli("predict", "--model", pipeline / "student", "--data", tiny_task["dev"], "--out", tmp_path / "p.jsonl")
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    from fastmt.data.dataset import read_dataset
    from fastmt.serve.predict import load_model

    model = load_model(pipeline / "student", torch.device("cpu"))
    ds = read_dataset(tiny_task["dev"])
    want = model.logits(ds).double().softmax(-1)
    assert len(got) == len(ds) == 96
    for i, row in enumerate(got):
        assert row["text"] == ds.text_a[i] and row["gold"] == ds.labels[i]
        assert [row["probs"]["bad"], row["probs"]["good"]] == pytest.approx(want[i].tolist(), abs=1e-6)
    acc = sum(r["label"] == r["gold"] for r in got) / len(got)
    done = _rows(pipeline / "student" / "metrics.jsonl")[-1]
    assert acc == pytest.approx(done["best_dev_accuracy"], abs=1e-9)
    # A teachers dir predicts with its ensemble.
    r = run_cli("predict", "--model", pipeline / "teachers", "--data", unlabelled, "--out", tmp_path / "t.csv")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "text,label,p_bad,p_good"


def test_eval_reports_f1_mcc_and_per_class(pipeline, tiny_task, tmp_path):
    r = run_cli("eval", "--model", pipeline / "student", "--data", tiny_task["dev"], "--json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert set(s["per_class"]) == {"bad", "good"} and sum(v["support"] for v in s["per_class"].values()) == 96
    assert -1 <= s["mcc"] <= 1 and 0 <= s["f1"] <= 1
    assert "macro-F1" in r.stdout and "MCC" in r.stdout and "precision" in r.stdout


def test_written_files_are_readable_by_others_and_metrics_are_stamped(pipeline):
    import os
    import stat

    for d in ("teachers", "student"):
        for f in (pipeline / d).rglob("*"):
            mode = stat.S_IMODE(os.stat(f).st_mode)
            want = 0o755 if f.is_dir() else 0o644
            assert mode & want == want & ~0o022, f"{f}: {oct(mode)}"
    rows = _rows(pipeline / "student" / "metrics.jsonl")
    from datetime import datetime

    stamps = [datetime.fromisoformat(r["time"]) for r in rows]
    assert all(s.tzinfo is not None for s in stamps) and stamps == sorted(stamps)


def test_report_to_tensorboard_gets_the_same_scalars(pipeline, tiny_task, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "s"
    r = run_cli("distill", "--teachers", pipeline / "teachers", "--student-layers", "1", "--train", tiny_task["train"],
                "--dev", tiny_task["dev"], "--out", out, "--epochs", "2", "--batch-size", "16", "--max-length", "16",
                "--no-progress", "--log-every", "4", "--report-to", "tensorboard", "--metric", "f1", "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert "best dev f1" in r.stdout
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    rows = _rows(out / "metrics.jsonl")
    train = [x for x in rows if x["event"] == "train"]
    logged = acc.Scalars("train/loss")
    assert [e.step for e in logged] == [x["step"] for x in train] and len(train) >= 4
    assert [e.value for e in logged] == pytest.approx([x["loss"] for x in train], rel=1e-6)
    evals = [x for x in rows if x["event"] == "eval"]
    assert [e.value for e in acc.Scalars("eval/dev_f1")] == pytest.approx([x["dev_f1"] for x in evals], rel=1e-6)
    done = rows[-1]
    assert done["metric"] == "f1" and done["best_dev_score"] == max(x["dev_f1"] for x in evals)


def test_config_replays_a_run_and_flags_override_it(pipeline, tiny_task, tmp_path):
    old = json.loads((pipeline / "student" / "config.json").read_text())["fastmt"]["run"]
    r = run_cli("distill", "--config", pipeline / "student", "--out", tmp_path / "again", "--epochs", "1")
    assert r.returncode == 0, r.stderr
    new = json.loads((tmp_path / "again" / "config.json").read_text())["fastmt"]["run"]
    differ = {k for k in set(old) | set(new) if old.get(k) != new.get(k)}
    assert differ <= {"out", "epochs", "progress", "student_init_info"}, differ
    assert new["epochs"] == 1 and new["temperature"] == 2.0 and new["lr"] == 2e-3
    r = run_cli("cofinetune", "--config", pipeline / "student", "--out", tmp_path / "x")
    assert r.returncode == 2 and "not a cofinetune run (it is a distill run)" in r.stderr


def test_device_auto_is_cuda_only_where_there_is_a_gpu(monkeypatch):
    from fastmt.config.settings import TrainArgs, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TrainArgs(train="t", dev="d", out="o", device="auto").device == "cpu"
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TrainArgs(train="t", dev="d", out="o", device="auto").device == "cuda"


def test_cli_student_loads_in_a_transformers_pipeline(pipeline, tiny_task):
    from transformers import pipeline as hf_pipeline

    clf = hf_pipeline("text-classification", model=str(pipeline / "student"))
    texts = tiny_task["dev"].read_text().splitlines()[1:21]
    out = clf([t.split("\t")[0] for t in texts])
    gold = [t.split("\t")[1] for t in texts]
    assert {o["label"] for o in out} <= {"bad", "good"}
    assert sum(o["label"] == g for o, g in zip(out, gold)) >= 14  # the student is well above chance here
