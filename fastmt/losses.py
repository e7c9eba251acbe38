"""Reference implementation of the MT-BERT distillation losses in plain PyTorch.

Every faster path (the fused kernels in ``fastmt.kernels``) is checked against these functions, so they
favour clarity over speed. With ``T`` teachers, ``N`` examples, ``C`` classes, temperature ``tau``:

Teacher weights, from the untempered cross-entropy ``CE_i[n] = -log softmax(t[i,n])[y_n]`` (no grad)::

    paper:    w[i,n] = 1 / (1 + CE_i[n])
    softmax:  w[:,n] = softmax_i(-CE_i[n])
    uniform:  w[i,n] = 1

Distillation loss (student logits ``s [N,C]``, teacher logits ``t [T,N,C]``)::

    L_kd = 1/N_valid * sum_n sum_i w[i,n] * tau^2 * KL(softmax(t[i,n]/tau) || softmax(s[n]/tau))

Hidden-state loss (``hs [K,N,S,Ds]``, ``ht [T,K,N,S,Dt]``, projections ``W [T,K,Ds,Dt]``, ``b [T,K,Dt]``,
``mask [N,S]``)::

    L_hid = sum_i sum_k sum_{n,s} mask[n,s] * w[i,n] * ||hs[k,n,s] @ W[i,k] + b[i,k] - ht[i,k,n,s]||^2
            / (sum_{n,s} mask[n,s] * Dt)

For causal language models (``lm_kl_loss``) a row is a token position and its label the next token;
``reverse`` swaps the KL's arguments: ``KL(softmax(s/tau) || softmax(t[i]/tau))``.

Rows whose label is ``ignore_index`` get weight 0 and are left out of ``N_valid``. Everything is computed
in float32 (float64 when an input is float64); gradients return in each input's own dtype and never
reach teacher tensors, masks or weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmt.choices import DIRECTIONS, SCHEMES

__all__ = ["SCHEMES", "DIRECTIONS", "teacher_weights", "mt_kl_loss", "lm_kl_loss", "mt_token_kl_loss", "check_vocab",
           "mt_hidden_loss",
           "layer_map", "check_kl_args", "check_hidden_args",
           "check_tensor", "check_shape", "check_labels", "check_scheme", "check_temperature", "compute_dtype"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------------
# Argument checks. Each raises ValueError naming the argument at fault; the public ones check the fused
# kernels' (``fastmt.kernels``) arguments too.


def _fmt(shape) -> str:
    return "[" + ",".join(str(n) for n in shape) + "]"


def check_tensor(x, name: str, ref: Tensor | None = None, ref_name: str = "", floating: bool = True) -> None:
    """Check that argument ``name`` is a tensor: of a floating dtype (float16, bfloat16, float32, float64)
    unless ``floating`` is False, and on the device of ``ref`` (argument ``ref_name``) when one is given."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if floating and x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64; got {x.dtype}")
    if ref is not None and x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def check_shape(x: Tensor, name: str, axes: tuple[str, ...], dims: dict[str, tuple[int, str]]) -> None:
    """Check ``x`` has one axis per name in ``axes``.

    Sizes of axes already in ``dims`` (name -> (size, argument it came from)) must agree; new ones are
    recorded, so a chain of calls checks every tensor against the first one that fixed each size.
    """
    ok = x.dim() == len(axes) and all(a not in dims or dims[a][0] == n for a, n in zip(axes, x.shape))
    if not ok:
        by_source: dict[str, list[str]] = {}
        for a in axes:
            if a in dims:
                by_source.setdefault(dims[a][1], []).append(f"{a}={dims[a][0]}")
        known = "; ".join(f"{', '.join(v)} matching {src}" for src, v in by_source.items())
        with_known = f" with {known}" if known else ""
        raise ValueError(f"{name} must have shape {_fmt(axes)}{with_known}; got {_fmt(x.shape)}")
    for a, n in zip(axes, x.shape):
        dims.setdefault(a, (n, name))


def check_labels(labels, n: int, ref: Tensor, ref_name: str) -> None:
    """Check that ``labels`` is an integer ``[N]`` tensor on ``ref``'s device, with ``N = n`` rows as in
    argument ``ref_name``. Their values are not read here (that would be a host sync)."""
    check_tensor(labels, "labels", ref, ref_name, floating=False)
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(f"labels must have an integer dtype; got {labels.dtype}")
    check_shape(labels, "labels", ("N",), {"N": (n, ref_name)})


