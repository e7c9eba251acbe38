"""The eager training loops in-process: teachers with different tokenizers, subsets, validation."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_args
from fastmt.config.settings import DistillArgs, TrainArgs
from fastmt.tasks.classification.cofinetune import cofinetune
from fastmt.tasks.classification.distill import distill
from fastmt.tasks.classification.evaluate import evaluate_dir
from fastmt.engine.kernelchoice import loss_module
from fastmt.tasks.classification.distill import subset_teachers
from fastmt.errors import UsageError
from test_engine_optim import _HostReads  # counts host reads, shared


def _other_tokenizer_teacher(tiny_encoders, tmp_path):
    """A teacher whose tokenizer maps the same words to other ids (so token positions agree but ids do not)."""
    from fastmt.tasks.demo import Shape, build_encoder, build_tokenizer

    tok = build_tokenizer(tmp_path / "other-tokenizer", reverse=True, extra_words=("extra",))
    return build_encoder(Shape("other", 2, 32, 2), tok, tmp_path, seed=5)


_args = run_args


@pytest.fixture(scope="module")
def mixed_teachers(tiny_task, tiny_encoders, tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    other = _other_tokenizer_teacher(tiny_encoders, d)
    cofinetune([str(tiny_encoders["a"]), str(other)], TrainArgs(**_args(tiny_task, d / "teachers")))
    return d / "teachers"


def test_teachers_with_different_tokenizers(mixed_teachers, tiny_task, tmp_path):
    cfg = json.loads((mixed_teachers / "config.json").read_text())
    assert len(cfg["teachers"]) == 2
    with pytest.raises(UsageError, match="--hidden-loss cls"):
        distill(DistillArgs(**_args(tiny_task, tmp_path / "s1"), teachers=str(mixed_teachers), student_layers=1))
    assert not (tmp_path / "s1").exists()
    res = distill(DistillArgs(**_args(tiny_task, tmp_path / "s2"), teachers=str(mixed_teachers), student_layers=1,
                                  hidden_loss="cls"))
    rows = [json.loads(x) for x in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["event"] == "train"]
    assert train_rows and all(r["loss_hidden"] > 0 for r in train_rows)
    logged = [r for r in rows if r["event"] == "eval" and r["epoch"] == res.best_epoch]
    assert res.best_dev_accuracy == logged[-1]["dev_accuracy"]
    assert evaluate_dir(str(tmp_path / "s2"), str(tiny_task["dev"]))["accuracy"] == pytest.approx(res.best_dev_accuracy)


def test_teacher_subset_and_student_alone(mixed_teachers, tiny_task, tmp_path):
    res = distill(DistillArgs(**_args(tiny_task, tmp_path / "one"), teachers=str(mixed_teachers), student_layers=1,
                                  teacher_subset=[0]))
    cfg = json.loads((tmp_path / "one" / "config.json").read_text())["fastmt"]
    assert cfg["num_teachers"] == 1 and len(cfg["teachers"]) == 1
    alone = distill(DistillArgs(**_args(tiny_task, tmp_path / "alone"), teachers=str(mixed_teachers), student_layers=1,
                                    alpha_kd=0.0, hidden_loss="none"))
    rows = [json.loads(x) for x in (tmp_path / "alone" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_kd" not in r for r in rows if r["event"] == "train")
    assert res.steps == alone.steps == 8


def test_same_seed_same_run(tiny_task, tiny_encoders, tmp_path):
    r1 = cofinetune([str(tiny_encoders["a"])], TrainArgs(**_args(tiny_task, tmp_path / "r1"), seed=3))
    r2 = cofinetune([str(tiny_encoders["a"])], TrainArgs(**_args(tiny_task, tmp_path / "r2"), seed=3))
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "r1" / "model.safetensors"), load_file(tmp_path / "r2" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert r1.best_dev_accuracy == r2.best_dev_accuracy


def test_out_dir_with_a_run_is_refused(tiny_task, tiny_encoders, tmp_path):
    cofinetune([str(tiny_encoders["a"])], TrainArgs(**_args(tiny_task, tmp_path / "r")))
    with pytest.raises(UsageError, match="--overwrite"):
        cofinetune([str(tiny_encoders["a"])], TrainArgs(**_args(tiny_task, tmp_path / "r")))
    cofinetune([str(tiny_encoders["a"])], TrainArgs(**_args(tiny_task, tmp_path / "r"), overwrite=True))


def test_fused_and_reference_kernels_train_alike(teachers_dir, tiny_task, tmp_path, kernels_ran):
    """Every step of a short run with the token-level hidden loss: the fused kernels' losses follow the
    reference's, step for step, and the trained students end up the same."""
    from safetensors.torch import load_file

    runs = {}
    for kind in ("reference", "fused"):
        distill(DistillArgs(**_args(tiny_task, tmp_path / kind, log_every=1, epochs=2), teachers=str(teachers_dir),
                                student_layers=2, hidden_loss="tokens", kernels=kind, temperature=2.0))
        rows = [json.loads(x) for x in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
        runs[kind] = [r for r in rows if r["event"] == "train"]
    assert kernels_ran.count("_hidden_fwd_kernel") >= 16 and any("kl" in k for k in kernels_ran)
    assert len(runs["fused"]) == len(runs["reference"]) == 16
    for a, b in zip(runs["fused"], runs["reference"]):
        assert a["step"] == b["step"]
        for key in ("loss_task", "loss_kd", "loss_hidden"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    ref, fused = (load_file(str(tmp_path / k / "model.safetensors")) for k in ("reference", "fused"))
    assert ref.keys() == fused.keys()
    for name in ref:
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("stack", [False, True])
def test_compiled_step_equals_eager_step(stack, tiny_task, tiny_encoders, tmp_path):
    import torch._inductor.config

    teachers_dir = tmp_path / "teachers"
    pair = ["a", "a"] if stack else ["a", "b"]  # stacking needs teachers of one architecture
    cofinetune([str(tiny_encoders[k]) for k in pair], TrainArgs(**_args(tiny_task, teachers_dir)))
    runs = {}
    # Dropout draws from Inductor's own generator unless told to use eager's: same seed, same masks.
    # (config.patch, not monkeypatch: undoing a monkeypatch deletes the config entry.)
    with torch._inductor.config.patch(fallback_random=True):
        for compiled in (False, True):
            out = tmp_path / f"compiled-{compiled}"
            distill(DistillArgs(**_args(tiny_task, out, log_every=1, batch_size=64, compile=compiled),
                                    teachers=str(teachers_dir), student_layers=1, temperature=2.0, stack_teachers=stack))
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            runs[compiled] = [r for r in rows if r["event"] == "train"]
    assert len(runs[True]) == len(runs[False]) == 4
    for a, b in zip(runs[True], runs[False]):
        for key in ("loss", "loss_task", "loss_kd", "loss_hidden"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_compiled_cofinetune_equals_eager(tiny_task, tiny_encoders, tmp_path):
    import torch._inductor.config

    runs = {}
    with torch._inductor.config.patch(fallback_random=True):  # the same dropout masks as eager
        for compiled in (False, True):
            out = tmp_path / f"cofinetune-compiled-{compiled}"
            torch._dynamo.utils.counters.clear()
            cofinetune([str(tiny_encoders["a"]), str(tiny_encoders["b"])],
                         TrainArgs(**_args(tiny_task, out, log_every=1, batch_size=64, compile=compiled)))
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            runs[compiled] = [r for r in rows if r["event"] == "train"]
            assert json.loads((out / "config.json").read_text())["run"]["compile"] is compiled
            assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) is compiled  # really compiled
    assert len(runs[True]) == len(runs[False]) >= 3
    for a, b in zip(runs[True], runs[False]):
        for key in ("loss", "loss_ce_0", "loss_ce_1"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_stacked_teachers_equal_sequential(tiny_encoders):
    from fastmt import losses
    from fastmt.models.classifier import Teachers, layer_maps
    from fastmt.tasks.classification.step import DistillStep

    teachers = Teachers.from_pretrained_encoders([str(tiny_encoders["a"]), str(tiny_encoders["b"]), str(tiny_encoders["a"])], 2)
    teachers.eval()
    with torch.no_grad():  # make the two copies of teacher a differ
        for p in teachers.encoders[2].parameters():
            p.add_(0.01 * torch.randn_like(p))
    from fastmt.models.classifier import StudentSpec, build_student

    student, _ = build_student(StudentSpec(2, "teacher:0"), teachers)
    ids = torch.randint(4, 40, (5, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    inputs = {teachers.keys[0]: {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}}
    out = {}
    for stack in (False, True):
        args = DistillArgs(train="-", dev="-", out="-", teachers="-", student_layers=2, stack_teachers=stack,
                             precision="fp32")
        step = DistillStep(student, teachers, layer_maps(2, teachers), args, losses, torch.device("cpu"))
        with torch.no_grad():
            out[stack] = step.teachers_forward(inputs)
        if stack:
            assert step.groups == [(0, 2), (1,)]
    torch.testing.assert_close(out[True][0], out[False][0])
    torch.testing.assert_close(out[True][1], out[False][1])
    assert not torch.allclose(out[False][0][0], out[False][0][2])  # the stacked pair really are two teachers


@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_bucket_padding_gives_the_same_loss(kernels, tiny_task, tiny_encoders):
    """Padding a batch to its length bucket (extra masked positions) leaves every loss term unchanged."""
    from fastmt.data.dataset import encode, read_dataset
    from fastmt.models.classifier import StudentSpec, Teachers, build_student, layer_maps
    from fastmt.tasks.classification.step import DistillStep

    teachers = Teachers.from_pretrained_encoders([str(tiny_encoders["a"]), str(tiny_encoders["b"])], 2)
    student, _ = build_student(StudentSpec(1, "teacher:1"), teachers)
    teachers.eval().requires_grad_(False)
    student.eval()
    args = DistillArgs(**_args(tiny_task, "unused"), teachers="x", student_layers=1, kernels=kernels, temperature=2.0)
    step = DistillStep(student, teachers, layer_maps(1, teachers), args, loss_module(kernels), torch.device("cpu"))
    enc = encode(student.tokenizer, read_dataset(tiny_task["train"]), 16)
    rows = enc.input_ids[:12]
    labels = torch.tensor([0, 1] * 6)

    def batch(width):
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {student.key: {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}}

    longest = max(map(len, rows))
    with torch.no_grad():
        loss_a, parts_a = step(batch(longest), labels)
        loss_b, parts_b = step(batch(longest + 13), labels)
    assert set(parts_a) == {"task", "kd", "hidden"}
    for k in parts_a:
        assert torch.allclose(parts_a[k], parts_b[k], rtol=1e-5, atol=1e-6), k
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6)


def test_student_init_indexes_the_teachers_dir_under_a_subset(tiny_encoders):
    """teacher:0 with --teacher-subset 1 still copies teacher 0: every variant starts from the same weights."""
    from fastmt.models.classifier import StudentSpec, Teachers, build_student

    teachers = Teachers.from_pretrained_encoders([str(tiny_encoders["a"]), str(tiny_encoders["b"])], 2)
    full, _ = build_student(StudentSpec(1, "teacher:0"), teachers)
    only_b = subset_teachers(teachers, [1])
    sub, _ = build_student(StudentSpec(1, "teacher:0"), only_b, init_from=teachers)
    a, b = full.encoder.state_dict(), sub.encoder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sub.proj_weight.shape[0] == 1 and full.proj_weight.shape[0] == 2
    assert sub.proj_weight.shape[-1] == only_b.hidden_size


def test_stacked_teachers_forward_reads_nothing_back(tiny_encoders):
    from fastmt import losses
    from fastmt.models.classifier import StudentSpec, Teachers, build_student, layer_maps
    from fastmt.tasks.classification.step import DistillStep

    teachers = Teachers.from_pretrained_encoders([str(tiny_encoders["a"])] * 3, 2).eval()
    student, _ = build_student(StudentSpec(1, "teacher:0"), teachers)
    args = DistillArgs(train="-", dev="-", out="-", teachers="-", student_layers=1, stack_teachers=True, precision="fp32")
    step = DistillStep(student, teachers, layer_maps(1, teachers), args, losses, torch.device("cpu"))
    ids = torch.randint(4, 40, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    inputs = {teachers.keys[0]: {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}}
    step.teacher_outputs(inputs)
    with _HostReads() as reads:
        t_logits, t_hidden = step.teacher_outputs(inputs)
    assert reads.count == 0 and t_logits.shape == (3, 3, 2)


def test_kd_target_ensemble_is_one_kl_to_the_averaged_logits(tiny_task, tiny_encoders):
    """--kd-target ensemble: tau^2 KL(softmax(mean_i t_i / tau) || softmax(s / tau)), averaged over rows."""
    import torch.nn.functional as F

    from fastmt.data.dataset import encode, read_dataset
    from fastmt.models.classifier import StudentSpec, Teachers, build_student, layer_maps
    from fastmt.tasks.classification.step import DistillStep

    teachers = Teachers.from_pretrained_encoders([str(tiny_encoders["a"]), str(tiny_encoders["b"])], 2)
    student, _ = build_student(StudentSpec(1, "teacher:1"), teachers)
    teachers.eval().requires_grad_(False)
    student.eval()
    enc = encode(student.tokenizer, read_dataset(tiny_task["train"]), 16)
    rows = enc.input_ids[:10]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    inputs = {student.key: {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}}
    labels = torch.tensor([0, 1] * 5)
    parts = {}
    for target in ("teachers", "ensemble"):
        args = DistillArgs(**_args(tiny_task, "unused"), teachers="x", student_layers=1, temperature=2.0,
                             hidden_loss="none", kd_target=target)
        step = DistillStep(student, teachers, layer_maps(1, teachers), args, loss_module("reference"), torch.device("cpu"))
        with torch.no_grad():
            t_logits, _ = step.teacher_outputs(inputs)
            s_logits, _ = step.student_forward(inputs)
            _, parts[target] = step(inputs, labels)
    tau = 2.0
    p = F.softmax(t_logits.double().mean(0) / tau, -1)
    log_q = F.log_softmax(s_logits.double() / tau, -1)
    want = tau * tau * (p * (p.log() - log_q)).sum(-1).mean()
    assert abs(parts["ensemble"]["kd"].item() - want.item()) < 1e-5
    assert abs(parts["teachers"]["kd"].item() - want.item()) > 1e-4  # the two targets really differ


def test_student_init_from_a_config_only_dir(teachers_dir, tiny_task, tmp_path):
    """--student-init DIR where DIR holds only a config.json: a fresh encoder of that shape (here
    narrower than the teachers), trained, saved and loadable, its weights its own."""
    from safetensors.torch import load_file
    from transformers import BertConfig

    cfg_dir = tmp_path / "narrow"
    teacher_cfg = json.loads((teachers_dir / "teacher_0" / "config.json").read_text())
    BertConfig(vocab_size=teacher_cfg["vocab_size"], hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=48, max_position_embeddings=64).save_pretrained(cfg_dir)
    assert sorted(p.name for p in cfg_dir.iterdir()) == ["config.json"]
    res = distill(DistillArgs(**_args(tiny_task, tmp_path / "s"), teachers=str(teachers_dir),
                                  student_layers=2, student_init=str(cfg_dir)))
    saved = json.loads((tmp_path / "s" / "config.json").read_text())
    assert saved["hidden_size"] == 24 and saved["num_hidden_layers"] == 2
    weights = load_file(str(tmp_path / "s" / "model.safetensors"))
    emb = [v for k, v in weights.items() if k.endswith("word_embeddings.weight")][0]
    assert emb.shape == (teacher_cfg["vocab_size"], 24)
    assert evaluate_dir(str(tmp_path / "s"), str(tiny_task["dev"]))["accuracy"] == pytest.approx(res.best_dev_accuracy)
