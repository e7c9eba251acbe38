"""``fastmt cofinetune``: the teachers fine-tuned jointly through one shared head, ``L = sum_i CE(y, z_i)``.

Builds the teachers, the data and the step (the summed cross-entropies), and hands them to the loop.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import torch
import torch.nn.functional as F

from fastmt.config import auto

from fastmt.engine import outlock, shapes
from fastmt.data.dataset import read_dataset
from fastmt.errors import UsageError
from fastmt.tasks.classification.evaluate import accuracy
from fastmt.models.inference import teacher_logits
from fastmt.engine.loop import Hooks, RunResult, fit
from fastmt.metrics import scores as metric_scores
from fastmt.models.classifier import Teachers, choose_pooling, fit_max_length
from fastmt.engine.rundir import check_out_dir, check_resume
from fastmt.config.settings import TrainArgs, resolve_device
from fastmt.engine.precision import autocast, compile_fn
from fastmt.tasks.classification.step import install_output_hooks
from fastmt.engine.checkpoint import seed_everything
from fastmt.tasks.classification.common import (columns_of, encodings_for, prepare_splits, total_steps, train_data,
                                                train_label_names)


@outlock.released
def cofinetune(teacher_sources: list[str], args: TrainArgs) -> RunResult:
    """Fine-tune the teachers jointly through one shared head: ``L = sum_i CE(y, z_i)``."""
    if not teacher_sources:
        raise UsageError("cofinetune needs at least one --teacher")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("cofinetune runs in one process; launch it without torchrun")
    device = resolve_device(args.device)
    out_dir = check_out_dir(args.out, args.overwrite, args.resume)
    seed_everything(args.seed)
    label_names = train_label_names(read_dataset(args.train, columns=columns_of(args)))
    pooled = ""
    if args.pooling == "auto":
        args.pooling, why = choose_pooling(teacher_sources)
        pooled = f"pooling {args.pooling} ({why})"  # told on the path line, once everything has loaded
    teachers = Teachers.from_pretrained_encoders(teacher_sources, len(label_names), args.pooling)
    args.max_length = fit_max_length(args.max_length, teachers.encoders, [f"teacher {s}" for s in teacher_sources])
    splits = prepare_splits(args.train, args.dev, teachers.tokenizers, args.max_length, label_names, columns_of(args))
    auto_compile = args.compile is None
    path = auto.resolve("cofinetune", args, device, total_steps(args, splits))
    compiled = shapes.plan(args, encodings_for(splits, teachers.keys), len(splits.train_labels), None, splits.buckets,
                           auto_compile, functions=1)
    path = ", ".join(x for x in (path, compiled, pooled) if x)
    splits.buckets = auto.widths(args, splits.buckets)
    teachers.to(device)
    run_config = {"command": "cofinetune", "teachers": list(teacher_sources), **asdict(args)}
    check_resume(args, out_dir, run_config)
    auto.report("cofinetune", path)

    def loss_fn(inputs, labels):
        with autocast(device, args.precision):
            logits = teachers(inputs)  # [T, N, C]
        per_teacher = torch.stack([F.cross_entropy(z.float(), labels) for z in logits])
        return per_teacher.sum(), {f"ce_{i}": v for i, v in enumerate(per_teacher)}

    if args.compile:
        install_output_hooks(list(teachers.encoders), device)
        # One graph per length bucket (forward + the T losses); backward is compiled with it.
        loss_fn = compile_fn(loss_fn)

    def evaluate():
        logits = teacher_logits(teachers, splits.dev_enc, len(splits.dev_labels), args.eval_batch_size, splits.buckets, device, args.precision)
        scores = {f"dev_accuracy_{i}": accuracy(z, splits.dev_labels) for i, z in enumerate(logits)}
        # The ensemble's scores pick the best epoch.
        scores.update({f"dev_{k}": v for k, v in metric_scores(logits.mean(0), splits.dev_labels, len(splits.label_names)).items()})
        return scores

    def save_best():
        teachers.save(out_dir, run_config, splits.label_names)

    return fit(teachers, loss_fn, train_data(splits, teachers.keys), args, device, out_dir, "cofinetune",
               Hooks(evaluate, save_best), run_config=run_config)
