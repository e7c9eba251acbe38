"""Shared fixtures: a tiny, easy task and tiny teachers built from configs (no downloads)."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from pathlib import Path

import pytest
import torch

try:
    from hypothesis import settings

    # The default run draws the same examples every time (a green suite stays green); set
    # FASTMT_FUZZ=explore for fresh random examples, many more of them, to hunt for new failures.
    settings.register_profile("default", derandomize=True, print_blob=True)
    settings.register_profile("explore", derandomize=False, max_examples=300, print_blob=True)
    settings.load_profile(os.environ.get("FASTMT_FUZZ", "default"))
except ImportError:  # pragma: no cover - hypothesis is in the test extras
    pass

# FASTMT_TEST_DEVICE=cuda runs the kernel tests on the GPU, compiled; by default they run on CPU
# tensors in Triton's interpreter, which must be switched on before Triton is first imported.
if os.environ.get("FASTMT_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `--cache-teachers auto` (the CLI's default with several epochs) writes under $FASTMT_CACHE: keep the
# suite's caches out of the user's home, in one dir per session.
if "FASTMT_CACHE" not in os.environ:
    import tempfile

    os.environ["FASTMT_CACHE"] = tempfile.mkdtemp(prefix="fastmt-test-cache-")

REPO = Path(__file__).resolve().parents[1]
# ../shared (real models and data) and CI's guard on the tests that need it.
from shared_guard import SHARED, pytest_collection_modifyitems, pytest_configure, pytest_runtest_makereport  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "no_launch: a kernel test that checks something other than a kernel's output")


@contextlib.contextmanager
def kernel_launches(device: str | torch.device = "cpu"):
    """Record the name of every Triton kernel launched inside the block.

    Fails the test at once when the fused kernels cannot run for tensors on ``device`` (Triton not
    importable, or CPU tensors without the interpreter): ``fastmt.kernels`` would then quietly run the
    reference, and a "fused matches reference" test would compare the reference with itself.
    """
    import fastmt.kernels as fused

    if fused._kl is None:
        pytest.fail(f"the fused kernels cannot be imported ({fused._IMPORT_ERROR}); a fused test must not fall back")
    if not fused.available(device):
        pytest.fail(f"the fused kernels do not run for tensors on {device} here (TRITON_INTERPRET is not 1)")
    from fastmt.kernels import kl

    names: list[str] = []
    real = kl.Launch.__call__

    def call(self):
        names.append(getattr(self.kernel, "fn", self.kernel).__name__)
        return real(self)

    kl.Launch.__call__ = call
    try:
        yield names
    finally:
        kl.Launch.__call__ = real


@contextlib.contextmanager
def kernels_must_run(request, device):
    """The kernel test files' autouse check: unless the test is marked ``no_launch``, it fails when no
    Triton kernel was launched (the fused path fell back to the reference)."""
    if request.node.get_closest_marker("no_launch"):
        yield
        return
    with kernel_launches(device) as names:
        yield
    assert names, "no Triton kernel was launched: the fused path fell back to the reference"


@pytest.fixture
def kernels_ran():
    """For a test that runs the fused kernels: fails it unless a Triton kernel really was launched."""
    with kernel_launches() as names:
        yield names
    assert names, "no Triton kernel was launched: the fused path fell back to the reference"


def easy_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """A two-class task a tiny encoder learns in a few epochs: the adjective decides."""
    from fastmt.tasks.demo import ADVERBS, NEGATIVE, POSITIVE, SUBJECTS

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pos = rng.random() < 0.5
        words = [rng.choice(SUBJECTS), "was"]
        if rng.random() < 0.5:
            words.append(rng.choice(ADVERBS))
        words.append(rng.choice(POSITIVE if pos else NEGATIVE))
        rows.append((" ".join(words), "good" if pos else "bad"))
    return rows


def run_args(tiny_task, out, **kw) -> dict:
    """Keyword arguments of a short training run on the tiny task (for ``TrainArgs``/``DistillArgs``)."""
    # Pinned: what these runs are about is never which CPU runs them (the auto choices have tests of
    # their own, in test_config_auto.py and test_config_settings_checks.py).
    base = dict(train=str(tiny_task["train"]), dev=str(tiny_task["dev"]), out=str(out), epochs=1, batch_size=32,
                lr=1e-3, max_length=16, progress=False, device="cpu", precision="fp32", compile=False,
                group_by_length=False, head_lr=None)
    base.update(kw)
    return base


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> dict[str, Path]:
    from fastmt.tasks.demo import write_tsv

    d = tmp_path_factory.mktemp("task")
    write_tsv(easy_rows(256, 1), d / "train.tsv")
    write_tsv(easy_rows(96, 2), d / "dev.tsv")
    return {"train": d / "train.tsv", "dev": d / "dev.tsv", "dir": d}


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory) -> dict[str, Path]:
    """Two tiny teachers of different shapes (2 layers/32 hidden, 3 layers/48 hidden) sharing a tokenizer."""
    from fastmt.tasks.demo import Shape, build_encoder, build_tokenizer

    d = tmp_path_factory.mktemp("encoders")
    tok = build_tokenizer(d / "tokenizer")
    a = build_encoder(Shape("a", 2, 32, 2), tok, d, seed=1)
    b = build_encoder(Shape("b", 3, 48, 2), tok, d, seed=2)
    return {"a": a, "b": b, "tokenizer": d / "tokenizer", "dir": d}


@pytest.fixture(scope="session")
def teachers_dir(tiny_task, tiny_encoders, tmp_path_factory) -> Path:
    """Both tiny encoders co-finetuned once (one epoch, lr 1e-3). Shared by the whole session: read it,
    and copy it before damaging or extending it."""
    from fastmt.config.settings import TrainArgs
    from fastmt.tasks.classification.cofinetune import cofinetune

    d = tmp_path_factory.mktemp("tiny-teachers") / "teachers"
    cofinetune([str(tiny_encoders["a"]), str(tiny_encoders["b"])], TrainArgs(**run_args(tiny_task, d)))
    return d


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run the real ``fastmt`` command in a subprocess (``env``: variables to set for it)."""
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "fastmt", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=timeout)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
