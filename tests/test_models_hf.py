"""Student and teacher dirs load in Hugging Face as they are, with fastmt's logits and label names."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_args, run_cli
from fastmt.config.settings import DistillArgs, TrainArgs
from fastmt.models.inference import teacher_logits
from fastmt.tasks.classification.cofinetune import cofinetune
from fastmt.tasks.classification.distill import distill
from fastmt.tasks.classification.evaluate import accuracy
from fastmt.data.dataset import read_dataset


_args = run_args


@pytest.fixture(scope="module")
def runs(tiny_task, tiny_encoders, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    a, b = str(tiny_encoders["a"]), str(tiny_encoders["b"])
    cofinetune([a, b], TrainArgs(**_args(tiny_task, d / "teachers")))  # shared size 32: b's head folds in
    cofinetune([b, a], TrainArgs(**_args(tiny_task, d / "wide")))  # shared size 48: a's head cannot
    distill(DistillArgs(**_args(tiny_task, d / "student"), teachers=str(d / "teachers"), student_layers=1))
    cofinetune([a, b], TrainArgs(**_args(tiny_task, d / "mean", pooling="mean")))  # no stock head reads a mean
    distill(DistillArgs(**_args(tiny_task, d / "mean-student"), teachers=str(d / "mean"), student_layers=1))
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

    from fastmt.models.classifier import Student

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
    from fastmt.models.classifier import Teachers

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


# Loads each dir as a user without fastmt would: ``import fastmt`` fails in this process, the hub is
# offline, and transformers' module cache is a fresh folder. Prints JSON: logits, pipeline rows, and
# what loading without trust_remote_code raised.
_NO_FASTMT = r"""
import json, sys
sys.modules["fastmt"] = None
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
dirs, texts = json.loads(sys.argv[1])
out = {}
for d in dirs:
    try:
        AutoModelForSequenceClassification.from_pretrained(d)
        refused = None
    except Exception as e:
        refused = f"{type(e).__name__}: {e}"
    model = AutoModelForSequenceClassification.from_pretrained(d, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        logits = model(**enc).logits
    rows = pipeline("text-classification", model=d, trust_remote_code=True)(texts)
    out[d] = {"logits": logits.tolist(), "rows": rows, "refused": refused, "class": type(model).__name__,
              "id2label": {str(k): v for k, v in model.config.id2label.items()}}
print("RESULT " + json.dumps(out))
"""


def _load_without_fastmt(dirs, texts, tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), TRANSFORMERS_VERBOSITY="error")
    r = subprocess.run([sys.executable, "-c", _NO_FASTMT, json.dumps([[str(d) for d in dirs], texts])],
                       capture_output=True, text=True, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.rsplit("RESULT ", 1)[1])  # after the prompt transformers prints when refusing


def _check_loaded(got, ours, stock=False):
    """Logits to 1e-5 (fp32), the pipeline's label and score from them, and the refusal without
    trust_remote_code, which names the flag (never a model with a random head); a stock dir loads
    either way, as a stock class."""
    hf = torch.tensor(got["logits"])
    assert torch.allclose(hf, ours, atol=1e-5), (hf - ours).abs().max()
    assert got["id2label"] == {"0": "bad", "1": "good"}
    assert got["class"] == ("BertForSequenceClassification" if stock else "FastmtForSequenceClassification")
    probs = ours.softmax(-1)
    for row, p in zip(got["rows"], probs):
        i = int(p.argmax())
        assert row["label"] == ["bad", "good"][i] and row["score"] == pytest.approx(float(p[i]), abs=1e-5)
    if stock:
        assert got["refused"] is None
    else:
        assert got["refused"] is not None and "trust_remote_code=True" in got["refused"], got["refused"]


def test_heads_without_stock_form_load_with_remote_code_and_no_fastmt(runs, tiny_task, tmp_path):
    """Mean pooling (teachers with and without an adapter, and their student), an adapter wider than its
    teacher: each dir loads with the Auto class and pipeline (trust_remote_code) in a process where
    fastmt cannot be imported, with fastmt's logits on a ragged batch and its label names; without
    trust_remote_code it is refused. The stock dirs (first-token pooling) load there too, without it."""
    from fastmt.models.hf import CODE_TYPE
    from fastmt.models.classifier import Student, Teachers

    texts = _texts(tiny_task, 6)
    wide, wcfg = Teachers.load(runs / "wide")
    mean, mcfg = Teachers.load(runs / "mean")
    student, _ = Student.load(runs / "mean-student")
    assert [t["stock_head"] for t in wcfg["teachers"]] == [True, False]
    assert [t["stock_head"] for t in mcfg["teachers"]] == [False, False]
    cls_teachers, _ = Teachers.load(runs / "teachers")
    cls_student, _ = Student.load(runs / "student")
    cases = [(runs / "wide" / "teacher_1", wide, 1), (runs / "mean" / "teacher_0", mean, 0),
             (runs / "mean" / "teacher_1", mean, 1), (runs / "mean-student", student, None),
             # first-token pooling: stock classes, a folded adapter for teacher 1 (also without fastmt)
             (runs / "teachers" / "teacher_0", cls_teachers, 0), (runs / "teachers" / "teacher_1", cls_teachers, 1),
             (runs / "student", cls_student, None)]
    got = _load_without_fastmt([d for d, _, _ in cases], texts, tmp_path)
    for d, model, i in cases:
        stock = json.loads((d / "config.json").read_text())["model_type"] != CODE_TYPE
        assert stock == (d.parent.name == "teachers" or d.name == "student")
        model.eval()
        with torch.no_grad():
            if i is None:
                ours, _ = model(_fastmt_inputs(model.tokenizer, texts))
            else:
                ours, _ = model.forward_teacher(i, _fastmt_inputs(model.tokenizers[i], texts))
        _check_loaded(got[str(d)], ours, stock)


def test_an_architecture_without_a_stock_head_loads_with_remote_code(tiny_encoders, tmp_path):
    """DistilBERT has no stock head fastmt's computes (its classifier reads pre_classifier + ReLU):
    written in the remote-code form, it loads without fastmt with fastmt's pooling and head."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    from fastmt.models.hf import CodeHead, load_seq_cls, save_seq_cls
    from fastmt.models.classifier import SharedHead, pool

    torch.manual_seed(3)
    tok = AutoTokenizer.from_pretrained(str(tiny_encoders["tokenizer"]))
    enc = DistilBertModel(DistilBertConfig(vocab_size=len(tok.get_vocab()), dim=24, n_layers=1, n_heads=2,
                                           hidden_dim=48, max_position_embeddings=64)).eval()
    head = SharedHead(24, 2).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    d = tmp_path / "distil"
    stock = save_seq_cls(d, enc, tok, None, None, ["bad", "good"], {"kind": "fastmt-teacher"},
                         head=CodeHead("mean", None, head.dense, head.classifier))
    assert not stock
    texts = ["good fine good good", "bad", "fine bad good"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = head(pool(enc(**batch).last_hidden_state, batch["attention_mask"], "mean"))
    _check_loaded(_load_without_fastmt([d], texts, tmp_path)[str(d)], ours)
    again, state = load_seq_cls(d)  # and fastmt reads the encoder back
    assert torch.equal(again.state_dict()["embeddings.word_embeddings.weight"], enc.embeddings.word_embeddings.weight)
    assert torch.equal(state["dense.weight"], head.dense.weight)


def test_dirs_in_the_older_encoder_only_form_still_load_and_export(runs, tiny_task, tmp_path):
    """The encoder-only form earlier versions wrote for heads without a stock form (encoder.safetensors,
    model type NOT_STOCK) is still read by fastmt, and `fastmt export` rewrites it in the remote-code form."""
    import shutil

    from fastmt.models.hf import CODE_TYPE, ENCODER_WEIGHTS, NOT_STOCK
    from fastmt.engine.fileio import save_tensors
    from fastmt.models.classifier import Teachers

    old = tmp_path / "old"
    shutil.copytree(runs / "wide", old)
    sub = old / "teacher_1"
    teachers, _ = Teachers.load(runs / "wide")
    raw = json.loads((sub / "config.json").read_text())
    enc_cfg = raw.pop("encoder")
    for k in ("auto_map", "architectures", "pooling", "adapter_in", "head_size", "head_dropout"):
        raw.pop(k, None)
    raw.update(enc_cfg)
    raw["fastmt"]["model_type"] = enc_cfg["model_type"]
    raw["model_type"] = NOT_STOCK
    (sub / "config.json").write_text(json.dumps(raw))
    (sub / "model.safetensors").unlink()
    (sub / "modeling_fastmt.py").unlink()
    save_tensors(sub / ENCODER_WEIGHTS, teachers.encoders[1].state_dict())
    texts = _texts(tiny_task)
    again, _ = Teachers.load(old)
    teachers.eval()
    again.eval()
    with torch.no_grad():
        want, _ = teachers.forward_teacher(1, _fastmt_inputs(teachers.tokenizers[1], texts))
        got, _ = again.forward_teacher(1, _fastmt_inputs(again.tokenizers[1], texts))
    assert torch.equal(want, got)
    r = run_cli("export", "--model", old)
    assert r.returncode == 0, r.stderr
    assert json.loads((sub / "config.json").read_text())["model_type"] == CODE_TYPE and not (sub / ENCODER_WEIGHTS).exists()


def test_fastmt_loads_a_remote_code_dir_with_its_head(runs, tiny_task):
    """fastmt reads the remote-code form itself (no code from the dir runs): the wide ensemble scores
    exactly what training logged for it."""
    from fastmt.models.classifier import Teachers

    teachers, _ = Teachers.load(runs / "wide")
    logits = teacher_logits(teachers, _enc(teachers, tiny_task), 96, 128, [16], torch.device("cpu"))
    labels = [["bad", "good"].index(x) for x in read_dataset(tiny_task["dev"]).labels]
    done = [json.loads(x) for x in (runs / "wide" / "metrics.jsonl").read_text().splitlines()][-1]
    assert accuracy(logits.mean(0), labels) == pytest.approx(done["best_dev_accuracy"], abs=1e-6)


def _enc(teachers, tiny_task):
    from fastmt.data.dataset import encode, tokenizer_key

    ds = read_dataset(tiny_task["dev"])
    return {tokenizer_key(t): encode(t, ds, 16) for t in teachers.tokenizers}


def test_older_student_dirs_load_and_export(runs, tiny_task, tmp_path):
    """A student dir in the earlier layout (fastmt config at the top, one model.safetensors with
    encoder.*/head.*/proj_*) still loads in fastmt, and `fastmt export` makes it loadable by HF."""
    from fastmt.engine.fileio import save_tensors, write_json
    from fastmt.models.classifier import STUDENT_KIND, Student, encoder_config_dict

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
    res = distill(DistillArgs(**_args(tiny_task, tmp_path / "next"), teachers=str(runs / "teachers"),
                                  student_layers=1, student_init=str(runs / "student")))
    assert res.steps > 0