def _labels_in_range(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    # Reads back to the host; skipped under torch.compile so a compiled step is not split in two.
    if torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; found {value}"
        )


def weights_from_ce(ce: Tensor, scheme: str) -> Tensor:
    """MT-BERT's per-example teacher weights from each teacher's cross-entropy on the gold label (or
    the next token) ``ce [T, N]``: ``paper`` ``1 / (1 + CE)``, ``softmax`` ``softmax_i(-CE)``."""
    return 1.0 / (1.0 + ce) if scheme == "paper" else torch.softmax(-ce, dim=0)


def check_scheme(scheme, name: str) -> str:
    """``scheme``, when it is one of the teacher-weighting schemes in ``SCHEMES``; anything else is a
    ValueError naming argument ``name`` and listing them."""
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, SCHEMES))}; got {scheme!r}")
    return scheme


def _teacher_logits(x, dims: dict[str, tuple[int, str]], ref: Tensor | None = None, ref_name: str = "") -> None:
    check_tensor(x, "teacher_logits", ref, ref_name)
    check_shape(x, "teacher_logits", ("T", "N", "C"), dims)
    if x.shape[0] < 1 or x.shape[2] < 1:
        raise ValueError(f"teacher_logits needs at least one teacher and one class; got {_fmt(x.shape)}")


