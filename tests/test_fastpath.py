"""Fast by default: what ``auto`` resolves to, and that explicit flags win."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from fastmt import fastpath
from fastmt import train as T

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {extra}\nbogomips\t: 4000\n"


def test_cpu_bf16_reads_the_flags():
    assert fastpath.cpu_bf16(CPUINFO.format(extra="avx512f avx512_bf16")) == (True, "CPU has avx512_bf16")
    assert fastpath.cpu_bf16(CPUINFO.format(extra="amx_bf16 amx_tile"))[0]
    ok, why = fastpath.cpu_bf16(CPUINFO.format(extra="avx512f"))
    assert not ok and "no AVX-512 BF16" in why


def _auto(tiny_task, **kw):
    base = dict(train=str(tiny_task["train"]), dev=str(tiny_task["dev"]), out="-", teachers="-", student_layers=1,
                precision="auto", kernels="auto", compile=None, cuda_graphs=None, stack_teachers=None,
                cache_teachers=fastpath.CACHE_DEFAULT, group_by_length=None, epochs=3)
    base.update(kw)
    return T.DistillArgs(**base)


@pytest.mark.parametrize("bf16", [False, True])
def test_auto_on_a_cpu(bf16, tiny_task, monkeypatch):
    monkeypatch.setattr(fastpath, "cpu_bf16", lambda: (bf16, "stub"))
    cpu = torch.device("cpu")
    args = _auto(tiny_task)
    line = fastpath.resolve(args, cpu, steps=24, stackable=True)
    assert args.precision == ("bf16" if bf16 else "fp32") and args.kernels == "reference"
    assert args.compile is False and args.cuda_graphs is False
    assert args.stack_teachers is bf16  # fp32 stacking did not pay on a CPU
    assert args.cache_teachers == "auto"  # three epochs
    assert f"precision {args.precision} (stub)" in line and "compile off (24 steps < 1000)" in line
    assert args.group_by_length is True and "length-grouped batches" in line
    assert fastpath.widths(args, [16, 32, 48]) == list(range(1, 49))  # eager: each batch its own width
    long = _auto(tiny_task, epochs=1)
    fastpath.resolve(long, cpu, steps=5000, data_parallel=False)
    assert long.compile is True and long.cache_teachers is None
    assert fastpath.widths(long, [16, 32, 48]) == [16, 32, 48]  # compiled: one graph per bucket


def test_explicit_flags_win_and_off_turns_the_cache_off(tiny_task, monkeypatch):
    monkeypatch.setattr(fastpath, "cpu_bf16", lambda: (True, "stub"))
    args = _auto(tiny_task, precision="fp32", kernels="reference", compile=False, stack_teachers=False,
                 cache_teachers="off", group_by_length=False)
    assert fastpath.resolve(args, torch.device("cpu"), steps=10**6, stackable=True) == ""
    assert (args.precision, args.kernels, args.compile, args.stack_teachers, args.cache_teachers) == (
        "fp32", "reference", False, False, None)
    assert args.group_by_length is False and fastpath.widths(args, [16, 32]) == [16, 32]
    dp = _auto(tiny_task)
    fastpath.resolve(dp, torch.device("cpu"), steps=10, data_parallel=True)
    assert dp.cache_teachers is None


def test_cli_defaults_print_the_path_and_record_what_ran(tiny_task, tiny_encoders, tmp_path):
    teachers = tmp_path / "teachers"
    r = run_cli("cofinetune", "--teacher", tiny_encoders["a"], "--train", tiny_task["train"], "--dev", tiny_task["dev"],
                "--out", teachers, "--epochs", "1", "--max-length", "16", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "cofinetune path: precision" in r.stderr + r.stdout
    r = run_cli("distill", "--teachers", teachers, "--student-layers", "1", "--train", tiny_task["train"],
                "--dev", tiny_task["dev"], "--out", tmp_path / "s", "--epochs", "2", "--max-length", "16",
                "--no-progress", "--cache-teachers", tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    out = r.stderr + r.stdout
    assert "distill path: precision" in out and "kernels reference (CPU)" in out and "compile off" in out
    run = json.loads((tmp_path / "s" / "config.json").read_text())["fastmt"]["run"]  # what ran, not "auto"
    assert run["precision"] in ("fp32", "bf16") and run["kernels"] == "reference" and run["compile"] is False
    assert run["cache_teachers"] == str(tmp_path / "cache")
    assert (tmp_path / "cache" / "manifest.json").exists()
