"""Model dirs that Hugging Face loads as they are: ``*ForSequenceClassification`` with fastmt's head.

fastmt's head (``SharedHead``) is BERT's: ``classifier(dropout(tanh(dense(h[:, 0]))))``. A stock
``BertForSequenceClassification`` computes exactly that with its pooler as ``dense``, and RoBERTa's
classification head (``classifier.dense`` -> tanh -> ``classifier.out_proj``, on the first token)
does too at inference. So a student, or a teacher together with the shared head, is written as a
standard dir (``config.json`` with ``model_type``, ``architectures``, ``id2label``/``label2id``;
``model.safetensors`` under transformers' names; the tokenizer) that ``AutoModelForSequenceClassification``
and ``pipeline("text-classification")`` load with fastmt's logits and label names.

Where the head cannot be written as a stock head (another architecture, or a teacher adapter that
maps to a wider shared size), :func:`save_seq_cls` writes the dir so that transformers refuses it
instead of loading it with a freshly initialised head: config.json's ``model_type`` is
``NOT_STOCK`` (transformers' error then names it, and the name says why), the real one is kept
under the ``fastmt`` key, the weights go to ``encoder.safetensors`` (no ``model.safetensors``), and a
README explains. fastmt loads such a dir with its head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from fastmt.engine.fileio import atomic_write_text, load_tensors, read_json, reading, save_tensors, write_json
from fastmt.errors import UsageError
from fastmt.models.modeldir import encoder_config_dict, encoder_from_config, fitting

# model_type -> (name of the head's dense layer, name of its output layer) in the stock class.
HEADS = {
    "bert": ("{base}.pooler.dense", "classifier"),
    "roberta": ("classifier.dense", "classifier.out_proj"),
    "xlm-roberta": ("classifier.dense", "classifier.out_proj"),
    "camembert": ("classifier.dense", "classifier.out_proj"),
}
ENCODER_WEIGHTS = "encoder.safetensors"  # the older encoder-only form (still read; `fastmt export` rewrites it)
NOT_STOCK = "fastmt-head-outside-this-dir-load-with-fastmt"  # that form's model type
# The remote-code form (fastmt/models/modeling_fastmt.py, saved into the dir).
CODE_MODULE = "modeling_fastmt"
CODE_TYPE = "fastmt-classifier"
CODE_CLASS = "FastmtForSequenceClassification"


def seq_cls_config(encoder: nn.Module, label_names: list[str]):
    """The encoder's config as a ``*ForSequenceClassification`` config with fastmt's label names."""
    d = encoder.config.to_dict()
    for k in ("_name_or_path", "architectures", "id2label", "label2id", "num_labels", "transformers_version",
              "dtype", "torch_dtype", "fastmt"):
        d.pop(k, None)
    model_type = d.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **d, id2label=dict(enumerate(label_names)),
                               label2id={n: i for i, n in enumerate(label_names)})
    return cfg


def _stock_keys(cfg) -> tuple[str, set[str]] | None:
    """(base prefix, every weight name) of the stock class for ``cfg``; None if there is none."""
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(cfg)
    except (ValueError, KeyError):
        return None
    cls = type(model).__name__
    cfg.architectures = [cls]
    return model.base_model_prefix, set(model.state_dict())


def prepare_stock_class(encoder: nn.Module) -> None:
    """Build, on the meta device, the stock class that saving ``encoder``'s dir builds.

    transformers registers every model class in a table the first time one is built, and a compiled
    graph that runs a transformers encoder guards on that table's size: the first save of a run dir
    in the middle of a compiled run would otherwise invalidate every graph made so far (each shape
    compiled twice). Called before the first compiled step."""
    _stock_keys(seq_cls_config(encoder, ["0", "1"]))


def stock_state(encoder: nn.Module, dense: tuple[torch.Tensor, torch.Tensor], out: tuple[torch.Tensor, torch.Tensor],
                cfg) -> dict[str, torch.Tensor] | None:
    """The weights under the stock class's names, or None when the head is not a stock head."""
    if cfg.model_type not in HEADS:
        return None
    found = _stock_keys(cfg)
    if found is None:
        return None
    base, want = found
    dense_name, out_name = (n.format(base=base) for n in HEADS[cfg.model_type])
    hidden = int(cfg.hidden_size)
    if tuple(dense[0].shape) != (hidden, hidden):
        return None
    state = {f"{base}.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"{dense_name}.weight": dense[0], f"{dense_name}.bias": dense[1],
                  f"{out_name}.weight": out[0], f"{out_name}.bias": out[1]})
    # Buffers a stock class keeps (e.g. position ids) may be missing from either side; weights may not.
    missing = {k for k in want - set(state) if not k.endswith(("position_ids", "token_type_ids"))}
    extra = set(state) - want
    if missing or extra:
        return None
    return state


