"""Training under CUDA graphs: the gradient buffers the optimizer reads never live in a graph's pool.

A backward replayed as a CUDA graph returns its gradients in the graph's private memory pool, which
the next replay overwrites. Autograd keeps the tensor a backward returns as ``param.grad`` when the
parameter has no gradient yet, so without care every ``.grad`` would point into the pool after the
first step. ``fastmt.engine.optim.GradBuffers`` moves them out right after that backward; from then on
autograd adds into the same buffers in place.

The invariant is checked here on the CPU, through the real training loop: after every backward,
each gradient the optimizer is about to read (a) is not the tensor the backward delivered and (b)
sits at the address it had after the first step. The mutation check switches the fix off and
shows the same check fails. The CUDA tests (skipped without a GPU) train with the graphs for real.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from fastmt.engine import loop, optim
from fastmt.config.settings import DistillArgs, TrainArgs
from fastmt.tasks.classification.cofinetune import cofinetune
from fastmt.tasks.classification.distill import distill
from test_tasks_classification_distill import _args  # the tiny task's training flags, shared


class _Watch:
    """Records, per parameter, the gradient each backward delivers, by address and a weak reference
    to its storage (holding the tensor itself would change whether autograd may adopt it; the weak
    reference tells a live storage from a freed one whose address the allocator handed out again),
    and checks what the optimizer is about to read."""

    def __init__(self):
        self.delivered: dict[int, tuple[int, StorageWeakRef]] = {}
        self.first: dict[int, int] = {}
        self.violations: list[str] = []
        self.steps = 0

    def watch(self, params):
        for i, p in enumerate(params):
            p.register_hook(lambda g, i=i: self.delivered.__setitem__(i, (g.data_ptr(), StorageWeakRef(g.untyped_storage()))))

    def check(self, params):
        self.steps += 1
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            ptr = p.grad.data_ptr()
            got = self.delivered.get(i)
            if got is not None and ptr == got[0] and not got[1].expired():
                self.violations.append(f"step {self.steps}: param {i} holds the backward's own output")
            if self.first.setdefault(i, ptr) != ptr:
                self.violations.append(f"step {self.steps}: param {i} gradient moved")


def _train_watched(monkeypatch, tiny_task, teachers_dir, out, fixed: bool, **kw) -> _Watch:
    watch = _Watch()

    class WatchedBuffers(optim.GradBuffers):
        def __init__(self, params):
            super().__init__(params)
            watch.watch(self.params)

        if not fixed:
            def adopt(self):  # the fix switched off: autograd keeps what the backward returned
                pass

    real_step = loop.optimizer_step

    def checked_step(opt, scaler, params, *a, **k):
        watch.check(params)
        return real_step(opt, scaler, params, *a, **k)

    monkeypatch.setattr(loop, "GradBuffers", WatchedBuffers)
    monkeypatch.setattr(loop, "optimizer_step", checked_step)
    distill(DistillArgs(**_args(tiny_task, out, **kw), teachers=str(teachers_dir), student_layers=1))
    return watch


def test_gradients_keep_one_buffer_of_their_own(monkeypatch, tiny_task, teachers_dir, tmp_path):
    watch = _train_watched(monkeypatch, tiny_task, teachers_dir, tmp_path / "s", fixed=True, epochs=2)
    assert watch.steps == 16 and len(watch.first) > 10
    assert not watch.violations, watch.violations[:5]


def test_the_check_catches_gradients_left_where_backward_put_them(monkeypatch, tiny_task, teachers_dir, tmp_path):
    # Mutation check: without GradBuffers.adopt the first backward's outputs become the .grad tensors.
    watch = _train_watched(monkeypatch, tiny_task, teachers_dir, tmp_path / "s", fixed=False)
    assert any("backward's own output" in v for v in watch.violations), watch.violations[:5]


def test_a_moved_buffer_is_reported():
    p = torch.nn.Parameter(torch.ones(3))
    buffers = optim.GradBuffers([p])
    (p * 2).sum().backward()
    buffers.adopt()
    p.grad = None  # what zero_grad(set_to_none=True) would do
    (p * 2).sum().backward()
    with pytest.raises(RuntimeError, match="moved between steps"):
        buffers.adopt()


def test_adopted_gradients_equal_plain_autograd():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    buffers = optim.GradBuffers(b.parameters())
    x = torch.randn(5, 4)
    for _ in range(3):
        for m in (a, b):
            if m.weight.grad is not None:
                m.zero_grad(set_to_none=False)
            m(x).square().sum().backward()
        buffers.adopt()
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa.grad, pb.grad)


# ---------------------------------------------------------------------------------------------------
# What a replay does to the previous replay's outputs, held on the CPU: the loop reads a step's loss
# and loss terms within that step only.


class _OverwrittenByNextStep:
    """A step whose outputs are overwritten (NaN) when the next step starts, as CUDA graph trees reuse
    a replay's output memory for the next replay."""

    def __init__(self, real):
        self.real, self.last = real, []

    def __call__(self, step, *args, **kwargs):
        with torch.no_grad():
            for t in self.last:
                t.fill_(float("nan"))
        loss, parts = self.real(step, *args, **kwargs)
        self.last = [loss, *parts.values()]
        return loss, parts


