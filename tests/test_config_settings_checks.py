"""Run settings: every flag checked where ``TrainArgs`` / ``DistillArgs`` are made, with a message naming it."""

from __future__ import annotations

import pytest
import torch

from conftest import run_args
from fastmt.config import settings
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
        settings.TrainArgs(**_args(tiny_task, tmp_path, **kw))


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
    with pytest.raises(UsageError, match=needle):
        settings.DistillArgs(**_args(tiny_task, tmp_path, **{"teachers": "x", "student_layers": 1, **kw}))


def test_device_cuda_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="--device cuda"):
        settings.resolve_device("cuda")


def test_kd_target_is_validated(tiny_task, tmp_path):
    with pytest.raises(UsageError, match="--kd-target"):
        settings.DistillArgs(**_args(tiny_task, tmp_path), teachers="x", student_layers=1, kd_target="mean")


@pytest.mark.parametrize("command", ["cofinetune", "distill"])
@pytest.mark.parametrize("native_bf16", [False, True])
def test_python_api_and_cli_resolve_the_same_defaults(command, native_bf16, tmp_path):
    """Built from nothing (the required settings only), the Python API's settings equal the CLI's,
    field by field, before and after the one resolver (``fastmt.config.auto.resolve``), on either CPU plan;
    the lr differs by command and is the CLI's for each."""
    import dataclasses

    from fastmt import cli

    from fastmt.config import auto
    from fastmt.config.settings import DistillArgs, TrainArgs

    need = dict(train="t.tsv", dev="d.tsv", out=str(tmp_path / "o"))
    flags = ["--train", "t.tsv", "--dev", "d.tsv", "--out", str(tmp_path / "o")]
    if command == "distill":
        api = DistillArgs(**need, teachers="T", student_layers=2)
        ns = cli.build_parser().parse_args(["distill", *flags, "--teachers", "T", "--student-layers", "2"])
        from_cli = cli.settings_from(ns, DistillArgs)
    else:
        api = TrainArgs(**need)
        ns = cli.build_parser().parse_args(["cofinetune", "--teacher", "a", "--teacher", "b", *flags])
        from_cli = cli.settings_from(ns, TrainArgs)
    assert dataclasses.asdict(api) == dataclasses.asdict(from_cli)
    assert api.lr == (5e-5 if command == "distill" else 3e-5)
    lines = [auto.resolve(command, a, torch.device("cpu"), steps=5000, stackable=True, native_bf16=native_bf16)
             for a in (api, from_cli)]
    assert lines[0] == lines[1] and dataclasses.asdict(api) == dataclasses.asdict(from_cli)
    assert api.precision == ("bf16" if native_bf16 else "fp32") and api.compile is True and api.group_by_length is True
    if command == "distill":
        assert (api.kernels, api.cuda_graphs, api.cache_teachers, api.stack_teachers) == ("reference", False, "auto",
                                                                                           native_bf16)