def fold_adapter(adapter: nn.Module, dense: nn.Linear, classifier: nn.Linear, hidden: int):
    """A teacher's head as a square dense layer of its own width: ``dense(adapter(h))`` folded into
    one linear map. When the shared width D is below the teacher's width ``hidden``, the extra units
    get zero weights (tanh(0) = 0 and the classifier ignores them): exact. Wider: None."""
    W_d, b_d = dense.weight.detach().double(), dense.bias.detach().double()
    if isinstance(adapter, nn.Linear):
        W = W_d @ adapter.weight.detach().double()
        b = W_d @ adapter.bias.detach().double() + b_d
    else:
        W, b = W_d, b_d
    D = W.shape[0]
    if D > hidden:
        return None
    W_sq = torch.zeros(hidden, hidden, dtype=torch.float64)
    W_sq[:D] = W
    b_sq = torch.zeros(hidden, dtype=torch.float64)
    b_sq[:D] = b
    C = torch.zeros(classifier.weight.shape[0], hidden, dtype=torch.float64)
    C[:, :D] = classifier.weight.detach().double()
    f = dense.weight.dtype
    return (W_sq.to(f), b_sq.to(f)), (C.to(f), classifier.bias.detach().clone())


@dataclass
class CodeHead:
    """fastmt's head as the remote-code form holds it (``fastmt/models/modeling_fastmt.py``): the pooling, the
    adapter a teacher of another width feeds the shared head through (None: none), the head's layers."""

    pooling: str
    adapter: nn.Linear | None
    dense: nn.Linear
    classifier: nn.Linear
    dropout: float = 0.1


def save_seq_cls(out_dir: Path, encoder: nn.Module, tokenizer, dense, out, label_names: list[str],
                 fastmt_block: dict, why_not: str = "", head: CodeHead | None = None) -> bool:
    """Write ``out_dir`` as a stock ``*ForSequenceClassification`` dir (True) when ``dense``/``out`` make
    a stock head, or else (False) as a dir that transformers loads with ``trust_remote_code=True``
    through the modeling file saved beside the weights (``head``: what it computes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    cfg = seq_cls_config(encoder, label_names)
    state = stock_state(encoder, dense, out, cfg) if dense is not None else None
    cfg.fastmt = fastmt_block
    if state is not None:
        cfg.save_pretrained(out_dir)
        save_tensors(out_dir / "model.safetensors", state, metadata={"format": "pt"})
        return True
    if head is None:
        raise ValueError("a head with no stock form needs its CodeHead")
    save_code_dir(out_dir, encoder, head, label_names, fastmt_block,
                  why_not or f"fastmt's head has no stock form for model type {cfg.model_type!r}")
    return False


def save_code_dir(out_dir: Path, encoder: nn.Module, head: CodeHead, label_names: list[str], fastmt_block: dict,
                  why: str) -> None:
    """The remote-code form: config.json of model type ``CODE_TYPE`` with ``auto_map`` naming the
    modeling file copied beside it, and ``model.safetensors`` under that file's names."""
    enc_cfg = encoder_config_dict(encoder)
    width = int(encoder.config.hidden_size)
    size = int(head.dense.weight.shape[0])
    d = {
        "model_type": CODE_TYPE,
        "architectures": [CODE_CLASS],
        "auto_map": {"AutoConfig": f"{CODE_MODULE}.FastmtClassifierConfig",
                     "AutoModelForSequenceClassification": f"{CODE_MODULE}.{CODE_CLASS}"},
        "encoder": enc_cfg,
        "pooling": head.pooling,
        "adapter_in": width if head.adapter is not None else None,
        "head_size": size,
        "head_dropout": float(head.dropout),
        "id2label": {str(i): n for i, n in enumerate(label_names)},
        "label2id": {n: i for i, n in enumerate(label_names)},
        "fastmt": {**fastmt_block, "model_type": enc_cfg["model_type"], "why_remote_code": why},
    }
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if enc_cfg.get(k) is not None:
            d[k] = enc_cfg[k]
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    if head.adapter is not None:
        state.update({"adapter.weight": head.adapter.weight, "adapter.bias": head.adapter.bias})
    state.update({"dense.weight": head.dense.weight, "dense.bias": head.dense.bias,
                  "classifier.weight": head.classifier.weight, "classifier.bias": head.classifier.bias})
    state = {k: v.detach().contiguous() for k, v in state.items()}
    save_tensors(out_dir / "model.safetensors", state, metadata={"format": "pt"})
    atomic_write_text(out_dir / f"{CODE_MODULE}.py", Path(__file__).with_name(f"{CODE_MODULE}.py").read_text())
    write_json(out_dir / "config.json", d)


