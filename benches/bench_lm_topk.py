"""The cached-teacher (top-k) loss, side by side: one forward + backward pass, two ways, same inputs.

    python benches/bench_lm_topk.py --tokens 1024 --dim 64 --vocab 30522 --teachers 2 --k 128

- ``one-pass``: ``fastmt.kernels.lm_topk_linear_kl_loss``, the gradients for the hidden states and the
  output matrix made in the forward, a chunk of rows at a time (what ``distill-lm --cache-teachers``
  runs for the forward KL)
- ``autograd``: ``fastmt.losses.lm_topk_kl_loss`` on chunks of the student's logits under activation
  checkpointing (the reference formula through autograd; what ran before)

Prints the median of ``--reps`` passes of each, their ratio, and the largest difference of the loss.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--teachers", type=int, default=2)
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    import fastmt.kernels as fused
    from fastmt import losses
    from fastmt.cache.topk import topk_from_logits
    from torch.utils.checkpoint import checkpoint

    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    n, v, t, tau = a.tokens, a.vocab, a.teachers, a.temperature
    h = torch.randn(n, a.dim, generator=g).to(dev).requires_grad_()
    w = (0.1 * torch.randn(v, a.dim, generator=g)).to(dev).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(dev)
    y[: n // 8] = -100
    ids, lp, tail, target = topk_from_logits((2 * torch.randn(t, n, v, generator=g)).to(dev), y, a.k, tau)

    def one_pass():
        return fused.lm_topk_linear_kl_loss(h, w, ids, lp, y, "paper", tau, target_logprobs=target, tail_logprobs=tail)

    def autograd():
        rows = max(16, 256 * 2**20 // (4 * v * (t + 2)))
        total = 0.0
        for r0 in range(0, n, rows):
            sl = slice(r0, r0 + rows)

            def part(hc, sl=sl):
                count = (y[sl] != -100).sum()
                return losses.lm_topk_kl_loss(hc @ w.t(), ids[:, sl], lp[:, sl], y[sl], "paper", tau,
                                              target_logprobs=target[:, sl], tail_logprobs=tail[:, sl]) * count

            total = total + checkpoint(part, h[sl], use_reentrant=False)
        return total / (y != -100).sum()

    times, values = {"one-pass": [], "autograd": []}, {}
    for _ in range(a.reps + 1):  # the first round warms up
        for name, fn in (("autograd", autograd), ("one-pass", one_pass)):
            h.grad = w.grad = None
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            loss = fn()
            loss.backward()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[name].append(time.perf_counter() - t0)
            values[name] = float(loss.detach())
    med = {k: statistics.median(x[1:]) for k, x in times.items()}
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"top-k loss, forward + backward: {n} tokens, D={a.dim}, V={v}, {t} teachers, k={a.k}, on {where}")
    for name in ("autograd", "one-pass"):
        print(f"  {name:<9} {1e3 * med[name]:9.1f} ms   loss {values[name]:.6f}")
    print(f"  one-pass is {med['autograd'] / med['one-pass']:.2f}x faster; loss difference "
          f"{abs(values['one-pass'] - values['autograd']):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