def check_temperature(temperature) -> float:
    """The temperature as a float, when it is a finite positive number (else a ValueError)."""
    try:
        tau = float(temperature)
    except (TypeError, ValueError):
        tau = math.nan
    if not (tau > 0.0 and math.isfinite(tau)):
        raise ValueError(f"temperature must be a finite positive number; got {temperature!r}")
    return tau


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype the reference computes in for these inputs (None ones skipped): float64 when any is
    float64, else float32."""
    # Half-precision inputs are upcast so that the reference is the accurate side of any comparison.
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------------
# Argument checks shared with the fused kernels (``fastmt.kernels``): one set of rules for both.


def check_kl_args(student_logits, teacher_logits, weights, temperature, labels, ignore_index) -> tuple[float, Tensor | str | None]:
    """Validate ``mt_kl_loss`` arguments; returns (temperature, weights: tensor, scheme name or None)."""
    check_tensor(student_logits, "student_logits")
    dims: dict[str, tuple[int, str]] = {}
    check_shape(student_logits, "student_logits", ("N", "C"), dims)
    _teacher_logits(teacher_logits, dims, student_logits, "student_logits")
    n = teacher_logits.shape[1]
    tau = check_temperature(temperature)
    if labels is not None:
        check_labels(labels, n, student_logits, "student_logits")
    if isinstance(weights, str) or not (weights is None or isinstance(weights, Tensor)):
        weights = check_scheme(weights, "weights")
        if labels is None:
            raise ValueError(f"weights={weights!r} computes teacher weights from labels; pass labels")
    elif weights is not None:
        check_tensor(weights, "weights", student_logits, "student_logits")
        check_shape(weights, "weights", ("T", "N"), dims)

    return tau, weights


def check_hidden_args(student_hidden, teacher_hidden, proj_weight, proj_bias, mask, weights) -> None:
    """Validate ``mt_hidden_loss`` arguments."""
    check_tensor(student_hidden, "student_hidden")
    ref = (student_hidden, "student_hidden")
    check_tensor(teacher_hidden, "teacher_hidden", *ref)
    check_tensor(proj_weight, "proj_weight", *ref)
    check_tensor(proj_bias, "proj_bias", *ref)
    dims: dict[str, tuple[int, str]] = {}
    check_shape(student_hidden, "student_hidden", ("K", "N", "S", "Ds"), dims)
    check_shape(teacher_hidden, "teacher_hidden", ("T", "K", "N", "S", "Dt"), dims)
    check_shape(proj_weight, "proj_weight", ("T", "K", "Ds", "Dt"), dims)
    check_shape(proj_bias, "proj_bias", ("T", "K", "Dt"), dims)
    if mask is not None:
        check_tensor(mask, "mask", *ref, floating=False)
        if mask.dtype.is_complex:
            raise ValueError(f"mask must be a real or bool tensor of 0/1; got {mask.dtype}")
        check_shape(mask, "mask", ("N", "S"), dims)
    if weights is not None:
        check_tensor(weights, "weights", *ref)
        check_shape(weights, "weights", ("T", "N"), dims)


# --------------------------------------------------------------------------------------------------
# Public API


def teacher_lse(teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """The teachers' per-example statistics that do not depend on the student: ``[2, T, N]`` float32,
    row 0 ``logsumexp(t / temperature)``, row 1 ``logsumexp(t)`` (nats), for each teacher and example.
    ``fastmt.kernels.mt_kl_loss(..., teacher_lse=...)`` takes them instead of computing them; a teacher
    cache computes them once per example."""
    _teacher_logits(teacher_logits, {})
    tau = check_temperature(temperature)
    with torch.no_grad():
        t = teacher_logits.detach().to(compute_dtype(teacher_logits))
        return torch.stack([torch.logsumexp(t / tau, dim=-1), torch.logsumexp(t, dim=-1)]).to(torch.float32)


def check_teacher_lse(lse, teacher_logits: Tensor) -> None:
    """Validate a ``teacher_lse`` argument against the teacher logits it describes."""
    check_tensor(lse, "teacher_lse", teacher_logits, "teacher_logits", floating=True)
    t, n = teacher_logits.shape[:2]
    if lse.dtype != torch.float32 or tuple(lse.shape) != (2, t, n):
        raise ValueError(f"teacher_lse must be float32 [2, T, N] = [2, {t}, {n}] (fastmt.losses.teacher_lse); "
                         f"got {lse.dtype} {list(lse.shape)}")


def teacher_weights(
    teacher_logits: Tensor, labels: Tensor, scheme: str = "paper", ignore_index: int = -100
) -> Tensor:
    """Per-example teacher weights ``[T,N]`` from each teacher's cross-entropy on the true label.

    ``teacher_logits`` is ``[T,N,C]`` (untempered), ``labels`` is ``[N]``. Rows labelled ``ignore_index``
    get weight 0 for every teacher. The result is float32 (float64 for float64 logits) and carries no
    gradient.
    """
    _teacher_logits(teacher_logits, {})
    num_teachers, n, num_classes = teacher_logits.shape
    check_labels(labels, n, teacher_logits, "teacher_logits")
    scheme = check_scheme(scheme, "scheme")
    _labels_in_range(labels, num_classes, ignore_index)

    dtype = compute_dtype(teacher_logits)
    with torch.no_grad():
        valid = labels != ignore_index
        # Ignored rows may hold any value (-100 by default); gather a harmless class 0 for them.
        index = torch.where(valid, labels, 0).long()
        if scheme == "uniform":
            w = torch.ones(num_teachers, n, dtype=dtype, device=teacher_logits.device)
        else:
            logp = F.log_softmax(teacher_logits.to(dtype), dim=-1)
            ce = -logp.gather(-1, index.view(1, n, 1).expand(num_teachers, n, 1)).squeeze(-1)
            w = weights_from_ce(ce, scheme)
        return torch.where(valid, w, 0.0)


def mt_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weights: Tensor | str | None = None,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Weighted multi-teacher distillation loss ``L_kd`` (a scalar).

    ``weights`` is ``None`` (every teacher weighs 1), a ``[T,N]`` tensor, or a scheme name from
    ``SCHEMES`` (which needs ``labels``). With ``labels``, rows labelled ``ignore_index`` are skipped and
    the mean runs over the remaining rows; with none left the loss is 0 (still attached to
    ``student_logits``, with zero gradient).
    """
    tau, weights, log_q, log_p = _tempered_log_probs(student_logits, teacher_logits, weights, temperature, labels,
                                                     ignore_index)
    p = log_p.exp()
    # p * (log p - log q) is 0 wherever p == 0 (a -inf teacher logit), including where log q is -inf
    # too; masking the difference keeps both the value and the gradient free of NaN there.
    support = p > 0
    kl = (p * torch.where(support, log_p - log_q, 0.0)).sum(-1)  # [T,N]

    return _weighted_mean(kl, weights, labels, ignore_index, tau)


