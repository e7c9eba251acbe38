"""``fastmt bench-serve``: how fast the student serves next to its teachers, measured side by side.

    fastmt bench-serve --teachers runs/teachers --student runs/student --data dev.tsv [--json OUT]

Every model a distillation run leaves (the student, each teacher, the teachers' ensemble: every teacher
on the batch, logits averaged) is timed on the same batches of real rows from ``--data``, in PyTorch
(eager, float32, inference mode) and in ONNX Runtime (the graph ``fastmt export --format onnx``
writes, exported to a temporary dir when the run dir has none), at each ``--batch-sizes``. The
timings are interleaved: for each batch every (model, runtime) runs once, in turn, so a machine that
speeds up or slows down mid-run moves all of them alike. A batch is padded to its longest row, as a
server batches requests; tokenizing is done before the clock starts (it is the same for every model).
Reported per (model, runtime, batch size): p50 and p99 latency of one batch, rows per second over all
timed batches, and the student's speed-up (its rows/s over the model's).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastmt.data.dataset import read_dataset
from fastmt.engine.fileio import atomic_write_text
from fastmt.engine.machine import device_name
from fastmt.errors import UsageError
from fastmt.models.classifier import Student, Teachers
from fastmt.serve.onnx import ServedClassifier, export_model, require_onnx


@dataclass
class Row:
    model: str
    runtime: str
    batch_size: int
    times: list[float] = field(default_factory=list)
    rows: int = 0

    def summary(self) -> dict:
        t = np.asarray(self.times)
        return {"model": self.model, "runtime": self.runtime, "batch_size": self.batch_size, "batches": len(t),
                "p50_ms": float(np.percentile(t, 50) * 1e3), "p99_ms": float(np.percentile(t, 99) * 1e3),
                "rows_per_s": float(self.rows / t.sum())}


def _served(student, teachers):
    """(name, [(ServedClassifier, tokenizer)]) per model; an ensemble lists every teacher."""
    parts = [ServedClassifier(student.encoder, nn.Identity(), student.head, student.pooling).eval()]
    models = [("student", [(parts[0], student.tokenizer)])]
    each = []
    for i, enc in enumerate(teachers.encoders):
        m = ServedClassifier(enc, teachers.adapters[i], teachers.head, teachers.pooling).eval()
        each.append((m, teachers.tokenizers[i]))
        models.append((f"teacher {i} ({Path(teachers.names[i]).name})", [each[-1]]))
    if len(each) > 1:
        models.append((f"ensemble of {len(each)} teachers", each))
    return models


def _sessions(models, onnx_dirs: list[Path], threads: int):
    """An ONNX Runtime session per ServedClassifier (exported on first need), keyed by id."""
    import onnxruntime as ort  # optional dependency: fastmt[onnx]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Its threads would otherwise spin for a while after each run, on the cores PyTorch's next turn needs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions, where = {}, iter(onnx_dirs)
    for _, parts in models:
        for m, tok in parts:
            if id(m) not in sessions:
                path = next(where) / "model.onnx"
                if not path.is_file():
                    export_model(m, tok, path)
                sessions[id(m)] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sessions


def run_bench(student_dir: str, teachers_dir: str, data: str, batch_sizes=(1, 32), batches: int = 40,
              max_length: int | None = None, onnx: bool = True, warmup: int = 3, progress=None) -> dict:
    student, scfg = Student.load(student_dir, "--student")
    teachers, _ = Teachers.load(teachers_dir, "--teachers")
    max_length = max_length or int(scfg.get("run", {}).get("max_length", 128))
    texts = list(read_dataset(data).text_a)
    if not texts:
        raise UsageError(f"--data {data}: no rows")
    threads = torch.get_num_threads()
    models = _served(student, teachers)
    sessions = {}
    if onnx:
        require_onnx()
        dirs = [Path(student_dir)] + [Path(teachers_dir) / f"teacher_{i}" for i in range(len(teachers))]
        with tempfile.TemporaryDirectory(prefix="fastmt-serve-") as tmp:  # sessions hold the graphs in memory
            sessions = _sessions(models, [d if (d / "model.onnx").is_file() else Path(tmp) / d.name for d in dirs], threads)
    runtimes = ["pytorch"] + (["onnxruntime"] if onnx else [])
    rows: list[Row] = []
    for bs in batch_sizes:
        # Consecutive rows of the data, cycled: every model sees the same batches in the same order.
        starts = [(k * bs) % len(texts) for k in range(warmup + batches)]
        cells = {(name, rt): Row(name, rt, bs) for name, _ in models for rt in runtimes}
        for k, s in enumerate(starts):
            batch = [texts[(s + j) % len(texts)] for j in range(bs)]
            for name, parts in models:
                feeds = []
                for m, tok in parts:
                    enc = tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np",
                              return_token_type_ids=True)
                    feeds.append({n: enc[n].astype("int64") for n in m.input_names})
                for rt in runtimes:
                    t0 = time.perf_counter()
                    if rt == "pytorch":
                        with torch.inference_mode():
                            outs = [m(*(torch.from_numpy(f[n]) for n in m.input_names)) for (m, _), f in zip(parts, feeds)]
                            logits = torch.stack(outs).mean(0)
                    else:
                        outs = [sessions[id(m)].run(["logits"], f)[0] for (m, _), f in zip(parts, feeds)]
                        logits = np.mean(outs, axis=0)
                    dt = time.perf_counter() - t0
                    assert logits.shape[0] == bs
                    if k >= warmup:
                        cells[(name, rt)].times.append(dt)
                        cells[(name, rt)].rows += bs
            if progress:
                progress(bs, k + 1, len(starts))
        rows.extend(cells.values())
    table = [r.summary() for r in rows]
    by = {(r["runtime"], r["batch_size"]): r["rows_per_s"] for r in table if r["model"] == "student"}
    for r in table:
        r["student_speedup"] = by[(r["runtime"], r["batch_size"])] / r["rows_per_s"]
    lengths = [len(x) for x in student.tokenizer(texts[:2000], truncation=True, max_length=max_length)["input_ids"]]
    return {
        "machine": device_name(torch.device("cpu")), "torch": torch.__version__, "threads": threads, "data": str(data),
        "rows_in_data": len(texts), "max_length": max_length, "timed_batches": batches, "warmup_batches": warmup,
        "token_lengths": {"mean": float(np.mean(lengths)), "p50": float(np.percentile(lengths, 50)),
                          "max": int(max(lengths))},
        "onnxruntime": _ort_version() if onnx else None, "rows": table,
    }


def _ort_version() -> str:
    import onnxruntime  # optional dependency: fastmt[onnx]

    return onnxruntime.__version__


def format_table(res: dict) -> str:
    head = "| model | runtime | batch | p50 ms | p99 ms | rows/s | student speed-up |\n|---|---|---:|---:|---:|---:|---:|"
    lines = [head]
    for r in sorted(res["rows"], key=lambda r: (r["batch_size"], r["runtime"], r["model"] != "student", r["model"])):
        lines.append(f"| {r['model']} | {r['runtime']} | {r['batch_size']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['rows_per_s']:.1f} | {r['student_speedup']:.2f}x |")
    return "\n".join(lines)


def write_json(path: str, res: dict) -> None:
    atomic_write_text(Path(path), json.dumps(res, indent=1) + "\n")
