"""A compiled run knows before step 1 how many input shapes it can meet (``fastmt.engine.shapes``), and
runs to the end however many there are: Dynamo's per-function limit (8 graphs) is fitted to them."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from fastmt.config import auto

from fastmt.engine import shapes
from fastmt.engine.distributed import World


def test_step_rows_cover_the_last_batch_and_every_process():
    assert shapes.step_rows(100, 32) == [4, 32]
    assert shapes.step_rows(96, 32) == [32]  # no partial batch
    assert shapes.step_rows(10, 32) == [10]  # one short batch
    # 25 rows in batches of 6 over 3 processes: 2 rows each, then a last row that one process takes
    # and the others stand in for with one placeholder row.
    for rank in range(3):
        assert shapes.step_rows(25, 6, World(rank=rank, size=3)) == [1, 2]
    assert shapes.step_rows(29, 6, World(rank=0, size=2)) == [3]  # 6 -> 3/3, last 5 -> 3/2
    assert shapes.step_rows(29, 6, World(rank=1, size=2)) == [2, 3]


def test_bucket_of_each_length():
    assert shapes.bucket_of([1, 16, 17, 33, 100, 512], [16, 32, 64, 512]).tolist() == [16, 16, 32, 64, 512, 512]


@pytest.mark.parametrize("seed", range(6))
def test_width_tuples_are_exactly_the_maxima_of_some_batch(seed):
    """Brute force over every batch (every subset) of a few examples: the tuples counted are exactly
    the padded widths some batch takes, so the count never falls short of what a run meets."""
    rng = random.Random(seed)
    buckets = [16, 32, 64, 128]
    keys = rng.choice([1, 2, 3])
    widths = np.array([[rng.choice(buckets) for _ in range(keys)] for _ in range(rng.randint(1, 9))])
    seen = set()
    for r in range(1, len(widths) + 1):
        for batch in itertools.combinations(range(len(widths)), r):
            seen.add(tuple(int(x) for x in widths[list(batch)].max(0)))
    assert set(shapes.width_tuples(widths)) == seen


def _long_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Reviews of 6 to ~440 words, spread over every length bucket up to 512; in every other group
    of seven each word carries a comma, which one of the two tokenizers splits off (so there the two
    tokenizers' lengths differ, often by a bucket)."""
    from fastmt.tasks.demo import NEGATIVE, POSITIVE, SUBJECTS

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos = rng.random() < 0.5
        target = [6, 12, 24, 48, 100, 200, 440][i % 7] + rng.randint(0, 3)
        comma = "," if (i // 7) % 2 else ""
        words = [rng.choice(SUBJECTS), "was"]
        while len(" ".join(words).split()) < target:
            words.append(rng.choice(POSITIVE if pos else NEGATIVE) + comma)
        rows.append((" ".join(" ".join(words).split()[:target]), "good" if pos else "bad"))
    return rows


@pytest.fixture(scope="module")
def long_task(tmp_path_factory):
    from fastmt.tasks.demo import Shape, build_encoder, build_tokenizer, write_tsv

    d = tmp_path_factory.mktemp("long")
    write_tsv(_long_rows(70, 1), d / "train.tsv")  # batches of 4: the last one has 2 rows
    write_tsv(_long_rows(14, 2), d / "dev.tsv")
    plain = build_tokenizer(d / "tok-plain")
    split = build_tokenizer(d / "tok-split", split_punctuation=True)
    a = build_encoder(Shape("a", 1, 16, 2), plain, d, seed=1, positions=512)
    b = build_encoder(Shape("b", 1, 16, 2), split, d, seed=2, positions=512)
    return {"train": d / "train.tsv", "dev": d / "dev.tsv", "a": a, "b": b, "dir": d}


@pytest.fixture
def eager_backend(monkeypatch):
    """Dynamo traces and checks every graph as Inductor would get it (fullgraph, one per shape, the
    recompile limit) without generating code: the limit, not the code, is under test. The limits
    are put back afterwards."""
    import torch._dynamo.config as cfg

    from fastmt.engine.precision import COMPILE_BACKEND_ENV

    monkeypatch.setenv(COMPILE_BACKEND_ENV, "eager")
    torch._dynamo.reset()
    with cfg.patch(recompile_limit=8, accumulated_recompile_limit=256):
        yield
    torch._dynamo.reset()


def _record_shapes(monkeypatch):
    """The shape of every training batch: (rows, padded width per tokenizer)."""
    from fastmt.engine import loop

    seen = set()
    real = loop.iterate_batches

    def spy(encodings, *a, **kw):
        for batch in real(encodings, *a, **kw):
            if kw.get("shuffle", a[3] if len(a) > 3 else False):  # training batches (eval is not compiled)
                seen.add((int(batch.labels.shape[0]),
                          tuple((k, int(batch.inputs[k]["input_ids"].shape[1])) for k in sorted(batch.inputs))))
            yield batch

    monkeypatch.setattr(loop, "iterate_batches", spy)
    return seen


def _path_line(caplog, command):
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{command} path:")]
    assert lines, f"no '{command} path:' line was logged"
    return lines[-1]


def test_compiled_cofinetune_and_distill_meet_many_shapes_and_finish(long_task, tmp_path, eager_backend,
                                                                      monkeypatch, caplog):
    from fastmt.config.settings import DistillArgs, TrainArgs
    from fastmt.tasks.classification.cofinetune import cofinetune
    from fastmt.tasks.classification.distill import distill

    from fastmt.data import dataset as data

    caplog.set_level("INFO", logger="fastmt")
    common = dict(train=str(long_task["train"]), dev=str(long_task["dev"]), batch_size=4, lr=1e-3, max_length=512,
                  progress=False, log_every=1, compile=None, group_by_length=True, precision="fp32")  # as the CLI defaults
    # Length-sorted runs of 2 batches (50 by default): the last, short batch then holds examples of
    # any length, so it lands in another bucket from one epoch to the next, as it does on a large set.
    monkeypatch.setattr(data, "GROUP_BATCHES", 2)
    steps = 3 * 18  # three epochs of 18 steps (17 full batches and one of 2 rows)
    monkeypatch.setattr(auto, "COMPILE_MIN_STEPS", steps)  # compile as an auto choice, as a long job would

    torch._dynamo.utils.counters.clear()
    seen = _record_shapes(monkeypatch)
    cofinetune([str(long_task["a"]), str(long_task["b"])], TrainArgs(out=str(tmp_path / "t"), epochs=3, **common))
    line = _path_line(caplog, "cofinetune")
    assert "compile on" in line
    bound = int(line.split("compiled shapes: up to ")[1].split()[0])
    assert len(seen) >= 12  # more than Dynamo's 8 graphs per function
    assert any(len({w for _, w in widths}) > 1 for _, widths in seen)  # two tokenizers, two widths in one batch
    assert len(seen) <= bound <= shapes.MAX_SHAPES
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(seen)  # one graph per shape
    assert json.loads((tmp_path / "t" / "config.json").read_text())["run"]["compile"] is True

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    seen.clear()
    distill(DistillArgs(out=str(tmp_path / "s"), teachers=str(tmp_path / "t"), student_layers=1, hidden_loss="cls",
                            epochs=3, cache_teachers=None, **common))  # the teachers run every epoch: every shape
    line = _path_line(caplog, "distill")
    bound = int(line.split("compiled shapes: up to ")[1].split()[0])
    assert len(seen) >= 12 and len(seen) <= bound
    # Two compiled functions, a graph per shape each: the teachers' forward, which reads both
    # tokenizers' inputs, and the student's forward and loss, which reads only its own (Dynamo guards
    # on what a function reads).
    from transformers import AutoTokenizer

    from fastmt.data.dataset import tokenizer_key

    mine = tokenizer_key(AutoTokenizer.from_pretrained(str(long_task["a"])))
    student_shapes = {(rows, dict(widths)[mine]) for rows, widths in seen}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(seen) + len(student_shapes)
    rows = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "train" for r in rows) == steps and rows[-1]["event"] == "done"