def _tempered_log_probs(student_logits, teacher_logits, weights, temperature, labels, ignore_index):
    """Checked arguments, the teacher weights (a scheme name computed into ``[T,N]``), and the student's
    ``[N,C]`` and teachers' ``[T,N,C]`` log-probabilities at the temperature, in the compute dtype."""
    tau, weights = check_kl_args(student_logits, teacher_logits, weights, temperature, labels, ignore_index)
    if isinstance(weights, str):
        weights = teacher_weights(teacher_logits, labels, weights, ignore_index)
    dtype = compute_dtype(student_logits, teacher_logits, weights)
    log_q = F.log_softmax(student_logits.to(dtype) / tau, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(dtype) / tau, dim=-1)
    return tau, weights, log_q, log_p


def _weighted_mean(kl: Tensor, weights: Tensor | None, labels: Tensor | None, ignore_index: int, tau: float) -> Tensor:
    """``tau^2 * mean over counted rows of sum_i w[i,n] kl[i,n]`` for per-teacher, per-row ``kl [T,N]``."""
    w = torch.ones_like(kl) if weights is None else weights.detach().to(kl.dtype)
    if labels is None:
        row = (w * kl).sum(0)  # [N]
        n_valid = torch.tensor(float(kl.shape[1]), dtype=kl.dtype, device=row.device)
    else:
        valid = labels != ignore_index
        # Zero the weights as well as the rows: an ignored row may carry a non-finite weight, and a NaN
        # weight times a zero upstream gradient would still poison the student gradient.
        w = torch.where(valid, w, 0.0)
        row = torch.where(valid, (w * kl).sum(0), 0.0)
        n_valid = valid.sum().to(kl.dtype)
    return (tau * tau) * row.sum() / n_valid.clamp_min(1.0)




