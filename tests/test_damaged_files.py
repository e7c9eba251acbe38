"""Damaged files and a full disk: one line, the right exit status, nothing on disk lost.

Every case goes through the real ``fastmt`` command in a subprocess. A full disk is a real tmpfs
where this machine lets the test mount one, and otherwise (and in every case that needs the disk to
fill at one given write) ``tests/full_disk/sitecustomize.py``, put on the subprocess's PYTHONPATH:
from the Nth file of a given name on, every write under the run dir fails with ENOSPC.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_args, run_cli
from fastmt.config.settings import DistillArgs
from fastmt.tasks.classification.distill import distill

# fp32 pinned: these tests are about damaged files and resuming, the same computation on every CPU.
FAST = ["--epochs", "1", "--batch-size", "32", "--max-length", "16", "--no-progress", "--seed", "0", "--lr", "2e-3", "-q",
        "--precision", "fp32"]
FULL_DISK = Path(__file__).resolve().parent / "full_disk"


def _args(tiny_task, out, **kw):
    return run_args(tiny_task, out, **{"lr": 2e-3, **kw})


@pytest.fixture(scope="module")
def student_dir(tiny_task, teachers_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("damaged") / "student"
    distill(DistillArgs(**_args(tiny_task, d), teachers=str(teachers_dir), student_layers=1))
    return d


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", **{k: str(v) for k, v in extra.items()})


def _cli(*argv, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastmt", *map(str, argv)], capture_output=True, text=True, cwd=REPO,
                          env=env or _env(), timeout=600)


def _full_disk_env(run_dir: Path, name: str, nth: int = 1) -> dict:
    path = os.pathsep.join(x for x in (str(FULL_DISK), os.environ.get("PYTHONPATH", "")) if x)
    return _env(PYTHONPATH=path, FASTMT_TEST_FULL_DISK=f"{run_dir}:{name}:{nth}")


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _one_line(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fastmt: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------
# Damaged or mismatched model files: exit status 2, one line naming the file and what to do


def _special_tokens_only(d: Path) -> None:
    """The vocabulary lost: tokenizer.json gone, only a BERT tokenizer_config.json left (transformers
    then builds a BertTokenizer of its five special tokens, which maps every word to [UNK])."""
    (d / "tokenizer.json").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "unk_token": "[UNK]", "sep_token": "[SEP]",
        "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]", "model_max_length": 64}))


def _edit_tokenizer(d: Path, edit) -> None:
    path = d / "tokenizer.json"
    spec = json.loads(path.read_text())
    edit(spec)
    path.write_text(json.dumps(spec))


def _drop_cls(spec: dict) -> None:
    del spec["model"]["vocab"]["[CLS]"]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "[CLS]"]


def _foreign_words(spec: dict) -> None:
    """A vocabulary of the right size in which no word of the task occurs."""
    vocab = spec["model"]["vocab"]
    keep = {t: i for t, i in vocab.items() if t.startswith("[")}
    spec["model"]["vocab"] = {**keep, **{f"zz{i}": i for i in sorted(set(vocab.values()) - set(keep.values()))}}


def _more_words(spec: dict) -> None:
    vocab = spec["model"]["vocab"]
    vocab.update({"extra": len(vocab), "more": len(vocab) + 1})


def _torch_weights(d: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


def _damage(name: str, tmp: Path, tiny_task, tiny_encoders, teachers_dir, student_dir):
    """(argv, text the line must contain, dirs that must be left as they were)."""
    tr, dev = tiny_task["train"], tiny_task["dev"]
    out = tmp / "out"
    cof = lambda d: ["cofinetune", "--teacher", d, "--train", tr, "--dev", dev, "--out", out, *FAST]  # noqa: E731
    dis = lambda d: ["distill", "--teachers", d, "--student-layers", "1", "--train", tr, "--dev", dev, "--out", out, *FAST]  # noqa: E731
    ev = lambda d: ["eval", "--model", d, "--data", dev, "-q"]  # noqa: E731
    if name == "truncated teacher weights":
        d = _copy(tiny_encoders["a"], tmp / "teacher")
        _truncate(d / "model.safetensors")
        return cof(d), [f"{d / 'model.safetensors'} is damaged or truncated", "download the model again"], [d]
    if name == "truncated torch-format teacher weights":
        d = _copy(tiny_encoders["a"], tmp / "teacher")
        _torch_weights(d)
        _truncate(d / "pytorch_model.bin")
        return cof(d), [f"{d / 'pytorch_model.bin'} is damaged or truncated"], [d]
    if name == "damaged teacher tokenizer.json":
        d = _copy(tiny_encoders["a"], tmp / "teacher")
        _truncate(d / "tokenizer.json")
        return cof(d), [f"{d / 'tokenizer.json'} is not valid JSON"], [d]
    if name == "teacher weights that do not fit config.json":
        d = _copy(tiny_encoders["a"], tmp / "teacher")
        shutil.copy(tiny_encoders["b"] / "config.json", d / "config.json")
        return cof(d), [f"{d / 'model.safetensors'} does not fit the model", "[32] in the file, [48] by config.json"], [d]
    if name == "teacher tokenizer with ids past the embedding table":
        d = _copy(tiny_encoders["a"], tmp / "teacher")
        _edit_tokenizer(d, _more_words)
        return cof(d), ["the tokenizer gives ids up to 51 ('more')", "embedding table has 50 rows"], [d]
    if name == "teacher tokenizer without its [CLS]":
        d = _copy(tiny_encoders["a"], tmp / "teacher")
        _edit_tokenizer(d, _drop_cls)
        return cof(d), ["cls token '[CLS]'"], [d]
    if name == "teacher tokenizer that adds no special tokens":
        d = _copy(tiny_encoders["a"], tmp / "teacher")
        _edit_tokenizer(d, lambda spec: spec.update(post_processor=None))
        return cof(d), ["adds no special tokens"], [d]
    if name == "teacher tokenizer that knows none of the words":
        d = _copy(tiny_encoders["a"], tmp / "teacher")
        _edit_tokenizer(d, _foreign_words)
        return cof(d), ["nothing but unknown tokens ([UNK]", "train.tsv"], [d]
    if name == "truncated shared head":
        d = _copy(teachers_dir, tmp / "teachers")
        _truncate(d / "model.safetensors", 5)
        return dis(d), [f"{d / 'model.safetensors'} is damaged or truncated", "fastmt cofinetune"], [d]
    if name == "teachers dir whose teacher_0 lost its vocabulary":
        d = _copy(teachers_dir, tmp / "teachers")
        _special_tokens_only(d / "teacher_0")
        # --hidden-loss cls: nothing else refuses the run (it used to train on [UNK]s and exit 0)
        argv = [*dis(d), "--hidden-loss", "cls"]
        return argv, [f"--teachers {d / 'teacher_0'}: the tokenizer knows 5 tokens", "50 rows"], [d]
    if name == "damaged teacher config.json":
        d = _copy(teachers_dir, tmp / "teachers")
        _truncate(d / "teacher_1" / "config.json", 100)
        return ev(d), [f"{d / 'teacher_1' / 'config.json'} is not valid JSON", "fastmt cofinetune"], [d]
    if name == "damaged teachers config.json":
        d = _copy(teachers_dir, tmp / "teachers")
        _truncate(d / "config.json", 100)
        return dis(d), [f"{d / 'config.json'} is not valid JSON"], [d]
    if name == "truncated student weights":
        d = _copy(student_dir, tmp / "student")
        _truncate(d / "model.safetensors", 1000)
        return ev(d), [f"{d / 'model.safetensors'} is damaged or truncated", "fastmt distill"], [d]
    if name == "truncated student head":
        d = _copy(student_dir, tmp / "student")
        _truncate(d / "fastmt.safetensors")
        argv = ["predict", "--model", d, "--data", dev, "--out", tmp / "out.tsv", "-q"]
        return argv, [f"{d / 'fastmt.safetensors'} is damaged or truncated"], [d]
    if name == "student weights that do not fit config.json":
        d = _copy(student_dir, tmp / "student")
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] = 64
        (d / "config.json").write_text(json.dumps(cfg))
        return ev(d), [f"{d / 'model.safetensors'} does not fit the model"], [d]
    if name == "student tokenizer that lost its vocabulary":
        d = _copy(student_dir, tmp / "student")
        _special_tokens_only(d)
        return ev(d), [f"--model {d}: the tokenizer knows 5 tokens"], [d]
    raise KeyError(name)


DAMAGED = [
    "truncated teacher weights", "truncated torch-format teacher weights", "damaged teacher tokenizer.json",
    "teacher weights that do not fit config.json", "teacher tokenizer with ids past the embedding table",
    "teacher tokenizer without its [CLS]", "teacher tokenizer that adds no special tokens",
    "teacher tokenizer that knows none of the words", "truncated shared head",
    "teachers dir whose teacher_0 lost its vocabulary", "damaged teacher config.json", "damaged teachers config.json",
    "truncated student weights", "truncated student head", "student weights that do not fit config.json",
    "student tokenizer that lost its vocabulary",
]


@pytest.mark.parametrize("name", DAMAGED)
def test_damaged_file_is_one_line(name, tmp_path, tiny_task, tiny_encoders, teachers_dir, student_dir):
    argv, needles, inputs = _damage(name, tmp_path, tiny_task, tiny_encoders, teachers_dir, student_dir)
    before = {d: _snapshot(d) for d in inputs}
    r = run_cli(*argv)
    _one_line(r, 2, *needles)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tsv").exists()
    for d in inputs:
        assert _snapshot(d) == before[d], f"{d} changed"


def test_torch_format_weights_still_load(tmp_path, tiny_task, tiny_encoders):
    """The undamaged twin of the torch-format case: pytorch_model.bin is read (the case above is
    refused for its damage, not its format)."""
    d = _copy(tiny_encoders["a"], tmp_path / "teacher")
    _torch_weights(d)
    from fastmt.models.classifier import load_model_dir

    encoder, _ = load_model_dir(d)
    assert encoder.config.hidden_size == 32


# ---------------------------------------------------------------------------------------------------
# Checkpoints and metrics.jsonl on --resume


@pytest.fixture(scope="module")
def interrupted_once(tiny_task, teachers_dir, tmp_path_factory) -> tuple[Path, Path, list]:
    """A distill run killed after step 3, with its checkpoint of step 2 and metrics.jsonl rows, and
    a copy of it as it was (the run records its --out, so a test damages it in place)."""
    base = tmp_path_factory.mktemp("interrupted")
    out = base / "run"
    argv = ["distill", "--teachers", teachers_dir, "--student-layers", "1", "--train", tiny_task["train"],
            "--dev", tiny_task["dev"], "--out", out, *FAST, "--save-every", "2", "--log-every", "1"]
    killed = _cli(*argv, env=_env(FASTMT_FAULT_KILL_AFTER_STEP=3))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["step"] == 2
    from fastmt.engine.outlock import lock_path

    lock_path(out).unlink()  # the lock a kill leaves behind has its own test (test_reliability); these are about files
    return out, _copy(out, base / "as-it-was"), argv


@pytest.fixture
def interrupted(interrupted_once) -> tuple[Path, list]:
    run, pristine, argv = interrupted_once
    shutil.rmtree(run)
    _copy(pristine, run)
    return run, argv


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _resume_case(name: str, run: Path, tmp: Path) -> tuple[int, list[str]]:
    state = run / "checkpoint" / "state.pt"
    if name == "truncated checkpoint":
        _truncate(state)
        return 2, [f"--resume: {state} cannot be read", "--overwrite"]
    if name == "checkpoint that would run code":
        torch.save({"format": 1, "run_config": {}, "counters": {}, "payload": _RunsCode(tmp / "ran")}, state)
        return 2, [f"--resume: {state} holds Python objects", "posix.mkdir", "could run code"]
    if name == "truncated metrics.jsonl":
        _truncate(run / "metrics.jsonl", 10)
        return 2, [f"--resume: {run / 'metrics.jsonl'} is truncated"]
    if name == "damaged metrics.jsonl":
        data = bytearray((run / "metrics.jsonl").read_bytes())
        data[5:9] = b"\0\0\0\0"
        (run / "metrics.jsonl").write_bytes(bytes(data))
        return 2, [f"--resume: {run / 'metrics.jsonl'}:1 is not a whole metrics row"]
    raise KeyError(name)


@pytest.mark.parametrize("name", ["truncated checkpoint", "checkpoint that would run code", "truncated metrics.jsonl",
                                  "damaged metrics.jsonl"])
def test_resume_from_a_damaged_run_is_one_line(name, interrupted, tmp_path):
    run, argv = interrupted
    code, needles = _resume_case(name, run, tmp_path)
    before = _snapshot(run)
    r = run_cli(*argv, "--resume")
    _one_line(r, code, *needles)
    assert _snapshot(run) == before, "a refused --resume must leave the run as it was"
    assert not (tmp_path / "ran").exists(), "the checkpoint's pickle ran code"


def test_damaged_checkpoint_meta_still_guards_the_run(interrupted, tmp_path):
    """meta.json is a summary: damaged, the run still holds a checkpoint that a new run must not drop."""
    run, argv = interrupted
    (run / "checkpoint" / "meta.json").write_text("{")
    before = _snapshot(run)
    _one_line(run_cli(*argv), 2, "holds an interrupted run (a checkpoint)", "--resume")
    assert _snapshot(run) == before


def test_checkpoints_are_loaded_without_unpickling(tmp_path):
    from fastmt.engine.checkpoint import _read_state

    torch.save({"payload": _RunsCode(tmp_path / "ran")}, tmp_path / "state.pt")
    with pytest.raises(Exception, match="posix.mkdir|mkdir"):
        _read_state(tmp_path / "state.pt", mmap=False)
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------------------------------------------
# A full disk: exit status 1, one line naming the path and the space needed; nothing on disk lost


def _cofinetune(tiny_task, tiny_encoders, out, *extra):
    return ["cofinetune", "--teacher", tiny_encoders["a"], "--train", tiny_task["train"], "--dev", tiny_task["dev"],
            "--out", out, *FAST, *extra]


def _distill(tiny_task, teachers_dir, out, *extra):
    return ["distill", "--teachers", teachers_dir, "--student-layers", "1", "--train", tiny_task["train"],
            "--dev", tiny_task["dev"], "--out", out, *FAST, *extra]


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def test_disk_full_while_saving_the_model_real_tmpfs(tmp_path, tiny_task, tiny_encoders):
    """A 64 KB tmpfs: the training and metrics.jsonl fit, the teacher's weights (~125 KB) do not."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected full disk below covers this case")
    try:
        out = disk / "run"
        r = _cli(*_cofinetune(tiny_task, tiny_encoders, out))
        _one_line(r, 1, f"cannot write {out}: No space left on device (it needs about", "free there",
                  "its model could not be saved", "holds no model yet", "run the command again")
        assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["event"] == "stopped" and rows[-1]["reason"] == "write failed"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_disk_full_while_saving_the_model(tmp_path, tiny_task, tiny_encoders):
    out = tmp_path / "run"
    r = _cli(*_cofinetune(tiny_task, tiny_encoders, out), env=_full_disk_env(out, "model.safetensors"))
    _one_line(r, 1, f"cannot write {out}: No space left on device (it needs about", "0 bytes free there",
              "training finished (epoch 1 of 1) but its model could not be saved", "run the command again")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # no staging dir, no stray temporary file


