"""What a run is asked to do: the settings of every training task, checked where they are made.

``TrainArgs`` holds the settings every training command shares, ``DistillArgs`` adds the student's.
The CLI and Python callers build the same objects with the same defaults (a test holds the CLI's
equal to these fields), so a bad value is refused with the same one-line message naming its flag either
way, and a setting left to ``auto`` (or ``None``) becomes the same concrete one: in one place,
:func:`fastmt.config.auto.resolve`, once the data's size and the device are known (precision, kernels,
compile, CUDA graphs, teacher stacking, the teacher cache, length grouping); ``--pooling auto`` when
the teachers load (:func:`fastmt.models.classifier.choose_pooling`); ``--device auto`` and ``--head-lr auto``
need no data and are resolved here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastmt import losses as reference_losses
from fastmt.data.dataset import Columns
from fastmt.errors import UsageError
from fastmt.metrics import METRICS
from fastmt.models.classifier import POOLINGS
from fastmt.engine.precision import PRECISIONS
from fastmt.engine.tracking import TRACKERS

HEAD_LR_FLOOR = 1e-3  # --head-lr auto: a freshly initialised head learns at least this fast


@dataclass
class TrainArgs:
    """Options shared by every training command (flag names in brackets)."""

    train: str  # [--train]
    dev: str  # [--dev]
    out: str  # [--out]
    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-5  # cofinetune's (DistillArgs: 5e-5), as the CLI's
    max_length: int = 128
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of all steps spent warming up
    max_grad_norm: float = 1.0
    log_every: int = 20
    eval_batch_size: int = 128
    progress: bool = True
    overwrite: bool = False
    save_every: int = 0  # [--save-every] steps between checkpoints; 0 writes none
    resume: bool = False  # [--resume] continue from DIR/checkpoint
    max_bad_steps: int = 20  # [--max-bad-steps] stop after this many non-finite losses in a row
    compile: bool | None = None  # [--compile] torch.compile(fullgraph=True) the step's forward + loss; None: auto
    group_by_length: bool | None = None  # [--group-by-length] batches of similar lengths (little padding); None: auto
    metric: str = "accuracy"  # [--metric] the dev score that picks the best epoch: accuracy, f1 (macro) or mcc
    report_to: str = "none"  # [--report-to] also send metrics.jsonl's scalars to: none, tensorboard
    text_column: str | None = None  # [--text-column] the text column (default: guessed from the names)
    text_pair_column: str | None = None  # [--text-pair-column] the second text of a pair
    label_column: str | None = None  # [--label-column] the label column
    head_lr: float | str | None = "auto"  # [--head-lr] cofinetune: rate of the fresh shared head and adapters; None: --lr; "auto": max(--lr, 1e-3)
    pooling: str = "auto"  # [--pooling] cofinetune: what the shared head reads: cls (first token), mean (masked mean), auto

    @property
    def columns(self) -> Columns:
        return Columns(self.text_column, self.text_pair_column, self.label_column)

    def __post_init__(self) -> None:
        if self.device == "auto":  # what ran is recorded, not "auto"
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.epochs < 1:
            raise UsageError(f"--epochs {self.epochs}: must be at least 1")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}: must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr {self.lr}: must be a positive number")
        if self.max_length < 2:
            raise UsageError(f"--max-length {self.max_length}: must be at least 2")
        if self.precision not in PRECISIONS and self.precision != "auto":
            raise UsageError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)} or auto")
        if not 0 <= self.warmup < 1:
            raise UsageError(f"--warmup {self.warmup}: a fraction in [0, 1)")
        if self.log_every < 1:
            raise UsageError(f"--log-every {self.log_every}: must be at least 1")
        if self.save_every < 0:
            raise UsageError(f"--save-every {self.save_every}: must be >= 0 (0 writes no checkpoint)")
        if self.metric not in METRICS:
            raise UsageError(f"--metric {self.metric}: choose one of {', '.join(METRICS)}")
        if self.head_lr == "auto":
            self.head_lr = max(self.lr, HEAD_LR_FLOOR)
        if self.head_lr is not None and not (isinstance(self.head_lr, (int, float)) and self.head_lr > 0
                                             and math.isfinite(self.head_lr)):
            raise UsageError(f"--head-lr {self.head_lr}: must be a positive number (or auto)")
        if self.pooling not in POOLINGS + ("auto",):
            raise UsageError(f"--pooling {self.pooling}: choose cls, mean or auto")
        if self.report_to not in TRACKERS:
            raise UsageError(f"--report-to {self.report_to}: choose one of {', '.join(TRACKERS)}")
        if self.max_bad_steps < 1:
            raise UsageError(f"--max-bad-steps {self.max_bad_steps}: must be at least 1")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite: choose one (continue the run, or start it again)")


KD_TARGETS = ("teachers", "ensemble")


@dataclass
class DistillArgs(TrainArgs):
    teachers: str = ""  # [--teachers] a dir written by cofinetune
    lr: float = 5e-5  # the student learns faster than the teachers are fine-tuned
    student_layers: int = 0
    student_init: str = "teacher:0"
    temperature: float = 1.0
    weighting: str = "paper"
    kd_target: str = "teachers"  # teachers: one KL term per teacher (MT-BERT); ensemble: one KL to the averaged logits
    hidden_loss: str = "tokens"
    weight_hidden: bool = False  # also weight the hidden loss per example by the teacher weights
    kernels: str = "auto"  # [--kernels] fused, reference, or auto (fused on CUDA, reference on a CPU)
    cuda_graphs: bool | None = None  # None: on with compile on CUDA (fastmt.config.auto)
    alpha_task: float = 1.0
    alpha_kd: float = 1.0
    alpha_hidden: float = 1.0
    teacher_subset: list[int] | None = None  # distil from these teachers only
    stack_teachers: bool | None = None  # run teachers of one architecture as one stacked module (fastmt.models.stacked); None: auto
    cache_teachers: str | None = "default"  # [--cache-teachers DIR|auto|off] teachers' outputs stored once (fastmt.cache.teachers); None: off
    cache_budget_gb: float = 8.0  # [--cache-budget-gb] the most disk the teacher cache may take

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.student_layers < 1:
            raise UsageError(f"--student-layers {self.student_layers}: must be at least 1")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise UsageError(f"--temperature {self.temperature}: must be a positive number")
        if self.weighting not in reference_losses.SCHEMES:
            raise UsageError(f"--weighting {self.weighting}: choose one of {', '.join(reference_losses.SCHEMES)}")
        if self.kd_target not in KD_TARGETS:
            raise UsageError(f"--kd-target {self.kd_target}: choose one of {', '.join(KD_TARGETS)}")
        if self.hidden_loss not in ("tokens", "cls", "none"):
            raise UsageError(f"--hidden-loss {self.hidden_loss}: choose tokens, cls or none")
        if self.kernels not in ("fused", "reference", "auto"):
            raise UsageError(f"--kernels {self.kernels}: choose fused, reference or auto")
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise UsageError(f"--cuda-graphs: CUDA graphs need --device cuda (this run is on {self.device})")
        if self.cuda_graphs and self.compile is None:
            self.compile = True  # graphs replay the compiled step
        if self.cuda_graphs and not self.compile:
            raise UsageError("--cuda-graphs replays the compiled step: add --compile")
        if self.cache_teachers is not None and not str(self.cache_teachers).strip():
            raise UsageError("--cache-teachers: give a dir, or auto")
        if not (self.cache_budget_gb >= 0 and math.isfinite(self.cache_budget_gb)):
            raise UsageError(f"--cache-budget-gb {self.cache_budget_gb}: must be a number >= 0")
        for name in ("alpha_task", "alpha_kd", "alpha_hidden"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise UsageError(f"--{name.replace('_', '-')} {v}: must be a number >= 0")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        return torch.device(name)
    raise UsageError(f"--device {name}: choose cpu or cuda")


def loss_module(kind: str):
    """The losses ``--kernels`` names: ``fastmt.losses`` (reference) or ``fastmt.kernels`` (fused)."""
    if kind == "reference":
        return reference_losses
    import fastmt.kernels as kernels

    return kernels
