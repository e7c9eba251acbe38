"""Stacked teachers (fastmt.models.stacked) give what the teachers give one after another."""

import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

import fastmt.data.dataset
from fastmt.models.classifier import Teachers
from fastmt.models.stacked import StackedBert, VmapTeachers, make_stacked, teacher_groups


def _bert(hidden=48, layers=3, heads=4, act="gelu", types=2, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=61, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden + 6, max_position_embeddings=40, hidden_act=act, type_vocab_size=types)
    return BertModel(cfg, add_pooling_layer=False)


@pytest.fixture
def one_tokenizer(monkeypatch):
    """Every teacher counts as sharing one tokenizer (the encoders here are built from configs)."""
    monkeypatch.setattr(fastmt.data.dataset, "tokenizer_key", lambda tok: "shared")


def _inputs(n=5, s=13, vocab=61, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, s), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 1:] = 0  # only the first token left
    types = torch.zeros_like(ids)
    types[:, s // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _sequential(teachers, idx, inputs, maps):
    return {i: teachers.forward_teacher(i, inputs, maps[k] if maps else None) for k, i in enumerate(idx)}


def _assert_same(got, want, **tol):
    assert set(got) == set(want)
    for i in want:
        torch.testing.assert_close(got[i][0], want[i][0], **tol)
        if want[i][1] is None:
            assert got[i][1] is None
            continue
        assert len(got[i][1]) == len(want[i][1])
        for a, b in zip(got[i][1], want[i][1]):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
@pytest.mark.parametrize("shape", [(48, 3, 4), (20, 1, 5), (36, 2, 1)])
def test_stacked_bert_equals_sequential_float64(shape, act, one_tokenizer):
    hidden, layers, heads = shape
    # Teacher 0 sets the shared head's width; the other three are wider, so they carry Linear adapters.
    encs = [_bert(16, 1, 2, seed=9)] + [_bert(hidden, layers, heads, act, seed=s) for s in (1, 2, 3)]
    teachers = Teachers(encs, [None] * 4, ["t0", "t1", "t2", "t3"], 3).double().eval()
    assert teacher_groups(teachers) == [(0,), (1, 2, 3)]
    idx = (1, 2, 3)
    maps = [[1, layers], [0, layers], [layers, layers]]
    inputs = _inputs()
    with torch.no_grad():
        want = _sequential(teachers, idx, inputs, maps)
        stacked = StackedBert(teachers, idx)
        got = stacked.forward(inputs, maps)
        again = _sequential(teachers, idx, inputs, maps)  # the teachers themselves still give the same
        no_hidden = stacked.forward(inputs, None)
    _assert_same(got, want, rtol=1e-12, atol=1e-12)
    _assert_same(again, want, rtol=0, atol=0)
    for i in idx:
        torch.testing.assert_close(no_hidden[i][0], want[i][0], rtol=1e-12, atol=1e-12)
        assert no_hidden[i][1] is None
    assert not torch.allclose(want[1][0], want[2][0])  # three different teachers, not one three times


def test_stacked_bert_float32(one_tokenizer):
    """float32 on the CPU takes the per-teacher GEMM path; same answer."""
    encs = [_bert(40, 2, 5, seed=s) for s in (4, 5, 6)]
    teachers = Teachers(encs, [None] * 3, ["a", "b", "c"], 2).eval()
    inputs = _inputs()
    maps = [[1, 2], [0, 2], [2]]
    with torch.no_grad():
        want = _sequential(teachers, (0, 1, 2), inputs, maps)
        got = StackedBert(teachers, (0, 1, 2)).forward(inputs, maps)
    _assert_same(got, want, rtol=1e-5, atol=1e-5)


def test_stacked_bert_without_token_types(one_tokenizer):
    encs = [_bert(24, 2, 3, types=1, seed=s) for s in (4, 5)]
    teachers = Teachers(encs, [None] * 2, ["a", "b"], 2).double().eval()
    inputs = _inputs()
    del inputs["token_type_ids"]
    with torch.no_grad():
        want = _sequential(teachers, (0, 1), inputs, [[2], [1, 2]])
        got = StackedBert(teachers, (0, 1)).forward(inputs, [[2], [1, 2]])
    _assert_same(got, want, rtol=1e-12, atol=1e-12)


def test_stacked_bert_shares_the_teachers_weights(one_tokenizer):
    encs = [_bert(24, 2, 3, seed=s) for s in (4, 5)]
    teachers = Teachers(encs, [None] * 2, ["a", "b"], 2).eval()
    stacked = StackedBert(teachers, (0, 1))
    q = encs[1].encoder.layer[1].attention.self.value.weight
    qkv_w = stacked.layers[1]["qkv"][0]
    assert q.untyped_storage().data_ptr() == qkv_w.untyped_storage().data_ptr()  # a view, not a copy
    with torch.no_grad():
        q.add_(1.0)
    torch.testing.assert_close(qkv_w[1, 48:72], q)
    emb = encs[0].embeddings.word_embeddings.weight
    assert emb.untyped_storage().data_ptr() == stacked.word.untyped_storage().data_ptr()


def test_stacked_bert_matches_vmap_under_bf16_autocast(one_tokenizer):
    encs = [_bert(32, 2, 4, seed=s) for s in (6, 7, 8)]
    teachers = Teachers(encs, [None] * 3, ["a", "b", "c"], 2).eval()
    inputs = _inputs()
    maps = [[1, 2]] * 3
    with torch.no_grad():
        want = _sequential(teachers, (0, 1, 2), inputs, maps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            seq16 = _sequential(teachers, (0, 1, 2), inputs, maps)
            got16 = StackedBert(teachers, (0, 1, 2)).forward(inputs, maps)
        vm = VmapTeachers(teachers, (0, 1, 2)).forward(inputs, maps)
    _assert_same(vm, want, rtol=1e-5, atol=1e-5)
    # bf16 keeps ~3 digits: the stacked encoder is as close to fp32 as the sequential one is.
    for i in range(3):
        err_seq = (seq16[i][0].float() - want[i][0]).abs().max()
        err_stk = (got16[i][0].float() - want[i][0]).abs().max()
        assert err_stk <= 2 * err_seq + 1e-2, (i, float(err_stk), float(err_seq))


def test_make_stacked_falls_back_to_vmap_for_other_architectures(one_tokenizer):
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=61, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=48,
                        max_position_embeddings=40, type_vocab_size=1)
    encs = [RobertaModel(cfg, add_pooling_layer=False) for _ in range(2)]
    teachers = Teachers(encs, [None] * 2, ["a", "b"], 2).eval()
    assert not StackedBert.supports(encs[0])
    stacked = make_stacked(teachers, (0, 1))
    assert isinstance(stacked, VmapTeachers)
    inputs = _inputs()
    del inputs["token_type_ids"]
    with torch.no_grad():
        want = _sequential(teachers, (0, 1), inputs, [[1], [2]])
        got = stacked.forward(inputs, [[1], [2]])
    _assert_same(got, want, rtol=1e-5, atol=1e-5)
    bert = Teachers([_bert(24, 2, 3, seed=s) for s in (1, 2)], [None] * 2, ["a", "b"], 2).eval()
    assert isinstance(make_stacked(bert, (0, 1)), StackedBert)
    assert isinstance(make_stacked(bert, (0, 1), "vmap"), VmapTeachers)


def _placeholders(fn, *args):
    """Compile ``fn`` (Dynamo only) and return each graph input as (source, static?): static inputs
    are the ones CUDA graph trees read in place instead of copying on every replay."""
    seen = []

    def record(gm, example_inputs):
        for node in gm.graph.find_nodes(op="placeholder"):
            if isinstance(node.meta.get("example_value"), torch.Tensor):
                src = getattr(node, "_dynamo_source", None)
                static = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type") is not None
                seen.append((src.name if src is not None else node.name, static))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, fullgraph=True, dynamic=False, backend=record)(*args)
    torch._dynamo.reset()
    return seen


