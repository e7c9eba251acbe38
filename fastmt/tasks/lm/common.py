"""What both ``distill-lm`` steps (``fastmt.tasks.lm.step``'s on live teachers,
``fastmt.tasks.lm.cached``'s on stored ones) and the evaluation share: the tokenizer key, the models'
bodies, the chunked next-token cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastmt.data.packed import IGNORE

KEY = "lm"  # the one tokenizer every model shares
CE_ROWS = 1024  # token rows per chunk of the cross-entropy (its logits are recomputed in backward)


def backbone(model, ids, mask, hidden: bool, bodies: dict | None = None):
    """The model's body: last hidden states after the final norm, and every layer's when ``hidden``;
    through its compiled version where ``bodies`` (``compiled_bodies``) holds one."""
    body = bodies.get(id(model), model.base_model) if bodies else model.base_model
    return body(input_ids=ids, attention_mask=mask, output_hidden_states=hidden, use_cache=False)


def compiled_bodies(models: list) -> dict:
    """``--compile``: each model's body under ``torch.compile`` for the training steps, keyed by the
    model. The modules themselves stay as they are (their names, ``save_pretrained``, the evaluation's
    eager calls); blocks have one length, so a body compiles for the batch shape and, at most once
    more, for the last, shorter batch (shapes marked dynamic then)."""
    return {id(m): torch.compile(m.base_model) for m in models}


def chunked_ce(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, rows: int = CE_ROWS):
    """``(sum of -log q(next token), correct top-1 count, counted tokens)`` over ``h [N, D]`` with
    output matrix ``w [V, D]``: logits ``rows`` at a time, recomputed in backward (checkpointed), so no
    ``N x V`` tensor lives across the pass."""

    def part(hc, yc):
        z = (hc @ w.t()).float()
        return F.cross_entropy(z, yc, ignore_index=IGNORE, reduction="sum"), ((z.argmax(-1) == yc) & (yc != IGNORE)).sum()

    nll = h.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.int64, device=h.device)
    for r0 in range(0, h.shape[0], rows):
        hc, yc = h[r0: r0 + rows], targets[r0: r0 + rows]
        if torch.is_grad_enabled() and h.requires_grad:
            s, c = checkpoint(part, hc, yc, use_reentrant=False)
        else:
            s, c = part(hc, yc)
        nll = nll + s
        correct += c
    return nll, correct, (targets != IGNORE).sum()