def check_direction(direction) -> None:
    """``forward`` ``KL(p_i || q)`` or ``reverse`` ``KL(q || p_i)``; anything else is a ValueError."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(map(repr, DIRECTIONS))}; got {direction!r}")


def check_vocab(student_vocab: int, teacher_vocabs, names=None) -> None:
    """Teachers of a language model must share the student's vocabulary (one tokenizer): a ValueError
    naming both sizes when one does not."""
    for i, v in enumerate(teacher_vocabs):
        if int(v) != int(student_vocab):
            who = f"teacher {i}" + (f" ({names[i]})" if names else "")
            raise ValueError(f"{who} has a vocabulary of {int(v)} tokens and the student {int(student_vocab)}: "
                             "teachers must share the student's tokenizer")


def lm_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    weights: Tensor | str | None = "paper",
    temperature: float = 1.0,
    ignore_index: int = -100,
    direction: str = "forward",
) -> Tensor:
    """Token-level multi-teacher distillation for a causal language model (a scalar).

    Each of the ``N`` rows is one token position (batch and sequence flattened): ``student_logits
    [N,V]`` and ``teacher_logits [T,N,V]`` predict ``targets [N]``, the actual next token, or
    ``ignore_index`` for positions that count nowhere (padding, the prompt). Each teacher is weighted
    per token as in ``mt_kl_loss``: ``paper`` ``1 / (1 + CE_i)`` from teacher ``i``'s untempered
    cross-entropy on the next token, ``softmax``, ``uniform``, a ``[T,N]`` tensor, or None (1).
    ``direction``: ``forward`` ``KL(p_i || q)`` (the teacher's distribution against the student's, as
    in MT-BERT), or ``reverse`` ``KL(q || p_i)`` (mode-seeking); each scaled by ``temperature^2`` and
    averaged over the counted tokens. Teachers must share the student's vocabulary (``check_vocab``).
    """
    check_direction(direction)
    if isinstance(student_logits, Tensor) and isinstance(teacher_logits, Tensor):
        if student_logits.dim() == 2 and teacher_logits.dim() == 3:
            check_vocab(student_logits.shape[-1], [teacher_logits.shape[-1]] * teacher_logits.shape[0])
    if targets is None:
        raise ValueError("targets (the next token of each row, or ignore_index) are required")
    if direction == "forward":
        return mt_kl_loss(student_logits, teacher_logits, weights, temperature, targets, ignore_index)
    tau, weights, log_q, log_p = _tempered_log_probs(student_logits, teacher_logits, weights, temperature, targets,
                                                     ignore_index)
    q = log_q.exp()
    # q (log q - log p) is 0 where q == 0; masked so that a -inf teacher logit there gives no NaN.
    kl = (q * torch.where(q > 0, log_q - log_p, 0.0)).sum(-1)  # [T,N]
    return _weighted_mean(kl, weights, targets, ignore_index, tau)


def mt_token_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    weighting: Tensor | str | None = "paper",
    temperature: float = 1.0,
    direction: str = "forward",
    ignore_index: int = -100,
) -> Tensor:
    """The token-level multi-teacher KL under its fixed name and argument order (``labels``: the next
    token of each row; ``weighting``: ``paper``, ``softmax``, ``uniform``, a ``[T,N]`` tensor or None):
    ``lm_kl_loss(student_logits, teacher_logits, labels, weighting, temperature, ignore_index, direction)``."""
    return lm_kl_loss(student_logits, teacher_logits, labels, weighting, temperature, ignore_index, direction)


def check_mt_linear_args(hidden, weight, teacher_logits, labels) -> None:
    """Validate ``fastmt.kernels.mt_linear_kl_loss``'s tensors: ``hidden [N,D]``, ``weight [V,D]``,
    ``teacher_logits [T,N,V]`` (the student's vocabulary), ``labels [N]``."""
    check_tensor(hidden, "hidden")
    check_tensor(weight, "weight", hidden, "hidden")
    check_tensor(teacher_logits, "teacher_logits", hidden, "hidden")
    dims: dict[str, tuple[int, str]] = {}
    check_shape(hidden, "hidden", ("N", "D"), dims)
    check_shape(weight, "weight", ("V", "D"), dims)
    if teacher_logits.dim() == 3:
        check_vocab(weight.shape[0], [teacher_logits.shape[-1]] * teacher_logits.shape[0])
    check_shape(teacher_logits, "teacher_logits", ("T", "N", "V"), dims)
    if labels is None:
        raise ValueError("labels (the next token of each row, or ignore_index) are required")
    check_labels(labels, hidden.shape[0], hidden, "hidden")


def lm_topk_kl_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    targets: Tensor,
    weights: Tensor | str | None = "paper",
    temperature: float = 1.0,
    ignore_index: int = -100,
    direction: str = "forward",
    target_logprobs: Tensor | None = None,
    tail_logprobs: Tensor | None = None,
) -> Tensor:
    """``lm_kl_loss`` against teachers stored as their top-k next-token log-probabilities (a cache).

    Teacher ``i`` at row ``n`` is known on ``topk_ids [T,N,K]`` with log-probabilities ``topk_logprobs
    [T,N,K]`` at ``temperature``, and the rest of the vocabulary as one tail bucket of mass ``1 - sum
    p``. The student's distribution is taken on the same ``K + 1`` cells (its tail: everything outside
    the teacher's ids), and the KL between the two is exact on that partition. It is never more than
    the KL over the whole vocabulary (merging cells cannot increase a KL), and equals it when the
    teacher puts no mass in the tail or the student's tail is shaped like the teacher's. Weights as in
    ``lm_kl_loss``; ``paper`` and ``softmax`` need ``target_logprobs [T,N]``: each teacher's
    untempered log-probability of the actual next token (stored beside the top-k). ``tail_logprobs
    [T,N]``: the log of each teacher's mass outside its ids, from its full distribution (a cache stores
    it); without it the tail is ``1 - sum p`` of the stored log-probabilities."""
    check_direction(direction)
    check_tensor(student_logits, "student_logits")
    dims: dict[str, tuple[int, str]] = {}
    check_shape(student_logits, "student_logits", ("N", "V"), dims)
    check_tensor(topk_logprobs, "topk_logprobs", student_logits, "student_logits")
    check_shape(topk_logprobs, "topk_logprobs", ("T", "N", "K"), dims)
    check_tensor(topk_ids, "topk_ids", student_logits, "student_logits", floating=False)
    check_shape(topk_ids, "topk_ids", ("T", "N", "K"), dims)
    if targets is None:
        raise ValueError("targets (the next token of each row, or ignore_index) are required")
    check_labels(targets, dims["N"][0], student_logits, "student_logits")
    tau = check_temperature(temperature)
    if isinstance(weights, str) or not (weights is None or isinstance(weights, Tensor)):
        weights = check_scheme(weights, "weights")
        if weights != "uniform":
            if target_logprobs is None:
                raise ValueError(f"weights={weights!r} needs target_logprobs: each teacher's log-probability "
                                 "of the next token")
            check_tensor(target_logprobs, "target_logprobs", student_logits, "student_logits")
            check_shape(target_logprobs, "target_logprobs", ("T", "N"), dims)
            ce = -target_logprobs.detach().to(compute_dtype(target_logprobs))
            weights = weights_from_ce(ce, weights)
        else:
            weights = None
    elif weights is not None:
        check_tensor(weights, "weights", student_logits, "student_logits")
        check_shape(weights, "weights", ("T", "N"), dims)

    dtype = compute_dtype(student_logits, topk_logprobs)
    t = topk_ids.shape[0]
    log_q = F.log_softmax(student_logits.to(dtype) / tau, dim=-1)  # [N,V]
    ids = topk_ids.long()
    lq_k = log_q.unsqueeze(0).expand(t, -1, -1).gather(-1, ids)  # [T,N,K]
    # The student's tail: its log-probability outside the teacher's ids (a log-sum-exp with them masked).
    outside = log_q.unsqueeze(0).expand(t, -1, -1).scatter(-1, ids, float("-inf"))
    lq_tail = torch.logsumexp(outside, dim=-1)  # [T,N]
    lp_k = topk_logprobs.detach().to(dtype)
    p_k = lp_k.exp()
    if tail_logprobs is not None:
        check_tensor(tail_logprobs, "tail_logprobs", student_logits, "student_logits")
        check_shape(tail_logprobs, "tail_logprobs", ("T", "N"), dims)
        lr = tail_logprobs.detach().to(dtype)
        r = lr.exp()
    else:
        r = (1.0 - p_k.sum(-1)).clamp_min(0.0)  # the teacher's tail mass
    lr = torch.log(r.clamp_min(torch.finfo(dtype).tiny))
    if direction == "forward":
        # Ids covering the whole vocabulary leave no tail (lq_tail = -inf): r is then rounding, not mass.
        has_tail = (r > 0) & (lq_tail > float("-inf"))
        kl = (p_k * (lp_k - lq_k)).sum(-1) + torch.where(has_tail, r * (lr - lq_tail), 0.0)
    else:
        q_k, q_tail = lq_k.exp(), lq_tail.exp()
        kl = (q_k * torch.where(q_k > 0, lq_k - lp_k, 0.0)).sum(-1)
        kl = kl + torch.where(q_tail > 0, q_tail * (lq_tail - lr), 0.0)
    return _weighted_mean(kl, weights, targets, ignore_index, tau)


