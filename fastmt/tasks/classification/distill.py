"""``fastmt distill``: the student trained from the teachers, ``a_task CE + a_kd L_kd + a_hid L_hid``
(the README's "The method").

Builds the student, the frozen teachers, the data and the step (``fastmt.tasks.classification.step.DistillStep``, with the
teacher cache when one serves), and hands them to the loop.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from fastmt.config import auto

from fastmt.engine import outlock, shapes
from fastmt.cache.store import cache_dir
from fastmt.cache.teachers import TeacherCache, fingerprint
from fastmt.engine.distributed import World, check_batch, local_device, world_from_env
from fastmt.errors import UsageError
from fastmt.models.inference import student_logits
from fastmt.engine.loop import Hooks, RunResult, fit
from fastmt.metrics import scores as metric_scores
from fastmt.models.classifier import Student, StudentSpec, Teachers, build_student, count_parameters, fit_max_length, layer_maps
from fastmt.engine.rundir import check_out_dir, check_resume
from fastmt.config.settings import DistillArgs, resolve_device
from fastmt.engine.kernelchoice import fused_available, loss_module
from fastmt.models.stacked import teacher_groups
from fastmt.tasks.classification.step import DistillStep
from fastmt.engine.checkpoint import seed_everything
from fastmt.tasks.classification.common import Splits, columns_of, encodings_for, prepare_splits, total_steps, train_data

log = logging.getLogger("fastmt")


@outlock.released
def distill(args: DistillArgs) -> RunResult:
    """Train the student from the teachers: ``a_task CE + a_kd L_kd + a_hid L_hid`` (the README's "The method")."""
    device = resolve_device(args.device)
    world = world_from_env(device)
    device = local_device(device, world)
    check_batch(args.batch_size, world)
    teachers, tcfg = Teachers.load(args.teachers)
    label_names = list(tcfg["label_names"])
    all_teachers = teachers
    if args.teacher_subset is not None:
        teachers = subset_teachers(teachers, args.teacher_subset)
    seed_everything(args.seed)  # the student's fresh parameters depend on --seed only
    student, init_info = build_student(StudentSpec(args.student_layers, args.student_init), teachers, init_from=all_teachers)
    maps = layer_maps(args.student_layers, teachers)
    use_teachers = args.alpha_kd > 0 or (args.hidden_loss != "none" and args.alpha_hidden > 0)
    if args.hidden_loss == "tokens" and use_teachers:
        _check_same_tokens(student, teachers)
    out_dir = check_out_dir(args.out, args.overwrite, args.resume, lock=world.is_main)
    args.max_length = fit_max_length(args.max_length, [student.encoder, *teachers.encoders] if use_teachers else
                                     [student.encoder], ["the student", *[f"teacher {n}" for n in teachers.names]])
    splits = prepare_splits(args.train, args.dev, [student.tokenizer, *teachers.tokenizers], args.max_length, label_names,
                            columns_of(args))
    stackable = use_teachers and any(len(g) > 1 for g in teacher_groups(teachers))
    auto_compile = args.compile is None
    path = auto.resolve("distill", args, device, total_steps(args, splits), stackable=stackable,
                            data_parallel=world.size > 1, fused_available=fused_available)
    keys = [student.key, *teachers.keys] if use_teachers else [student.key]
    # Two compiled functions: the teachers' forward and the student's forward + loss.
    compiled = shapes.plan(args, encodings_for(splits, keys), len(splits.train_labels), world, splits.buckets,
                           auto_compile, functions=2)
    path = ", ".join(x for x in (path, compiled) if x)
    splits.buckets = auto.widths(args, splits.buckets)
    losses_mod = loss_module(args.kernels)
    teachers.to(device).eval().requires_grad_(False)
    student.to(device)
    run_config = {"command": "distill", **asdict(args), "layer_maps": maps, "student_init_info": init_info}
    fit_config = {k: v for k, v in run_config.items() if k != "student_init_info"}
    check_resume(args, out_dir, fit_config)
    auto.report("distill", path)
    loss_fn = _make_step(args, student, teachers, maps, splits, losses_mod, device, world, use_teachers)

    def evaluate():
        logits = student_logits(student, splits.dev_enc, len(splits.dev_labels), args.eval_batch_size, splits.buckets, device, args.precision)
        return {f"dev_{k}": v for k, v in metric_scores(logits, splits.dev_labels, len(splits.label_names)).items()}

    def save_best():
        student.save(out_dir, run_config, label_names, {"layer_maps": maps, "teachers": teachers.names})

    result = fit(student, loss_fn, train_data(splits, keys), args, device, out_dir, "distill",
                 Hooks(evaluate, save_best, loss_fn.describe_faults), world, run_config=fit_config)
    result.extra["parameters"] = count_parameters(student.encoder) + count_parameters(student.head)
    if loss_fn.cache is not None:
        log.info("%s", loss_fn.cache.report())
        result.extra["cache_read_s"], result.extra["cache_verify_s"] = loss_fn.cache.read_s, loss_fn.cache.verify_s
    return result


def _check_same_tokens(student: Student, teachers: Teachers) -> None:
    """--hidden-loss tokens pairs token positions: every teacher must tokenize as the student does."""
    for i, key in enumerate(teachers.keys):
        if key != student.key:
            raise UsageError(
                f"--hidden-loss tokens: teacher {i} ({teachers.names[i]}) tokenizes differently from the "
                f"student, so token positions do not line up; use --hidden-loss cls (or none)"
            )


def _make_step(args: DistillArgs, student: Student, teachers: Teachers, maps, splits: Splits, losses_mod,
               device: torch.device, world: World, use_teachers: bool) -> DistillStep:
    """The step the loop runs: forward + loss (``DistillStep``), fed by the teacher cache where one serves."""
    loss_fn = DistillStep(student, teachers, maps, args, losses_mod, device, compile=args.compile)
    if args.cache_teachers is not None and use_teachers:
        loss_fn.cache = teacher_cache(args, splits, student, teachers, maps)
    if not loss_fn.want_hidden:
        # No hidden loss: the projections get no gradient, so they are not trained (nor synchronised).
        student.proj_weight.requires_grad_(False)
        student.proj_bias.requires_grad_(False)
    if world.size > 1:
        # Forward goes through the wrapper so gradients are averaged across processes. The
        # projections are used after forward, in the loss; their gradient hooks still fire once.
        loss_fn.student_call = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    return loss_fn


def teacher_cache(args: DistillArgs, splits: Splits, student: Student, teachers: Teachers, maps):
    """The teacher cache for this run (``fastmt.cache.teachers``). A data-parallel run has none: its
    ``--cache-teachers`` was turned off by ``fastmt.config.auto``."""
    want_hidden = args.hidden_loss != "none" and args.alpha_hidden > 0
    kind = args.hidden_loss if want_hidden else "none"
    fp = fingerprint(args.teachers, args.train, args.max_length, args.teacher_subset, kind, maps, args.precision)
    path = cache_dir(args.cache_teachers, fp)
    k = len(maps[0]) if want_hidden else 0
    d = teachers.hidden_size if want_hidden else 0
    lengths = splits.train_enc[student.key].packed()[3] if kind == "tokens" else None
    return TeacherCache.open(path, fp, len(splits.train_labels), len(teachers), len(splits.label_names),
                               k, d, lengths, args.cache_budget_gb * 1e9, temperature=args.temperature)


def subset_teachers(teachers: Teachers, idx: list[int]) -> Teachers:
    for i in idx:
        if not 0 <= i < len(teachers):
            raise UsageError(f"--teacher-subset {i}: there are {len(teachers)} teachers (0..{len(teachers) - 1})")
    sub = Teachers([teachers.encoders[i] for i in idx], [teachers.tokenizers[i] for i in idx], [teachers.names[i] for i in idx],
                   teachers.num_labels, teachers.pooling)
    sub.head = teachers.head
    sub.adapters = nn.ModuleList(teachers.adapters[i] for i in idx)
    return sub
