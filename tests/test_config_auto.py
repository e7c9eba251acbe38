"""Fast by default: what ``auto`` resolves to, and that explicit flags win."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli
from fastmt.config import auto
from fastmt.config.settings import DistillArgs
from fastmt.errors import UsageError

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {extra}\nbogomips\t: 4000\n"


def test_cpu_bf16_reads_the_flags():
    assert auto.cpu_bf16(CPUINFO.format(extra="avx512f avx512_bf16")) == (True, "CPU has avx512_bf16")
    assert auto.cpu_bf16(CPUINFO.format(extra="amx_bf16 amx_tile"))[0]
    ok, why = auto.cpu_bf16(CPUINFO.format(extra="avx512f"))
    assert not ok and "no AVX-512 BF16" in why


def _auto(tiny_task, **kw):
    base = dict(train=str(tiny_task["train"]), dev=str(tiny_task["dev"]), out="-", teachers="-", student_layers=1,
                precision="auto", kernels="auto", compile=None, cuda_graphs=None, stack_teachers=None,
                cache_teachers=auto.CACHE_DEFAULT, group_by_length=None, epochs=3)
    base.update(kw)
    return DistillArgs(**base)


def test_native_bf16_can_be_forced_either_way(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(auto.NATIVE_BF16_ENV, raising=False)
    assert auto.native_bf16(cpu) == auto.cpu_bf16()  # unset: the hardware's answer
    for force in (False, True):
        assert auto.native_bf16(cpu, force) == (force, f"forced by native_bf16={force}")
        assert auto.choose_precision(cpu, force)[0] == ("bf16" if force else "fp32")
        assert auto.choose_precision(gpu, force)[0] == ("bf16" if force else "fp16")  # no CUDA call made
        monkeypatch.setenv(auto.NATIVE_BF16_ENV, str(int(force)))
        assert auto.native_bf16(cpu) == (force, f"forced by FASTMT_NATIVE_BF16={int(force)}")
        assert auto.native_bf16(cpu, not force)[0] is (not force)  # the parameter wins over the variable
    monkeypatch.setenv(auto.NATIVE_BF16_ENV, "yes")
    with pytest.raises(UsageError, match="FASTMT_NATIVE_BF16=yes: set it to 1"):
        auto.native_bf16(cpu)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("how", ["parameter", "environment"])
def test_auto_on_a_cpu(bf16, how, tiny_task, monkeypatch):
    """Both plans, whatever CPU runs the test: forced by ``resolve``'s parameter or the variable."""
    monkeypatch.setattr(auto, "cpu_bf16", lambda: pytest.fail("the forced plan must not read the CPU's flags"))
    cpu = torch.device("cpu")
    args = _auto(tiny_task)
    if how == "environment":
        monkeypatch.setenv(auto.NATIVE_BF16_ENV, str(int(bf16)))
        line = auto.resolve("distill", args, cpu, steps=24, stackable=True)
    else:
        monkeypatch.setenv(auto.NATIVE_BF16_ENV, str(int(not bf16)))  # the parameter wins
        line = auto.resolve("distill", args, cpu, steps=24, stackable=True, native_bf16=bf16)
    assert args.precision == ("bf16" if bf16 else "fp32") and args.kernels == "reference"
    assert args.compile is False and args.cuda_graphs is False
    assert args.stack_teachers is bf16  # fp32 stacking did not pay on a CPU
    assert args.cache_teachers == "auto"  # three epochs
    assert f"precision {args.precision} (forced by " in line and "compile off (24 steps < 1000)" in line
    assert args.group_by_length is True and "length-grouped batches" in line
    assert auto.widths(args, [16, 32, 48]) == list(range(1, 49))  # eager: each batch its own width
    long = _auto(tiny_task, epochs=1)
    auto.resolve("distill", long, cpu, steps=5000, data_parallel=False)
    assert long.compile is True and long.cache_teachers is None
    assert auto.widths(long, [16, 32, 48]) == [16, 32, 48]  # compiled: one graph per bucket


def test_explicit_flags_win_and_off_turns_the_cache_off(tiny_task, monkeypatch):
    monkeypatch.setenv(auto.NATIVE_BF16_ENV, "1")
    args = _auto(tiny_task, precision="fp32", kernels="reference", compile=False, stack_teachers=False,
                 cache_teachers="off", group_by_length=False)
    assert auto.resolve("distill", args, torch.device("cpu"), steps=10**6, stackable=True) == ""
    assert (args.precision, args.kernels, args.compile, args.stack_teachers, args.cache_teachers) == (
        "fp32", "reference", False, False, None)
    assert args.group_by_length is False and auto.widths(args, [16, 32]) == [16, 32]
    dp = _auto(tiny_task)
    auto.resolve("distill", dp, torch.device("cpu"), steps=10, data_parallel=True)
    assert dp.cache_teachers is None


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32-plan", "bf16-plan"])
def test_cli_defaults_print_the_path_and_record_what_ran(bf16, tiny_task, tiny_encoders, tmp_path):
    """The CLI's defaults end to end, in both plans on any CPU (the bf16 plan on a CPU without AVX-512
    BF16 is emulated: slow, but the same computation): the run trains, and records what ran."""
    plan, precision = {auto.NATIVE_BF16_ENV: str(int(bf16))}, "bf16" if bf16 else "fp32"
    teachers = tmp_path / "teachers"
    # Two teachers of one architecture: the plan also decides whether they run stacked.
    r = run_cli("cofinetune", "--teacher", tiny_encoders["a"], "--teacher", tiny_encoders["a"], "--train",
                tiny_task["train"], "--dev", tiny_task["dev"], "--out", teachers, "--epochs", "1", "--max-length", "16",
                "--no-progress", env=plan)
    assert r.returncode == 0, r.stderr
    assert f"cofinetune path: precision {precision} (forced by FASTMT_NATIVE_BF16={int(bf16)})" in r.stderr + r.stdout
    r = run_cli("distill", "--teachers", teachers, "--student-layers", "1", "--train", tiny_task["train"],
                "--dev", tiny_task["dev"], "--out", tmp_path / "s", "--epochs", "2", "--max-length", "16",
                "--no-progress", "--cache-teachers", tmp_path / "cache", env=plan)
    assert r.returncode == 0, r.stderr
    out = r.stderr + r.stdout
    assert f"distill path: precision {precision}" in out and "kernels reference (CPU)" in out and "compile off" in out
    assert f"stacked teachers {'on' if bf16 else 'off (fp32 on a CPU)'}" in out, out
    run = json.loads((tmp_path / "s" / "config.json").read_text())["fastmt"]["run"]  # what ran, not "auto"
    assert run["precision"] == precision and run["kernels"] == "reference" and run["compile"] is False
    rows = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in rows if x["event"] == "train"]
    assert losses and all(math.isfinite(x) for x in losses)
    assert run["cache_teachers"] == str(tmp_path / "cache")
    assert (tmp_path / "cache" / "manifest.json").exists()
