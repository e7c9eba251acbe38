"""The optimizer side of a step: the fp16-safe step, the schedule in one device tensor, no host reads."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmt.engine import optim
from fastmt.config.settings import TrainArgs


def test_fp16_overflow_step_is_skipped_and_counted():
    model = torch.nn.Linear(8, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # the first step's gradients overflow fp16
    params = list(model.parameters())
    x, y = torch.randn(4, 8) * 100, torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in params]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    scaler.scale(loss).backward()
    out = optim.optimizer_step(opt, scaler, params, 1.0)
    assert out.dtype == torch.int64 and out.shape == () and int(out) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, params))  # skipped: weights untouched
    assert scaler.get_scale() < 2.0**60
    # Keep overflowing until the scale is sane, then a step must go through and change the weights.
    for _ in range(80):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        if int(optim.optimizer_step(opt, scaler, params, 1.0)) == 0:
            break
    assert not all(torch.equal(a, b) for a, b in zip(before, params))


def test_learning_rate_lives_in_one_device_tensor_updated_in_place():
    """The schedule writes the rate into one tensor that every group reads (so a replayed graph sees it)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    args = TrainArgs(train="-", dev="-", out="-", lr=1e-3, warmup=0.25)
    opt, sched = optim.make_optimizer(model, args, total_steps=8, device=torch.device("cpu"))
    lr = sched.lr
    assert len(opt.param_groups) == 2 and all(g["lr"] is lr for g in opt.param_groups)
    ptr = lr.data_ptr()
    seen = []
    for _ in range(8):
        seen.append(float(lr))
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    # Warm-up over 2 steps, then linear decay to 0 at step 8.
    assert seen == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4 * 5 / 3, 1e-3 * 4 / 6, 1e-3 * 3 / 6, 1e-3 * 2 / 6, 1e-3 / 6])
    assert lr.data_ptr() == ptr and float(lr) == 0.0
    # A resumed optimizer gets the rate tensor back (load_state_dict replaces group values).
    state, sstate = opt.state_dict(), sched.state_dict()
    opt2, sched2 = optim.make_optimizer(model, args, total_steps=8, device=torch.device("cpu"))
    opt2.load_state_dict(state)
    sched2.load_state_dict(sstate)
    assert all(g["lr"] is sched2.lr for g in opt2.param_groups)
    assert sched2.last_epoch == 8 and float(sched2.lr) == 0.0 and sched2.get_last_lr() == [0.0]


class _HostReads(TorchDispatchMode):
    """Counts device-to-host scalar reads (.item(), bool(), float(), int() all go through this op)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_fp16_optimizer_step_reads_nothing_back():
    """Unscale, clip, skip-on-overflow, AdamW, loss-scale update and the schedule: no host read, on
    an overflowing step and on a good one (on a GPU each read would be a sync)."""
    model = torch.nn.Linear(8, 3)
    args = TrainArgs(train="-", dev="-", out="-", precision="fp16", lr=1e-2)
    opt, sched = optim.make_optimizer(model, args, total_steps=10, device=torch.device("cpu"))
    assert opt.defaults["fused"]
    params = list(model.parameters())
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    results = []
    for init_scale in (2.0**60, 2.0**4):  # the first overflows fp16, the second does not
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x * 100).float(), y)
        opt.zero_grad(set_to_none=False)
        scaler.scale(loss).backward()
        with _HostReads() as reads:
            skipped = optim.optimizer_step(opt, scaler, params, 1.0, loss)
            sched.step()
        assert reads.count == 0
        results.append(int(skipped))
    assert results == [1, 0]
