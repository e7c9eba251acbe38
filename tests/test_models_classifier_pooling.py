"""--pooling (what the shared head reads) and --head-lr (the fresh head's own learning rate)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from fastmt.config.settings import TrainArgs
from fastmt.models.classifier import choose_pooling, pool, sentence_transformers_pooling
from fastmt.engine.optim import make_optimizer


def test_pool_reads_the_first_token_or_the_mean_of_real_tokens():
    last = torch.arange(2 * 4 * 3, dtype=torch.float64).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(pool(last, mask, "cls"), last[:, 0])
    mean = pool(last, mask, "mean")
    assert torch.allclose(mean[0], last[0, :2].mean(0)) and torch.allclose(mean[1], last[1].mean(0))
    last2 = last.clone()
    last2[0, 2:] = 1e6  # padding never reaches the mean
    assert torch.equal(pool(last2, mask, "mean"), mean)


def test_auto_pooling_follows_sentence_transformers_folders(tmp_path):
    def folder(name, mean):
        d = tmp_path / name
        (d / "1_Pooling").mkdir(parents=True)
        (d / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                                                    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": mean, "pooling_mode_cls_token": not mean}))
        return str(d)

    a, b, c = folder("a", True), folder("b", True), folder("c", False)
    assert sentence_transformers_pooling(a) == "mean" and sentence_transformers_pooling(c) == "cls"
    assert sentence_transformers_pooling(tmp_path / "nothing") is None
    assert choose_pooling([a, b])[0] == "mean"
    assert choose_pooling([a, c])[0] == "cls" and choose_pooling([a, "bert-base-uncased"])[0] == "cls"


def test_mean_pooled_teachers_and_student_end_to_end(tiny_task, tiny_encoders, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from fastmt.data.dataset import encode, read_dataset, tokenizer_key
    from fastmt.models.classifier import Student, Teachers

    r = run_cli("cofinetune", "--teacher", tiny_encoders["a"], "--teacher", tiny_encoders["b"], "--train", tiny_task["train"],
                "--dev", tiny_task["dev"], "--out", tmp_path / "t", "--epochs", "2", "--max-length", "16", "--no-progress",
                "--pooling", "mean", "--lr", "2e-3", "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    teachers, cfg = Teachers.load(tmp_path / "t")
    assert cfg["pooling"] == "mean" and teachers.pooling == "mean" and cfg["run"]["pooling"] == "mean"
    assert cfg["run"]["head_lr"] == pytest.approx(2e-3)  # auto: the larger of --lr and 1e-3
    with pytest.raises((ValueError, OSError), match="trust_remote_code"):  # no stock head reads a mean
        AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "t" / "teacher_0"))
    r = run_cli("distill", "--teachers", tmp_path / "t", "--student-layers", "1", "--train", tiny_task["train"],
                "--dev", tiny_task["dev"], "--out", tmp_path / "s", "--epochs", "2", "--max-length", "16", "--no-progress",
                "--lr", "2e-3", "--precision", "fp32")  # fp32 pinned: eval (fp32) reproduces the logged accuracy below
    assert r.returncode == 0, r.stderr
    student, scfg = Student.load(tmp_path / "s")
    assert student.pooling == "mean" and scfg["pooling"] == "mean"
    # Stacked teachers (one vmapped module) read the mean too: same logits as one teacher at a time.
    same = Teachers([teachers.encoders[0], teachers.encoders[0]], [teachers.tokenizers[0]] * 2, ["x", "y"], 2, "mean")
    same.head.load_state_dict(teachers.head.state_dict())
    same.eval()
    from fastmt.models.stacked import make_stacked

    ds = read_dataset(tiny_task["dev"])
    enc = encode(teachers.tokenizers[0], ds, 16)
    from fastmt.data.dataset import iterate_batches

    batch = next(iter(iterate_batches({"k": enc}, [0] * len(ds), 8, [16], False)))
    inputs = batch.inputs["k"]
    with torch.no_grad():
        for impl in ("bert", "vmap"):  # the hand-stacked BERT and the generic vmapped module
            stacked = make_stacked(same, (0, 1), impl).forward(inputs, None)
            for i in (0, 1):
                one, _ = same.forward_teacher(i, inputs)
                assert torch.allclose(stacked[i][0], one, atol=1e-5), impl
    # The student's eval reproduces its logged best dev accuracy after the round trip through the dir.
    r = run_cli("eval", "--model", tmp_path / "s", "--data", tiny_task["dev"], "--json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    done = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()][-1]
    assert json.loads((tmp_path / "s.json").read_text())["accuracy"] == pytest.approx(done["best_dev_accuracy"], abs=1e-9)
    assert tokenizer_key(student.tokenizer) == student.key


def test_head_lr_gives_the_head_its_own_scheduled_rate(tiny_encoders, tiny_task):
    from fastmt.models.classifier import Teachers

    teachers = Teachers.from_pretrained_encoders([str(tiny_encoders["a"]), str(tiny_encoders["b"])], 2)
    args = TrainArgs(train="t", dev="d", out="o", lr=1e-4, head_lr="auto", warmup=0.5)
    assert args.head_lr == pytest.approx(1e-3)
    opt, sched = make_optimizer(teachers, args, total_steps=10, device=torch.device("cpu"))
    head_ids = {id(p) for n, p in teachers.named_parameters() if n.startswith(("head.", "adapters."))}
    assert head_ids  # the shared head and b's adapter
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= head_ids or not ids & head_ids
        want = 1e-3 if ids <= head_ids else 1e-4
        for step in range(10):
            sched.last_epoch = step
            sched.attach()
            assert float(g["lr"]) == pytest.approx(want * sched.factor(step))
    plain = TrainArgs(train="t", dev="d", out="o", lr=1e-4, head_lr=None)  # None: the head at --lr
    opt, _ = make_optimizer(teachers, plain, total_steps=10, device=torch.device("cpu"))
    assert len(opt.param_groups) == 2 and all("base_lr" not in g for g in opt.param_groups)  # the reference path
    with pytest.raises(Exception, match="--head-lr"):
        TrainArgs(train="t", dev="d", out="o", head_lr=-1.0)
