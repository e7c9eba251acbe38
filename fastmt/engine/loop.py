"""The training loop, one page: batch -> step -> backward -> optimizer, then the hooks it calls out to.

A task (``fastmt.tasks``) builds the model, the data and the step and hands them to :func:`fit`;
the loop knows nothing of teachers or students. What it calls out to has a room of its own: the
counters and checkpoints in ``fastmt.engine.runstate``, the metrics rows in ``fastmt.engine.trainlog``, stopping on
non-finite losses, a caught SIGTERM / SIGINT (``fastmt.engine.stopping``) and the message of a failed write
in ``fastmt.engine.faults``, the task's evaluation and saving in the :class:`Hooks` it is given.

With several processes, each trains on its shard of every global batch; only the first writes.
``--save-every`` checkpoints the whole loop state; ``--resume`` continues from it exactly.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from fastmt.engine.checkpoint import checkpoint_dir, fault_after_step
from fastmt.data.dataset import Encoded, host_to, iterate_batches, num_batches, to_device
from fastmt.engine.distributed import World, barrier, max_over_world, shard
from fastmt.errors import WriteFailed
from fastmt.engine import stopping
from fastmt.engine.faults import Progress, stop_if_diverged, stop_on_signal, write_failed
from fastmt.engine.optim import GradBuffers, make_optimizer, optimizer_step
from fastmt.engine.rundir import start_out_dir
from fastmt.engine.runstate import RunState, Trainables, resume_run, save_run
from fastmt.config.settings import TrainArgs
from fastmt.engine.trainlog import RunLog

log = logging.getLogger("fastmt")


@dataclass
class TrainData:
    encodings: dict[str, Encoded]  # the training set, encoded once per tokenizer the step reads
    labels: list[int]
    buckets: list[int]  # the padded lengths a batch may take


@dataclass
class Hooks:
    evaluate: Callable[[], dict[str, float]]  # dev scores after each epoch: dev_accuracy, dev_<--metric>, ...
    save_best: Callable[[], None]  # write the model of the best epoch so far (first process only)
    faults: Callable[[], str] | None = None  # non-finite inputs seen so far, for the logs and the stop message


@dataclass
class RunResult:
    out: str
    best_dev_accuracy: float  # dev accuracy at the best epoch
    best_epoch: int
    train_s: float
    train_samples_per_s: float
    steps: int
    extra: dict = field(default_factory=dict)
    metric: str = "accuracy"  # what chose the best epoch
    best_dev_score: float = float("nan")  # that metric at the best epoch


def progress_bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False, unit="step")


def fit(model: nn.Module, step_fn, data: TrainData, args: TrainArgs, device: torch.device, out_dir: Path, desc: str,
        hooks: Hooks, world: World | None = None, run_config: dict | None = None) -> RunResult:
    """:func:`train`, with a failed write (a full disk) told in one line (``fastmt.engine.faults``)."""
    progress = Progress()
    world = world or World()
    try:
        with stopping.catch_stop(world.size == 1):  # SIGTERM / Ctrl-C: checkpoint after the step, then stop
            return train(model, step_fn, data, args, device, out_dir, desc, hooks, world, run_config, progress)
    except WriteFailed as e:
        raise write_failed(e, progress, args, out_dir, desc) from e


def train(model: nn.Module, step_fn, data: TrainData, args: TrainArgs, device: torch.device, out_dir: Path, desc: str,
          hooks: Hooks, world: World, run_config: dict | None, progress: Progress) -> RunResult:
    """Epochs of AdamW steps (schedule, clipping, fp16 loss scale); dev after each epoch, best model saved."""
    run_config = dict(run_config or asdict(args))
    steps_per_epoch = num_batches(len(data.labels), args.batch_size)
    total = steps_per_epoch * args.epochs
    opt, sched = make_optimizer(model, args, total, device)
    parts = Trainables(model, opt, sched, torch.amp.GradScaler(device.type, enabled=args.precision == "fp16"))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = GradBuffers(params)  # one address per gradient for the whole run (CUDA-graph safe)
    gen = torch.Generator().manual_seed(args.seed)
    state = RunState(device)
    if args.resume:
        metrics_bytes = resume_run(out_dir, state, parts, run_config)
        progress.checkpoint = state.step
        if world.is_main:
            start_out_dir(out_dir, metrics_bytes)
        log.info("%s: resuming %s at step %d (epoch %d, batch %d of %d)", desc, out_dir, state.step, state.start_epoch,
                 state.done_in_epoch, steps_per_epoch)
    elif world.is_main:
        start_out_dir(out_dir)
    barrier(world)
    runlog = RunLog(out_dir, args.report_to, world, desc, hooks.faults)
    for epoch in range(state.start_epoch, args.epochs + 1):
        progress.epoch, progress.step = epoch, state.step
        if epoch == state.start_epoch and state.epoch_gen_state is not None:  # resuming inside this epoch
            gen.set_state(state.epoch_gen_state)
        else:
            state.epoch_gen_state, state.done_in_epoch = gen.get_state(), 0  # the epoch's shuffle is drawn from here
        model.train()
        bar = progress_bar(steps_per_epoch, f"{desc} epoch {epoch}/{args.epochs}", args.progress)
        bar.update(state.done_in_epoch)
        done = state.done_in_epoch
        state.start_clock()  # training time is read at the logging interval, where the host waits anyway
        for batch in iterate_batches(data.encodings, data.labels, args.batch_size, data.buckets, True, gen,
                                     skip_batches=state.done_in_epoch, group_by_length=bool(args.group_by_length)):
            loss, loss_parts = _forward(step_fn, batch, device, world)
            opt.zero_grad(set_to_none=False)
            parts.scaler.scale(loss).backward()
            grads.adopt()
            state.skipped += optimizer_step(opt, parts.scaler, params, args.max_grad_norm, loss)
            sched.step()
            state.record(loss, loss_parts, len(batch.labels))
            done += 1
            bar.update(1)
            log_now = state.step % args.log_every == 0 or state.step == total
            if (device.type != "cuda" and world.size == 1) or log_now:  # else read at the logging interval only
                if world.size > 1:
                    state.worst_run = max_over_world(state.worst_run, world)
                stop_if_diverged(state, args, epoch, out_dir, hooks.faults, world.is_main)
            if log_now:
                state.lap()
                avg, sps = runlog.train(state, epoch, sched.get_last_lr()[0], parts.scaler)
                bar.set_postfix(loss=f"{avg:.4f}", sps=f"{sps:.0f}")
            progress.step = state.step
            if args.save_every and state.step % args.save_every == 0 and int(state.bad_run) == 0:
                state.lap()
                if world.is_main:
                    save_run(out_dir, state, parts, run_config, epoch, done, steps_per_epoch)
                state.last_checkpoint = progress.checkpoint = state.step
                barrier(world)
                state.start_clock()  # the checkpoint's own time is not training time
            fault_after_step(state.step)
            if stopping.requested() is not None:
                stop_on_signal(state, parts, run_config, epoch, done, steps_per_epoch, args, out_dir, desc)
        state.lap()
        bar.close()
        progress.trained = epoch == args.epochs
        _end_epoch(state, epoch, args, hooks, runlog, world, progress)
    sps = state.samples / max(state.train_time, 1e-9)
    runlog.done(state, args.metric, sps)
    if world.is_main:
        shutil.rmtree(checkpoint_dir(out_dir), ignore_errors=True)  # finished: the saved model is the result
    return RunResult(str(out_dir), state.best_accuracy, state.best_epoch, state.train_time, sps, state.step,
                     metric=args.metric, best_dev_score=state.best)


def _forward(step_fn, batch, device: torch.device, world: World):
    """The step's loss and its named parts for this process's share of ``batch``."""
    part = shard(batch.inputs, batch.labels, world)
    inputs = to_device(part.inputs, device)
    labels = host_to(part.labels, device)
    if world.size > 1:
        # Weighted by this process's share of the global batch (fastmt.engine.distributed): the averaged
        # gradients, and the means over processes logged, are the global batch's.
        return step_fn(inputs, labels, shard=part)
    if getattr(step_fn, "takes_index", False):
        return step_fn(inputs, labels, batch.index)
    return step_fn(inputs, labels)


def _end_epoch(state: RunState, epoch: int, args: TrainArgs, hooks: Hooks, runlog: RunLog, world: World,
               progress: Progress) -> None:
    """Dev scores (every process: the same replica on the same dev set); the best epoch's model saved."""
    scores = hooks.evaluate()
    score = scores[f"dev_{args.metric}"]
    improved = state.best_epoch == 0 or score > state.best
    if improved:
        state.best, state.best_epoch, state.best_accuracy = score, epoch, scores["dev_accuracy"]
        if world.is_main:
            hooks.save_best()
            progress.saved_epoch = epoch
    runlog.eval(epoch, state.step, scores, improved)
    barrier(world)
