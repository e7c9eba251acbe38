"""Data-parallel distillation with torchrun (gloo, CPU processes) follows one process's trajectory,
including the last batch of an epoch, which may be uneven over the processes or have fewer rows than
there are processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def _encoder_without_dropout(tok, d, name, layers, hidden, seed):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(d / name)
    tok.save_pretrained(d / name)
    return d / name


def torchrun(nproc: int, *args, env: dict | None = None, timeout: int = 300):
    """``torchrun --standalone``: the rendezvous picks a free port itself (none is fixed)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           *map(str, args)], capture_output=True, text=True, env=env or _env(), cwd=REPO, timeout=timeout)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _train_rows(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "train"]


def test_two_processes_match_one_with_the_same_global_batch(tiny_task, tmp_path):
    from fastmt.config.settings import TrainArgs
    from fastmt.tasks.classification.cofinetune import cofinetune
    from fastmt.tasks.demo import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    a = _encoder_without_dropout(tok, tmp_path, "a", 2, 32, 1)
    b = _encoder_without_dropout(tok, tmp_path, "b", 1, 32, 2)
    common = dict(train=str(tiny_task["train"]), dev=str(tiny_task["dev"]), epochs=1, batch_size=32, lr=1e-3,
                  max_length=16, progress=False, precision="fp32")
    cofinetune([str(a), str(b)], TrainArgs(out=str(tmp_path / "teachers"), **common))
    flags = ["distill", "--teachers", tmp_path / "teachers", "--student-layers", "1", "--hidden-loss", "cls",
             "--temperature", "2", "--train", tiny_task["train"], "--dev", tiny_task["dev"], "--epochs", "1",
             "--batch-size", "32", "--lr", "1e-3", "--max-length", "16", "--log-every", "1", "--no-progress",
             "--precision", "fp32"]  # pinned: the test is about sharding, not about which CPU runs it
    one = subprocess.run([sys.executable, "-m", "fastmt", *map(str, flags), "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "-m", "fastmt", *flags, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert len(r1) == len(r2) == 8
    # The two processes sum the same rows' gradients in another order: float32 rounding (2^-24
    # relative) that 8 AdamW steps (which divide by the gradient's own scale) magnify; 1e-4 is ~2^10
    # float32 ulps. abs: for losses near 0.
    for x, y in zip(r1, r2):
        for key in ("loss", "loss_task", "loss_kd", "loss_hidden"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)
    assert r1[-1]["loss"] != pytest.approx(r1[0]["loss"], rel=1e-3)  # the student did move
    assert (tmp_path / "two" / "model.safetensors").is_file()


def test_shards_split_a_global_batch_into_disjoint_near_equal_parts():
    import torch

    from fastmt.engine.distributed import World, shard

    def split(n, size):
        ids = torch.arange(3 * n).reshape(n, 3)
        mask = torch.ones_like(ids)
        mask[:, 2] = torch.arange(n) % 2  # rows hold 2 or 3 real tokens
        inputs = {"k": {"input_ids": ids, "attention_mask": mask}}
        return ids, mask, [shard(inputs, torch.arange(n), World(rank=r, size=size)) for r in range(size)]

    ids, _, parts = split(8, 2)
    assert [p.labels.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert torch.equal(torch.cat([p.inputs["k"]["input_ids"] for p in parts]), ids)
    assert [p.row_weight() for p in parts] == [1.0, 1.0]
    ids, mask, parts = split(8, 3)  # uneven: 3, 3, 2 rows
    assert [p.labels.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert torch.equal(torch.cat([p.inputs["k"]["input_ids"] for p in parts]), ids)
    assert sum(p.row_weight() for p in parts) == pytest.approx(3)
    assert [p.row_weight() for p in parts] == pytest.approx([9 / 8, 9 / 8, 6 / 8])
    tokens = [int(p.inputs["k"]["attention_mask"].sum()) for p in parts]
    assert [p.token_weight("k") for p in parts] == pytest.approx([3 * t / int(mask.sum()) for t in tokens])
    _, _, parts = split(4, 3)  # 2, 1, 1 rows (a ceiling split would leave the last process none)
    assert [p.rows for p in parts] == [2, 1, 1]
    _, _, parts = split(1, 3)  # one row: two processes hold a placeholder row weighted 0
    assert [p.rows for p in parts] == [1, 0, 0]
    assert [p.labels.tolist() for p in parts] == [[0], [0], [0]]
    assert [p.row_weight() for p in parts] == [3.0, 0.0, 0.0]
    assert [p.token_weight("k") for p in parts] == [3.0, 0.0, 0.0]
    inputs, labels = {"k": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}, torch.arange(8)
    one = shard(inputs, labels, World())
    assert one.inputs is inputs and one.labels is labels and one.row_weight() == 1.0


# Last batches of an epoch with batch size 6: 25 rows end with a batch of 1 row (1/0 and 1/0/0 rows
# over 2 and 3 processes); 29 rows with one of 5 rows (3/2 and 2/2/1). The first case distils with
# a hidden loss over [CLS] (a mean over rows), the second over tokens (a mean over real tokens).
UNEVEN = {"one_row": (25, "cls"), "five_rows": (29, "tokens")}


@pytest.fixture(scope="module")
def uneven_runs(tiny_task, tmp_path_factory):
    """Teachers without dropout (so replicas and one process draw nothing at random), the uneven
    cases' run arguments, and the single-process runs of them."""
    from fastmt.config.settings import DistillArgs, TrainArgs
    from fastmt.tasks.classification.cofinetune import cofinetune
    from fastmt.tasks.classification.distill import distill
    from fastmt.tasks.demo import build_tokenizer, write_tsv

    from conftest import easy_rows

    d = tmp_path_factory.mktemp("uneven")
    tok = build_tokenizer(d / "tok")
    a = _encoder_without_dropout(tok, d, "a", 2, 32, 1)
    b = _encoder_without_dropout(tok, d, "b", 1, 32, 2)
    write_tsv(easy_rows(12, 5), d / "dev.tsv")
    common = dict(dev=str(d / "dev.tsv"), batch_size=6, lr=1e-3, max_length=16, progress=False, precision="fp32",
                  group_by_length=False)
    write_tsv(easy_rows(24, 4), d / "teach.tsv")
    cofinetune([str(a), str(b)], TrainArgs(train=str(d / "teach.tsv"), out=str(d / "teachers"), epochs=1, **common))
    cases = {}
    for name, (n, hidden) in UNEVEN.items():
        write_tsv(easy_rows(n, 6), d / f"{name}.tsv")
        cases[name] = dict(train=str(d / f"{name}.tsv"), teachers=str(d / "teachers"), student_layers=1, hidden_loss=hidden,
                           temperature=2.0, epochs=2, log_every=1, cache_teachers=None, **common)  # as torchrun's runs
        distill(DistillArgs(out=str(d / "one" / name), **cases[name]))
    return d, cases


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("nproc", [2, 3])
def test_uneven_last_batches_match_one_process(uneven_runs, nproc):
    """The trained student and every logged loss equal one process's over the same global batches,
    including a last batch smaller than the number of processes and one they do not divide."""
    import torch

    d, cases = uneven_runs
    spec = d / f"runs{nproc}.json"
    spec.write_text(json.dumps([dict(out=str(d / f"world{nproc}" / name), **kw) for name, kw in cases.items()]))
    run = torchrun(nproc, REPO / "tests" / "distill_runs.py", spec)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in cases:
        one, many = d / "one" / name, d / f"world{nproc}" / name
        r1, rn = _train_rows(one), _train_rows(many)
        assert len(r1) == len(rn) == 10  # 5 steps an epoch, the last one the uneven batch
        for x, y in zip(r1, rn):
            for key in ("loss", "loss_task", "loss_kd", "loss_hidden"):
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (name, x["step"], key)
        w1, wn = _weights(one), _weights(many)
        assert w1.keys() == wn.keys()
        for key in w1:
            # One AdamW step moves a weight by about lr = 1e-3; a batch weighted wrongly, or a step
            # skipped for a NaN, shows at that scale. Rounding (rows summed in another order) stays
            # near 1e-6: Adam divides by the gradient's own scale, which magnifies it where the
            # gradient is tiny.
            torch.testing.assert_close(wn[key], w1[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {key}: {m}")
