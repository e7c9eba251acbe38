"""``fastmt distill-lm``: a small causal LM trained from several that share its tokenizer.

``a_task CE + a_kd L_kd + a_hid L_hid``, token by token: ``CE`` on the next token, ``L_kd`` the
multi-teacher KL with each teacher weighted per token by how well it predicts that token
(``fastmt.kernels.lm_linear_kl_loss``: from the output layers, never ``tokens x vocab`` logits), and
``L_hid`` the projected hidden-state loss of the classification task (``mt_hidden_loss``) on every token.
Text is packed into blocks (``fastmt.data.packed``); the loop, checkpoints, exact ``--resume``, signals
and the one-line errors are the classification task's (``fastmt.engine.loop``). The result is a
``transformers`` ``AutoModelForCausalLM`` dir with its tokenizer (``pipeline("text-generation")``
loads it), plus ``fastmt_run.json``, the run's settings.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from fastmt.config import auto as fastpath

from fastmt.engine import outlock
from fastmt.data.dataset import iterate_batches, tokenizer_key
from fastmt.engine.distributed import World
from fastmt.errors import UsageError
from fastmt.engine.fileio import first_line, staged_set, write_json
from fastmt.data.packed import next_tokens, pack, read_texts, token_count
from fastmt.tasks.lm.common import KEY, _backbone, chunked_ce, compiled_bodies  # noqa: F401 - KEY: the tests' and benches' name
from fastmt.engine.loop import Hooks, RunResult, TrainData, fit
from fastmt.engine.rundir import check_out_dir, check_resume
from fastmt.config.settings import TrainArgs, resolve_device
from fastmt.engine.precision import autocast
from fastmt.tasks.classification.common import seed_everything

log = logging.getLogger("fastmt")

DIRECTIONS = ("forward", "reverse")
RUN_FILE = "fastmt_run.json"


@dataclass
class DistillLMArgs(TrainArgs):
    teacher: list[str] = field(default_factory=list)  # [--teacher] causal-LM dirs or names (repeat)
    student: str | None = None  # [--student] a causal-LM dir to start from
    student_layers: int = 0  # [--student-layers] or: teacher 0 cut to K evenly spaced layers
    lr: float = 1e-4
    temperature: float = 1.0
    weighting: str = "paper"
    direction: str = "forward"
    kd_target: str = "teachers"  # teachers: one weighted KL per teacher (MT-BERT); ensemble: one KL to the mean logits
    kernels: str = "auto"  # fused (fastmt.kernels), reference (fastmt.losses), auto: fused on CUDA, reference on a CPU
    alpha_task: float = 1.0
    alpha_kd: float = 1.0
    alpha_hidden: float = 0.0  # the hidden loss needs teachers of one width
    dev_share: float = 0.05  # without --dev: this share of the training blocks (at least one) is held out
    cache_teachers: str | None = None  # [--cache-teachers DIR|auto|off] the teachers' top-k stored once (fastmt.tasks.lm.cached); None: off
    top_k: int = 128  # [--top-k] next tokens stored per token and teacher
    cache_budget_gb: float = 8.0  # [--cache-budget-gb] the most disk the top-k cache may take

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.teacher:
            raise UsageError("--teacher: give at least one teacher (repeat the flag for several)")
        if (self.student is None) == (self.student_layers <= 0):
            raise UsageError("give one of --student DIR (a causal LM to start from) or --student-layers K "
                             "(teacher 0 cut to K layers)")
        if self.weighting not in ("paper", "softmax", "uniform"):
            raise UsageError(f"--weighting {self.weighting}: choose paper, softmax or uniform")
        if self.direction not in DIRECTIONS:
            raise UsageError(f"--direction {self.direction}: choose forward or reverse")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise UsageError(f"--temperature {self.temperature}: must be a positive number")
        if self.kd_target not in ("teachers", "ensemble"):
            raise UsageError(f"--kd-target {self.kd_target}: choose teachers or ensemble")
        if self.kernels not in ("auto", "fused", "reference"):
            raise UsageError(f"--kernels {self.kernels}: choose auto, fused or reference")
        for name in ("alpha_task", "alpha_kd", "alpha_hidden"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0")
        if self.metric != "accuracy":
            raise UsageError(f"--metric {self.metric}: distill-lm picks the best epoch by next-token accuracy")
        if not 0 < self.dev_share < 1:
            raise UsageError(f"--dev-share {self.dev_share}: a fraction in (0, 1)")
        if self.cache_teachers == "off":
            self.cache_teachers = None
        if self.cache_teachers is not None and not str(self.cache_teachers).strip():
            raise UsageError("--cache-teachers: give a dir, auto or off")
        if not (self.cache_budget_gb >= 0 and math.isfinite(self.cache_budget_gb)):
            raise UsageError(f"--cache-budget-gb {self.cache_budget_gb}: must be a number >= 0")
        from fastmt.tasks.lm.cached import check_cache_args

        check_cache_args(self)


# --------------------------------------------------------------------------------------------------
# Models


def load_lm(path: str, what: str):
    """A causal LM from a dir (or a hub name in the local cache), in float32; one line if it is not one."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{what} {path}: not a causal language model that transformers can load "
                         f"({first_line(e, 160)})") from None
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise UsageError(f"{what} {path}: its output layer is not a plain matrix (a bias, or none); "
                         "fastmt distils through the output matrix")
    return model


