"""Run settings: every flag checked where ``TrainArgs`` / ``DistillArgs`` are made, with a message naming it."""

from __future__ import annotations

import pytest
import torch

from conftest import run_args
from fastmt import settings as T
from fastmt.errors import UsageError

_args = run_args


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(batch_size=0), "--batch-size"),
        (dict(lr=0.0), "--lr"),
        (dict(lr=-1.0), "--lr"),
        (dict(epochs=0), "--epochs"),
        (dict(precision="fp8"), "--precision"),
    ],
)
def test_train_args_rejected(kw, needle, tiny_task, tmp_path):
    with pytest.raises(UsageError, match=needle):
        T.TrainArgs(**_args(tiny_task, tmp_path, **kw))


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(temperature=0.0), "--temperature"),
        (dict(weighting="best"), "--weighting"),
        (dict(hidden_loss="all"), "--hidden-loss"),
        (dict(kernels="magic"), "--kernels"),
        (dict(student_layers=0), "--student-layers"),
        (dict(cuda_graphs=True, compile=True), "--cuda-graphs: CUDA graphs need --device cuda"),
        (dict(cuda_graphs=True, device="cuda"), "add --compile"),
    ],
)
def test_distill_args_rejected(kw, needle, tiny_task, tmp_path):
    base = dict(teachers="x", student_layers=1)
    base.update(kw)
    with pytest.raises(UsageError, match=needle):
        T.DistillArgs(**_args(tiny_task, tmp_path), **base)


def test_device_cuda_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="--device cuda"):
        T.resolve_device("cuda")


def test_kd_target_is_validated(tiny_task, tmp_path):
    with pytest.raises(UsageError, match="--kd-target"):
        T.DistillArgs(**_args(tiny_task, tmp_path), teachers="x", student_layers=1, kd_target="mean")
