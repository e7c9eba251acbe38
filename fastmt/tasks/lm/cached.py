"""``fastmt distill-lm --cache-teachers``: the teachers run once, their top-k next tokens are read back.

On the first pass over the training blocks each batch runs the teachers as usual, keeps per token and
teacher the ``--top-k`` most likely next tokens, their log-probabilities at the run's temperature, the
log of the mass outside them and the log-probability of the actual next token (``fastmt.cache.topk``),
and trains on exactly that. Every later step that meets a stored block (later epochs, a resumed run,
another run on the same teachers, text, tokenizer, block length, k, temperature and precision) reads
it back instead of running the teachers.

The distillation term is then ``fastmt.losses.lm_topk_kl_loss``: the KL on the stored ids plus one
tail bucket, the teachers weighted per token from the stored target log-probabilities (``paper``,
``softmax``) as the full loss weights them. It is never more than the full KL and equals it when the
stored ids cover what the teachers put mass on (``--top-k`` at the vocabulary size: exactly). The
student's logits exist a chunk of rows at a time: the forward KL through
``fastmt.kernels.lm_topk_linear_kl_loss`` (its gradients made in the same pass), the reverse KL through
the reference, recomputed in backward; no ``tokens x vocab`` tensor lives across the step.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from fastmt import losses
from fastmt.cache.store import cache_dir
from fastmt.errors import UsageError
from fastmt.cache.topk import TopKCache, lm_fingerprint, topk_from_logits
from fastmt.data.packed import IGNORE, next_tokens
from fastmt.engine.precision import autocast
from fastmt.kernels import lm_topk_linear_kl_loss
from fastmt.tasks.lm.common import KEY, backbone, chunked_ce, compiled_bodies

log = logging.getLogger("fastmt")

# Bytes the student's float32 logits (and the per-teacher views the top-k loss takes of them) may take
# in one chunk of rows.
TOPK_CHUNK_BYTES = 256 * 1024 * 1024


def fit_top_k(args, vocab: int) -> None:
    """``--top-k`` above the vocabulary stores every token (the exact KL): lowered to ``vocab``."""
    if args.top_k > vocab:
        log.info("--top-k %d: the vocabulary has %d tokens; storing all of them (the exact KL)", args.top_k, vocab)
        args.top_k = vocab


def open_cache(args, names: list[str], tokenizer_dir: str, input_ids: list, vocab: int) -> TopKCache:
    """The run's top-k cache: ``--cache-teachers DIR``, or ``auto`` (one dir per fingerprint under
    ``$FASTMT_CACHE``). The training text enters the key as its packed tokens (so any data source and
    any change of tokenizer or block length shows). ``--top-k`` is already at most ``vocab``
    (:func:`fit_top_k`, before the run's settings are kept and checked against a resumed run's)."""
    digest = hashlib.sha256()
    for block in input_ids:
        digest.update(np.asarray(block, dtype=np.int64).tobytes())
        digest.update(b"|")
    fp = lm_fingerprint(names, None, tokenizer_dir, args.max_length, args.top_k, args.temperature,
                        data_digest=digest.hexdigest())
    fp["precision"] = args.precision
    path = cache_dir(args.cache_teachers, fp)
    size = len(input_ids) * args.max_length * TopKCache.bytes_per_token(len(names), args.top_k)
    if size > args.cache_budget_gb * 1e9:
        raise UsageError(f"--cache-teachers: {len(input_ids)} blocks of {args.max_length} tokens, {len(names)} "
                         f"teachers, k = {args.top_k} take {size / 1e9:.2f} GB, more than --cache-budget-gb "
                         f"{args.cache_budget_gb:g}: lower --top-k or raise --cache-budget-gb")
    return TopKCache.open(path, fp, len(input_ids), len(names))


def topk_kd(h: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor,
            target: torch.Tensor, targets: torch.Tensor, weighting: str, temperature: float, direction: str,
            rows: int | None = None) -> torch.Tensor:
    """``lm_topk_kl_loss`` of the student's logits ``h @ w.T`` (``h [N, D]``, ``w [V, D]``) against the
    stored teachers (``ids``/``logprobs`` ``[T, N, k]``, ``tail``/``target`` ``[T, N]``), averaged over
    every counted row of ``targets [N]``, a chunk of ``rows`` at a time: the forward KL through
    ``fastmt.kernels.lm_topk_linear_kl_loss`` (gradients made in one pass), the reverse KL through the
    reference, each chunk recomputed in backward."""
    t, v = ids.shape[0], w.shape[0]
    if direction == "forward":
        # One pass a chunk, the gradient made in the forward (fastmt.kernels.lm_topk): no graph over V.
        return lm_topk_linear_kl_loss(h, w, ids, logprobs, targets, weighting, temperature, IGNORE,
                                      target_logprobs=target, tail_logprobs=tail,
                                      chunk_bytes=None if rows is None else 12 * v * rows)
    if rows is None:
        rows = max(16, TOPK_CHUNK_BYTES // (4 * v * (t + 2)))

    def part(hc, ic, lc, tc, gc, yc):
        z = hc @ w.t()
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z  # float64 stays (the checks)
        count = (yc != IGNORE).sum()
        loss = losses.lm_topk_kl_loss(z, ic, lc, yc, weighting, temperature, IGNORE, direction,
                                      target_logprobs=gc, tail_logprobs=tc)
        return loss * count

    total = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    for r0 in range(0, h.shape[0], rows):
        sl = slice(r0, r0 + rows)
        chunk = (h[sl], ids[:, sl], logprobs[:, sl], tail[:, sl], target[:, sl], targets[sl])
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(part, *chunk, use_reentrant=False)
        else:
            total = total + part(*chunk)
    return total / (targets != IGNORE).sum().clamp_min(1)


class CachedLMStep:
    """``step(inputs, labels, index) -> (loss, parts)``: the task loss and the distillation loss on the
    teachers' stored top-k (run and stored on a block's first visit). ``teacher_runs`` counts the
    batches the teachers ran for."""

    takes_index = True  # fastmt.engine.loop passes the blocks' positions (the cache's keys)

    def __init__(self, student, teachers: list, args, device: torch.device, cache: TopKCache):
        self.student, self.teachers, self.args, self.device, self.cache = student, teachers, args, device, cache
        self.teacher_runs = 0
        self.bodies = compiled_bodies([*teachers, student.model]) if args.compile else None

    @torch.no_grad()
    def _teachers(self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, index: torch.Tensor):
        """Run the teachers on the batch; store and return its top-k (``[B, T, L, k]``, ``[B, T, L]``)."""
        a = self.args
        with autocast(self.device, a.precision):
            states = [backbone(t, ids, mask, False, self.bodies).last_hidden_state for t in self.teachers]
        heads = [t.get_output_embeddings().weight.float() for t in self.teachers]
        blocks = []
        for b in range(ids.shape[0]):
            # One block's logits at a time, in float32: [T, L, V], never the batch's.
            logits = torch.stack([s[b].float() @ w.t() for s, w in zip(states, heads)])
            blocks.append(topk_from_logits(logits, targets[b], a.top_k, a.temperature))
        out = [torch.stack(x) for x in zip(*blocks)]
        self.cache.put(index.tolist(), *out)
        self.teacher_runs += 1
        return out

    def __call__(self, inputs, labels, index):
        x = inputs[KEY]
        ids, mask = x["input_ids"], x["attention_mask"]
        targets = next_tokens(ids, mask)  # [B, L]
        a = self.args
        got = self.cache.get(index.tolist(), self.device)
        if got is None:
            got = self._teachers(ids, mask, targets, index)
        top_ids, top_lp, tail, target = got
        n = targets.numel()
        # [B, T, L, ...] -> [T, B * L, ...]: the loss's teacher-major rows.
        flat = lambda z: z.transpose(0, 1).reshape(z.shape[1], n, *z.shape[3:])  # noqa: E731
        with autocast(self.device, a.precision):
            s_out = backbone(self.student.model, ids, mask, False, self.bodies)
            h = s_out.last_hidden_state.reshape(n, -1)
            w = self.student.model.get_output_embeddings().weight
            y = targets.reshape(-1)
            nll, _, count = chunked_ce(h, w, y)
            task = nll / count.clamp_min(1)
            kd = topk_kd(h, w, flat(top_ids), flat(top_lp), flat(tail), flat(target), y, a.weighting, a.temperature,
                         a.direction)
        loss = a.alpha_task * task + a.alpha_kd * kd
        return loss, {"task": task.detach(), "kd": kd.detach()}
