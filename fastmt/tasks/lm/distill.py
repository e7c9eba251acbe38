"""``fastmt distill-lm``: a small causal LM trained from several that share its tokenizer.

``a_task CE + a_kd L_kd + a_hid L_hid``, token by token: ``CE`` on the next token, ``L_kd`` the
multi-teacher KL with each teacher weighted per token by how well it predicts that token
(``fastmt.kernels.lm_linear_kl_loss``: from the output layers, never ``tokens x vocab`` logits), and
``L_hid`` the projected hidden-state loss of the classification task (``mt_hidden_loss``) on every token.
Text is packed into blocks (``fastmt.data.packed``); the models load, are cut and saved in
``fastmt.models.causal_lm``; the step is ``fastmt.tasks.lm.step`` on live teachers or
``fastmt.tasks.lm.cached`` on stored ones; the dev score is ``fastmt.tasks.lm.evaluate``. The loop,
checkpoints, exact ``--resume``, signals and the one-line errors are every task's (``fastmt.engine.loop``).
The result is a ``transformers`` ``AutoModelForCausalLM`` dir with its tokenizer
(``pipeline("text-generation")`` loads it), plus ``fastmt_run.json``, the run's settings.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict

from fastmt.config import auto
from fastmt.config.settings import DistillLMArgs, resolve_device
from fastmt.data.dataset import Encoded, tokenizer_key
from fastmt.data.packed import pack, read_texts, token_count
from fastmt.engine import outlock
from fastmt.engine.checkpoint import seed_everything
from fastmt.engine.distributed import World
from fastmt.engine.kernelchoice import fused_available, loss_module
from fastmt.engine.loop import Hooks, RunResult, TrainData, fit
from fastmt.engine.rundir import check_out_dir, check_resume
from fastmt.errors import UsageError
from fastmt.losses import check_vocab, layer_map
from fastmt.models.causal_lm import (LMStudent, cut_layers, hidden_width, load_lm, load_tokenizer, num_layers, save_lm,
                                     vocab_size)
from fastmt.tasks.lm.cached import CachedLMStep, fit_top_k, open_cache
from fastmt.tasks.lm.common import KEY
from fastmt.tasks.lm.evaluate import dev_scores, lm_scores
from fastmt.tasks.lm.step import LMStep

log = logging.getLogger("fastmt")


def _load_models(args: DistillLMArgs) -> tuple[list, object, object]:
    """The teachers, the tokenizer they share and the student's model (``--student``, or teacher 0 cut
    to ``--student-layers``); one line where they do not fit together."""
    names = list(args.teacher)
    teachers = [load_lm(p, "--teacher") for p in names]
    tokenizers = [load_tokenizer(p, "--teacher") for p in names]
    tokenizer = tokenizers[0]
    if args.student is not None:
        model = load_lm(args.student, "--student")
        if tokenizer_key(load_tokenizer(args.student, "--student")) != tokenizer_key(tokenizer):
            raise UsageError(f"--student {args.student}: its tokenizer differs from the teachers'; every model must "
                             "share one tokenizer")
    else:
        model = cut_layers(teachers[0], args.student_layers)
    _check_models(teachers, names, model, tokenizer_key(tokenizer), tokenizers)
    return teachers, tokenizer, model


def _check_models(teachers, names, student, tok_key: str, tokenizers) -> None:
    for name, tok in zip(names, tokenizers):
        if tokenizer_key(tok) != tok_key:
            raise UsageError(f"--teacher {name}: its tokenizer differs from teacher 0's ({names[0]}); every model "
                             "must share one tokenizer")
    try:
        check_vocab(vocab_size(student), [vocab_size(t) for t in teachers], names)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _student(args: DistillLMArgs, model, teachers: list) -> tuple[LMStudent, list[list[int]]]:
    """The student with the projections of its hidden loss, and per teacher the teacher layer each student
    layer learns (``[[]]`` without the hidden loss)."""
    k = num_layers(model)
    widths = {hidden_width(t) for t in teachers}
    if args.alpha_hidden > 0 and len(widths) > 1:
        raise UsageError(f"--alpha-hidden {args.alpha_hidden}: the teachers differ in width ({sorted(widths)}); the "
                         "hidden loss stacks them, so give teachers of one width or --alpha-hidden 0")
    try:
        maps = [layer_map(k, num_layers(t)) for t in teachers] if args.alpha_hidden > 0 else [[]]
    except ValueError as e:
        raise UsageError(f"--alpha-hidden: {e}") from None
    return LMStudent(model, len(teachers), k, hidden_width(model), max(widths), args.alpha_hidden > 0), maps


def _splits(args: DistillLMArgs, tokenizer):
    """Packed training and dev blocks; without --dev, the last ``dev_share`` of the training blocks."""
    train = pack(tokenizer, read_texts(args.train, args.text_column), args.max_length)
    if args.dev:
        dev = pack(tokenizer, read_texts(args.dev, args.text_column), args.max_length)
        return train, dev
    n = len(train)
    if n < 2:
        raise UsageError(f"--train {args.train}: {n} block of {args.max_length} tokens; give --dev, or more text "
                         "(without --dev a share of the blocks is held out)")
    held = max(1, int(round(n * args.dev_share)))
    cut = lambda a, b: Encoded(train.input_ids[a:b], train.token_type_ids[a:b], train.pad_id)  # noqa: E731
    return cut(0, n - held), cut(n - held, n)


def _make_step(args: DistillLMArgs, student: LMStudent, teachers: list, maps: list[list[int]], device, cache):
    """The step the loop runs: on the teachers' stored top-k where a cache serves, else on the live teachers."""
    if cache is not None:
        return CachedLMStep(student, teachers, args, device, cache)
    return LMStep(student, teachers, args, loss_module(args.kernels), device, maps)


