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

from pathlib import Path

import torch
import torch.nn as nn

from fastmt.io import atomic_write_text, save_tensors

# model_type -> (name of the head's dense layer, name of its output layer) in the stock class.
HEADS = {
    "bert": ("{base}.pooler.dense", "classifier"),
    "roberta": ("classifier.dense", "classifier.out_proj"),
    "xlm-roberta": ("classifier.dense", "classifier.out_proj"),
    "camembert": ("classifier.dense", "classifier.out_proj"),
}
ENCODER_WEIGHTS = "encoder.safetensors"
NOT_STOCK = "fastmt-head-outside-this-dir-load-with-fastmt"


def seq_cls_config(encoder: nn.Module, label_names: list[str]):
    """The encoder's config as a ``*ForSequenceClassification`` config with fastmt's label names."""
    from transformers import AutoConfig

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
    from transformers import AutoModelForSequenceClassification

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


def save_seq_cls(out_dir: Path, encoder: nn.Module, tokenizer, dense, out, label_names: list[str],
                 fastmt_block: dict, why_not: str = "") -> bool:
    """Write ``out_dir`` as a stock ``*ForSequenceClassification`` dir (True), or, when the head is not
    a stock head, as an encoder-only dir that transformers refuses to load (False)."""
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
    from fastmt.io import write_json

    d = cfg.to_dict()
    d.pop("architectures", None)
    d["fastmt"] = {**fastmt_block, "model_type": d["model_type"]}
    d["model_type"] = NOT_STOCK
    write_json(out_dir / "config.json", d)
    save_tensors(out_dir / ENCODER_WEIGHTS, encoder.state_dict(), metadata={"format": "pt"})
    reason = why_not or f"fastmt's head has no stock form for model type {cfg.model_type!r}"
    atomic_write_text(out_dir / "README.md",
                      "# Not a stand-alone Hugging Face model\n\n"
                      f"{reason}, so this dir holds the encoder's weights only ({ENCODER_WEIGHTS}) and its "
                      f"config.json names the model type `{NOT_STOCK}`: transformers refuses it rather than "
                      "load it with a freshly initialised head (the real model type is under the `fastmt` key). "
                      "fastmt loads it with its head, from the teachers dir above.\n")
    return False


def load_seq_cls(model_dir: Path, fix: str = "write it again with fastmt, or restore it from a copy"
                 ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The encoder (fastmt's ``AutoModel`` without pooler) of a dir written by :func:`save_seq_cls`,
    and its head's weights as ``dense.weight/bias``, ``classifier.weight/bias`` (empty when the dir
    holds the encoder only). A damaged file, or weights that do not fit config.json, is one line
    naming the file and ``fix``."""
    from transformers import AutoConfig

    from fastmt.io import load_tensors, read_json, reading
    from fastmt.modeldir import encoder_from_config, fitting

    config = model_dir / "config.json"
    with reading(config, fix):
        raw = read_json(config)
        if raw.get("model_type") == NOT_STOCK:
            d = {**raw, "model_type": raw["fastmt"]["model_type"]}
            cfg = None
        else:
            cfg = AutoConfig.from_pretrained(str(model_dir))
            d = cfg.to_dict()
    for k in ("architectures", "id2label", "label2id", "fastmt", "_name_or_path", "transformers_version", "dtype",
              "torch_dtype"):
        d.pop(k, None)
    with fitting(config, fix):
        encoder = encoder_from_config(d)
    if cfg is not None and (model_dir / "model.safetensors").is_file():
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
        from fastmt.errors import UsageError

        raise UsageError(f"{weights} does not fit the model its config.json describes (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); {fix}")
    return encoder, head
