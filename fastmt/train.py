"""Co-finetuning, distillation and evaluation, as Python calls: the names user code imports.

    from fastmt.train import TrainArgs, DistillArgs, cofinetune, distill
    cofinetune(["bert-base-uncased", "roberta-base"], TrainArgs(train="train.tsv", dev="dev.tsv", out="teachers"))
    distill(DistillArgs(train="train.tsv", dev="dev.tsv", out="student", teachers="teachers", student_layers=4))

Each lives in its own room: the settings in ``fastmt.settings``, the tasks in ``fastmt.tasks``, the
loop they share in ``fastmt.loop``, evaluation in ``fastmt.evaluate``.
"""

from fastmt.evaluate import accuracy, evaluate_dir
from fastmt.faults import TrainingStopped
from fastmt.inference import student_logits, teacher_logits
from fastmt.loop import RunResult
from fastmt.optim import make_optimizer, optimizer_step
from fastmt.settings import DistillArgs, TrainArgs, resolve_device
from fastmt.tasks.cofinetune import cofinetune
from fastmt.tasks.common import Splits, prepare_splits, seed_everything
from fastmt.tasks.distill import distill

__all__ = [
    "TrainArgs", "DistillArgs", "cofinetune", "distill", "evaluate_dir", "RunResult", "TrainingStopped", "resolve_device",
    "accuracy", "teacher_logits", "student_logits", "make_optimizer", "optimizer_step", "prepare_splits", "seed_everything",
    "Splits",
]
