"""Bad input answered in one line, killed runs resumed exactly, non-finite numbers contained.

Everything that a user would see goes through the real ``fastmt`` command in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_args, run_cli
from fastmt.config.settings import DistillArgs, TrainArgs
from fastmt.engine.faults import TrainingStopped
from fastmt.engine.optim import optimizer_step
from fastmt.tasks.classification.cofinetune import cofinetune
from fastmt.tasks.classification.distill import distill

# fp32 pinned: these tests are about failures and resuming, the same computation on every CPU (and eval,
# which runs in fp32, must reproduce the accuracy a run logged).
FAST = ["--epochs", "2", "--batch-size", "32", "--max-length", "16", "--no-progress", "--seed", "0", "--lr", "2e-3",
        "--precision", "fp32"]
TIMING = {"samples_per_s", "train_s", "time"}


def _args(tiny_task, out, **kw):
    return run_args(tiny_task, out, **{"lr": 2e-3, **kw})


@pytest.fixture(scope="module")
def other_tokenizer_teachers(tiny_task, tiny_encoders, tmp_path_factory) -> Path:
    from fastmt.tasks.demo import Shape, build_encoder, build_tokenizer

    d = tmp_path_factory.mktemp("rel-other")
    tok = build_tokenizer(d / "other-tokenizer", reverse=True, extra_words=("extra",))
    other = build_encoder(Shape("other", 2, 32, 2), tok, d, seed=5)
    cofinetune([str(tiny_encoders["a"]), str(other)], TrainArgs(**_args(tiny_task, d / "teachers")))
    return d / "teachers"


# ---------------------------------------------------------------------------------------------------
# 1. Bad input: exit status, one line naming the file/line or flag, no traceback, nothing written


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _case(name, tiny_task, tiny_encoders, teachers_dir, other_tokenizer_teachers, tmp: Path):
    """(argv, expected exit status, text the one line must contain) for each bad input."""
    tr, dev = str(tiny_task["train"]), str(tiny_task["dev"])
    out = str(tmp / "out")
    cof = ["cofinetune", "--teacher", str(tiny_encoders["a"]), "--out", out, *FAST]
    dis = ["distill", "--teachers", str(teachers_dir), "--student-layers", "1", "--out", out, *FAST]
    if name == "missing file":
        return [*cof, "--train", str(tmp / "nope.tsv"), "--dev", dev], 2, "nope.tsv"
    if name == "empty file":
        return [*cof, "--train", str(_write(tmp / "empty.tsv", "")), "--dev", dev], 2, "empty.tsv"
    if name == "header without the columns":
        f = _write(tmp / "cols.tsv", "text_a\tgold\nthe film was good\tgood\n")
        return [*cof, "--train", str(f), "--dev", dev], 2, "cols.tsv"
    if name == "ragged row":
        f = _write(tmp / "ragged.tsv", "sentence\tlabel\nthe film was good\tgood\nthe film was bad\tbad\textra\n")
        return [*cof, "--train", str(f), "--dev", dev], 2, "ragged.tsv:3"
    if name == "not UTF-8":
        f = _write(tmp / "latin.tsv", b"sentence\tlabel\nthe film was good\tgood\nthe caf\xe9 was bad\tbad\n")
        return [*cof, "--train", str(f), "--dev", dev], 2, "latin.tsv:3"
    if name == "label unseen in train":
        f = _write(tmp / "dev.tsv", "sentence\tlabel\nthe film was good\tgood\nthe film was fine\tmeh\n")
        return [*cof, "--train", tr, "--dev", str(f)], 2, "meh"
    if name == "teacher cannot be loaded":
        return ["cofinetune", "--teacher", str(tmp / "no-such-model"), "--out", out, "--train", tr, "--dev", dev, *FAST], 2, "no-such-model"
    if name == "teacher dir holds garbage":
        bad = tmp / "garbage-model"
        bad.mkdir()
        _write(bad / "config.json", "{not json")
        return ["cofinetune", "--teacher", str(bad), "--out", out, "--train", tr, "--dev", dev, *FAST], 2, "garbage-model"
    if name in ("teachers dir without config", "teachers dir without head"):
        copy = tmp / "teachers"
        shutil.copytree(teachers_dir, copy)
        (copy / ("config.json" if "config" in name else "model.safetensors")).unlink()
        argv = ["distill", "--teachers", str(copy), "--student-layers", "1", "--out", out, "--train", tr, "--dev", dev, *FAST]
        return argv, 2, "config.json" if "config" in name else "model.safetensors"
    if name == "student layers 0":
        return ["distill", "--teachers", str(teachers_dir), "--student-layers", "0", "--out", out, "--train", tr, "--dev", dev, *FAST], 2, "--student-layers"
    if name == "student deeper than a teacher":
        return ["distill", "--teachers", str(teachers_dir), "--student-layers", "3", "--out", out, "--train", tr, "--dev", dev, *FAST], 2, "--student-layers 3"
    if name == "batch size 0":
        return [*cof, "--train", tr, "--dev", dev, "--batch-size", "0"], 2, "--batch-size 0"
    if name == "batch size negative":
        return [*dis, "--train", tr, "--dev", dev, "--batch-size", "-4"], 2, "--batch-size -4"
    if name == "learning rate 0":
        return [*cof, "--train", tr, "--dev", dev, "--lr", "0"], 2, "--lr 0"
    if name == "learning rate negative":
        return [*dis, "--train", tr, "--dev", dev, "--lr", "-1e-4"], 2, "--lr -0.0001"
    if name == "unknown flag":
        return [*dis, "--train", tr, "--dev", dev, "--teachrs", "x"], 2, "--teachrs"
    if name == "tokens hidden loss across tokenizers":
        argv = ["distill", "--teachers", str(other_tokenizer_teachers), "--student-layers", "1", "--out", out, "--train", tr, "--dev", dev, *FAST]
        return argv, 2, "--hidden-loss cls"
    if name == "cuda without CUDA":
        return [*dis, "--train", tr, "--dev", dev, "--device", "cuda"], 2, "--device cuda"
    if name == "resume without a checkpoint":
        return [*dis, "--train", tr, "--dev", dev, "--resume"], 2, "--resume"
    if name == "save-every negative":
        return [*dis, "--train", tr, "--dev", dev, "--save-every", "-1"], 2, "--save-every"
    if name == "max-bad-steps 0":
        return [*dis, "--train", tr, "--dev", dev, "--max-bad-steps", "0"], 2, "--max-bad-steps"
    raise KeyError(name)


BAD_INPUTS = [
    "missing file", "empty file", "header without the columns", "ragged row", "not UTF-8", "label unseen in train",
    "teacher cannot be loaded", "teacher dir holds garbage", "teachers dir without config", "teachers dir without head",
    "student layers 0", "student deeper than a teacher", "batch size 0", "batch size negative", "learning rate 0",
    "learning rate negative", "unknown flag", "tokens hidden loss across tokenizers", "cuda without CUDA",
    "resume without a checkpoint", "save-every negative", "max-bad-steps 0",
]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line(name, tiny_task, tiny_encoders, teachers_dir, other_tokenizer_teachers, tmp_path):
    if name == "cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv, code, needle = _case(name, tiny_task, tiny_encoders, teachers_dir, other_tokenizer_teachers, tmp_path)
    r = run_cli(*argv, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fastmt") and needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists(), "a refused run must not create its output dir"


def test_finished_run_is_refused_then_overwritten(tiny_task, teachers_dir, tmp_path):
    argv = ["distill", "--teachers", teachers_dir, "--student-layers", "1", "--train", tiny_task["train"],
            "--dev", tiny_task["dev"], "--out", tmp_path / "run", *FAST]
    assert run_cli(*argv).returncode == 0
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    r = run_cli(*argv)
    assert r.returncode == 2 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    assert run_cli(*argv, "--overwrite").returncode == 0


def test_debug_shows_the_traceback(tiny_task, tiny_encoders, tmp_path):
    r = run_cli("cofinetune", "--teacher", tiny_encoders["a"], "--train", tmp_path / "nope.tsv", "--dev", tiny_task["dev"],
                "--out", tmp_path / "o", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


# ---------------------------------------------------------------------------------------------------
# 2-3. Checkpoints: a run killed with SIGKILL and resumed ends exactly like an uninterrupted one


def _distill_argv(tiny_task, teachers_dir, out, *extra):
    return ["distill", "--teachers", teachers_dir, "--student-layers", "1", "--train", tiny_task["train"],
            "--dev", tiny_task["dev"], "--out", out, *FAST, "--log-every", "3", *extra]


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit-identical on the CPU
    assert _metrics(a) == _metrics(b)


@pytest.fixture(scope="module")
def uninterrupted(tiny_task, teachers_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    r = run_cli(*_distill_argv(tiny_task, teachers_dir, out))
    assert r.returncode == 0, r.stderr
    return out


def _run_env(**env) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", **{k: str(v) for k, v in env.items()})


@contextmanager
def _paused_run(argv, step: int):
    """A real run that announces step ``step`` on stderr and waits there (``FASTMT_FAULT_PAUSE_AFTER_STEP``):
    yields its process once it is there, so what the test does next lands at that step whatever the
    machine's speed; killed in any case afterwards (a hung run fails the test instead of the suite)."""
    proc = subprocess.Popen([sys.executable, "-m", "fastmt", *map(str, argv)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_run_env(FASTMT_FAULT_PAUSE_AFTER_STEP=step))
    guard = threading.Timer(600, proc.kill)
    guard.start()
    try:
        seen = []
        for line in proc.stderr:  # blocks until the run writes a line, or ends
            seen.append(line)
            if f"paused after step {step}" in line:
                break
        else:
            pytest.fail(f"the run ended before step {step}: " + "".join(seen[-20:]))
        yield proc
    finally:
        guard.cancel()
        proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("save_every, kill_after", [(3, 7), (4, 8), (5, 12)])
def test_sigkill_then_resume_is_bit_identical(save_every, kill_after, tiny_task, teachers_dir, uninterrupted, tmp_path):
    # 8 steps per epoch, 2 epochs: kill mid-epoch 1, right after the end-of-epoch checkpoint (before
    # the dev evaluation), and in epoch 2.
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fastmt", *map(str, _distill_argv(tiny_task, teachers_dir, out, "--save-every", save_every))]
    killed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=_run_env(FASTMT_FAULT_KILL_AFTER_STEP=kill_after))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == kill_after // save_every * save_every
    r = run_cli(*_distill_argv(tiny_task, teachers_dir, out))
    assert r.returncode == 2 and "--resume" in r.stderr, r.stderr  # not silently restarted
    r = run_cli(*_distill_argv(tiny_task, teachers_dir, out, "--save-every", save_every, "--resume"))
    assert r.returncode == 0, r.stderr
    _assert_same_run(out, uninterrupted)
    assert not (out / "checkpoint").exists()  # a finished run keeps its model, not the checkpoint


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_task, teachers_dir, uninterrupted, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fastmt", *map(str, _distill_argv(tiny_task, teachers_dir, out, "--save-every", "3"))]
    killed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=_run_env(FASTMT_FAULT_KILL_IN_CHECKPOINT=6))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["step"] == 3
    assert list((out / "checkpoint").glob(".state.pt.*.tmp")), "the torn write should still be lying there"
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert state["counters"]["step"] == 3
    r = run_cli(*_distill_argv(tiny_task, teachers_dir, out, "--save-every", "3", "--resume"))
    assert r.returncode == 0, r.stderr
    _assert_same_run(out, uninterrupted)