@outlock.released
def distill_lm(args: DistillLMArgs) -> RunResult:
    """Train the student causal LM from the teachers (see the module's docstring)."""
    device = resolve_device(args.device)
    seed_everything(args.seed)  # the hidden loss's fresh projections depend on --seed only
    teachers, tokenizer, model = _load_models(args)
    student, maps = _student(args, model, teachers)
    out_dir = check_out_dir(args.out, args.overwrite, args.resume)
    train_enc, dev_enc = _splits(args, tokenizer)
    log.info("distill-lm: %d teachers, student of %d layers; %d training blocks (%d tokens), %d dev blocks",
             len(teachers), num_layers(model), len(train_enc), token_count(train_enc), len(dev_enc))
    steps = math.ceil(len(train_enc) / args.batch_size) * args.epochs
    auto.report("distill-lm", auto.resolve("distill-lm", args, device, steps, fused_available=fused_available))
    for t in teachers:
        t.to(device).eval().requires_grad_(False)
    student.to(device)
    if args.cache_teachers is not None:
        fit_top_k(args, vocab_size(model))  # before the settings are kept and held against a resumed run's
    run_config = {"command": "distill-lm", **asdict(args), "layer_maps": maps}
    check_resume(args, out_dir, run_config)  # before the cache opens: a refused resume leaves it as it was
    cache = None
    if args.cache_teachers is not None:
        cache = open_cache(args, list(args.teacher), args.teacher[0], train_enc.input_ids, vocab_size(model))
    step = _make_step(args, student, teachers, maps, device, cache)
    hooks = Hooks(lambda: dev_scores(student.model, dev_enc, args.eval_batch_size, device, args.precision),
                  lambda: save_lm(out_dir, student.model, tokenizer, run_config))
    data = TrainData({KEY: train_enc}, [0] * len(train_enc), [args.max_length])
    result = fit(student, step, data, args, device, out_dir, "distill-lm", hooks, World(), run_config=run_config)
    result.extra["dev"] = lm_scores(student.model, dev_enc, args.eval_batch_size, device, args.precision)
    if cache is not None:
        cache.flush()
        result.extra["teacher_runs"] = step.teacher_runs
        log.info("distill-lm: the teachers ran on %d batches; the top-k teacher cache %s served the rest",
                 step.teacher_runs, cache.path)
    return result
