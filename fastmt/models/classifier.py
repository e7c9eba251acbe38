"""Teachers with their shared head, the student with its projections, and how both are saved.

Teachers are any Hugging Face encoders (``AutoModel``), each with its own tokenizer. They all feed ONE
shared pooler + classifier (``SharedHead``), which puts their logits in one space; a teacher whose
hidden size differs from the shared size ``D`` gets its own ``Linear(D_i, D)`` adapter. The adapter is
also applied to that teacher's hidden states for the hidden loss, so every teacher's hidden states
live in ``D`` and the projections can be one ``[T, K, Ds, D]`` tensor.

Layouts on disk:

    teachers dir:  config.json  model.safetensors (shared head + adapters)  metrics.jsonl
                   teacher_0/ teacher_1/ ...  (each a Hugging Face ``*ForSequenceClassification`` dir:
                   the teacher with the shared head folded in, its tokenizer; see ``fastmt.models.hf``)
    student dir:   a Hugging Face ``*ForSequenceClassification`` dir (config.json, model.safetensors,
                   tokenizer files) with fastmt's settings under config.json's ``fastmt`` key, plus
                   fastmt.safetensors (head + projections) and metrics.jsonl

Older student dirs (config.json of kind ``fastmt-student`` at the top, one model.safetensors with
``encoder.*``, ``head.*``, ``proj_*``) still load; ``fastmt export`` rewrites them in today's layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoTokenizer

from fastmt.data import dataset  # tokenizer_key looked up at each call: a stand-in set on the module reaches it
from fastmt.errors import UsageError
from fastmt.engine.fileio import (first_line, load_tensors, read_json, read_problem, reading, save_tensors, staged_set,
                       tensor_bytes, write_json)
from fastmt.losses import layer_map
from fastmt.models.hf import CodeHead, fold_adapter, is_code_dir, load_seq_cls, save_seq_cls
from fastmt.models.modeldir import (STUDENT_KIND, TEACHERS_KIND, encoder_config_dict, encoder_from_config,  # noqa: F401
                             fastmt_block, fitting, quiet_transformers, read_run_kind, recover_dir)

STUDENT_WEIGHTS = "fastmt.safetensors"  # a student's head and projections, beside the stock model.safetensors
TOKENIZER_BYTES = 1 << 20  # room for a saved tokenizer and config in the estimate of a save's size


def pool(last: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """What the head reads from the last hidden states ``[N,S,D]``: the first token (``cls``) or the
    mean over the real tokens (``mean``, as sentence-transformers checkpoints were trained to be read)."""
    if how == "cls":
        return last[:, 0]
    m = mask.to(last.dtype).unsqueeze(-1)
    return (last * m).sum(1) / m.sum(1).clamp_min(1.0)


def sentence_transformers_pooling(source: str | Path) -> str | None:
    """``mean`` or ``cls`` when ``source`` is a sentence-transformers folder that says how it pools
    (modules.json + a Pooling module's config), else None."""
    d = Path(source)
    try:
        modules = read_json(d / "modules.json")
    except (OSError, ValueError):
        return None
    for m in modules if isinstance(modules, list) else []:
        if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling"):
            try:
                cfg = read_json(d / m.get("path", "") / "config.json")
            except (OSError, ValueError):
                return None
            if cfg.get("pooling_mode_mean_tokens"):
                return "mean"
            if cfg.get("pooling_mode_cls_token"):
                return "cls"
    return None


def choose_pooling(sources: Sequence[str]) -> tuple[str, str]:
    """``--pooling auto``: mean when every teacher is a sentence-transformers folder that mean-pools."""
    said = [sentence_transformers_pooling(s) for s in sources]
    if said and all(x == "mean" for x in said):
        return "mean", "every teacher is a mean-pooling sentence-transformers folder"
    return "cls", "not every teacher is a mean-pooling sentence-transformers folder"


class SharedHead(nn.Module):
    """BERT's pooler (tanh(Linear) over the first token) followed by the classifier."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.dense(first_token))
        return self.classifier(self.dropout(pooled))


# ---------------------------------------------------------------------------------------------------
# Loading Hugging Face encoders and tokenizers with one-line errors

# What to do about a damaged file, by where it came from.
FIX_SOURCE = "copy or download the model again"
FIX_TEACHERS = "write the teachers dir again with `fastmt cofinetune`, or restore it from a copy"
FIX_STUDENT = "write the student dir again with `fastmt distill`, or restore it from a copy"

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "config.json")
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
# Buffers and pooler weights a base model may lack in a checkpoint without losing anything it uses.
_OPTIONAL_KEYS = ("position_ids", "token_type_ids")


def _check_file(path: Path) -> None:
    """Read enough of ``path`` to know that it is whole: a JSON file parses, a safetensors file's
    header covers the file, a torch file's archive opens. Raises what the reader raised."""
    if path.suffix == ".json":
        read_json(path)
    elif path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            f.keys()
    elif path.suffix in (".bin", ".pt", ".pth"):
        torch.load(path, map_location="cpu", weights_only=True)


def damaged_file(d: Path, names: Sequence[str], fix: str) -> UsageError | None:
    """The first of these files (names or glob patterns) in ``d`` that cannot be read whole, as the
    one-line error to raise; None when every one reads."""
    for pattern in names:
        for path in sorted(d.glob(pattern)):
            if not path.is_file():
                continue
            try:
                _check_file(path)
            except Exception as e:
                return UsageError(f"{path} {read_problem(e)}; {fix}")
    return None


def _weights_name(d: Path) -> str:
    for pattern in ("model.safetensors", "model.safetensors.index.json", "*.safetensors", "pytorch_model*.bin"):
        found = sorted(d.glob(pattern))
        if found:
            return str(found[0])
    return f"the weights in {d}"


def _check_loading(source: str, info: dict, flag: str, fix: str) -> None:
    """Refuse weights that do not fit the config.json they came with: tensors of other shapes, or
    weights the config asks for that the file does not have (transformers would start them at random)."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.endswith(_OPTIONAL_KEYS) and "pooler" not in k)
    if not mismatched and not missing:
        return
    weights = _weights_name(Path(source)) if Path(source).is_dir() else f"the weights of {source}"
    if mismatched:
        key, *shapes = mismatched[0]
        shown = f" ({list(shapes[0])} in the file, {list(shapes[1])} by config.json)" if len(shapes) == 2 else ""
        what = f"{len(mismatched)} tensor(s) have other shapes than its config.json says, e.g. {key}{shown}"
    else:
        what = f"{len(missing)} weight(s) that its config.json asks for are not in it, e.g. {missing[0]}"
    raise UsageError(f"{flag} {source}: {weights} does not fit the model: {what}; the weights and config.json "
                     f"come from different models ({fix})")


def load_encoder(source: str | Path, flag: str = "--teacher", fix: str = FIX_SOURCE) -> nn.Module:
    """``AutoModel.from_pretrained`` in float32, without the model's own pooler where it has one.
    A damaged file or weights that do not fit config.json are one line naming the file and ``fix``."""
    quiet_transformers()
    source = str(source)
    d = Path(source)
    if d.is_dir() and is_code_dir(d):
        return load_seq_cls(d, fix)[0]  # a teacher whose head has no stock form (fastmt.models.hf)
    kw = dict(dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True, trust_remote_code=False)
    try:
        try:
            model, info = AutoModel.from_pretrained(source, add_pooling_layer=False, **kw)
        except TypeError:
            model, info = AutoModel.from_pretrained(source, **kw)
    except Exception as e:  # which file is at fault, when one of them is
        damaged = damaged_file(d, ("config.json", *WEIGHT_FILES), fix) if d.is_dir() else None
        if damaged is not None:
            raise damaged from e
        raise UsageError(f"{flag} {source}: cannot load a model from it ({first_line(e)})") from e
    _check_loading(source, info, flag, fix)
    return model


def load_tokenizer(source: str | Path, flag: str = "--teacher", fix: str = FIX_SOURCE):
    quiet_transformers()
    d = Path(source)
    try:
        # Never run code a dir ships (nor ask whether to): the tokenizer is a stock one.
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except Exception as e:  # tokenizers raises a bare Exception for a damaged tokenizer.json
        if d.is_dir():
            damaged = damaged_file(d, TOKENIZER_JSON, fix)
            if damaged is not None:
                raise damaged from e
            if not any((d / f).is_file() for f in VOCAB_FILES):
                raise UsageError(f"{flag} {source}: no tokenizer vocabulary in it (none of {', '.join(VOCAB_FILES)}); "
                                 f"{fix}") from e
        raise UsageError(f"{flag} {source}: cannot load a tokenizer from it ({first_line(e)})") from e


def check_tokenizer(tokenizer, encoder: nn.Module, where: str, fix: str = FIX_SOURCE) -> None:
    """Refuse, in one line, a tokenizer that does not belong to this model: ids past its embedding
    table, a vocabulary far smaller than the table (vocabulary files lost: transformers then builds a
    tokenizer of special tokens alone), special tokens it names but does not have, or none added to a
    text at all (a model trained with [CLS]/[SEP] would read text without them)."""
    vocab = tokenizer.get_vocab()
    rows = int(encoder.get_input_embeddings().num_embeddings)
    files = "its vocabulary files (tokenizer.json, vocab.txt, ...) are missing, damaged or another model's"
    if not vocab:
        raise UsageError(f"{where}: the tokenizer has an empty vocabulary; {files}; {fix}")
    top = max(vocab.values())
    if top >= rows:
        token = next(t for t, i in vocab.items() if i == top)
        raise UsageError(f"{where}: the tokenizer gives ids up to {top} ({token!r}) but the model's embedding table "
                         f"has {rows} rows: the tokenizer is not this model's; {fix}")
    if len(vocab) * 2 < rows:
        raise UsageError(f"{where}: the tokenizer knows {len(vocab)} tokens but the model's embedding table has {rows} "
                         f"rows; {files}; {fix}")
    special = {name: getattr(tokenizer, name, None) for name in
               ("unk_token", "pad_token", "cls_token", "sep_token", "bos_token", "eos_token", "mask_token")}
    special = {n: str(t) for n, t in special.items() if t is not None}
    special_ids = {vocab[t] for t in special.values() if t in vocab}
    by_id: dict[int, list[str]] = {}
    for t, i in vocab.items():
        if i in special_ids:
            by_id.setdefault(i, []).append(t)
    for name, token in special.items():
        shared = [t for t in by_id.get(vocab.get(token), []) if t != token]
        if token not in vocab or shared:
            why = f"shares id {vocab[token]} with {shared[0]!r}" if shared else "is not in its vocabulary"
            raise UsageError(f"{where}: the tokenizer's {name.replace('_', ' ')} {token!r} {why}; {files}; {fix}")
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    marked = tokenizer("a", add_special_tokens=True)["input_ids"]
    if list(plain) == list(marked):
        raise UsageError(f"{where}: the tokenizer adds no special tokens (such as [CLS] and [SEP]) to a text, which "
                         f"the model was trained with; {files}; {fix}")


def check_tokenizer_on(tokenizer, texts: Sequence[str], where: str, what: str = "the training text") -> None:
    """Refuse a tokenizer that turns a few ordinary texts (``texts``: a sample of the data) into
    nothing but unknown tokens, or into no tokens at all."""
    sample = [t for t in texts if t and t.strip()][:64]
    if not sample:
        return
    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", []) or []) - {unk}
    ids = [[i for i in row if i not in special] for row in tokenizer(sample, add_special_tokens=False)["input_ids"]]
    tokens = [i for row in ids for i in row]
    if not tokens:
        raise UsageError(f"{where}: its tokenizer turns {what} into no tokens at all (e.g. {sample[0][:40]!r}); "
                         "its vocabulary files are missing, damaged or another model's")
    if unk is not None and all(i == unk for i in tokens):
        raise UsageError(f"{where}: its tokenizer turns {what} into nothing but unknown tokens "
                         f"({tokenizer.unk_token}, e.g. {sample[0][:40]!r} -> {len(ids[0])} x {tokenizer.unk_token}); "
                         "its vocabulary files (tokenizer.json, vocab.txt, ...) are missing, damaged or another model's")


def tokenizer_source(tokenizer) -> str:
    """Where a tokenizer was loaded from, for messages."""
    return str(getattr(tokenizer, "name_or_path", "") or "the tokenizer")


def load_model_dir(source: str | Path, flag: str = "--teacher", fix: str = FIX_SOURCE):
    """(encoder, tokenizer) of a model dir or hub name, checked to belong together."""
    encoder = load_encoder(source, flag, fix)
    tokenizer = load_tokenizer(source, flag, fix)
    check_tokenizer(tokenizer, encoder, f"{flag} {source}", fix)
    return encoder, tokenizer


def _dropout(encoder: nn.Module) -> float:
    """The head's dropout follows its encoder's (BERT's classifier does the same)."""
    return float(getattr(encoder.config, "hidden_dropout_prob", 0.1))


def num_layers(encoder: nn.Module) -> int:
    return int(encoder.config.num_hidden_layers)


# Encoders whose position ids start after the padding index (RoBERTa's convention).
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")


def position_limit(encoder: nn.Module) -> int | None:
    """The longest input (in tokens) ``encoder`` has positions for; None when its config does not say."""
    cfg = encoder.config
    n = getattr(cfg, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return None
    if cfg.model_type in _OFFSET_POSITIONS and getattr(cfg, "pad_token_id", None) is not None:
        n -= int(cfg.pad_token_id) + 1
    return n


def fit_max_length(max_length: int, encoders: Sequence[nn.Module], names: Sequence[str]) -> int:
    """``--max-length`` clamped to the shortest position table among ``encoders``, with one line saying
    so: longer texts are then truncated like any other, instead of crashing the run at the first one."""
    limits = [(position_limit(e), n) for e, n in zip(encoders, names)]
    limits = [(lim, n) for lim, n in limits if lim is not None]
    if not limits:
        return max_length
    lim, name = min(limits, key=lambda x: x[0])
    if max_length <= lim:
        return max_length
    logging.getLogger("fastmt").warning("--max-length %d: %s has positions for %d tokens; texts are truncated to %d",
                                        max_length, name, lim, lim)
    return lim


def hidden_size(encoder: nn.Module) -> int:
    return int(encoder.config.hidden_size)


def encode_hidden(encoder: nn.Module, inputs: dict[str, torch.Tensor], want_hidden: bool):
    """Run an encoder; returns (last hidden [N,S,D], tuple of all hidden states or None)."""
    kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    if getattr(encoder.config, "type_vocab_size", 0) and encoder.config.type_vocab_size > 1:
        kwargs["token_type_ids"] = inputs["token_type_ids"]
    out = encoder(**kwargs, output_hidden_states=want_hidden, return_dict=True)
    return out.last_hidden_state, (out.hidden_states if want_hidden else None)


# ---------------------------------------------------------------------------------------------------
# Teachers


class Teachers(nn.Module):
    """T encoders, their adapters and ONE shared head. ``forward`` gives logits ``[T, N, C]``."""

    def __init__(self, encoders: Sequence[nn.Module], tokenizers: Sequence, names: Sequence[str], num_labels: int,
                 pooling: str = "cls"):
        super().__init__()
        self.pooling = pooling

        if not encoders:
            raise UsageError("no teachers given: pass --teacher at least once")
        self.encoders = nn.ModuleList(encoders)
        self.tokenizers = list(tokenizers)
        self.names = list(names)
        self.keys = [dataset.tokenizer_key(t) for t in self.tokenizers]
        self.hidden_size = hidden_size(encoders[0])
        self.num_labels = num_labels
        self.adapters = nn.ModuleList(
            nn.Identity() if hidden_size(e) == self.hidden_size else nn.Linear(hidden_size(e), self.hidden_size)
            for e in encoders
        )
        self.head = SharedHead(self.hidden_size, num_labels, _dropout(encoders[0]))

    def __len__(self) -> int:
        return len(self.encoders)

    def depth(self, i: int) -> int:
        return num_layers(self.encoders[i])

    def forward_teacher(self, i: int, inputs: dict[str, torch.Tensor], hidden_indices: Sequence[int] | None = None):
        """Logits ``[N, C]`` of teacher i, and (when asked) its adapted hidden states at those indices."""
        last, all_hidden = encode_hidden(self.encoders[i], inputs, want_hidden=hidden_indices is not None)
        adapter = self.adapters[i]
        logits = self.head(adapter(pool(last, inputs["attention_mask"], self.pooling)))
        if hidden_indices is None:
            return logits, None
        return logits, [adapter(all_hidden[j]) for j in hidden_indices]

    def forward(self, batch_inputs: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        return torch.stack([self.forward_teacher(i, batch_inputs[k])[0] for i, k in enumerate(self.keys)])

    # ---- persistence
    def head_state(self) -> dict[str, torch.Tensor]:
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        for i, a in enumerate(self.adapters):
            state.update({f"adapters.{i}.{k}": v for k, v in a.state_dict().items()})
        return state

    def save(self, out_dir: str | Path, run_config: dict, label_names: list[str]) -> None:
        """Write the teachers into ``out_dir``: teacher dirs, head and config.json as one unit (``staged_set``)."""
        entries = []
        need = sum(tensor_bytes(e.state_dict()) + TOKENIZER_BYTES for e in self.encoders) + tensor_bytes(self.head_state())
        with staged_set(out_dir, need) as stage:
            for i, (enc, tok, name) in enumerate(zip(self.encoders, self.tokenizers, self.names)):
                # The teacher as a stock classifier: its adapter and the shared head folded into its own head.
                folded = fold_adapter(self.adapters[i], self.head.dense, self.head.classifier, hidden_size(enc))
                why = ("" if folded else f"this teacher (hidden size {hidden_size(enc)}) feeds fastmt's shared head of "
                       f"size {self.hidden_size} through an adapter, which no square stock head can hold")
                if self.pooling != "cls":
                    folded, why = None, f"fastmt's shared head reads the {self.pooling} of the tokens, which no stock head does"
                adapter = self.adapters[i] if isinstance(self.adapters[i], nn.Linear) else None
                head = CodeHead(self.pooling, adapter, self.head.dense, self.head.classifier, self.head.dropout.p)
                stock = save_seq_cls(stage / f"teacher_{i}", enc, tok, *(folded or (None, None)), label_names,
                                     {"kind": "fastmt-teacher", "index": i, "name": name}, why_not=why, head=head)
                entries.append({"name": name, "dir": f"teacher_{i}", "hidden_size": hidden_size(enc),
                                "num_layers": num_layers(enc), "stock_head": stock})
            save_tensors(stage / "model.safetensors", self.head_state(), metadata={"kind": TEACHERS_KIND})
            write_json(
                stage / "config.json",
                {
                    "kind": TEACHERS_KIND,
                    "teachers": entries,
                    "hidden_size": self.hidden_size,
                    "num_labels": self.num_labels,
                    "pooling": self.pooling,
                    "label_names": label_names,
                    "run": run_config,
                },
            )

    @classmethod
    def from_pretrained_encoders(cls, sources: Sequence[str], num_labels: int, pooling: str = "cls") -> "Teachers":
        loaded = [load_model_dir(s, "--teacher") for s in sources]
        return cls([e for e, _ in loaded], [t for _, t in loaded], [str(s) for s in sources], num_labels, pooling)

    @classmethod
    def load(cls, teachers_dir: str | Path, flag: str = "--teachers") -> tuple["Teachers", dict]:
        teachers_dir = Path(teachers_dir)
        cfg = _read_run_config(teachers_dir, TEACHERS_KIND, flag, "a teachers dir written by `fastmt cofinetune`")
        head_file = teachers_dir / "model.safetensors"
        if not head_file.is_file():
            raise UsageError(f"{flag} {teachers_dir}: no model.safetensors (the shared head); re-run `fastmt cofinetune`")
        encoders, tokenizers = [], []
        try:
            entries = [(teachers_dir / e["dir"], e["name"]) for e in cfg["teachers"]]
            num_labels = int(cfg["num_labels"])
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{teachers_dir / 'config.json'} lacks the teachers' {e} entry; {FIX_TEACHERS}") from e
        for sub, _ in entries:
            encoder, tokenizer = load_model_dir(sub, flag, FIX_TEACHERS)
            encoders.append(encoder)
            tokenizers.append(tokenizer)
        teachers = cls(encoders, tokenizers, [name for _, name in entries], num_labels, cfg.get("pooling", "cls"))
        state = load_tensors(head_file, FIX_TEACHERS)
        head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
        with fitting(head_file, FIX_TEACHERS):
            teachers.head.load_state_dict(head)
            for i, a in enumerate(teachers.adapters):
                prefix = f"adapters.{i}."
                sub_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                a.load_state_dict(sub_state)
        return teachers, cfg


def _read_run_config(d: Path, kind: str, flag: str, what: str) -> dict:
    if not d.is_dir():
        raise UsageError(f"{flag} {d}: no such directory")
    recover_dir(d)
    path = d / "config.json"
    if not path.is_file():
        raise UsageError(f"{flag} {d}: no config.json; expected {what}")
    with reading(path, FIX_TEACHERS if kind == TEACHERS_KIND else FIX_STUDENT):
        cfg = read_json(path)
    block = fastmt_block(cfg)
    if not block or block.get("kind") != kind:
        raise UsageError(f"{flag} {d}: config.json is not {what}")
    return block


# ---------------------------------------------------------------------------------------------------
# Student


@dataclass
class StudentSpec:
    num_layers: int
    init: str = "teacher:0"  # "teacher:I", "random", or a path


class Student(nn.Module):
    """A K-layer encoder, its own pooler + classifier, and projections ``W [T,K,Ds,Dt]``, ``b [T,K,Dt]``."""

    def __init__(self, encoder: nn.Module, tokenizer, num_labels: int, num_teachers: int, teacher_hidden: int,
                 pooling: str = "cls"):
        super().__init__()
        self.pooling = pooling  # the student reads its tokens the way its teachers' head does

        self.encoder = encoder
        self.tokenizer = tokenizer
        self.key = dataset.tokenizer_key(tokenizer)
        self.num_labels = num_labels
        ds = hidden_size(encoder)
        self.head = SharedHead(ds, num_labels, _dropout(encoder))
        k = num_layers(encoder)
        self.proj_weight = nn.Parameter(torch.empty(num_teachers, k, ds, teacher_hidden))
        self.proj_bias = nn.Parameter(torch.zeros(num_teachers, k, teacher_hidden))
        with torch.no_grad():
            if ds == teacher_hidden:
                # Identity start: a student copied from a teacher begins with a small hidden loss.
                self.proj_weight.copy_(torch.eye(ds).expand_as(self.proj_weight))
            else:
                nn.init.normal_(self.proj_weight, std=ds**-0.5)

    @property
    def depth(self) -> int:
        return num_layers(self.encoder)

    def forward(self, inputs: dict[str, torch.Tensor], want_hidden: bool = False):
        """Logits ``[N, C]`` and, when asked, hidden states of layers 1..K stacked ``[K, N, S, Ds]``."""
        last, all_hidden = encode_hidden(self.encoder, inputs, want_hidden)
        logits = self.head(pool(last, inputs["attention_mask"], self.pooling))
        if not want_hidden:
            return logits, None
        return logits, torch.stack(all_hidden[1:])

    def save(self, out_dir: str | Path, run_config: dict, label_names: list[str], extra: dict | None = None) -> None:
        with staged_set(out_dir, tensor_bytes(self.state_dict()) + TOKENIZER_BYTES) as stage:
            self._save_into(stage, run_config, label_names, extra)

    def _save_into(self, out_dir: Path, run_config: dict, label_names: list[str], extra: dict | None) -> None:
        """A stock ``*ForSequenceClassification`` dir (``fastmt.models.hf``); fastmt's settings under config.json's
        ``fastmt`` key, the head and projections also in fastmt.safetensors."""
        block = {
            "kind": STUDENT_KIND,
            "num_labels": self.num_labels,
            "num_teachers": int(self.proj_weight.shape[0]),
            "teacher_hidden": int(self.proj_weight.shape[-1]),
            "pooling": self.pooling,
            "label_names": label_names,
            "run": run_config,
            **(extra or {}),
        }
        h = self.head
        stock = self.pooling == "cls"
        save_seq_cls(out_dir, self.encoder, self.tokenizer, (h.dense.weight, h.dense.bias) if stock else None,
                     (h.classifier.weight, h.classifier.bias), label_names, block,
                     why_not="" if stock else f"this student's head reads the {self.pooling} of the tokens, which no stock head does",
                     head=CodeHead(self.pooling, None, h.dense, h.classifier, h.dropout.p))
        own = {f"head.{k}": v for k, v in h.state_dict().items()}
        own.update({"proj_weight": self.proj_weight, "proj_bias": self.proj_bias})
        save_tensors(out_dir / STUDENT_WEIGHTS, own, metadata={"kind": STUDENT_KIND})

    @classmethod
    def load(cls, student_dir: str | Path, flag: str = "--model") -> tuple["Student", dict]:
        student_dir = Path(student_dir)
        cfg = _read_run_config(student_dir, STUDENT_KIND, flag, "a student dir written by `fastmt distill`")
        if "encoder" in cfg:  # the older layout: everything in one model.safetensors
            with fitting(student_dir / "config.json", FIX_STUDENT):
                encoder = encoder_from_config(cfg["encoder"])
            weights = student_dir / "model.safetensors"
        else:
            weights = student_dir / STUDENT_WEIGHTS
            if not weights.is_file():
                raise UsageError(f"{flag} {student_dir}: no {STUDENT_WEIGHTS}")
            try:
                encoder, _ = load_seq_cls(student_dir, FIX_STUDENT)
            except (OSError, ValueError, KeyError) as e:
                raise UsageError(f"{flag} {student_dir}: cannot load the encoder ({first_line(e)})") from e
        tokenizer = load_tokenizer(student_dir, flag, FIX_STUDENT)
        check_tokenizer(tokenizer, encoder, f"{flag} {student_dir}", FIX_STUDENT)
        with fitting(student_dir / "config.json", FIX_STUDENT):
            student = cls(encoder, tokenizer, int(cfg["num_labels"]), int(cfg["num_teachers"]), int(cfg["teacher_hidden"]),
                          cfg.get("pooling", "cls"))
        if not weights.is_file():
            raise UsageError(f"{flag} {student_dir}: no {weights.name}")
        state = load_tensors(weights, FIX_STUDENT)
        with fitting(weights, FIX_STUDENT):
            if "encoder" in cfg:
                student.load_state_dict(state)
            else:
                student.head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
                with torch.no_grad():
                    student.proj_weight.copy_(state["proj_weight"])
                    student.proj_bias.copy_(state["proj_bias"])
        return student, cfg


def _copy_layers_from(encoder: nn.Module, teacher: nn.Module, picked: Sequence[int], where: str) -> None:
    """Copy embeddings and teacher layers ``picked`` (1-based hidden-state indices) into a K-layer encoder."""
    try:
        encoder.embeddings.load_state_dict(teacher.embeddings.state_dict())
        for k, j in enumerate(picked):
            encoder.encoder.layer[k].load_state_dict(teacher.encoder.layer[j - 1].state_dict())
    except (AttributeError, RuntimeError) as e:
        raise UsageError(
            f"--student-init {where}: cannot copy layers from this teacher (a BERT-style encoder with "
            f".embeddings and .encoder.layer is needed); use --student-init random"
        ) from e


def build_student(spec: StudentSpec, teachers: Teachers, init_from: Teachers | None = None) -> tuple[Student, dict]:
    """Make the student of ``spec`` for these teachers; returns it with a description of its init.

    ``teacher:I`` picks teacher I of ``init_from`` (default ``teachers``): with ``--teacher-subset``
    the index still refers to the teachers dir, so every subset starts the student from the same weights.
    """
    pool = init_from if init_from is not None else teachers
    k = spec.num_layers
    if k < 1:
        raise UsageError(f"--student-layers {k}: must be at least 1")
    for i in range(len(teachers)):
        if k > teachers.depth(i):
            raise UsageError(
                f"--student-layers {k} is deeper than teacher {i} ({teachers.names[i]}, {teachers.depth(i)} layers)"
            )
    init = spec.init
    if init.startswith("teacher:"):
        try:
            idx = int(init.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"--student-init {init}: expected teacher:I with I an integer") from None
        if not 0 <= idx < len(pool):
            raise UsageError(f"--student-init {init}: there are {len(pool)} teachers (0..{len(pool) - 1})")
        src = pool.encoders[idx]
        cfg = encoder_config_dict(src)
        cfg["num_hidden_layers"] = k
        encoder = encoder_from_config(cfg)
        _copy_layers_from(encoder, src, layer_map(k, num_layers(src)), init)
        tokenizer = pool.tokenizers[idx]
        student = Student(encoder, tokenizer, teachers.num_labels, len(teachers), teachers.hidden_size, teachers.pooling)
        if hidden_size(encoder) == teachers.hidden_size:
            student.head.load_state_dict(teachers.head.state_dict())
        return student, {"init": init}
    if init == "random":
        cfg = encoder_config_dict(teachers.encoders[0])
        cfg["num_hidden_layers"] = k
        encoder = encoder_from_config(cfg)
        student = Student(encoder, teachers.tokenizers[0], teachers.num_labels, len(teachers), teachers.hidden_size, teachers.pooling)
        student.head.load_state_dict(teachers.head.state_dict())
        return student, {"init": "random"}
    path = Path(init)
    if not path.exists():
        raise UsageError(f"--student-init {init}: not teacher:I, random, or an existing path")
    if not (path / "config.json").is_file():
        raise UsageError(f"--student-init {init}: no config.json in that directory")
    has_weights = any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
    if read_run_kind(path) == STUDENT_KIND:
        prev, _ = Student.load(path, "--student-init")
        encoder, tokenizer = prev.encoder, prev.tokenizer
    elif has_weights:
        encoder, tokenizer = load_model_dir(path, "--student-init")
    else:
        # A config-only directory: a fresh encoder of that shape (its tokenizer, else teacher 0's).
        quiet_transformers()
        with reading(path / "config.json", FIX_SOURCE):
            encoder = encoder_from_config({**AutoConfig.from_pretrained(str(path), trust_remote_code=False).to_dict()})
        tok_files = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
        tokenizer = load_tokenizer(path, "--student-init") if any((path / f).is_file() for f in tok_files) else teachers.tokenizers[0]
        check_tokenizer(tokenizer, encoder, f"--student-init {init}")
    if num_layers(encoder) != k:
        raise UsageError(f"--student-init {init}: that encoder has {num_layers(encoder)} layers, but --student-layers is {k}")
    student = Student(encoder, tokenizer, teachers.num_labels, len(teachers), teachers.hidden_size, teachers.pooling)
    if hidden_size(encoder) == teachers.hidden_size:
        student.head.load_state_dict(teachers.head.state_dict())
    return student, {"init": str(path)}


def layer_maps(student_layers: int, teachers: Teachers) -> list[list[int]]:
    """Per teacher, the hidden-state index matched to each student layer 1..K (the README's "The method")."""
    return [layer_map(student_layers, teachers.depth(i)) for i in range(len(teachers))]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def student_inference_parameters(student: Student) -> int:
    """Parameters used at inference (the projections only serve training)."""
    return count_parameters(student.encoder) + count_parameters(student.head)


log = logging.getLogger("fastmt")
