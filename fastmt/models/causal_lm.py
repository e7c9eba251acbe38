"""Causal language models for ``fastmt distill-lm``: loaded from ``transformers`` dirs, cut down to a
student, wrapped with the projections of the hidden loss, and saved back as an
``AutoModelForCausalLM`` dir with its tokenizer and the run's settings."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastmt.engine.fileio import first_line, staged_set, write_json
from fastmt.errors import UsageError
from fastmt.losses import layer_map

RUN_FILE = "fastmt_run.json"  # the run's settings, beside the model

# A parameter of one numbered layer: prefix, layer index, rest (``model.layers.3.mlp...``, ``h.3...``).
_LAYER = re.compile(r"^(.*\.(?:layers|h|layer|blocks)\.)(\d+)(\..*)$")


def load_lm(path: str, what: str):
    """A causal LM from a dir (or a hub name in the local cache), in float32; one line if it is not one."""
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{what} {path}: not a causal language model that transformers can load "
                         f"({first_line(e, 160)})") from None
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise UsageError(f"{what} {path}: its output layer is not a plain matrix (a bias, or none); "
                         "fastmt distils through the output matrix")
    return model


def load_tokenizer(path: str, what: str):
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{what} {path}: no tokenizer transformers can load ({first_line(e, 160)})") from None


def vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def hidden_width(model) -> int:
    return int(model.get_output_embeddings().weight.shape[1])


def cut_layers(teacher, k: int):
    """Teacher ``teacher`` with ``k`` of its layers, evenly spaced (``fastmt.losses.layer_map``); its
    embeddings, final norm and output layer as they are. Fresh copies: the teacher is not changed."""
    depth = num_layers(teacher)
    if k > depth:
        raise UsageError(f"--student-layers {k}: teacher 0 has {depth} layers; choose at most {depth}")
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = k
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    picked = layer_map(k, depth)  # student layer j + 1 -> teacher layer picked[j] (1-based)
    source = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        m = _LAYER.match(name)
        src = f"{m.group(1)}{picked[int(m.group(2))] - 1}{m.group(3)}" if m else name
        state[name] = source[src].detach().clone()
    student.load_state_dict(state)
    return student


class LMStudent(nn.Module):
    """The student and the projections of its hidden loss (trained, not saved with the model)."""

    def __init__(self, model, num_teachers: int, k: int, ds: int, dt: int, with_hidden: bool):
        super().__init__()
        self.model = model
        shape = (num_teachers, k, ds, dt) if with_hidden else (0, 0, ds, dt)
        w = torch.zeros(shape)
        if with_hidden:
            if ds == dt:
                w += torch.eye(ds)
            else:
                nn.init.normal_(w, std=ds**-0.5)
        self.proj_weight = nn.Parameter(w, requires_grad=with_hidden)
        self.proj_bias = nn.Parameter(torch.zeros(shape[0], shape[1], dt), requires_grad=with_hidden)


def save_lm(out_dir: Path, model, tokenizer, run_config: dict) -> None:
    """The model, its tokenizer and the run's settings, replacing the previous ones as one set."""
    with staged_set(out_dir) as stage:
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        write_json(stage / RUN_FILE, run_config)