def test_disk_full_keeps_the_finished_model_already_there(tmp_path, tiny_task, tiny_encoders, teachers_dir):
    out = _copy(teachers_dir, tmp_path / "run")
    kept = {k: v for k, v in _snapshot(out).items() if k != "metrics.jsonl"}
    r = _cli(*_cofinetune(tiny_task, tiny_encoders, out, "--overwrite"), env=_full_disk_env(out, "model.safetensors"))
    _one_line(r, 1, f"cannot write {out}: No space left on device", f"the model that was in {out} is still there")
    assert {k: v for k, v in _snapshot(out).items() if k != "metrics.jsonl"} == kept
    from fastmt.models.classifier import Teachers

    Teachers.load(out)  # still a whole teachers dir


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(tmp_path, tiny_task, teachers_dir):
    out = tmp_path / "run"
    r = _cli(*_distill(tiny_task, teachers_dir, out, "--save-every", "2"), env=_full_disk_env(out, "state.pt", 2))
    _one_line(r, 1, f"cannot write {out / 'checkpoint' / 'state.pt'}: No space left on device (it needs about",
              "the checkpoint of step 4 could not be written", "the checkpoint of step 2", "--resume: it goes on from step 2")
    from fastmt.engine.checkpoint import _read_state

    assert _read_state(out / "checkpoint" / "state.pt", mmap=False)["counters"]["step"] == 2
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["meta.json", "state.pt"]