def test_too_many_shapes_turn_auto_compile_off_and_refuse_an_explicit_one(long_task, tmp_path, eager_backend,
                                                                          monkeypatch, caplog):
    from fastmt.config.settings import TrainArgs
    from fastmt.tasks.classification.cofinetune import cofinetune
    from fastmt.errors import UsageError

    caplog.set_level("INFO", logger="fastmt")
    monkeypatch.setattr(shapes, "MAX_SHAPES", 4)
    monkeypatch.setattr(auto, "COMPILE_MIN_STEPS", 1)
    common = dict(train=str(long_task["train"]), dev=str(long_task["dev"]), batch_size=4, lr=1e-3, max_length=512,
                  progress=False, epochs=1, precision="fp32")
    torch._dynamo.utils.counters.clear()
    cofinetune([str(long_task["a"])], TrainArgs(out=str(tmp_path / "auto"), compile=None, **common))
    line = _path_line(caplog, "cofinetune")
    assert "compile off (up to " in line and "more than 4" in line
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["run"]["compile"] is False
    with pytest.raises(UsageError, match=r"--compile: up to \d+ input shapes .* --no-compile"):
        cofinetune([str(long_task["a"])], TrainArgs(out=str(tmp_path / "explicit"), compile=True, **common))
    assert not (tmp_path / "explicit" / "metrics.jsonl").exists()  # refused before step 1