def is_code_dir(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a model in the remote-code form (or the older encoder-only form)."""
    model_dir = Path(model_dir)
    if (model_dir / ENCODER_WEIGHTS).is_file() and not (model_dir / "model.safetensors").is_file():
        return True
    try:
        return read_json(model_dir / "config.json").get("model_type") == CODE_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def load_seq_cls(model_dir: Path, fix: str = "write it again with fastmt, or restore it from a copy"
                 ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The encoder (fastmt's ``AutoModel`` without pooler) of a dir written by :func:`save_seq_cls`,
    and its head's weights as ``dense.weight/bias``, ``classifier.weight/bias`` (and ``adapter.*`` in
    the remote-code form; empty when the dir holds the encoder only). A damaged file, or weights that do not fit config.json, is one line
    naming the file and ``fix``."""
    config = model_dir / "config.json"
    code = False
    with reading(config, fix):
        raw = read_json(config)
        if raw.get("model_type") == NOT_STOCK:
            d = {**raw, "model_type": raw["fastmt"]["model_type"]}
            cfg = None
        elif raw.get("model_type") == CODE_TYPE:
            d, cfg, code = dict(raw["encoder"]), None, True
        else:
            cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
            d = cfg.to_dict()
    for k in ("architectures", "id2label", "label2id", "fastmt", "_name_or_path", "transformers_version", "dtype",
              "torch_dtype"):
        d.pop(k, None)
    with fitting(config, fix):
        encoder = encoder_from_config(d)
    if code:
        weights = model_dir / "model.safetensors"
        state = load_tensors(weights, fix)
        head = {k: v for k, v in state.items() if k.split(".")[0] in ("adapter", "dense", "classifier")}
        enc_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    elif cfg is not None and (model_dir / "model.safetensors").is_file():
        weights = model_dir / "model.safetensors"
        state = load_tensors(weights, fix)
        found = _stock_keys(cfg)
        base = found[0] if found else cfg.model_type
        with fitting(weights, fix):
            dense_name, out_name = (n.format(base=base) for n in HEADS[cfg.model_type])
            head = {"dense.weight": state.pop(f"{dense_name}.weight"), "dense.bias": state.pop(f"{dense_name}.bias"),
                    "classifier.weight": state.pop(f"{out_name}.weight"), "classifier.bias": state.pop(f"{out_name}.bias")}
        enc_state = {k[len(base) + 1:]: v for k, v in state.items() if k.startswith(base + ".")}
    else:
        weights = model_dir / ENCODER_WEIGHTS
        head, enc_state = {}, load_tensors(weights, fix)
    with fitting(weights, fix):
        missing, unexpected = encoder.load_state_dict(enc_state, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise UsageError(f"{weights} does not fit the model its config.json describes (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); {fix}")
    return encoder, head