def test_external_sigkill_then_resume(tiny_task, teachers_dir, tmp_path):
    """A kill from outside, between two checkpoints, then --resume.

    The run says when it has passed step 10 (its first checkpoint is at step 7) and waits there, so
    the kill lands at that step whatever the machine's speed: no polling, no race with the run's end.
    """
    common = ["--epochs", "3", "--batch-size", "8", "--max-length", "16", "--no-progress", "--seed", "1", "--lr", "1e-3",
              "--log-every", "5"]
    base = ["cofinetune", "--teacher", str(teachers_dir / "teacher_0"), "--train", str(tiny_task["train"]),
            "--dev", str(tiny_task["dev"]), *common]
    straight = tmp_path / "straight"
    assert run_cli(*base, "--out", straight).returncode == 0
    out = tmp_path / "run"
    with _paused_run([*base, "--out", out, "--save-every", "7"], 10) as proc:
        assert json.loads((out / "checkpoint" / "meta.json").read_text())["step"] == 7
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
    r = run_cli(*base, "--out", out, "--save-every", "7", "--resume")
    assert r.returncode == 0, r.stderr
    wa, wb = load_file(out / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _metrics(out) == _metrics(straight)
    for i in range(1):
        a, b = load_file(out / f"teacher_{i}" / "model.safetensors"), load_file(straight / f"teacher_{i}" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_checkpoints_after_the_step_and_resume_is_bit_identical(sig, tiny_task, teachers_dir, uninterrupted,
                                                                          tmp_path):
    """SIGTERM (a scheduler's notice) or Ctrl-C mid-run, with no --save-every: the run finishes the step,
    writes a checkpoint, says in one line how to go on, exits with 128 + the signal; that command ends
    with the same weights and log as a run never stopped."""
    import shlex

    out = tmp_path / "run"
    with _paused_run(_distill_argv(tiny_task, teachers_dir, out), 5) as proc:
        proc.send_signal(sig)
        rest = proc.stderr.read()
        assert proc.wait() == 128 + sig, rest
    assert "Traceback" not in rest
    last = rest.strip().splitlines()[-1]
    name = signal.Signals(sig).name
    assert last.startswith(f"fastmt: distill: {name} received; stopped after step 5 (epoch 1 of 2) with a checkpoint in "), last
    cmd = last.split("To go on: ", 1)[1]
    assert cmd.startswith("fastmt distill ") and cmd.endswith(" --resume")
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["step"] == 5
    r = run_cli(*shlex.split(cmd)[1:])
    assert r.returncode == 0, r.stderr
    _assert_same_run(out, uninterrupted)
    assert not (out / "checkpoint").exists()  # finished: the model is the result


def test_a_run_owns_its_out_while_it_lives(tiny_task, teachers_dir, tmp_path):
    """A second run into the same --out, or a --resume of it, is refused in one line naming the live
    process; once that process is gone (SIGKILL: no clean-up), its lock is taken over, said so."""
    from fastmt.engine.outlock import lock_path

    out = tmp_path / "run"
    with _paused_run(_distill_argv(tiny_task, teachers_dir, out), 2) as first:
        for extra in ([], ["--resume"], ["--overwrite"]):
            r = run_cli(*_distill_argv(tiny_task, teachers_dir, out, "--seed", "9", *extra))
            assert r.returncode == 2, r.stderr
            said = r.stderr.strip()
            assert "\n" not in said and said.startswith(f"fastmt: error: --out {out}: another fastmt run is using it "
                                                        f"(process {first.pid} (fastmt distill --teachers "), said
            assert said.endswith("...)); wait for it to end, or choose another dir"), said
    assert lock_path(out).exists()  # a SIGKILL cleans nothing up
    r = run_cli(*_distill_argv(tiny_task, teachers_dir, out, "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert f"--out {out}: took over the lock left by process {first.pid}, which is no longer running" in r.stderr
    assert not lock_path(out).exists()  # released at the end


def test_resume_refuses_changed_settings(tiny_task, teachers_dir, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fastmt", *map(str, _distill_argv(tiny_task, teachers_dir, out, "--save-every", "2"))]
    killed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=_run_env(FASTMT_FAULT_KILL_AFTER_STEP=3))
    assert killed.returncode == -signal.SIGKILL
    r = run_cli(*_distill_argv(tiny_task, teachers_dir, out, "--save-every", "2", "--resume", "--temperature", "3"))
    said = [x for x in r.stderr.strip().splitlines() if "took over the lock left by" not in x]  # the kill's lock
    assert r.returncode == 2 and "temperature" in r.stderr and len(said) == 1, r.stderr


# ---------------------------------------------------------------------------------------------------
# 4. Numerical faults


def test_nan_teacher_is_reported_and_the_run_stops(tiny_task, teachers_dir, tmp_path):
    broken = tmp_path / "teachers"
    shutil.copytree(teachers_dir, broken)
    from fastmt.engine.fileio import load_tensors, save_tensors

    head = load_tensors(broken / "model.safetensors")
    key = next(k for k in head if k.endswith("weight") and "classifier" in k)
    head[key] = torch.full_like(head[key], float("nan"))
    save_tensors(broken / "model.safetensors", head)
    out = tmp_path / "run"
    r = run_cli("distill", "--teachers", broken, "--student-layers", "1", "--train", tiny_task["train"], "--dev", tiny_task["dev"],
                "--out", out, *FAST, "--max-bad-steps", "4", "--save-every", "1")
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "not finite for 4 steps in a row" in line and "--max-bad-steps 4" in line
    assert "non-finite teacher logits: teacher 0" in line and "teacher 1" in line
    assert "no checkpoint was written" in line  # every step was bad: nothing good to keep
    assert "Traceback" not in r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["event"] == "stopped" and rows[-1]["bad_steps_in_a_row"] == 4
    assert not (out / "checkpoint").exists()


def test_bad_steps_keep_the_last_good_checkpoint(tiny_task, teachers_dir, tmp_path, monkeypatch):
    """The loss turns NaN after step 4: steps 5.. change nothing, the step-4 checkpoint stays, and
    --resume (once the cause is gone) goes on from it."""
    from fastmt.tasks.classification import step as S

    calls = {"n": 0}
    real = S.DistillStep.__call__

    def flaky(self, inputs, labels, index=None):
        loss, parts = real(self, inputs, labels, index)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 4 else loss), parts

    monkeypatch.setattr(S.DistillStep, "__call__", flaky)
    kw = _args(tiny_task, tmp_path / "run", teachers=str(teachers_dir), student_layers=1, epochs=2, save_every=2, max_bad_steps=3)
    with pytest.raises(TrainingStopped, match=r"3 steps in a row .*step 4\)"):
        distill(DistillArgs(**kw))
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)
    assert state["counters"]["step"] == 4
    monkeypatch.setattr(S.DistillStep, "__call__", real)
    distill(DistillArgs(**{**kw, "resume": True}))
    ref = distill(DistillArgs(**{**kw, "out": str(tmp_path / "straight"), "save_every": 0}))
    a, b = load_file(tmp_path / "run" / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ref.steps == 16


@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_step_changes_nothing(fused):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = (p * 2).sum()
    loss.backward()
    assert int(optimizer_step(opt, scaler, [p], 1.0, loss)) == 0
    before, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    opt.zero_grad()
    loss = (p * float("nan")).sum()
    loss.backward()
    assert int(optimizer_step(opt, scaler, [p], 1.0, loss)) == 1
    assert torch.equal(p.detach(), before)
    for k, v in opt.state[p].items():
        assert torch.equal(v, state[k]), k


# ---------------------------------------------------------------------------------------------------
# 2. A model is saved as one unit: weights, tokenizer and config.json never from two different saves


def test_staged_set_rolls_forward_or_back(tmp_path):
    from fastmt.engine.fileio import STAGING, recover, staged_set

    out = tmp_path / "run"
    with staged_set(out) as st:
        (st / "model.bin").write_text("v1")
        (st / "sub").mkdir()
        (st / "sub" / "w").write_text("v1")
        (st / "config.json").write_text("v1")
    assert (out / "model.bin").read_text() == (out / "sub" / "w").read_text() == (out / "config.json").read_text() == "v1"
    assert not (out / STAGING).exists()
    # A writer killed before its set was complete: the old set stays.
    stage = out / STAGING
    stage.mkdir()
    (stage / "model.bin").write_text("v2")
    recover(out)
    assert (out / "model.bin").read_text() == "v1" and not stage.exists()
    # A writer killed while moving a complete set into place: the move is finished.
    stage.mkdir()
    for name in ("model.bin", "config.json"):
        (stage / name).write_text("v2")
    (stage / "sub").mkdir()
    (stage / "sub" / "w").write_text("v2")
    (stage / ".complete").write_text("complete\n")
    (out / ".trash").mkdir()
    os.replace(out / "model.bin", out / ".trash" / "model.bin")  # killed between the two renames of one name
    recover(out)
    assert (out / "model.bin").read_text() == (out / "sub" / "w").read_text() == (out / "config.json").read_text() == "v2"
    assert not stage.exists() and not (out / ".trash").exists()
    # An exception inside the block leaves the old set.
    with pytest.raises(RuntimeError), staged_set(out) as st:
        (st / "model.bin").write_text("v3")
        raise RuntimeError("disk full")
    assert (out / "model.bin").read_text() == "v2" and not stage.exists()


@pytest.mark.parametrize("kind", ["distill", "cofinetune"])
def test_kill_while_saving_the_model_then_read(kind, tiny_task, tiny_encoders, teachers_dir, tmp_path):
    """SIGKILL after the weights moved into place but before config.json: the next reader finishes
    the save, and the dir evaluates to what the run logged."""
    out = tmp_path / "run"
    if kind == "distill":
        argv = _distill_argv(tiny_task, teachers_dir, out)
    else:
        argv = ["cofinetune", "--teacher", tiny_encoders["a"], "--train", tiny_task["train"], "--dev", tiny_task["dev"],
                "--out", out, *FAST]
    killed = subprocess.run([sys.executable, "-m", "fastmt", *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                            env=_run_env(FASTMT_FAULT_KILL_IN_COMMIT="model.safetensors"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / ".staging" / "config.json").exists() and not (out / "config.json").exists()
    metrics = out / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    assert not [r for r in rows if r["event"] == "eval"]  # killed in the first save, before its eval row
    r = run_cli("eval", "--model", out, "--data", tiny_task["dev"], "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").exists() and not (out / ".staging").exists()
    # The same run left alone logs its first epoch's dev accuracy: the model whose save was cut short
    # is that epoch's model, so it must evaluate to exactly that.
    clean = tmp_path / "clean"
    argv = [clean if a == out else a for a in argv]
    done = subprocess.run([sys.executable, "-m", "fastmt", *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                          env=_run_env())
    assert done.returncode == 0, done.stderr
    first = [r for r in _metrics(clean) if r["event"] == "eval" and r["epoch"] == 1][0]
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == pytest.approx(first["dev_accuracy"], abs=1e-9)


def test_fp16_overflow_is_absorbed_and_logged(tiny_task, teachers_dir, tmp_path, monkeypatch):
    """A loss scale far too large: the first steps overflow in fp16, are skipped, counted in
    metrics.jsonl, the scale comes down, and the run trains on to a finite loss."""
    real = torch.amp.GradScaler

    def huge_scale(device, enabled=True, **kw):
        return real(device, init_scale=2.0**24, enabled=enabled)

    monkeypatch.setattr(torch.amp, "GradScaler", huge_scale)
    distill(DistillArgs(**_args(tiny_task, tmp_path / "run", log_every=2, epochs=3, precision="fp16"),
                            teachers=str(teachers_dir), student_layers=1))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["event"] == "train"]
    assert train[0]["skipped_steps"] >= 1 and train[0]["loss_scale"] < 2.0**24
    assert train[-1]["skipped_steps"] < 24  # not every step: the scale came down
    assert all(np.isfinite(r["loss"]) for r in train)
    assert rows[-1]["event"] == "done" and rows[-1]["skipped_steps"] == train[-1]["skipped_steps"]
