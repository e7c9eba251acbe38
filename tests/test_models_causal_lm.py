"""``fastmt.models.causal_lm``: a student cut from a teacher, its hidden-loss projections, a run saved
as an ``AutoModelForCausalLM`` dir, and the one-line refusals. Tiny Llamas made here, no downloads."""

from __future__ import annotations

import json

import pytest
import torch

import fastmt  # noqa: F401 - first: from the checkout root, `kernels` must be Hugging Face's (fastmt/__init__.py)
from fastmt.errors import UsageError
from fastmt.losses import layer_map
from fastmt.models.causal_lm import (RUN_FILE, LMStudent, cut_layers, hidden_width, load_lm, load_tokenizer, num_layers,
                                     save_lm, vocab_size)


def _llama(layers: int, width: int = 16, vocab: int = 40, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", "the", "film", "was", "good"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def test_sizes_are_read_from_the_output_layer_and_config():
    model = _llama(3, width=16, vocab=40)
    assert (vocab_size(model), hidden_width(model), num_layers(model)) == (40, 16, 3)


def test_cut_layers_keeps_evenly_spaced_teacher_layers_and_leaves_the_teacher_alone():
    teacher = _llama(5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = cut_layers(teacher, 2)
    assert num_layers(student) == 2
    picked = layer_map(2, 5)
    assert picked != [1, 2]  # the cut skips layers: a copy of the first two would not pass below
    s, t = student.state_dict(), teacher.state_dict()
    for j, src in enumerate(picked):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(s[f"model.layers.{j}.{name}"], t[f"model.layers.{src - 1}.{name}"]), (j, name)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[name], t[name])
    with torch.no_grad():
        student.lm_head.weight.add_(1.0)  # fresh copies: training the student cannot move the teacher
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cut_layers_refuses_more_layers_than_the_teacher_has():
    with pytest.raises(UsageError, match="--student-layers 4: teacher 0 has 3 layers"):
        cut_layers(_llama(3), 4)


@pytest.mark.parametrize("ds, dt", [(16, 16), (16, 24)])
def test_student_projections_start_at_identity_where_widths_match(ds, dt):
    torch.manual_seed(0)
    s = LMStudent(_llama(2, width=ds), 3, 2, ds, dt, with_hidden=True)
    assert s.proj_weight.shape == (3, 2, ds, dt) and s.proj_weight.requires_grad
    assert s.proj_bias.shape == (3, 2, dt) and not s.proj_bias.any()
    eye = torch.eye(ds).expand(3, 2, ds, ds)
    assert torch.equal(s.proj_weight, eye) == (ds == dt)


def test_student_without_the_hidden_loss_trains_no_projection():
    s = LMStudent(_llama(2), 3, 2, 16, 16, with_hidden=False)
    assert s.proj_weight.numel() == 0 and not s.proj_weight.requires_grad and not s.proj_bias.requires_grad
    assert {n for n, p in s.named_parameters() if p.requires_grad} == {n for n, _ in s.named_parameters()
                                                                     if n.startswith("model.")}


def test_save_lm_writes_a_dir_that_loads_back_and_replaces_the_last_save(tmp_path):
    tok = _tokenizer(tmp_path / "tok")
    model = _llama(2, vocab=len(tok))
    out = tmp_path / "run"
    save_lm(out, model, tok, {"command": "distill-lm", "epoch": 1})
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    save_lm(out, model, tok, {"command": "distill-lm", "epoch": 2})
    again = load_lm(str(out), "--model")
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert json.loads((out / RUN_FILE).read_text()) == {"command": "distill-lm", "epoch": 2}
    assert load_tokenizer(str(out), "--model").get_vocab() == tok.get_vocab()


def test_loading_what_is_not_a_causal_lm_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model\n")
    with pytest.raises(UsageError, match=r"--teacher .*notes.txt: not a causal language model") as e:
        load_lm(str(tmp_path / "notes.txt"), "--teacher")
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="--student .*: no tokenizer transformers can load"):
        load_tokenizer(str(tmp_path / "empty"), "--student")
