"""Classification scores from predictions: accuracy, macro-F1, Matthews correlation, per-class table.

All from one confusion matrix (rows: gold class, columns: predicted class). ``--metric`` picks which
of ``METRICS`` chooses the best epoch; ``fastmt eval`` reports them all.
"""

from __future__ import annotations

import math

import torch

from fastmt.choices import METRICS


def confusion(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``[C, C]`` int64 counts: ``m[g, p]`` examples of gold class ``g`` predicted as ``p``."""
    pred, gold = torch.as_tensor(pred).reshape(-1).long(), torch.as_tensor(gold).reshape(-1).long()
    return torch.bincount(gold * num_labels + pred, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def per_class(m: torch.Tensor) -> list[dict]:
    """Precision, recall, F1 and support of each class (0 where a ratio has no denominator)."""
    m = m.double()
    tp = m.diag()
    predicted, support = m.sum(0), m.sum(1)
    rows = []
    for c in range(m.shape[0]):
        p = float(tp[c] / predicted[c]) if predicted[c] else 0.0
        r = float(tp[c] / support[c]) if support[c] else 0.0
        rows.append({"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": int(support[c])})
    return rows


def mcc(m: torch.Tensor) -> float:
    """Matthews correlation coefficient, the multi-class form (Gorodkin 2004); 0 when undefined."""
    m = m.double()
    n = float(m.sum())
    if n == 0:
        return float("nan")
    correct = float(m.diag().sum())
    t, p = m.sum(1), m.sum(0)
    cov_yp = correct * n - float((t * p).sum())
    cov_yy = n * n - float((t * t).sum())
    cov_pp = n * n - float((p * p).sum())
    den = math.sqrt(cov_yy * cov_pp)
    return cov_yp / den if den else 0.0


def scores(logits: torch.Tensor, labels, num_labels: int | None = None) -> dict[str, float]:
    """``accuracy``, ``f1`` (macro over the classes present in gold or predictions) and ``mcc``."""
    labels = torch.as_tensor(labels).reshape(-1).long()
    if len(labels) == 0:
        return {k: float("nan") for k in METRICS}
    num_labels = num_labels or logits.shape[-1]
    m = confusion(logits.argmax(-1), labels, num_labels)
    seen = [c for c in range(num_labels) if m[c].sum() or m[:, c].sum()]
    table = per_class(m)
    return {"accuracy": float(m.diag().sum()) / len(labels),
            "f1": sum(table[c]["f1"] for c in seen) / len(seen),
            "mcc": mcc(m)}


def report(logits: torch.Tensor, labels, label_names: list[str]) -> dict:
    """Every score plus the per-class table (keyed by label name) and the confusion matrix."""
    out = scores(logits, labels, len(label_names))
    m = confusion(logits.argmax(-1), torch.as_tensor(labels), len(label_names))
    out["per_class"] = {name: row for name, row in zip(label_names, per_class(m))}
    out["confusion"] = m.tolist()
    return out
