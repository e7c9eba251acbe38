"""``fastmt predict`` (and the loading behind ``fastmt eval``): a student or teachers dir applied to a file.

    fastmt predict --model runs/student --data new.tsv --out predictions.tsv

Each row of the output is one input row, in the input's order: its text (and pair text), the
predicted label's name, the probability of every label, and the gold label when the file has one.
``.tsv`` and ``.csv`` outputs have one ``p_<label>`` column per label; ``.jsonl``/``.json`` outputs one
JSON object per line with a ``probs`` mapping. A teachers dir predicts with its ensemble (the mean of
the teachers' logits, as ``eval`` scores it). The file is written whole or not at all.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fastmt.data.dataset import encode, read_dataset, tokenizer_key
from fastmt.engine.fileio import atomic_write_text
from fastmt.errors import UsageError
from fastmt.models.classifier import Student, Teachers, check_tokenizer_on, fit_max_length, tokenizer_source
from fastmt.models.inference import student_logits, teacher_logits
from fastmt.models.modeldir import STUDENT_KIND, TEACHERS_KIND, read_run_kind

OUT_EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json")


@dataclass
class LoadedModel:
    """A student (``kind == "student"``) or teachers dir ready to score texts."""

    kind: str
    model: torch.nn.Module
    tokenizers: list
    label_names: list[str]
    names: list[str]  # the teachers' names; [] for a student
    max_length: int
    device: torch.device

    def logits(self, ds, batch_size: int = 128, max_length: int | None = None, timings: list[float] | None = None) -> torch.Tensor:
        """``[n, C]`` for a student, ``[T, n, C]`` for teachers (float32, on the CPU)."""
        if batch_size < 1:
            raise UsageError(f"--batch-size {batch_size}: must be at least 1")
        encoders = list(self.model.encoders) if self.kind == "teachers" else [self.model.encoder]
        names = [f"teacher {n}" for n in self.names] if self.kind == "teachers" else ["the student"]
        max_length = fit_max_length(max_length or self.max_length, encoders, names)
        enc = {}
        for t in self.tokenizers:
            key = tokenizer_key(t)
            if key not in enc:
                check_tokenizer_on(t, ds.text_a[:64], tokenizer_source(t), "the data")
                enc[key] = encode(t, ds, max_length)
        widths = list(range(1, max_length + 1))  # sorted by length: each batch padded to its longest row
        if self.kind == "teachers":
            return teacher_logits(self.model, enc, len(ds), batch_size, widths, self.device, timings=timings)
        return student_logits(self.model, enc, len(ds), batch_size, widths, self.device)


def load_model(model_dir: str | Path, device: torch.device, flag: str = "--model") -> LoadedModel:
    kind = read_run_kind(model_dir, strict=True)
    if kind is None:
        if not Path(model_dir).is_dir():
            raise UsageError(f"{flag} {model_dir}: no such directory")
        raise UsageError(f"{flag} {model_dir}: no fastmt config.json (expected a dir written by cofinetune or distill)")
    if kind == TEACHERS_KIND:
        teachers, cfg = Teachers.load(model_dir, flag)
        loaded = LoadedModel("teachers", teachers, list(teachers.tokenizers), list(cfg["label_names"]),
                             list(teachers.names), 0, device)
    elif kind == STUDENT_KIND:
        student, cfg = Student.load(model_dir, flag)
        loaded = LoadedModel("student", student, [student.tokenizer], list(cfg["label_names"]), [], 0, device)
    else:
        raise UsageError(f"{flag} {model_dir}: unknown kind {kind!r} in config.json")
    loaded.max_length = int(cfg.get("run", {}).get("max_length", 128))
    loaded.model.to(device).eval()
    return loaded


def _check_out(out: str) -> str:
    ext = Path(out).suffix.lower()
    if ext not in OUT_EXTENSIONS:
        raise UsageError(f"--out {out}: unknown file type '{Path(out).suffix or '(none)'}'; use one of {', '.join(OUT_EXTENSIONS)}")
    if Path(out).is_dir():
        raise UsageError(f"--out {out}: is a directory; give a file name")
    return ext


def predict_file(model_dir: str, data: str, out: str, device: torch.device, batch_size: int = 128,
                 max_length: int | None = None, columns=None) -> dict:
    """Write predictions for every row of ``data`` into ``out``; returns a summary."""
    ext = _check_out(out)  # before loading anything: a wrong --out is found at once
    model = load_model(model_dir, device)
    ds = read_dataset(data, require_labels=False, columns=columns)
    logits = model.logits(ds, batch_size, max_length)
    if model.kind == "teachers":
        logits = logits.mean(0)
    probs = logits.double().softmax(-1)
    pred = probs.argmax(-1).tolist()
    names = model.label_names
    gold = list(ds.labels) if ds.labels else None
    rows = []
    for i in range(len(ds)):
        row = {"text": ds.text_a[i]}
        if ds.text_b is not None:
            row["text_pair"] = ds.text_b[i]
        row["label"] = names[pred[i]]
        row["probs"] = {n: float(p) for n, p in zip(names, probs[i].tolist())}
        if gold is not None:
            row["gold"] = gold[i]
        rows.append(row)
    if ext in (".jsonl", ".json"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        buf = io.StringIO()
        cols = ["text"] + (["text_pair"] if ds.text_b is not None else []) + ["label"] + [f"p_{n}" for n in names]
        cols += ["gold"] if gold is not None else []
        if ext == ".tsv":  # GLUE-style TSV: no quoting, so tabs and newlines inside a text become spaces
            clean = lambda v: " ".join(str(v).replace("\t", " ").splitlines())  # noqa: E731
            lines = ["\t".join(cols)]
            for r in rows:
                vals = [r["text"]] + ([r["text_pair"]] if "text_pair" in r else []) + [r["label"]]
                vals += [f"{r['probs'][n]:.6f}" for n in names] + ([r["gold"]] if gold is not None else [])
                lines.append("\t".join(clean(v) for v in vals))
            buf.write("\n".join(lines) + "\n")
        else:
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(cols)
            for r in rows:
                vals = [r["text"]] + ([r["text_pair"]] if "text_pair" in r else []) + [r["label"]]
                w.writerow(vals + [f"{r['probs'][n]:.6f}" for n in names] + ([r["gold"]] if gold is not None else []))
        text = buf.getvalue()
    atomic_write_text(out, text)
    counts = {n: pred.count(i) for i, n in enumerate(names)}
    return {"n": len(ds), "out": str(out), "counts": counts, "kind": model.kind}
