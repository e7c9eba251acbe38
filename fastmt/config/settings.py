"""What a run is asked to do: the settings of every training command, each written once, checked where
they are made.

``TrainArgs`` holds the settings every training command shares (it is ``fastmt cofinetune``'s),
``KDArgs`` adds what both distillation commands share, ``DistillArgs`` (``fastmt distill``) and
``DistillLMArgs`` (``fastmt distill-lm``) what each adds. Each field carries its flag's default, type,
choices and help (``fastmt.config.flags``): the command line is built from these classes, so a Python
caller and the CLI make the same object with the same defaults (a test compares them field by field),
and a bad value is refused with the same one-line message naming its flag either way.

A setting left to ``auto`` (or None) becomes a concrete one in one place, :func:`fastmt.config.auto.resolve`,
once the data's size and the device are known (precision, kernels, compile, CUDA graphs, teacher
stacking, the teacher cache, length grouping); ``--pooling auto`` when the teachers load
(:func:`fastmt.models.classifier.choose_pooling`); ``--device auto`` and ``--head-lr auto`` need no data
and are resolved here.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import ClassVar

from fastmt.choices import (AUTO, DIRECTIONS, HIDDEN_LOSSES, KD_TARGETS, KERNELS, METRICS, POOLINGS, PRECISIONS,
                            SCHEMES, TRACKERS)
from fastmt.config.flags import opt, override
from fastmt.errors import UsageError

HEAD_LR_FLOOR = 1e-3  # --head-lr auto: a freshly initialised head learns at least this fast
CACHE_DEFAULT = "default"  # distill's --cache-teachers when not given: auto with several epochs (fastmt.config.auto)

DATA_HELP = ("a .tsv, .csv, .jsonl or .parquet file, a datasets save_to_disk dir (DIR or DIR:SPLIT), or a "
             "Hugging Face hub NAME[/CONFIG][:SPLIT] (parquet, dirs and hub names need the datasets package)")
LM_DATA_HELP = "a .txt file (one document per line), or " + DATA_HELP + " (its text column)"
DEVICE_HELP = "auto (CUDA when this machine has a GPU, else cpu), cpu, cuda or cuda:N"


# --------------------------------------------------------------------------------------------------
# Flag values that need more than int() or float()


def parse_device(text: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N (checked when parsing, not after loading the models)."""
    t = text.strip().lower()
    if t in ("auto", "cpu", "cuda") or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"{text!r}: choose auto, cpu, cuda or cuda:N")


def parse_head_lr(text: str) -> float | str:
    """``--head-lr``: a learning rate, or auto."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a learning rate or auto") from None


def parse_indices(text: str) -> list[int]:
    """``--teacher-subset I,J``: teacher indices."""
    try:
        idx = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--teacher-subset {text}: expected comma-separated teacher indices, e.g. 0,2") from None
    if not idx:
        raise UsageError("--teacher-subset: empty")
    return idx


def _cuda_available() -> bool:
    # Imported here, not at the top: torch takes 4-7 s to import on a 2-core machine, and `fastmt --help`
    # (0.1 s without it) builds every command's flags from this module.
    import torch

    return torch.cuda.is_available()


def resolve_device(name: str):
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``, as a ``torch.device``."""
    import torch  # here, not at the top: see _cuda_available

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        return torch.device(name)
    raise UsageError(f"--device {name}: choose cpu or cuda")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0 and math.isfinite(value)


# --------------------------------------------------------------------------------------------------
# The settings