def _teacher_list(x, name: str) -> list[Tensor]:
    """A stacked ``[T, ...]`` tensor or a list of per-teacher tensors, as a list."""
    if isinstance(x, Tensor):
        return list(x.unbind(0))
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, Tensor) for t in x):
        return list(x)
    raise ValueError(f"{name} must be a [T, ...] tensor or a non-empty list of tensors; got {type(x).__name__}")


def check_lm_linear_args(student_hidden, student_weight, teacher_hidden, teacher_weight, targets):
    """Validate ``lm_linear_kl_loss`` arguments; returns the teachers' hidden states and output matrices
    as lists (teachers may differ in width)."""
    check_tensor(student_hidden, "student_hidden")
    check_tensor(student_weight, "student_weight", student_hidden, "student_hidden")
    dims: dict[str, tuple[int, str]] = {}
    check_shape(student_hidden, "student_hidden", ("N", "D"), dims)
    check_shape(student_weight, "student_weight", ("V", "D"), dims)
    hts, wts = _teacher_list(teacher_hidden, "teacher_hidden"), _teacher_list(teacher_weight, "teacher_weight")
    if len(hts) != len(wts):
        raise ValueError(f"{len(hts)} teachers' hidden states but {len(wts)} output matrices")
    for i, (h, w) in enumerate(zip(hts, wts)):
        check_tensor(h, f"teacher_hidden[{i}]", student_hidden, "student_hidden")
        check_tensor(w, f"teacher_weight[{i}]", student_hidden, "student_hidden")
        tdims = {"N": dims["N"]}
        check_shape(h, f"teacher_hidden[{i}]", ("N", "Dt"), tdims)
        check_shape(w, f"teacher_weight[{i}]", ("V", "Dt"), tdims)
    check_vocab(student_weight.shape[0], [w.shape[0] for w in wts])
    if targets is None:
        raise ValueError("targets (the next token of each row, or ignore_index) are required")
    check_labels(targets, student_hidden.shape[0], student_hidden, "student_hidden")
    return hts, wts