def test_stacked_teachers_weights_are_static_inputs_of_the_compiled_forward(tiny_encoders, monkeypatch):
    from fastmt import losses
    from fastmt.config.settings import DistillArgs
    from fastmt.models.classifier import StudentSpec, Teachers, build_student, layer_maps
    from fastmt.engine.precision import COMPILE_BACKEND_ENV
    from fastmt.tasks.classification.step import DistillStep

    teachers = Teachers.from_pretrained_encoders([str(tiny_encoders["a"])] * 3, 2)
    teachers.eval().requires_grad_(False)
    student, _ = build_student(StudentSpec(1, "teacher:0"), teachers)
    args = DistillArgs(train="-", dev="-", out="-", teachers="-", student_layers=1, stack_teachers=True, precision="fp32")
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "eager")
    step = DistillStep(student, teachers, layer_maps(1, teachers), args, losses, torch.device("cpu"), compile=True)
    assert isinstance(step.stacked[(0, 1, 2)], StackedBert)
    ids = torch.randint(4, 40, (3, 7))
    inputs = {teachers.keys[0]: {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                 "token_type_ids": torch.zeros_like(ids)}}
    seen = _placeholders(step.teachers_forward, inputs)
    ordinary = sorted(name for name, static in seen if not static)
    # The batch is the only ordinary input; every weight (the stacked teachers', the shared head's) is static.
    assert ordinary and all(name.startswith("L['inputs']") for name in ordinary), ordinary
    assert sum(static for _, static in seen) >= 16  # the stacked embeddings, layers and norms among them