def test_overwriting_a_step_s_outputs_at_the_next_step_changes_nothing(monkeypatch, tiny_task, teachers_dir, tmp_path):
    from fastmt.tasks.classification.step import DistillStep

    def run(out):
        distill(DistillArgs(**_args(tiny_task, out, epochs=2, log_every=3), teachers=str(teachers_dir),
                                student_layers=1, temperature=2.0))
        return _train_rows(out)

    plain = run(tmp_path / "plain")
    overwrite = _OverwrittenByNextStep(DistillStep.__call__)
    monkeypatch.setattr(DistillStep, "__call__", lambda self, *a, **k: overwrite(self, *a, **k))
    overwritten = run(tmp_path / "overwritten")
    assert overwrite.last  # the wrapper was in the loop
    assert len(plain) == len(overwritten) > 3
    for a, b in zip(plain, overwritten):
        for key in ("loss", "loss_task", "loss_kd", "loss_hidden"):
            assert b[key] == a[key], (a["step"], key)  # bit-identical, and never NaN


def test_the_overwrite_reaches_a_reader_that_keeps_outputs_too_long():
    # The check above can fail: a reader that keeps the previous step's loss sees NaN.
    step = _OverwrittenByNextStep(lambda self, x: (x.sum(), {"x": x.detach().sum()}))
    kept, _ = step(None, torch.ones(3))
    fresh, _ = step(None, torch.ones(3))
    assert torch.isnan(kept) and float(fresh) == 3.0


# ---------------------------------------------------------------------------------------------------
# On a GPU: the graphs replayed for real (skipped on the CPU).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs CUDA (and the Triton kernels compiled, not interpreted)")


def _train_rows(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "train"]


@needs_cuda
def test_distill_under_cuda_graphs_trains_like_eager(tiny_task, tiny_encoders, tmp_path):
    import torch._inductor.config

    teachers = tmp_path / "teachers"
    cofinetune([str(tiny_encoders["a"]), str(tiny_encoders["a"])],
                 TrainArgs(**_args(tiny_task, teachers, device="cuda")))
    runs = {}
    with torch._inductor.config.patch(fallback_random=True):  # the same dropout masks as eager
        for name, kw in {"eager": {}, "graphs": dict(compile=True, cuda_graphs=True)}.items():
            out = tmp_path / name
            distill(DistillArgs(**_args(tiny_task, out, device="cuda", precision="fp16", kernels="fused", epochs=4,
                                            log_every=1, **kw), teachers=str(teachers), student_layers=1,
                                    stack_teachers=True, temperature=2.0))
            runs[name] = _train_rows(out)
    eager, graphs = runs["eager"], runs["graphs"]
    assert len(graphs) == len(eager) == 32
    for key in ("loss", "loss_task", "loss_kd", "loss_hidden"):
        assert graphs[0][key] == pytest.approx(eager[0][key], rel=1e-2, abs=1e-4), key
    # Trains like eager: the loss falls over the 32 steps (4 epochs, the last 3 from the teacher
    # cache) and ends where eager's ends. How far it falls is the task's, not the graphs': eager fp32
    # on the CPU goes from 0.938 to 0.847 (mean of the first and last 4 steps).
    mean4 = lambda rows: sum(r["loss"] for r in rows) / 4  # noqa: E731
    assert all(math.isfinite(r["loss"]) for r in graphs)
    assert mean4(graphs[-4:]) < mean4(graphs[:4])
    assert mean4(graphs[-4:]) == pytest.approx(mean4(eager[-4:]), rel=3e-2)


