"""Causal LMs scored on packed text: perplexity, next-token accuracy and the mean negative
log-likelihood (the dev score of ``distill-lm``, and ``fastmt eval-lm``)."""

from __future__ import annotations

import math

import torch

from fastmt.config.settings import resolve_device
from fastmt.data.dataset import Encoded, iterate_batches, tokenizer_key
from fastmt.data.packed import next_tokens, pack, read_texts
from fastmt.engine.precision import autocast
from fastmt.errors import UsageError
from fastmt.models.causal_lm import load_lm, load_tokenizer
from fastmt.tasks.lm.common import KEY, backbone, chunked_ce


@torch.no_grad()
def lm_scores(model, enc: Encoded, batch_size: int, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Perplexity, next-token accuracy and the mean negative log-likelihood of ``model`` on the packed
    blocks ``enc``."""
    was = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    width = max(len(b) for b in enc.input_ids)
    for batch in iterate_batches({KEY: enc}, [0] * len(enc), batch_size, [width], False):
        x = batch.inputs[KEY]
        ids, mask = x["input_ids"].to(device), x["attention_mask"].to(device)
        with autocast(device, precision):
            out = backbone(model, ids, mask, False)
            h = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
            s, c, n = chunked_ce(h, model.get_output_embeddings().weight, next_tokens(ids, mask).reshape(-1))
        nll += s.double()
        correct += c
        count += n
    model.train(was)
    n = max(int(count), 1)
    mean = float(nll) / n
    return {"nll": mean, "perplexity": math.exp(min(mean, 700.0)), "accuracy": int(correct) / n, "tokens": int(count)}


def dev_scores(model, enc: Encoded, batch_size: int, device: torch.device, precision: str) -> dict[str, float]:
    """``lm_scores`` under the names the loop logs and picks the best epoch by (``dev_accuracy``)."""
    s = lm_scores(model, enc, batch_size, device, precision)
    return {"dev_accuracy": s["accuracy"], "dev_perplexity": s["perplexity"], "dev_nll": s["nll"]}


def eval_lm(models: list[str], data: str, max_length: int, batch_size: int, device_name: str,
            text_column: str | None = None) -> list[dict]:
    """Perplexity and next-token accuracy of each model on ``data`` (packed with the first model's
    tokenizer; every model must share it)."""
    device = resolve_device(device_name)
    tokenizer = load_tokenizer(models[0], "--model")
    enc = pack(tokenizer, read_texts(data, text_column), max_length)
    rows = []
    for path in models:
        if tokenizer_key(load_tokenizer(path, "--model")) != tokenizer_key(tokenizer):
            raise UsageError(f"--model {path}: its tokenizer differs from {models[0]}'s; the models must share one "
                             "to be compared on the same tokens")
        model = load_lm(path, "--model").to(device)
        rows.append({"model": str(path), **lm_scores(model, enc, batch_size, device)})
        del model
    return rows
