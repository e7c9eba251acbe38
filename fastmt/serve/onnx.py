"""``fastmt export --format onnx``: a student or each teacher as ``model.onnx`` for ONNX Runtime.

    fastmt export --model runs/student --format onnx [--out DIR]

The graph takes ``input_ids`` and ``attention_mask`` (and ``token_type_ids`` where the encoder reads
them), any batch size and length, and returns ``logits [batch, classes]``: the encoder, the pooling
(first token or mean over real tokens), a teacher's adapter and the head are all inside it, traced
from the same modules fastmt trains and evaluates. Each file is checked before it is put in place:
ONNX Runtime must reproduce fastmt's logits on ragged batches to 1e-4, else nothing is written.
The exporter and the runtime are optional: ``pip install "fastmt[onnx]"``.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from fastmt.engine.fileio import first_line
from fastmt.errors import UsageError
from fastmt.models.classifier import Student, Teachers, encode_hidden, pool
from fastmt.models.modeldir import STUDENT_KIND
from fastmt.serve.export import run_dir_kind

TOLERANCE = 1e-4  # float32 logits, ONNX Runtime vs PyTorch
SINGLE_FILE_BYTES = 1_800_000_000  # under protobuf's 2 GB limit: weights inside model.onnx, else beside it


@contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [g.level for g in loggers]
    for g in loggers:
        g.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for g, level in zip(loggers, levels):
            g.setLevel(level)


def require_onnx() -> None:
    """One line naming what is missing and the extra that installs it."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UsageError(f"--format onnx needs {', '.join(missing)}: pip install \"fastmt[onnx]\"")


class ServedClassifier(nn.Module):
    """Token ids to logits, as fastmt computes them: encoder, pooling, adapter, head."""

    def __init__(self, encoder: nn.Module, adapter: nn.Module, head: nn.Module, pooling: str):
        super().__init__()
        self.encoder, self.adapter, self.head, self.pooling = encoder, adapter, head, pooling
        self.reads_token_types = int(getattr(encoder.config, "type_vocab_size", 0) or 0) > 1

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] + (["token_type_ids"] if self.reads_token_types else [])

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        last, _ = encode_hidden(self.encoder, inputs, False)
        return self.head(self.adapter(pool(last, attention_mask, self.pooling)))


def sample_texts(tokenizer) -> list[list[str]]:
    """Ragged batches of the tokenizer's own words (3 rows of 1, 6 and 23 words; then one row)."""
    words = [w for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
             if w.isalpha() and w not in tokenizer.all_special_tokens][:64] or ["a"]
    take = lambda n, k: " ".join(words[(k + j) % len(words)] for j in range(n))  # noqa: E731
    return [[take(1, 0), take(6, 3), take(23, 7)], [take(4, 11)]]


def _feeds(model: ServedClassifier, tokenizer, texts: list[str]) -> dict:
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="np", return_token_type_ids=True)
    return {k: enc[k].astype("int64") for k in model.input_names}


def export_model(model: ServedClassifier, tokenizer, path: Path) -> float:
    """Write ``path`` (and ``path.data`` for weights over ~1.8 GB) once ONNX Runtime reproduces the
    model's logits on ragged batches; the largest difference seen."""
    import onnxruntime as ort  # optional dependency: fastmt[onnx]

    model = model.eval()
    names = model.input_names
    first = _feeds(model, tokenizer, sample_texts(tokenizer)[0])
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = tuple({0: batch, 1: length} for _ in names)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-partial-", dir=path.parent))
    try:
        staged = tmp / path.name
        try:
            with torch.no_grad(), warnings.catch_warnings(), _quiet("torch.onnx", "torch.export", "onnxscript", "onnx_ir"):
                warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations
                torch.onnx.export(model, tuple(torch.from_numpy(first[k]) for k in names), str(staged),
                                  input_names=names, output_names=["logits"], dynamic_shapes=shapes, dynamo=True,
                                  verbose=False, external_data=weights > SINGLE_FILE_BYTES)
        except Exception as e:  # the exporter's errors are long; the first line says what it met
            why = re.sub(r"\x1b\[[0-9;]*m", "", first_line(e))  # the exporter colours its messages
            raise UsageError(f"{path}: torch.onnx could not export this model ({why})") from e
        sess = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        worst = 0.0
        for texts in sample_texts(tokenizer):
            feeds = _feeds(model, tokenizer, texts)
            got = torch.from_numpy(sess.run(["logits"], feeds)[0])
            with torch.no_grad():
                want = model(*(torch.from_numpy(feeds[k]) for k in names))
            worst = max(worst, float((got - want).abs().max()))
        if not worst <= TOLERANCE:
            raise UsageError(f"{path}: ONNX Runtime's logits differ from fastmt's by {worst:.2e} (over {TOLERANCE:g}); "
                             "nothing written")
        for f in tmp.iterdir():
            os.replace(f, path.parent / f.name)
        return worst
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_onnx(model_dir: str, out: str | None = None) -> dict:
    """``model.onnx`` for a student dir, or ``teacher_i/model.onnx`` for each teacher of a teachers
    dir, beside the model (or under ``out``, with the tokenizer)."""
    require_onnx()
    src, kind = run_dir_kind(model_dir)
    dst = Path(out) if out else src
    jobs = []
    if kind == STUDENT_KIND:
        student, _ = Student.load(src, "--model")
        jobs.append((ServedClassifier(student.encoder, nn.Identity(), student.head, student.pooling),
                     student.tokenizer, dst))
    else:
        teachers, _ = Teachers.load(src, "--model")
        for i, enc in enumerate(teachers.encoders):
            jobs.append((ServedClassifier(enc, teachers.adapters[i], teachers.head, teachers.pooling),
                         teachers.tokenizers[i], dst / f"teacher_{i}"))
    written = []
    for model, tokenizer, where in jobs:
        worst = export_model(model, tokenizer, where / "model.onnx")
        if out:
            tokenizer.save_pretrained(where)
        written.append({"path": str(where / "model.onnx"), "max_abs_diff": worst})
    return {"kind": "student" if kind == STUDENT_KIND else "teachers", "out": str(dst), "files": written}