def load_tokenizer(path: str, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{what} {path}: no tokenizer transformers can load ({first_line(e, 160)})") from None


def vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def hidden_width(model) -> int:
    return int(model.get_output_embeddings().weight.shape[1])


_LAYER = re.compile(r"^(.*\.(?:layers|h|layer|blocks)\.)(\d+)(\..*)$")


def cut_layers(teacher, k: int):
    """Teacher ``teacher`` with ``k`` of its layers, evenly spaced (``fastmt.losses.layer_map``); its
    embeddings, final norm and output layer as they are. Fresh copies: the teacher is not changed."""
    from transformers import AutoModelForCausalLM

    from fastmt.losses import layer_map

    depth = num_layers(teacher)
    if k > depth:
        raise UsageError(f"--student-layers {k}: teacher 0 has {depth} layers; choose at most {depth}")
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = k
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    picked = layer_map(k, depth)  # student layer j + 1 -> teacher layer picked[j] (1-based)
    source = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        m = _LAYER.match(name)
        src = f"{m.group(1)}{picked[int(m.group(2))] - 1}{m.group(3)}" if m else name
        state[name] = source[src].detach().clone()
    student.load_state_dict(state)
    return student


class LMStudent(nn.Module):
    """The student and the projections of its hidden loss (trained, not saved with the model)."""

    def __init__(self, model, num_teachers: int, k: int, ds: int, dt: int, with_hidden: bool):
        super().__init__()
        self.model = model
        shape = (num_teachers, k, ds, dt) if with_hidden else (0, 0, ds, dt)
        w = torch.zeros(shape)
        if with_hidden:
            if ds == dt:
                w += torch.eye(ds)
            else:
                nn.init.normal_(w, std=ds**-0.5)
        self.proj_weight = nn.Parameter(w, requires_grad=with_hidden)
        self.proj_bias = nn.Parameter(torch.zeros(shape[0], shape[1], dt), requires_grad=with_hidden)


class LMStep:
    """``step(inputs, labels) -> (loss, parts)``: one batch of blocks through the teachers (no gradient)
    and the student, the three losses."""

    def __init__(self, student: LMStudent, teachers: list, args: DistillLMArgs, losses, device: torch.device,
                 maps: list[list[int]]):
        from fastmt.kernels.lm_tiled import stack_teachers

        self.student, self.teachers, self.args, self.losses, self.device = student, teachers, args, losses, device
        self.maps = maps  # per teacher, the teacher layer each student layer learns (hidden loss)
        self.bodies = compiled_bodies([*teachers, student.model]) if args.compile else None
        self.want_kd = args.alpha_kd > 0
        self.want_hidden = args.alpha_hidden > 0
        heads = [t.get_output_embeddings().weight.detach() for t in teachers]
        self.ensemble = args.kd_target == "ensemble"
        if self.ensemble:
            # The teachers' mean logits sum_i (h_i / T) W_i^T are one teacher's: hidden states and output
            # matrices side by side along the width, the states divided by T. Still no tokens x vocab.
            self.t_heads = torch.cat(heads, dim=1)[None]
        else:
            self.t_heads = stack_teachers(heads) if len({h.shape[1] for h in heads}) == 1 else heads
        if args.precision in ("bf16", "fp16") and isinstance(self.t_heads, torch.Tensor):
            # Under autocast the teachers' states come in half precision; their output matrices are cast
            # once here, not on every step inside the loss.
            self.t_heads = self.t_heads.to(torch.bfloat16 if args.precision == "bf16" else torch.float16)

    def __call__(self, inputs, labels):
        x = inputs[KEY]
        ids, mask = x["input_ids"], x["attention_mask"]
        targets = next_tokens(ids, mask).reshape(-1)
        a = self.args
        with autocast(self.device, a.precision):
            t_out = []
            if self.want_kd or self.want_hidden:
                with torch.no_grad():
                    t_out = [_backbone(t, ids, mask, self.want_hidden, self.bodies) for t in self.teachers]
            s_out = _backbone(self.student.model, ids, mask, self.want_hidden, self.bodies)
            h = s_out.last_hidden_state.reshape(-1, s_out.last_hidden_state.shape[-1])
            w = self.student.model.get_output_embeddings().weight
            nll, _, count = chunked_ce(h, w, targets)
            task = nll / count.clamp_min(1)
            loss = a.alpha_task * task
            parts = {"task": task.detach()}
            if self.want_kd:
                t_h = [o.last_hidden_state.reshape(h.shape[0], -1) for o in t_out]
                if self.ensemble:
                    t_h, weighting = (torch.cat(t_h, dim=1) / len(t_h))[None], "uniform"
                else:
                    t_h = torch.stack(t_h) if isinstance(self.t_heads, torch.Tensor) else t_h
                    weighting = a.weighting
                kd = self.losses.lm_linear_kl_loss(h, w, t_h, self.t_heads, targets, weighting, a.temperature,
                                                   direction=a.direction)
                loss = loss + a.alpha_kd * kd
                parts["kd"] = kd.detach()
            if self.want_hidden:
                s_layers = torch.stack([s_out.hidden_states[k + 1] for k in range(len(self.maps[0]))])
                t_layers = torch.stack([torch.stack([o.hidden_states[m] for m in mp]) for o, mp in zip(t_out, self.maps)])
                hid = self.losses.mt_hidden_loss(s_layers, t_layers, self.student.proj_weight, self.student.proj_bias,
                                                 mask)
                loss = loss + a.alpha_hidden * hid
                parts["hidden"] = hid.detach()
        return loss, parts


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def lm_scores(model, enc, batch_size: int, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Perplexity, next-token accuracy and the mean negative log-likelihood of ``model`` on the packed
    blocks ``enc``."""
    was = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    width = max(len(b) for b in enc.input_ids)
    for batch in iterate_batches({KEY: enc}, [0] * len(enc), batch_size, [width], False):
        x = batch.inputs[KEY]
        ids, mask = x["input_ids"].to(device), x["attention_mask"].to(device)
        with autocast(device, precision):
            out = _backbone(model, ids, mask, False)
            h = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
            s, c, n = chunked_ce(h, model.get_output_embeddings().weight, next_tokens(ids, mask).reshape(-1))
        nll += s.double()
        correct += c
        count += n
    model.train(was)
    n = max(int(count), 1)
    mean = float(nll) / n
    return {"nll": mean, "perplexity": math.exp(min(mean, 700.0)), "accuracy": int(correct) / n, "tokens": int(count)}


# --------------------------------------------------------------------------------------------------
# The command


def _check_models(teachers, names, student, tok_key: str, tokenizers) -> None:
    from fastmt.losses import check_vocab

    for name, tok in zip(names, tokenizers):
        if tokenizer_key(tok) != tok_key:
            raise UsageError(f"--teacher {name}: its tokenizer differs from teacher 0's ({names[0]}); every model "
                             "must share one tokenizer")
    try:
        check_vocab(vocab_size(student), [vocab_size(t) for t in teachers], names)
    except ValueError as e:
        raise UsageError(str(e)) from None


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
    from fastmt.data.dataset import Encoded

    cut = lambda a, b: Encoded(train.input_ids[a:b], train.token_type_ids[a:b], train.pad_id)  # noqa: E731
    return cut(0, n - held), cut(n - held, n)


@outlock.released
def distill_lm(args: DistillLMArgs) -> RunResult:
    """Train the student causal LM from the teachers (see the module's docstring)."""
    device = resolve_device(args.device)
    if args.precision == "auto":
        args.precision, _ = fastpath.choose_precision(device)
    seed_everything(args.seed)
    names = list(args.teacher)
    teachers = [load_lm(p, "--teacher") for p in names]
    tokenizers = [load_tokenizer(p, "--teacher") for p in names]
    tokenizer = tokenizers[0]
    if args.student is not None:
        model = load_lm(args.student, "--student")
        s_tok = load_tokenizer(args.student, "--student")
        if tokenizer_key(s_tok) != tokenizer_key(tokenizer):
            raise UsageError(f"--student {args.student}: its tokenizer differs from the teachers'; every model must "
                             "share one tokenizer")
    else:
        model = cut_layers(teachers[0], args.student_layers)
    _check_models(teachers, names, model, tokenizer_key(tokenizer), tokenizers)
    from fastmt.losses import layer_map

    k = num_layers(model)
    widths = {hidden_width(t) for t in teachers}
    if args.alpha_hidden > 0 and len(widths) > 1:
        raise UsageError(f"--alpha-hidden {args.alpha_hidden}: the teachers differ in width ({sorted(widths)}); the "
                         "hidden loss stacks them, so give teachers of one width or --alpha-hidden 0")
    try:
        maps = [layer_map(k, num_layers(t)) for t in teachers] if args.alpha_hidden > 0 else [[]]
    except ValueError as e:
        raise UsageError(f"--alpha-hidden: {e}") from None
    student = LMStudent(model, len(teachers), k, hidden_width(model), max(widths), args.alpha_hidden > 0)
    out_dir = check_out_dir(args.out, args.overwrite, args.resume)
    train_enc, dev_enc = _splits(args, tokenizer)
    log.info("distill-lm: %d teachers, student of %d layers; %d training blocks (%d tokens), %d dev blocks",
             len(teachers), k, len(train_enc), token_count(train_enc), len(dev_enc))
    if args.compile is None:  # as for classification: compiling repays itself on long jobs only
        steps = math.ceil(len(train_enc) / args.batch_size) * args.epochs
        args.compile = steps >= fastpath.COMPILE_MIN_STEPS
        log.info("distill-lm: compile %s (%d steps %s %d; --compile/--no-compile to choose)",
                 "on" if args.compile else "off", steps, ">=" if args.compile else "<", fastpath.COMPILE_MIN_STEPS)
    if args.kernels == "auto":  # as for classification: fused on CUDA, the reference on a CPU (fewer products there)
        args.kernels = "fused" if device.type == "cuda" else "reference"
    import fastmt.kernels as fused_losses
    from fastmt import losses as reference_losses

    losses_mod = fused_losses if args.kernels == "fused" else reference_losses
    for t in teachers:
        t.to(device).eval().requires_grad_(False)
    student.to(device)
    cache = None
    if args.cache_teachers is not None:
        from fastmt.tasks.lm.cached import CachedLMStep, open_cache

        cache = open_cache(args, names, names[0], train_enc.input_ids, vocab_size(model))  # may lower --top-k to V
    run_config = {"command": "distill-lm", **asdict(args), "layer_maps": maps}
    check_resume(args, out_dir, run_config)
    if cache is not None:
        step = CachedLMStep(student, teachers, args, device, cache)
    else:
        step = LMStep(student, teachers, args, losses_mod, device, maps)

    def evaluate():
        s = lm_scores(student.model, dev_enc, args.eval_batch_size, device, args.precision)
        return {"dev_accuracy": s["accuracy"], "dev_perplexity": s["perplexity"], "dev_nll": s["nll"]}

    def save_best():
        save_lm(out_dir, student.model, tokenizer, run_config)

    data = TrainData({KEY: train_enc}, [0] * len(train_enc), [args.max_length])
    result = fit(student, step, data, args, device, out_dir, "distill-lm", Hooks(evaluate, save_best), World(),
                 run_config=run_config)
    result.extra["dev"] = lm_scores(student.model, dev_enc, args.eval_batch_size, device, args.precision)
    if cache is not None:
        cache.flush()
        result.extra["teacher_runs"] = step.teacher_runs
        log.info("distill-lm: the teachers ran on %d batches; the top-k teacher cache %s served the rest",
                 step.teacher_runs, cache.path)
    return result


def save_lm(out_dir: Path, model, tokenizer, run_config: dict) -> None:
    """The model, its tokenizer and the run's settings, replacing the previous ones as one set."""
    with staged_set(out_dir) as stage:
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        write_json(stage / RUN_FILE, run_config)


def eval_lm(models: list[str], data: str, max_length: int, batch_size: int, device_name: str,
            text_column: str | None = None) -> list[dict]:
    """Perplexity and next-token accuracy of each model on ``data`` (packed with the first model's
    tokenizer; every model must share it)."""
    device = resolve_device(device_name)
    tokenizer = load_tokenizer(models[0], "--model")
    enc = pack(tokenizer, read_texts(data, text_column), max_length)
    rows = []
    for path in models:
        if tokenizer_key(load_tokenizer(path, "--model")) != tokenizer_key(tokenizer):
            raise UsageError(f"--model {path}: its tokenizer differs from {models[0]}'s; the models must share one "
                             "to be compared on the same tokens")
        model = load_lm(path, "--model").to(device)
        rows.append({"model": str(path), **lm_scores(model, enc, batch_size, device)})
        del model
    return rows
