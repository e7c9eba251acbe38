"""``fastmt.tasks.lm.evaluate``: the chunked scores equal those of the model's own full logits, and the
dev scores carry the names the loop picks the best epoch by."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastmt  # noqa: F401 - first: from the checkout root, `kernels` must be Hugging Face's (fastmt/__init__.py)
from fastmt.data.dataset import Encoded
from fastmt.tasks.lm.evaluate import dev_scores, lm_scores


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _blocks():
    g = torch.Generator().manual_seed(1)
    lengths = [8, 8, 8, 5]  # the last block shorter: padding must not count
    blocks = [torch.randint(3, 30, (n,), generator=g).tolist() for n in lengths]
    return Encoded(blocks, [[0] * len(b) for b in blocks], 0)


def test_lm_scores_equal_the_full_logits(model):
    enc = _blocks()
    nll, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for b in enc.input_ids:
            logits = model(torch.tensor([b])).logits[0, :-1].double()
            y = torch.tensor(b[1:])
            nll += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            count += len(b) - 1
    model.train()
    got = lm_scores(model, enc, 3, torch.device("cpu"))
    assert model.training  # put back as it was
    assert got["tokens"] == count == 7 * 3 + 4  # one fewer than each block
    assert got["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["accuracy"] == correct / count


def test_dev_scores_are_lm_scores_under_the_loops_names(model):
    enc = _blocks()
    s = lm_scores(model, enc, 2, torch.device("cpu"))
    d = dev_scores(model, enc, 2, torch.device("cpu"), "fp32")
    assert d == {"dev_accuracy": s["accuracy"], "dev_perplexity": s["perplexity"], "dev_nll": s["nll"]}