@dataclass(kw_only=True)
class TrainArgs:
    """The settings every training command shares, and cofinetune's own (its first three)."""

    not_flags: ClassVar[tuple[str, ...]] = ("eval_batch_size",)  # settings of Python callers only
    # The settings a resumed run may change (fastmt.engine.rundir.check_resume); every other must match.
    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = frozenset(
        {"resume", "overwrite", "progress", "save_every", "max_bad_steps", "log_every", "eval_batch_size", "report_to"})

    pooling: str = opt(AUTO, "what the shared head reads: the first token (cls) or the mean of the tokens; auto: mean "
                             "when every teacher is a sentence-transformers folder that mean-pools, else cls (the "
                             "student follows)", choices=(AUTO, *POOLINGS))
    head_lr: float | str | None = opt(AUTO, "learning rate of the freshly initialised shared head and adapters; auto: "
                                            "the larger of --lr and 1e-3", type=parse_head_lr, metavar="LR")
    compile: bool | None = opt(None, "torch.compile the teachers' forward and losses (one graph per length bucket); "
                                     "default: on for jobs of 1000 steps or more")
    train: str = opt(help="training data: " + DATA_HELP, metavar="F")
    dev: str = opt(help="dev data, evaluated after every epoch (same forms)", metavar="F")
    text_column: str | None = opt(None, "the text column (default: guessed from the names)", metavar="C")
    text_pair_column: str | None = opt(None, "the second text of a pair (default: guessed)", metavar="C")
    label_column: str | None = opt(None, "the label column (default: guessed)", metavar="C")
    out: str = opt(help="run directory to create", metavar="DIR")
    epochs: int = opt(3, "passes over the training set")
    batch_size: int = opt(32, "examples per optimizer step (over all processes)")
    lr: float = opt(3e-5, "peak learning rate of AdamW")
    max_length: int = opt(128, "longest tokenized input; longer is truncated")
    seed: int = opt(42, "seed of the shuffling, dropout and fresh weights")
    device: str = opt(AUTO, DEVICE_HELP, type=parse_device)
    precision: str = opt(AUTO, "auto (default): bf16 where the GPU or CPU multiplies it natively (fp16 on a GPU "
                               "without bf16), else fp32", choices=(AUTO, *PRECISIONS))
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases and norms)")
    warmup: float = opt(0.1, "fraction of steps for linear warm-up")
    max_grad_norm: float = opt(1.0, "clip the gradients' global norm to this")
    log_every: int = opt(20, "steps between metrics.jsonl rows")
    eval_batch_size: int = opt(128, "examples per forward pass when scoring the dev set")
    progress: bool = opt(True, "no progress bar", flag="--no-progress")
    overwrite: bool = opt(False, "replace a run already in --out")
    save_every: int = opt(0, "checkpoint the whole training state every STEPS steps into OUT/checkpoint",
                          metavar="STEPS")  # 0 writes none
    resume: bool = opt(False, "continue the interrupted run in --out from its checkpoint")
    max_bad_steps: int = opt(20, "stop after N non-finite losses in a row (default 20)", metavar="N")
    metric: str = opt("accuracy", "the dev score that picks the best epoch (f1: macro-averaged; mcc: Matthews "
                                  "correlation)", choices=METRICS)
    report_to: str = opt("none", "also send metrics.jsonl's scalars to this tracker (tensorboard: OUT/tensorboard)",
                         choices=TRACKERS)
    group_by_length: bool | None = opt(None, "batch examples of similar length together, so batches carry little "
                                             "padding (default: on)")

    def __post_init__(self) -> None:
        if self.device == AUTO:  # what ran is recorded, not "auto"
            self.device = "cuda" if _cuda_available() else "cpu"
        if self.epochs < 1:
            raise UsageError(f"--epochs {self.epochs}: must be at least 1")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}: must be at least 1")
        if not _positive(self.lr):
            raise UsageError(f"--lr {self.lr}: must be a positive number")
        if self.max_length < 2:
            raise UsageError(f"--max-length {self.max_length}: must be at least 2")
        if self.precision not in PRECISIONS and self.precision != AUTO:
            raise UsageError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)} or auto")
        if not 0 <= self.warmup < 1:
            raise UsageError(f"--warmup {self.warmup}: a fraction in [0, 1)")
        if self.log_every < 1:
            raise UsageError(f"--log-every {self.log_every}: must be at least 1")
        if self.save_every < 0:
            raise UsageError(f"--save-every {self.save_every}: must be >= 0 (0 writes no checkpoint)")
        if self.metric not in METRICS:
            raise UsageError(f"--metric {self.metric}: choose one of {', '.join(METRICS)}")
        if self.head_lr == AUTO:
            self.head_lr = max(self.lr, HEAD_LR_FLOOR)
        if self.head_lr is not None and not _positive(self.head_lr):
            raise UsageError(f"--head-lr {self.head_lr}: must be a positive number (or auto)")
        if self.pooling not in (*POOLINGS, AUTO):
            raise UsageError(f"--pooling {self.pooling}: choose cls, mean or auto")
        if self.report_to not in TRACKERS:
            raise UsageError(f"--report-to {self.report_to}: choose one of {', '.join(TRACKERS)}")
        if self.max_bad_steps < 1:
            raise UsageError(f"--max-bad-steps {self.max_bad_steps}: must be at least 1")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite: choose one (continue the run, or start it again)")


