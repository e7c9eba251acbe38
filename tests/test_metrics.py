"""fastmt.metrics against hand-counted confusion matrices."""

from __future__ import annotations

import math

import pytest
import torch

from fastmt.metrics import confusion, mcc, per_class, report, scores


def _logits(pred, c):
    return torch.nn.functional.one_hot(torch.tensor(pred), c).float()


def test_binary_scores_by_hand():
    gold = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    pred = [1, 1, 1, 0, 0, 0, 0, 0, 1, 1]  # tp 3, fn 1, tn 4, fp 2
    m = confusion(torch.tensor(pred), torch.tensor(gold), 2)
    assert m.tolist() == [[4, 2], [1, 3]]
    s = scores(_logits(pred, 2), gold)
    assert s["accuracy"] == pytest.approx(0.7)
    f1_pos = 2 * 3 / (2 * 3 + 2 + 1)
    f1_neg = 2 * 4 / (2 * 4 + 1 + 2)
    assert s["f1"] == pytest.approx((f1_pos + f1_neg) / 2)
    assert s["mcc"] == pytest.approx((3 * 4 - 2 * 1) / math.sqrt((3 + 2) * (3 + 1) * (4 + 2) * (4 + 1)))


def test_multiclass_mcc_extremes_and_per_class():
    gold = [0, 1, 2, 0, 1, 2]
    assert mcc(confusion(torch.tensor(gold), torch.tensor(gold), 3)) == pytest.approx(1.0)
    assert mcc(confusion(torch.zeros(6, dtype=torch.long), torch.tensor(gold), 3)) == 0.0  # one class predicted: undefined -> 0
    rows = per_class(confusion(torch.tensor([0, 0, 2, 0, 1, 1]), torch.tensor(gold), 3))
    assert rows[0] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "support": 2}
    assert rows[2]["support"] == 2 and rows[2]["recall"] == 0.5 and rows[2]["precision"] == 1.0


def test_report_names_classes_and_skips_absent_ones_in_macro_f1():
    r = report(_logits([0, 0, 1, 1], 3), [0, 0, 1, 0], ["neg", "pos", "neutral"])
    assert list(r["per_class"]) == ["neg", "pos", "neutral"] and r["per_class"]["neutral"]["support"] == 0
    # "neutral" is neither gold nor predicted: macro-F1 over neg and pos only.
    assert r["f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert r["confusion"] == [[2, 1, 0], [0, 1, 0], [0, 0, 0]]
