"""``fastmt export --format onnx``: ONNX Runtime gives fastmt's logits for a student and each teacher."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_args, run_cli
from fastmt.config.settings import DistillArgs, TrainArgs
from fastmt.tasks.classification.cofinetune import cofinetune
from fastmt.tasks.classification.distill import distill
from fastmt.data.dataset import read_dataset

ort = pytest.importorskip("onnxruntime", reason="the onnx extras are not installed (pip install \"fastmt[onnx]\")")
pytest.importorskip("onnxscript", reason="the onnx extras are not installed (pip install \"fastmt[onnx]\")")


@pytest.fixture(scope="module")
def runs(tiny_task, tiny_encoders, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    a, b = str(tiny_encoders["a"]), str(tiny_encoders["b"])
    # Mean pooling, and teacher b (48 wide) reaching the shared head (32) through an adapter.
    cofinetune([a, b], TrainArgs(**run_args(tiny_task, d / "teachers", pooling="mean", precision="fp32")))
    distill(DistillArgs(**run_args(tiny_task, d / "student", precision="fp32"), teachers=str(d / "teachers"),
                            student_layers=1))
    return d


def _ragged(tokenizer, texts, names):
    enc = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt", return_token_type_ids=True)
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}, {k: enc[k].numpy() for k in names}


def _run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(["logits"], feeds)[0]), [i.name for i in sess.get_inputs()]


def test_student_and_each_teacher_run_in_onnx_runtime_with_fastmts_logits(runs, tiny_task, tmp_path):
    """Dynamic batch and length, the attention mask, mean pooling, the adapter and the head inside the
    graph: ragged batches of real rows (one of 9 rows, one of 1) give fastmt's logits to 1e-4."""
    from fastmt.models.classifier import Student, Teachers

    r = run_cli("export", "--model", runs / "student", "--format", "onnx", "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    assert "written; ONNX Runtime gives fastmt's logits to" in r.stdout
    r = run_cli("export", "--model", runs / "teachers", "--format", "onnx")  # beside each teacher
    assert r.returncode == 0, r.stderr
    texts = read_dataset(tiny_task["dev"]).text_a
    student, _ = Student.load(runs / "student")
    teachers, _ = Teachers.load(runs / "teachers")
    student.eval()
    teachers.eval()
    for rows in (texts[:9], texts[20:21]):
        names = ["input_ids", "attention_mask", "token_type_ids"]
        inputs, feeds = _ragged(student.tokenizer, rows, names)
        assert inputs["attention_mask"].min() == 0 or len(rows) == 1  # ragged: padding in the batch
        with torch.no_grad():
            want, _ = student(inputs)
        got, inputs_seen = _run(tmp_path / "s" / "model.onnx", feeds)
        assert inputs_seen == names
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
        for i in range(len(teachers)):
            inputs, feeds = _ragged(teachers.tokenizers[i], rows, names)
            with torch.no_grad():
                want, _ = teachers.forward_teacher(i, inputs)
            got, _ = _run(runs / "teachers" / f"teacher_{i}" / "model.onnx", feeds)
            assert torch.allclose(got, want, atol=1e-4), (i, (got - want).abs().max())
    assert (tmp_path / "s" / "tokenizer.json").is_file()  # --out carries the tokenizer along


def test_missing_onnx_extras_are_one_line(runs, tmp_path):
    code = ("import sys; sys.modules['onnxruntime'] = None; from fastmt.cli import main; "
            f"sys.exit(main(['export', '--model', {str(runs / 'student')!r}, '--format', 'onnx', '--out', {str(tmp_path / 'x')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == 'fastmt: error: --format onnx needs onnxruntime: pip install "fastmt[onnx]"'
    assert not (tmp_path / "x").exists()


def test_a_model_onnx_runtime_does_not_reproduce_is_not_written(runs, tmp_path, monkeypatch):
    """The check guards the file: when ONNX Runtime's logits are off, nothing is left behind."""
    from fastmt.serve import onnx as X
    from fastmt.errors import UsageError
    from fastmt.models.classifier import Student

    class Off:  # a runtime whose logits are off by one
        def __init__(self, *a, **kw):
            self.real = real(*a, **kw)

        def run(self, *a, **kw):
            return [x + 1.0 for x in self.real.run(*a, **kw)]

    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", Off)
    student, _ = Student.load(runs / "student")
    served = X.ServedClassifier(student.encoder, torch.nn.Identity(), student.head, student.pooling)
    with pytest.raises(UsageError, match="differ from fastmt's by 1.00e\\+00 \\(over 0.0001\\); nothing written"):
        X.export_model(served, student.tokenizer, tmp_path / "m" / "model.onnx")
    assert list((tmp_path / "m").iterdir()) == []


def test_bench_serve_times_every_model_in_both_runtimes(runs, tiny_task, tmp_path):
    """Student, each teacher and the ensemble, PyTorch and ONNX Runtime, at each batch size: one row
    each with p50 <= p99, rows/s from the timed batches, and the student's speed-up against it."""
    import json

    r = run_cli("bench-serve", "--student", runs / "student", "--teachers", runs / "teachers", "--data", tiny_task["dev"],
                "--batch-sizes", "1,4", "--batches", "3", "--json", tmp_path / "serve.json", "--no-progress")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "serve.json").read_text())
    cells = {(x["model"], x["runtime"], x["batch_size"]) for x in res["rows"]}
    models = {"student", "teacher 0 (a)", "teacher 1 (b)", "ensemble of 2 teachers"}
    assert cells == {(m, rt, b) for m in models for rt in ("pytorch", "onnxruntime") for b in (1, 4)}
    for x in res["rows"]:
        assert x["batches"] == 3 and 0 < x["p50_ms"] <= x["p99_ms"] and x["rows_per_s"] > 0
        if x["model"] == "student":
            assert x["student_speedup"] == pytest.approx(1.0)
    assert "| student | pytorch | 1 |" in r.stdout and res["machine"] in r.stdout
    # The run dirs were not touched: the graphs were exported to a temporary dir.
    assert not (runs / "student" / "model.onnx").exists()