def lm_linear_kl_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden,
    teacher_weight,
    targets: Tensor,
    weights: Tensor | str | None = "paper",
    temperature: float = 1.0,
    ignore_index: int = -100,
    direction: str = "forward",
) -> Tensor:
    """``lm_kl_loss`` on the output layers' logits: the student's ``student_hidden [N,D] @
    student_weight [V,D]^T`` and each teacher's ``teacher_hidden[i] [N,Dt_i] @ teacher_weight[i]
    [V,Dt_i]^T`` (stacked ``[T,...]`` tensors, or lists when the teachers differ in width). The
    reference for ``fastmt.kernels.lm_linear_kl_loss``, which never forms these ``N x V`` logits."""
    hts, wts = check_lm_linear_args(student_hidden, student_weight, teacher_hidden, teacher_weight, targets)
    s_logits = student_hidden @ student_weight.t()
    with torch.no_grad():
        t_logits = torch.stack([h @ w.t() for h, w in zip(hts, wts)])
    return lm_kl_loss(s_logits, t_logits, targets, weights, temperature, ignore_index, direction)


def mt_hidden_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    proj_weight: Tensor,
    proj_bias: Tensor,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Projected hidden-state MSE ``L_hid`` summed over teachers and student layers (a scalar).

    Student layer ``k`` is projected into teacher ``i``'s space by ``proj_weight[i,k]`` and
    ``proj_bias[i,k]`` and compared with ``teacher_hidden[i,k]``. ``mask`` (``[N,S]``, 0/1 of any numeric or
    bool dtype) selects token positions and ``weights`` (``[T,N]``) weighs teachers per example; both
    default to 1. If the mask selects nothing the loss is 0, still attached to the graph.
    """
    check_hidden_args(student_hidden, teacher_hidden, proj_weight, proj_bias, mask, weights)

    dtype = compute_dtype(student_hidden, teacher_hidden, proj_weight, proj_bias, weights)
    _, _, n, s, _ = teacher_hidden.shape
    dt = teacher_hidden.shape[-1]
    device = student_hidden.device
    hs = student_hidden.to(dtype)
    projected = torch.einsum("knsd,tkde->tknse", hs, proj_weight.to(dtype))
    projected = projected + proj_bias.to(dtype)[:, :, None, None, :]
    sq_err = (projected - teacher_hidden.detach().to(dtype)).square().sum(-1)  # [T,K,N,S]

    m = torch.ones(n, s, dtype=dtype, device=device) if mask is None else mask.detach().to(dtype)
    w = torch.ones(1, n, dtype=dtype, device=device) if weights is None else weights.detach().to(dtype)
    coef = m[None, None, :, :] * w[:, None, :, None]  # [T or 1, 1, N, S]
    # Masked-out positions (padding) are dropped rather than multiplied by 0, so that a non-finite
    # value there cannot turn the sum into NaN.
    total = torch.where(coef != 0, coef * sq_err, 0.0).sum()
    denom = m.sum() * dt
    return total / torch.where(denom > 0, denom, 1.0)


def layer_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Teacher hidden-state index matched to each student layer ``k = 1..K``.

    Student layer ``k`` maps to ``round(k * M / K)`` with halves rounded up, i.e.
    ``floor(k * M / K + 1/2)`` (not Python's round-half-to-even), computed in integers. Index 0 is the
    teacher's embedding output, so the last student layer always maps to the last teacher layer ``M``.
    """
    k_total, m_total = num_student_layers, num_teacher_layers
    if not isinstance(k_total, int) or isinstance(k_total, bool) or k_total < 1:
        raise ValueError(f"student layers (--student-layers) must be a positive integer; got {k_total!r}")
    if not isinstance(m_total, int) or isinstance(m_total, bool) or m_total < 1:
        raise ValueError(f"num_teacher_layers must be a positive integer; got {m_total!r}")
    if k_total > m_total:
        raise ValueError(
            f"student layers (--student-layers) = {k_total} is deeper than a teacher with {m_total} layers"
        )
    return [(2 * k * m_total + k_total) // (2 * k_total) for k in range(1, k_total + 1)]
