"""Student and teacher dirs load in Hugging Face as they are, with fastmt's logits and label names."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_args, run_cli
from fastmt import train as T
from fastmt.data import read_dataset


_args = run_args


@pytest.fixture(scope="module")
def runs(tiny_task, tiny_encoders, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    a, b = str(tiny_encoders["a"]), str(tiny_encoders["b"])
    T.cofinetune([a, b], T.TrainArgs(**_args(tiny_task, d / "teachers")))  # shared size 32: b's head folds in
    T.cofinetune([b, a], T.TrainArgs(**_args(tiny_task, d / "wide")))  # shared size 48: a's head cannot
    T.distill(T.DistillArgs(**_args(tiny_task, d / "student"), teachers=str(d / "teachers"), student_layers=1))
    return d


def _texts(tiny_task, n=12):
    return read_dataset(tiny_task["dev"]).text_a[:n]


def _hf_logits(model_dir, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        return model(**enc).logits, model


def _fastmt_inputs(tokenizer, texts):
    enc = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt", return_token_type_ids=True)
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def test_student_dir_is_a_stock_classifier(runs, tiny_task):
    from transformers import pipeline

    from fastmt.models import Student

    texts = _texts(tiny_task)
    hf, model = _hf_logits(runs / "student", texts)
    student, cfg = Student.load(runs / "student")
    student.eval()
    with torch.no_grad():
        ours, _ = student(_fastmt_inputs(student.tokenizer, texts))
    assert torch.allclose(hf, ours, atol=1e-5), (hf - ours).abs().max()
    assert model.config.id2label == {0: "bad", 1: "good"} and model.config.label2id == {"bad": 0, "good": 1}
    assert type(model).__name__ == "BertForSequenceClassification"
    clf = pipeline("text-classification", model=str(runs / "student"))
    out = clf(texts[:4])
    probs = ours[:4].softmax(-1)
    for row, p in zip(out, probs):
        i = int(p.argmax())
        assert row["label"] == ["bad", "good"][i] and row["score"] == pytest.approx(float(p[i]), abs=1e-5)
    # fastmt's own settings ride along in config.json, ignored by transformers.
    assert json.loads((runs / "student" / "config.json").read_text())["fastmt"]["kind"] == "fastmt-student"


def test_each_teacher_dir_carries_the_shared_head(runs, tiny_task):
    from fastmt.models import Teachers

    texts = _texts(tiny_task)
    teachers, cfg = Teachers.load(runs / "teachers")
    teachers.eval()
    assert [t["stock_head"] for t in cfg["teachers"]] == [True, True]
    for i in range(len(teachers)):
        hf, model = _hf_logits(runs / "teachers" / f"teacher_{i}", texts)
        with torch.no_grad():
            ours, _ = teachers.forward_teacher(i, _fastmt_inputs(teachers.tokenizers[i], texts))
        # teacher 1 (hidden 48) reaches the shared head (32) through an adapter, folded into its pooler
        assert torch.allclose(hf, ours, atol=1e-5), (i, (hf - ours).abs().max())
        assert model.config.id2label == {0: "bad", 1: "good"}


def test_a_head_without_stock_form_is_refused_not_randomised(runs, tiny_task):
    from transformers import AutoModelForSequenceClassification

    from fastmt.models import Teachers

    cfg = json.loads((runs / "wide" / "config.json").read_text())
    assert [t["stock_head"] for t in cfg["teachers"]] == [True, False]
    narrow = runs / "wide" / "teacher_1"
    assert not (narrow / "model.safetensors").exists() and "adapter" in (narrow / "README.md").read_text()
    with pytest.raises((ValueError, OSError), match="fastmt-head-outside-this-dir-load-with-fastmt"):
        AutoModelForSequenceClassification.from_pretrained(str(narrow))
    # fastmt still loads it, with its head: the ensemble scores exactly what training logged for it.
    teachers, _ = Teachers.load(runs / "wide")
    logits = T.teacher_logits(teachers, _enc(teachers, tiny_task), 96, 128, [16], torch.device("cpu"))
    labels = [["bad", "good"].index(x) for x in read_dataset(tiny_task["dev"]).labels]
    done = [json.loads(x) for x in (runs / "wide" / "metrics.jsonl").read_text().splitlines()][-1]
    assert T.accuracy(logits.mean(0), labels) == pytest.approx(done["best_dev_accuracy"], abs=1e-6)


def _enc(teachers, tiny_task):
    from fastmt.data import encode, tokenizer_key

    ds = read_dataset(tiny_task["dev"])
    return {tokenizer_key(t): encode(t, ds, 16) for t in teachers.tokenizers}


def test_older_student_dirs_load_and_export(runs, tiny_task, tmp_path):
    """A student dir in the earlier layout (fastmt config at the top, one model.safetensors with
    encoder.*/head.*/proj_*) still loads in fastmt, and `fastmt export` makes it loadable by HF."""
    from fastmt.io import save_tensors, write_json
    from fastmt.models import STUDENT_KIND, Student, encoder_config_dict

    student, cfg = Student.load(runs / "student")
    old = tmp_path / "old"
    old.mkdir()
    student.tokenizer.save_pretrained(old)
    save_tensors(old / "model.safetensors", student.state_dict())
    write_json(old / "config.json", {"kind": STUDENT_KIND, "encoder": encoder_config_dict(student.encoder),
                                     "num_labels": 2, "num_teachers": 2, "teacher_hidden": 32,
                                     "label_names": ["bad", "good"], "run": cfg["run"], "layer_maps": cfg["layer_maps"]})
    (old / "metrics.jsonl").write_text('{"event": "done"}\n')
    texts = _texts(tiny_task)
    again, _ = Student.load(old)
    again.eval()
    student.eval()
    with torch.no_grad():
        want, _ = student(_fastmt_inputs(student.tokenizer, texts))
        got, _ = again(_fastmt_inputs(again.tokenizer, texts))
    assert torch.equal(want, got)
    r = run_cli("export", "--model", old, "--out", tmp_path / "new")
    assert r.returncode == 0, r.stderr
    hf, _ = _hf_logits(tmp_path / "new", texts)
    assert torch.allclose(hf, want, atol=1e-5)
    assert (tmp_path / "new" / "metrics.jsonl").read_text() == '{"event": "done"}\n'
    assert json.loads((tmp_path / "new" / "config.json").read_text())["fastmt"]["layer_maps"] == cfg["layer_maps"]
    r = run_cli("export", "--model", old)  # in place
    assert r.returncode == 0, r.stderr
    assert torch.allclose(_hf_logits(old, texts)[0], want, atol=1e-5)


def test_a_student_dir_starts_another_student(runs, tiny_task, tmp_path):
    res = T.distill(T.DistillArgs(**_args(tiny_task, tmp_path / "next"), teachers=str(runs / "teachers"),
                                  student_layers=1, student_init=str(runs / "student")))
    assert res.steps > 0
