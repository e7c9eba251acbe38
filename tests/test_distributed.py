"""Data-parallel distillation with torchrun (gloo, 2 CPU processes) follows one process's trajectory."""

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


def _train_rows(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "train"]


def test_two_processes_match_one_with_the_same_global_batch(tiny_task, tmp_path):
    from fastmt import train as T
    from fastmt.demo import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    a = _encoder_without_dropout(tok, tmp_path, "a", 2, 32, 1)
    b = _encoder_without_dropout(tok, tmp_path, "b", 1, 32, 2)
    common = dict(train=str(tiny_task["train"]), dev=str(tiny_task["dev"]), epochs=1, batch_size=32, lr=1e-3,
                  max_length=16, progress=False)
    T.cofinetune([str(a), str(b)], T.TrainArgs(out=str(tmp_path / "teachers"), **common))
    flags = ["distill", "--teachers", tmp_path / "teachers", "--student-layers", "1", "--hidden-loss", "cls",
             "--temperature", "2", "--train", tiny_task["train"], "--dev", tiny_task["dev"], "--epochs", "1",
             "--batch-size", "32", "--lr", "1e-3", "--max-length", "16", "--log-every", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, "-m", "fastmt", *map(str, flags), "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                          "-m", "fastmt", *map(str, flags), "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert len(r1) == len(r2) == 8
    for x, y in zip(r1, r2):
        for key in ("loss", "loss_task", "loss_kd", "loss_hidden"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)
    assert r1[-1]["loss"] != pytest.approx(r1[0]["loss"], rel=1e-3)  # the student did move
    assert (tmp_path / "two" / "model.safetensors").is_file()


def test_shards_split_a_global_batch_into_disjoint_equal_parts():
    import torch

    from fastmt.distributed import World, shard

    ids = torch.arange(24).reshape(8, 3)
    inputs = {"k": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
    labels = torch.arange(8)
    parts = [shard(inputs, labels, World(rank=r, size=2)) for r in range(2)]
    assert [p[1].tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert torch.equal(torch.cat([p[0]["k"]["input_ids"] for p in parts]), ids)
    same_inputs, same_labels = shard(inputs, labels, World())
    assert same_inputs is inputs and same_labels is labels
