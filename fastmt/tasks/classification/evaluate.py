"""``fastmt eval``: the scores of a student dir, or of each teacher and their ensemble in a teachers dir."""

from __future__ import annotations

import time

import torch

from fastmt.data.dataset import Columns, encode_labels, read_dataset
from fastmt.metrics import report as metric_report
from fastmt.serve.predict import load_model
from fastmt.config.settings import resolve_device


def accuracy(logits: torch.Tensor, labels: list[int] | torch.Tensor) -> float:
    labels = torch.as_tensor(labels)
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def evaluate_dir(model_dir: str, data: str, device_name: str = "cpu", batch_size: int = 128, max_length: int | None = None,
                 columns: Columns | None = None) -> dict:
    """Scores of a student dir, or of each teacher and their ensemble in a teachers dir: accuracy,
    macro-F1, MCC and a per-class table (``fastmt.metrics.report``)."""
    device = resolve_device(device_name)
    model = load_model(model_dir, device)
    ds = read_dataset(data, columns=columns)
    labels = encode_labels(ds, model.label_names)
    t0 = time.perf_counter()
    per_teacher: list[float] = []
    logits = model.logits(ds, batch_size, max_length, timings=per_teacher)
    dt = time.perf_counter() - t0
    if model.kind == "teachers":
        result = {
            "teachers": [
                {"name": model.names[i], "accuracy": accuracy(z, labels), "n": len(ds), "samples_per_s": len(ds) / max(per_teacher[i], 1e-9)}
                for i, z in enumerate(logits)
            ],
            "ensemble": {**metric_report(logits.mean(0), labels, model.label_names), "n": len(ds)},
        }
        result.update(result["ensemble"])
    else:
        result = {**metric_report(logits, labels, model.label_names), "n": len(ds)}
    result["samples_per_s"] = len(ds) / max(dt, 1e-9)
    result["kind"] = model.kind
    return result
