"""Teachers with their shared head and adapters, the student and its init, save/load round trips."""

from __future__ import annotations

import pytest
import torch

from fastmt.errors import UsageError
from fastmt.models.classifier import Student, StudentSpec, Teachers, build_student, layer_maps


def _batch(n=5, s=7, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, s), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(n, s, dtype=torch.long)
    mask[0, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.fixture()
def teachers(tiny_encoders):
    return Teachers.from_pretrained_encoders([str(tiny_encoders["a"]), str(tiny_encoders["b"])], num_labels=3)


def test_teachers_share_one_head_and_adapt_other_sizes(teachers, tiny_encoders):
    assert teachers.hidden_size == 32
    assert isinstance(teachers.adapters[0], torch.nn.Identity)
    assert isinstance(teachers.adapters[1], torch.nn.Linear) and teachers.adapters[1].in_features == 48
    assert teachers.keys[0] == teachers.keys[1]
    teachers.eval()
    b = _batch()
    z = teachers({teachers.keys[0]: b})
    assert z.shape == (2, 5, 3)
    # Both teachers' logits come from the one shared head, written out here from its parameters and the
    # encoders as transformers itself loads them (nothing of fastmt's forward is reused).
    from transformers import AutoModel

    head = {n: p.detach() for n, p in teachers.head.named_parameters()}
    for i, src in enumerate(("a", "b")):
        enc = AutoModel.from_pretrained(str(tiny_encoders[src]), add_pooling_layer=False).eval()
        with torch.no_grad():
            first = enc(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[:, 0]
        if i == 1:  # 48 -> 32 through the adapter
            a = teachers.adapters[1]
            first = first @ a.weight.detach().T + a.bias.detach()
        pooled = torch.tanh(first @ head["dense.weight"].T + head["dense.bias"])
        expect = pooled @ head["classifier.weight"].T + head["classifier.bias"]
        torch.testing.assert_close(z[i], expect, rtol=1e-5, atol=1e-5)


def test_teachers_save_load_round_trip(teachers, tmp_path):
    teachers.eval()
    b = _batch()
    before = teachers({teachers.keys[0]: b})
    teachers.save(tmp_path / "t", {"note": "test"}, ["x", "y", "z"])
    loaded, cfg = Teachers.load(tmp_path / "t")
    loaded.eval()
    assert cfg["label_names"] == ["x", "y", "z"]
    assert torch.equal(loaded({loaded.keys[0]: b}), before)


def test_layer_maps_and_depth_check(teachers):
    assert layer_maps(2, teachers) == [[1, 2], [2, 3]]
    assert layer_maps(1, teachers) == [[2], [3]]
    with pytest.raises(UsageError, match="--student-layers 3"):
        build_student(StudentSpec(3, "teacher:0"), teachers)
    with pytest.raises(UsageError, match="--student-layers 0"):
        build_student(StudentSpec(0, "teacher:0"), teachers)


def test_student_init_copies_the_mapped_teacher_layers(teachers):
    student, _ = build_student(StudentSpec(2, "teacher:1"), teachers)
    src = teachers.encoders[1]
    # layer map for K=2, M=3 is [2, 3]: student layer 1 <- teacher layer 2, student layer 2 <- teacher layer 3
    for k, j in enumerate([2, 3]):
        for (name, p), q in zip(student.encoder.encoder.layer[k].named_parameters(), src.encoder.layer[j - 1].parameters()):
            assert torch.equal(p, q), name
    assert torch.equal(student.encoder.embeddings.word_embeddings.weight, src.embeddings.word_embeddings.weight)
    assert student.proj_weight.shape == (2, 2, 48, 32) and student.proj_bias.shape == (2, 2, 32)
    # Ds (48) differs from the shared head's D (32): the student's head is its own.
    assert student.head.dense.weight.shape == (48, 48)


def test_student_head_starts_from_shared_head_when_sizes_match(teachers):
    student, _ = build_student(StudentSpec(1, "teacher:0"), teachers)
    assert torch.equal(student.head.classifier.weight, teachers.head.classifier.weight)
    assert torch.equal(student.head.dense.weight, teachers.head.dense.weight)
    # Same sizes: projections start at the identity.
    assert torch.equal(student.proj_weight[1, 0], torch.eye(32))


def test_student_forward_and_hidden_stack(teachers):
    student, _ = build_student(StudentSpec(2, "teacher:1"), teachers)
    logits, hidden = student.eval()(_batch(), want_hidden=True)
    assert logits.shape == (5, 3) and hidden.shape == (2, 5, 7, 48)


def test_student_init_errors(teachers, tmp_path):
    with pytest.raises(UsageError, match="--student-init teacher:5"):
        build_student(StudentSpec(1, "teacher:5"), teachers)
    with pytest.raises(UsageError, match="--student-init"):
        build_student(StudentSpec(1, str(tmp_path / "missing")), teachers)


def test_student_from_config_dir_and_random(teachers, tiny_encoders):
    # A dir with a config but no weights: a fresh encoder of that shape.
    a = tiny_encoders["a"]
    s1, _ = build_student(StudentSpec(2, "random"), teachers)
    assert s1.depth == 2
    with pytest.raises(UsageError, match="has 2 layers"):
        build_student(StudentSpec(1, str(a)), teachers)
    s2, _ = build_student(StudentSpec(2, str(a)), teachers)  # a real model dir with weights
    assert torch.equal(s2.encoder.embeddings.word_embeddings.weight, teachers.encoders[0].embeddings.word_embeddings.weight)


def test_student_save_load_round_trip(teachers, tmp_path):
    student, _ = build_student(StudentSpec(2, "teacher:1"), teachers)
    student.save(tmp_path / "s", {"x": 1}, ["a", "b", "c"])
    loaded, cfg = Student.load(tmp_path / "s")
    for (n, p), q in zip(student.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), n
    assert cfg["label_names"] == ["a", "b", "c"]