def test_disk_full_after_training_then_resume(tmp_path, tiny_task, teachers_dir):
    """Training finished, its checkpoint of the last step written, then the model did not fit: the
    message says so, and --resume (once there is room) saves the model without training again."""
    out = tmp_path / "run"
    argv = _distill(tiny_task, teachers_dir, out, "--save-every", "8")
    r = _cli(*argv, env=_full_disk_env(out, "model.safetensors"))
    _one_line(r, 1, f"cannot write {out}: No space left on device", "training finished (epoch 1 of 1)",
              "the checkpoint of step 8", "run the same command with --resume")
    assert not (out / "config.json").exists() and (out / "checkpoint" / "state.pt").is_file()
    r = run_cli(*argv, "--resume")
    assert r.returncode == 0, r.stderr
    from fastmt.models.classifier import Student

    Student.load(out)
    assert not (out / "checkpoint").exists()


# ---------------------------------------------------------------------------------------------------
# The pieces: every writer turns an OS error into WriteFailed, after dropping what it had written


def test_native_writers_os_errors_are_recognised():
    from fastmt.engine.fileio import os_error_of

    e = os_error_of(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert e.errno == errno.ENOSPC
    assert os_error_of(OSError(errno.EACCES, "Permission denied")).errno == errno.EACCES
    assert os_error_of(RuntimeError("size mismatch")) is None


def test_a_line_that_does_not_fit_is_taken_back(tmp_path, monkeypatch):
    import builtins

    from fastmt.errors import WriteFailed
    from fastmt.engine.fileio import append_jsonl

    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"event": "a"})
    before = path.read_bytes()
    real_open = builtins.open

    class HalfWrite:
        def __init__(self, f):
            self.f, self.calls = f, 0

        def write(self, data):
            self.calls += 1
            if self.calls > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data[: len(data) // 2])

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(builtins, "open", lambda *a, **kw: HalfWrite(real_open(*a, **kw)))
    with pytest.raises(WriteFailed, match="No space left on device"):
        append_jsonl(path, {"event": "b"})
    monkeypatch.setattr(builtins, "open", real_open)
    assert path.read_bytes() == before


def test_staged_set_drops_the_stage_and_names_the_dir(tmp_path):
    from fastmt.errors import WriteFailed
    from fastmt.engine.fileio import STAGING, staged_set

    out = tmp_path / "run"
    with staged_set(out) as st:
        (st / "model.bin").write_text("v1")
    with pytest.raises(WriteFailed) as caught, staged_set(out, need=5_000_000) as st:
        (st / "model.bin").write_text("v2")
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert caught.value.path == out and "it needs about 5.0 MB" in str(caught.value)
    assert (out / "model.bin").read_text() == "v1" and not (out / STAGING).exists()


def test_truncated_teacher_cache_is_rebuilt(tmp_path, caplog):
    """The teacher cache is derived data: a truncated file of it is rebuilt, with a warning naming it."""
    import logging

    import numpy as np

    from fastmt.cache import teachers as C

    n, t, c = 6, 2, 3
    fp = {"format": C.FORMAT, "teacher_files": "x", "train_data": "y", "max_length": 8, "teacher_subset": None,
          "hidden_loss": "none", "layer_maps": None, "precision": "fp32"}
    cache = C.TeacherCache.open(tmp_path / "c", fp, n, t, c, 0, 0, None, 1e9)
    cache.put(torch.tensor([0, 1]), torch.randn(t, 2, c), None)
    cache.flush()
    _truncate(tmp_path / "c" / "logits.bin", 10)
    with caplog.at_level(logging.WARNING, logger="fastmt"):
        again = C.TeacherCache.open(tmp_path / "c", fp, n, t, c, 0, 0, None, 1e9)
    assert "is damaged (logits.bin (10 bytes, not 144))" in caplog.text and "rebuilding it" in caplog.text
    assert again.count == 0 and np.asarray(again.logits).shape == (n, t, c)
