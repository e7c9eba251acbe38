"""What the causal-LM loss's paths share: dtypes, stacked teachers, float32 products, a chunk budget.

The vocabulary tiles in torch (``fastmt.kernels.lm_tiled``), the Triton tiles
(``fastmt.kernels.lm_kl``), the chunks of rows (``fastmt.kernels.lm_chunks``) and the top-k loss
(``fastmt.kernels.lm_topk``) all import from here; this module imports none of them, and needs no
Triton.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("fastmt")

# Bytes of the gradient block G that one chunk of rows may take (the Triton path, fastmt.kernels.lm_kl).
CHUNK_BYTES = 256 * 1024 * 1024
_FP32_OUT_GEMM: dict[str, bool] = {}  # device type -> whether torch's GEMMs write float32 from half inputs


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the op returns ``d hs`` in: the hidden states' own, but float32 for float16 (made for an
    upstream gradient of 1, small entries would underflow float16 before a loss scaler's factor reaches
    them). The same for ``d ws``, summed in float32 over chunks of rows and rounded once at the end."""
    return torch.float32 if dtype == torch.float16 else dtype


def stack_teachers(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Teachers' ``[N, Dt_i]`` hidden states or ``[V, Dt_i]`` output matrices as one ``[T, *, max Dt]``
    tensor, narrower ones padded with zero columns (their logits are unchanged). Stack output matrices
    once, not every step: they are the largest tensors here."""
    width = max(t.shape[-1] for t in tensors)
    if all(t.shape[-1] == width for t in tensors):
        return torch.stack(tensors)
    out = tensors[0].new_zeros((len(tensors), tensors[0].shape[0], width))
    for i, t in enumerate(tensors):
        out[i, :, : t.shape[-1]] = t
    return out


def fp32_out_gemm(device_type: str) -> bool | None:
    """Whether ``product`` found that torch's GEMMs on ``device_type`` write float32 from half inputs
    (None until it has tried one there)."""
    return _FP32_OUT_GEMM.get(device_type)


def product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
    """``out = a @ b`` (``out += a @ b`` with ``accumulate``), ``out`` float32, ``a`` and ``b`` maybe half.
    On a GPU: one cuBLAS GEMM that writes float32 from half inputs (products exact in float32, summed
    in float32, never rounded to half); where torch lacks it, the half product (said once). On a CPU
    (tests; the tiled torch path is the CPU's): float32 inputs."""
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    kind = out.device.type
    if kind != "cpu" and _FP32_OUT_GEMM.get(kind, True):
        try:
            if accumulate:
                torch.ops.aten.addmm.dtype_out(out, a, b, torch.float32, out=out)
            else:
                torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=out)
            _FP32_OUT_GEMM[kind] = True
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as e:
            _FP32_OUT_GEMM[kind] = False
            log.warning("fastmt.kernels: this torch has no %s GEMM writing float32 from %s (%s); "
                        "the logits are rounded to %s", kind, a.dtype, str(e).splitlines()[0][:120], a.dtype)
    if kind == "cpu":
        a, b = a.float(), b.float()
    if accumulate:
        out.add_(a @ b)
    else:
        out.copy_(a @ b)
