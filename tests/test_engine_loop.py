"""fastmt.engine.loop on a toy task: the loop alone, no teachers, no student, no tokenizer.

The model reads token ids through an embedding bag and a linear layer; the label says whether token 1
occurs in the example, so a few epochs of AdamW learn it. What is checked is the loop's contract:
steps counted, the best epoch chosen by the hook's scores and saved once per improvement, the step
called with each batch's inputs, metrics rows written, and a finished run leaving no checkpoint.
"""

from __future__ import annotations

import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmt.config.settings import TrainArgs
from fastmt.data.dataset import Encoded
from fastmt.engine.loop import Hooks, TrainData, fit

KEY = "toy"


class BagOfTokens(nn.Module):
    def __init__(self, vocab: int = 8, classes: int = 2):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab, 16, mode="sum", padding_idx=0)
        self.head = nn.Linear(16, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def toy_data(n: int = 96, seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        row = torch.randint(2, 8, (length,), generator=g).tolist()
        if torch.rand(1, generator=g) < 0.5:
            row[int(torch.randint(0, length, (1,), generator=g))] = 1
        ids.append(row)
        labels.append(int(1 in row))
    enc = Encoded(input_ids=ids, token_type_ids=[[0] * len(r) for r in ids], pad_id=0)
    return TrainData({KEY: enc}, labels, buckets=[8])


def _args(tmp_path, **kw) -> TrainArgs:
    base = dict(train="unused.tsv", dev="unused.tsv", out=str(tmp_path / "run"), epochs=3,
                batch_size=16, lr=3e-2, seed=0, device="cpu", precision="fp32", compile=False, progress=False,
                log_every=2, warmup=0.0)
    base.update(kw)
    return TrainArgs(**base)


def test_fit_trains_counts_steps_and_keeps_the_best_epoch(tmp_path):
    torch.manual_seed(0)
    data, model = toy_data(), BagOfTokens()
    seen_shapes, saved = [], []
    scripted = iter([0.50, 0.75, 0.60])  # epoch 2 is the best: saved after epochs 1 and 2, not 3

    def step(inputs, labels):
        ids = inputs[KEY]["input_ids"]
        seen_shapes.append(tuple(ids.shape))
        loss = F.cross_entropy(model(ids), labels)
        return loss, {"task": loss.detach()}

    def evaluate():
        acc = next(scripted)
        return {"dev_accuracy": acc, f"dev_{args.metric}": acc}

    args = _args(tmp_path)
    first = F.cross_entropy(model(torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(r) for r in data.encodings[KEY].input_ids], batch_first=True)), torch.tensor(data.labels)).item()
    result = fit(model, step, data, args, torch.device("cpu"), tmp_path / "run", "toy",
                 Hooks(evaluate=evaluate, save_best=lambda: saved.append(len(seen_shapes))))

    steps_per_epoch = -(-len(data.labels) // args.batch_size)
    assert result.steps == len(seen_shapes) == 3 * steps_per_epoch
    assert all(b <= args.batch_size and length == 8 for b, length in seen_shapes)  # padded to the one bucket
    assert result.best_epoch == 2 and result.best_dev_accuracy == 0.75
    assert saved == [steps_per_epoch, 2 * steps_per_epoch]
    last = F.cross_entropy(model(torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(r) for r in data.encodings[KEY].input_ids], batch_first=True)), torch.tensor(data.labels)).item()
    assert last < 0.5 * first, (first, last)  # the optimizer steps the model the step reads

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [r["event"] for r in rows]
    assert events.count("eval") == 3 and events[-1] == "done"
    assert [r["step"] for r in rows if r["event"] == "train"] == list(range(2, result.steps + 1, 2))
    assert not (tmp_path / "run" / "checkpoint").exists()  # finished: nothing left to resume


def test_the_same_seed_gives_the_same_weights(tmp_path):
    def run(where):
        torch.manual_seed(0)
        model, data = BagOfTokens(), toy_data()

        def step(inputs, labels):
            loss = F.cross_entropy(model(inputs[KEY]["input_ids"]), labels)
            return loss, {"task": loss.detach()}

        fit(model, step, data, _args(where, epochs=2), torch.device("cpu"), where / "run", "toy",
            Hooks(evaluate=lambda: {"dev_accuracy": 0.5}, save_best=lambda: None))
        return [p.detach().clone() for p in model.parameters()]

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