@dataclass(kw_only=True)
class KDArgs(TrainArgs):
    """What both distillation commands share: the distillation loss, the loss weights, the kernels and
    the teacher cache. The help is classification's (``distill``); ``DistillLMArgs`` restates it where
    the causal LM's wording or default differs."""

    # cofinetune's: the student reads its teachers' pooling; its head's rate stays --head-lr auto
    not_flags: ClassVar[tuple[str, ...]] = (*TrainArgs.not_flags, "pooling", "head_lr")

    temperature: float = opt(1.0, "softmax temperature of the distillation loss")
    weighting: str = opt("paper", "per-example teacher weights of the distillation loss", choices=SCHEMES)
    kd_target: str = opt("teachers", "teachers: one weighted KL term per teacher (MT-BERT); ensemble: a single KL "
                                     "term to the teachers' averaged logits (the usual multi-teacher KD; --weighting "
                                     "is then unused)", choices=KD_TARGETS)
    kernels: str = opt(AUTO, "auto (default): the fused Triton kernels on CUDA, the reference losses on a CPU",
                       choices=(AUTO, *KERNELS))
    alpha_task: float = opt(1.0, "weight of the cross-entropy on the gold labels")
    alpha_kd: float = opt(1.0, "weight of the multi-teacher distillation loss")
    alpha_hidden: float = opt(1.0, "weight of the multi-teacher hidden-state loss")
    cache_teachers: str | None = opt(
        CACHE_DEFAULT, "store the frozen teachers' outputs per example in DIR (auto: ~/.cache/fastmt/teachers/...) on "
                       "the first pass and read them back in every later epoch and run on the same data and teachers; "
                       "default: auto when more than one epoch runs", metavar="DIR|auto|off")  # None: off
    cache_budget_gb: float = opt(8.0, "most disk the teacher cache may take (default 8); --hidden-loss tokens stores "
                                      "every token's states")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _positive(self.temperature):
            raise UsageError(f"--temperature {self.temperature}: must be a positive number")
        if self.weighting not in SCHEMES:
            raise UsageError(f"--weighting {self.weighting}: choose one of {', '.join(SCHEMES)}")
        if self.kd_target not in KD_TARGETS:
            raise UsageError(f"--kd-target {self.kd_target}: choose one of {', '.join(KD_TARGETS)}")
        if self.kernels not in (*KERNELS, AUTO):
            raise UsageError(f"--kernels {self.kernels}: choose fused, reference or auto")
        for name in ("alpha_task", "alpha_kd", "alpha_hidden"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise UsageError(f"--{name.replace('_', '-')} {v}: must be a number >= 0")
        if self.cache_teachers == "off":
            self.cache_teachers = None
        if self.cache_teachers is not None and not str(self.cache_teachers).strip():
            raise UsageError("--cache-teachers: give a dir, auto or off")
        if not (self.cache_budget_gb >= 0 and math.isfinite(self.cache_budget_gb)):
            raise UsageError(f"--cache-budget-gb {self.cache_budget_gb}: must be a number >= 0")


@dataclass(kw_only=True)
class DistillArgs(KDArgs):
    """``fastmt distill``: a student classifier from co-finetuned teachers."""

    # The teacher cache stores the exact outputs: a resumed run may use it or not.
    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = TrainArgs.RESUME_MAY_CHANGE | {"cache_teachers", "cache_budget_gb"}

    teachers: str = opt("", "a dir written by fastmt cofinetune", metavar="DIR", required=True)
    student_layers: int = opt(0, "transformer layers of the student", metavar="K", required=True)
    student_init: str = opt("teacher:0", "teacher:I (the student starts from teacher I's embeddings and evenly spaced "
                                         "layers), random, or a model dir")
    hidden_loss: str = opt("tokens", "hidden-state loss over every token, over the first token only, or none",
                           choices=HIDDEN_LOSSES)
    weight_hidden: bool = opt(False, "weight the hidden loss by the teacher weights too")
    cuda_graphs: bool | None = opt(None, "replay the compiled step as CUDA graphs (needs --device cuda); default: "
                                         "with --compile on CUDA")
    teacher_subset: list[int] | None = opt(None, "distil from these teachers only", type=parse_indices, metavar="I,J")
    stack_teachers: bool | None = opt(None, "run same-architecture teachers as one stacked module (one batched GEMM "
                                            "per layer for all of them); default: on CUDA, and on a CPU in bf16")
    lr: float = override(TrainArgs, "lr", default=5e-5)  # the student learns faster than the teachers are fine-tuned
    compile: bool | None = override(TrainArgs, "compile", help="torch.compile the step's forward and losses; default: "
                                                               "on for jobs of 1000 steps or more")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.student_layers < 1:
            raise UsageError(f"--student-layers {self.student_layers}: must be at least 1")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise UsageError(f"--hidden-loss {self.hidden_loss}: choose tokens, cls or none")
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise UsageError(f"--cuda-graphs: CUDA graphs need --device cuda (this run is on {self.device})")
        if self.cuda_graphs and self.compile is None:
            self.compile = True  # graphs replay the compiled step
        if self.cuda_graphs and not self.compile:
            raise UsageError("--cuda-graphs replays the compiled step: add --compile")


@dataclass(kw_only=True)
class DistillLMArgs(KDArgs):
    """``fastmt distill-lm``: a causal LM from several that share its tokenizer."""

    # The top-k cache changes the loss (the KL on the stored top-k, not the full one): a resumed run
    # keeps --cache-teachers as it was (--top-k and --temperature too, as every setting not named here).
    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = TrainArgs.RESUME_MAY_CHANGE | {"cache_budget_gb"}

    teacher: list[str] = opt(help="a causal-LM dir (or a hub name already in the local cache); repeat for several",
                             factory=list, metavar="M", required=True)
    student: str | None = opt(None, "a causal-LM dir to start the student from", metavar="DIR", one_of="student")
    student_layers: int = opt(0, "the student is teacher 0 cut to K evenly spaced layers", metavar="K",
                              one_of="student")
    direction: str = opt("forward", "KL(teacher || student) (forward) or KL(student || teacher) (reverse)",
                         choices=DIRECTIONS)
    dev_share: float = opt(0.05, "without --dev, this share of the training blocks is held out as the dev set")
    top_k: int = opt(128, "next tokens stored per token and teacher (default 128)")

    train: str = override(TrainArgs, "train", help="training text: " + LM_DATA_HELP)
    dev: str = override(TrainArgs, "dev", default="",
                        help="dev text, evaluated after every epoch (default: a share of --train, see --dev-share)")
    max_length: int = override(TrainArgs, "max_length", help="tokens per packed block")
    epochs: int = override(TrainArgs, "epochs", default=1)
    lr: float = override(TrainArgs, "lr", default=1e-4)
    metric: str = override(TrainArgs, "metric", help=argparse.SUPPRESS)  # the best epoch: next-token accuracy
    compile: bool | None = override(TrainArgs, "compile", help="torch.compile the models' bodies for the training "
                                                               "steps; default: on for jobs of 1000 steps or more")
    weighting: str = override(KDArgs, "weighting", help="per-token teacher weights from each teacher's cross-entropy "
                                                        "on the next token")
    kd_target: str = override(KDArgs, "kd_target", help="teachers: one weighted KL per teacher (MT-BERT); ensemble: "
                                                         "one KL to the teachers' mean logits (--weighting is then "
                                                         "unused)")
    kernels: str = override(KDArgs, "kernels", help="fused: the loss from the output layers without tokens x vocab "
                                                    "logits; reference: the float64-checkable losses that form them; "
                                                    "auto (default): fused on CUDA, reference on a CPU; not used with "
                                                    "--cache-teachers, whose top-k loss is its own (the path line "
                                                    "says so)")
    alpha_task: float = override(KDArgs, "alpha_task", help="weight of the cross-entropy on the next token")
    alpha_hidden: float = override(KDArgs, "alpha_hidden", default=0.0,
                                   help="weight of the projected hidden-state loss (teachers of one width)")
    cache_teachers: str | None = override(
        KDArgs, "cache_teachers", default=None,
        help="run the teachers once: store each token's --top-k next tokens per teacher in DIR (auto: under "
             "~/.cache/fastmt) on the first pass and train on them (the KL on those ids plus one tail bucket) in every "
             "later step and run; default off (the exact KL, teachers every step)")  # None: off
    cache_budget_gb: float = override(KDArgs, "cache_budget_gb", help="most disk the top-k cache may take (default 8)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.teacher:
            raise UsageError("--teacher: give at least one teacher (repeat the flag for several)")
        if (self.student is None) == (self.student_layers <= 0):
            raise UsageError("give one of --student DIR (a causal LM to start from) or --student-layers K "
                             "(teacher 0 cut to K layers)")
        if self.direction not in DIRECTIONS:
            raise UsageError(f"--direction {self.direction}: choose forward or reverse")
        if self.metric != "accuracy":
            raise UsageError(f"--metric {self.metric}: distill-lm picks the best epoch by next-token accuracy")
        if not 0 < self.dev_share < 1:
            raise UsageError(f"--dev-share {self.dev_share}: a fraction in (0, 1)")
        if self.top_k < 1:
            raise UsageError(f"--top-k {self.top_k}: must be at least 1")
        if self.cache_teachers is None:
            return
        # What the top-k cache (fastmt.tasks.lm.cached) cannot serve.
        if self.alpha_hidden > 0:
            raise UsageError(f"--cache-teachers stores the teachers' next-token distributions, but --alpha-hidden "
                             f"{self.alpha_hidden} needs their hidden states on every step: use --alpha-hidden 0 "
                             "or --cache-teachers off")
        if self.kd_target == "ensemble":
            raise UsageError("--cache-teachers stores each teacher's top-k, not their averaged logits: use "
                             "--kd-target teachers or --cache-teachers off")
        if self.alpha_kd == 0:
            raise UsageError("--cache-teachers stores what the distillation loss reads, and --alpha-kd 0 turns it "
                             "off: drop --cache-teachers (or --alpha-kd 0)")