@needs_cuda
def test_every_step_under_cuda_graphs_matches_eager_on_the_same_weights_and_batch(tiny_task, tmp_path, monkeypatch):
    """Each step under CUDA graphs (the first records, every later one replays) against the eager
    functions on the same weights and batch, read before the next replay. Dropout-free models: the
    eager shadow must not draw other random numbers than the graphs do."""
    from fastmt.tasks.demo import build_tokenizer
    from fastmt.tasks.classification.step import DistillStep
    from test_engine_distributed import _encoder_without_dropout

    tok = build_tokenizer(tmp_path / "tok")
    enc = _encoder_without_dropout(tok, tmp_path, "a", 2, 32, 1)
    teachers = tmp_path / "teachers"
    cofinetune([str(enc), str(enc)], TrainArgs(**_args(tiny_task, teachers, device="cuda")))
    pairs = []
    real = DistillStep.__call__

    def shadowed(self, inputs, labels, index=None, shard=None):
        loss, parts = real(self, inputs, labels, index, shard)
        got = [float(loss)] + [float(parts[k]) for k in sorted(parts)]  # before the next replay reuses them
        with torch.no_grad():
            t_logits, t_hidden = self.teachers_forward(inputs)
            want_loss, want_parts = self.student_loss(inputs, labels, t_logits, t_hidden)
        pairs.append((got, [float(want_loss)] + [float(want_parts[k]) for k in sorted(want_parts)]))
        return loss, parts

    monkeypatch.setattr(DistillStep, "__call__", shadowed)
    distill(DistillArgs(**_args(tiny_task, tmp_path / "s", device="cuda", precision="fp16", kernels="fused",
                                    epochs=4, log_every=1, compile=True), teachers=str(teachers), student_layers=1,
                            stack_teachers=True, temperature=2.0, cuda_graphs=True))
    assert len(pairs) == 32
    # The same fp16 computation, compiled and eager: they differ by rounding, a few fp16 ulps
    # (2^-11) per layer; 2e-2 is ~40 ulps. A replay that read a stale batch or stale weights would
    # be off by the difference between batches or steps.
    for step, (got, want) in enumerate(pairs, 1):
        assert got == pytest.approx(want, rel=2e-2, abs=1e-3), f"step {step}"
    assert len({round(g[0], 6) for g, _ in pairs}) > 16  # the steps did differ


@needs_cuda
def test_bench_fast_mode_runs_under_cuda_graphs(tmp_path):
    import torch._inductor.config

    from fastmt.tools.bench import run_bench

    with torch._inductor.config.patch(fallback_random=True):  # the same dropout masks as eager
        result = run_bench("cuda", "tiny", json_out=str(tmp_path / "b.json"), steps=20, modes="eager-fp16,fast")
    eager, fast = result["modes"]
    assert fast["cuda_graphs"] and fast["compile"]
    # Same weights, batch and dropout masks; fused kernels, stacked teachers and compiled fp16 differ
    # from eager fp16 only by rounding.
    assert fast["first_loss"] == pytest.approx(eager["first_loss"], rel=1e-2)
    assert fast["final_loss"] < fast["first_loss"]
