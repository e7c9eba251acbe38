"""Reading text-classification data, tokenizing it, and batching it by length.

Input files (``F`` in the command line) are TSV (GLUE layout), CSV or JSON Lines with a label column
and one text column (``sentence``) or a pair of them (``sentence1``/``sentence2`` and the other GLUE
names).  Every problem with a file is reported as a :class:`DataError` whose message is one line of
the form ``<path>:<line>: <what is wrong> (<how to fix it>)``.

Each teacher (and the student) may use its own tokenizer, so a dataset is encoded once per distinct
tokenizer (see :func:`tokenizer_key`) and :func:`iterate_batches` pads every tokenizer's view of a
batch separately, to the smallest of a few fixed lengths (:func:`length_buckets`), which keeps the
number of distinct shapes small for compiled models and CUDA graphs.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from fastmt.errors import DataError, data_error
from fastmt.data.sources import read_source

__all__ = [
    "DataError",
    "TextDataset",
    "read_dataset",
    "label_names_from",
    "encode_labels",
    "length_buckets",
    "tokenizer_key",
    "Encoded",
    "encode",
    "Batch",
    "iterate_batches",
    "num_batches",
    "EXTENSIONS",
    "LABEL_COLUMNS",
    "SINGLE_COLUMNS",
    "PAIR_COLUMNS",
]

EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json")

# Accepted column names, in order of preference (matched case-insensitively).
LABEL_COLUMNS = ("label", "gold_label", "labels", "is_duplicate")
PAIR_COLUMNS = (
    ("sentence1", "sentence2"),  # GLUE MRPC, RTE, STS-B, WNLI; MNLI/SNLI TSV
    ("question", "sentence"),  # QNLI
    ("question1", "question2"),  # QQP
    ("premise", "hypothesis"),  # MNLI/SNLI/RTE in JSON form
    ("question", "passage"),  # BoolQ
)
SINGLE_COLUMNS = ("sentence", "text", "review", "question")

_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_ENCODE_CHUNK = 8192


def _short_list(items: list[str], limit: int = 20) -> str:
    if len(items) <= limit:
        return repr(list(items))
    shown = ", ".join(repr(x) for x in items[:limit])
    return f"[{shown}, ... ({len(items)} in all)]"


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------


@dataclass
class TextDataset:
    """Texts and raw string labels of one file, with the source line of every example."""

    path: str
    text_a: list[str]
    text_b: list[str] | None  # None for single-sentence tasks
    labels: list[str]  # raw labels as strings; [] when the file has no labels
    lines: list[int]  # 1-based source line of each example (row, for parquet and datasets)
    label_names: list[str] | None = None  # the source's own class names in order (a datasets ClassLabel)

    def __len__(self) -> int:
        return len(self.text_a)

    @property
    def is_pair(self) -> bool:
        return self.text_b is not None


def decoded_lines(path: str, data: bytes) -> list[str]:
    """Split ``data`` at ``\\n`` and decode every line as UTF-8, keeping the line endings."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    raw = data.split(b"\n")
    out: list[str] = []
    last = len(raw) - 1
    for i, chunk in enumerate(raw):
        if i == last and not chunk:
            break  # the empty piece after a final newline is not a line
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            raise data_error(
                path,
                i + 1,
                f"bytes that are not valid UTF-8 at byte {e.start + 1} of the line "
                f"({chunk[e.start:e.end]!r})",
                "save the file as UTF-8",
            ) from None
        out.append(text + "\n" if i != last else text)
    return out


def _strip_eol(line: str) -> str:
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    return line


@dataclass(frozen=True)
class Columns:
    """Column names that override the guesses (``--text-column``, ``--text-pair-column``, ``--label-column``)."""

    text: str | None = None
    pair: str | None = None
    label: str | None = None


def _pick_columns(
    path: str, names: list[str], require_labels: bool, header_line: int, columns: Columns | None = None
) -> tuple[str | None, str, str | None]:
    """Choose (label, text_a, text_b) among ``names``; returns the names as written in the file."""
    lower: dict[str, str] = {}
    for name in names:
        key = name.strip().lower()
        if key and key not in lower:
            lower[key] = name
    given = columns or Columns()
    for flag, want in (("--text-column", given.text), ("--text-pair-column", given.pair), ("--label-column", given.label)):
        if want is not None and want.strip().lower() not in lower:
            raise data_error(path, header_line, f"{flag} {want}: no such column; the columns are "
                         f"{_short_list([n.strip() for n in names])}", f"give one of them to {flag}")
    label = next((lower[c] for c in LABEL_COLUMNS if c in lower), None)
    if given.label is not None:
        label = lower[given.label.strip().lower()]
    text_a = text_b = None
    for a, b in PAIR_COLUMNS:
        if a in lower and b in lower:
            text_a, text_b = lower[a], lower[b]
            break
    else:
        for a in SINGLE_COLUMNS:
            if a in lower:
                text_a = lower[a]
                break
    if given.text is not None:
        text_a, text_b = lower[given.text.strip().lower()], None
    if given.pair is not None:
        text_b = lower[given.pair.strip().lower()]
    if text_a is None or (label is None and require_labels):
        raise data_error(
            path,
            header_line,
            f"header has columns {_short_list([n.strip() for n in names])}; need a 'label' column "
            "and 'sentence' or a pair such as sentence1/sentence2",
            "name them with --text-column/--text-pair-column/--label-column, or rename them; also "
            "accepted: gold_label/labels/is_duplicate, text/review/question, "
            "question/sentence, question1/question2, premise/hypothesis, question/passage",
        )
    return label, text_a, text_b


def _clean_label(path: str, line: int, value: Any, column: str) -> str:
    """Turn a label value into its string form, or raise for values that are not class labels."""
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise data_error(path, line, f"empty label in column '{column}'",
                         "give every example a label")
        return value
    if isinstance(value, bool) or value is None:
        shown = json.dumps(value)
        raise data_error(
            path, line, f"label {shown} in column '{column}' is not a class label",
            "use a string or an integer class label",
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        raise data_error(
            path, line, f"label {value!r} in column '{column}' is not an integral class label",
            "use a string or an integer class label; regression targets are not supported",
        )
    raise data_error(
        path, line, f"label {json.dumps(value)[:60]} in column '{column}' is not a class label",
        "use a string or an integer class label",
    )


class _Builder:
    """Collects examples and checks labels the same way for every format."""

    def __init__(self, path: str, label_col: str | None, pair: bool, require_labels: bool):
        self.path = path
        self.label_col = label_col
        self.require_labels = require_labels
        self.text_a: list[str] = []
        self.text_b: list[str] | None = [] if pair else None
        self.labels: list[str] = []
        self.lines: list[int] = []
        self.first_missing: int | None = None  # first line without a label (require_labels=False)

    def add(self, line: int, a: str, b: str | None, label: Any) -> None:
        self.text_a.append(a)
        if self.text_b is not None:
            self.text_b.append(b if b is not None else "")
        self.lines.append(line)
        if self.label_col is None:
            return
        missing = label is None or (isinstance(label, str) and not label.strip())
        if missing and not self.require_labels:
            if self.first_missing is None:
                self.first_missing = line
            self.labels.append("")
            return
        self.labels.append(_clean_label(self.path, line, label, self.label_col))

    def build(self, empty_line: int, empty_what: str) -> TextDataset:
        if not self.text_a:
            raise data_error(self.path, empty_line, f"no examples: {empty_what}",
                         "add at least one example")
        labels = self.labels
        if self.first_missing is not None:
            if all(not x for x in labels):
                labels = []  # an unlabelled file that merely has an empty label column
            else:
                raise data_error(
                    self.path, self.first_missing,
                    f"empty label in column '{self.label_col}' while other examples have labels",
                    "give every example a label, or none of them",
                )
        return TextDataset(self.path, self.text_a, self.text_b, labels, self.lines)


def _read_delimited(
    path: str, lines: list[str], delimiter: str, require_labels: bool, columns: Columns | None = None
) -> TextDataset:
    is_tsv = delimiter == "\t"
    kind = "tab" if is_tsv else "comma"
    if is_tsv:
        # GLUE TSV files are written without quoting and their texts contain '"' freely.
        def rows() -> Iterator[tuple[int, list[str]]]:
            for i, raw in enumerate(lines):
                text = _strip_eol(raw)
                if text.strip():
                    yield i + 1, text.split("\t")
    else:
        def rows() -> Iterator[tuple[int, list[str]]]:
            reader = csv.reader(lines, delimiter=",", quotechar='"', doublequote=True, strict=True)
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    if "unexpected end of data" in str(e):
                        raise data_error(
                            path, start, "a quoted field that starts here is never closed",
                            'close the quote; write a " inside a quoted field as ""',
                        ) from None
                    raise data_error(path, reader.line_num, f"malformed CSV row: {e}",
                                 'quote fields that contain commas or quotes, and write a " inside '
                                 'a quoted field as ""') from None
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                yield start, row

    it = rows()
    first = next(it, None)
    if first is None:
        raise data_error(path, 1, "no examples: the file is empty",
                     "the first line must be a header, followed by one example per line")
    header_line, header = first
    label_col, col_a, col_b = _pick_columns(path, header, require_labels, header_line, columns)
    ia, ib = header.index(col_a), header.index(col_b) if col_b is not None else None
    il = header.index(label_col) if label_col is not None else None
    width = len(header)
    out = _Builder(path, header[il].strip() if il is not None else None, ib is not None,
                   require_labels)
    for line, row in it:
        if len(row) != width:
            fix = ("a text may contain a tab; GLUE TSV files cannot quote it, so remove it"
                   if is_tsv and len(row) > width else "check for a missing or extra field")
            what = f"row has {len(row)} {kind}-separated fields but the header has {width}"
            raise data_error(path, line, what, fix)
        out.add(line, row[ia], row[ib] if ib is not None else None,
                row[il] if il is not None else None)
    return out.build(header_line, "the file has a header line but no rows")


def _read_jsonl(path: str, lines: list[str], require_labels: bool, columns: Columns | None = None) -> TextDataset:
    out: _Builder | None = None
    keys: tuple[str | None, str, str | None] = (None, "", None)
    starts_with_array = False
    for i, raw in enumerate(lines):
        line = i + 1
        text = raw.strip()
        if not text:
            continue
        if out is None and text.startswith("["):
            starts_with_array = True
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            fix = ("the file must hold one JSON object per line (JSON Lines), not one JSON array"
                   if starts_with_array else "each line must hold one JSON object")
            raise data_error(path, line, f"invalid JSON: {e.msg} at column {e.colno}", fix) from None
        if not isinstance(obj, dict):
            fix = ("the file must hold one JSON object per line (JSON Lines), not one JSON array"
                   if isinstance(obj, list) else "each line must hold one JSON object")
            raise data_error(path, line, f"expected a JSON object, found {type(obj).__name__}", fix)
        if out is None:
            keys = _pick_columns(path, list(obj.keys()), require_labels, line, columns)
            out = _Builder(path, keys[0], keys[2] is not None, require_labels)
        values = []
        for key, needed in ((keys[1], True), (keys[2], keys[2] is not None),
                            (keys[0], keys[0] is not None)):
            if not needed:
                values.append(None)
                continue
            if key in obj:
                values.append(obj[key])
                continue
            alt = next((k for k in obj if isinstance(k, str) and k.strip().lower()
                        == key.strip().lower()), None)
            if alt is None:
                if key == keys[0] and not require_labels:
                    values.append(None)
                    continue
                raise data_error(path, line, f"missing key '{key}'",
                             f"every line needs the keys chosen from the first object: "
                             f"{[k for k in keys if k is not None]}")
            values.append(obj[alt])
        a, b, label = values
        for key, value in ((keys[1], a), (keys[2], b)):
            if key is not None and not isinstance(value, str):
                raise data_error(path, line,
                             f"text in '{key}' is {json.dumps(value)[:60]}, not a string",
                             "write every text as a JSON string")
        out.add(line, a, b, label)
    if out is None:
        raise data_error(path, 1, "no examples: the file has no JSON objects",
                     "write one JSON object per line")
    return out.build(1, "the file has no JSON objects")


def read_dataset(path: str | Path, require_labels: bool = True, columns: Columns | None = None) -> TextDataset:
    """Read labelled texts from a file, a ``datasets`` dir, or the Hugging Face hub.

    Files follow their extension: ``.tsv`` (tab-separated, header line, no quoting), ``.csv``
    (comma-separated, header line, standard CSV quoting), ``.jsonl``/``.json`` (one JSON object per
    line; blank lines are skipped) or ``.parquet``. A directory written by ``datasets``'
    ``save_to_disk`` is read as it is (``DIR:SPLIT`` picks a split of a ``DatasetDict``), and any other
    ``NAME[/CONFIG][:SPLIT]`` that is not a path goes to ``datasets.load_dataset`` (parquet, dirs and
    hub names need the optional ``datasets`` package). The label column is ``label`` (or
    ``gold_label``, ``labels``, ``is_duplicate``); the text is ``sentence`` (or ``text``, ``review``,
    ``question``) or a pair (``sentence1``/``sentence2``, ``question``/``sentence``,
    ``question1``/``question2``, ``premise``/``hypothesis``, ``question``/``passage``); ``columns``
    overrides any of the three. Other columns are ignored. A ``datasets`` ClassLabel column gives
    its class names (in its order, as ``label_names``), and its label -1 (GLUE test splits) means
    "no label".

    With ``require_labels=False`` a file without a label column (or with an empty one) is accepted
    and ``labels`` is ``[]``.  Raises :class:`DataError` for any problem with the file.
    """
    p = Path(path)
    spath = str(path)
    ext = p.suffix.lower()
    if not p.exists() and ext not in EXTENSIONS + (".parquet",):
        return _read_records(*read_source(spath), require_labels, columns)
    if ext == ".parquet" or p.is_dir():
        return _read_records(*read_source(spath), require_labels, columns)
    if ext not in EXTENSIONS:
        raise data_error(spath, None, f"unknown file type '{p.suffix or '(none)'}'",
                     f"use one of {', '.join(EXTENSIONS + ('.parquet',))}, a datasets dir, or a hub NAME[/CONFIG][:SPLIT]")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise data_error(spath, None, "no such file", "check the path") from None
    except IsADirectoryError:
        raise data_error(spath, None, "is a directory", "give the path of a data file") from None
    except OSError as e:
        raise data_error(spath, None, f"cannot be read: {e.strerror or e}",
                     "check the path and its permissions") from None
    lines = decoded_lines(spath, data)
    if ext == ".tsv":
        return _read_delimited(spath, lines, "\t", require_labels, columns)
    if ext == ".csv":
        return _read_delimited(spath, lines, ",", require_labels, columns)
    return _read_jsonl(spath, lines, require_labels, columns)


def _read_records(path: str, names: list[str], rows: list[dict], class_names: dict[str, list[str]],
                  require_labels: bool, columns: Columns | None) -> TextDataset:
    """Examples from column-named records (parquet, ``datasets``): row ``i`` is reported as line ``i + 1``."""
    if not rows:
        raise data_error(path, None, "no examples: the dataset has no rows", "give a split with rows")
    label_col, col_a, col_b = _pick_columns(path, names, require_labels, None, columns)
    label_names = class_names.get(label_col) if label_col is not None else None
    out = _Builder(path, label_col, col_b is not None, require_labels)
    for i, row in enumerate(rows):
        a, b = row.get(col_a), row.get(col_b) if col_b is not None else None
        for key, value in ((col_a, a), (col_b, b)):
            if key is not None and not isinstance(value, str):
                raise data_error(path, i + 1, f"text in '{key}' is {json.dumps(value, default=str)[:60]}, not a string",
                             "give a text column (--text-column)")
        label = row.get(label_col) if label_col is not None else None
        if label_names is not None and label is not None:
            if label == -1:  # a ClassLabel's -1: this example has no label (GLUE test splits)
                if require_labels:
                    raise data_error(path, i + 1, f"label -1 in '{label_col}': the example has no label, as in a test split",
                                 "train and evaluate on a labelled split; unlabelled rows are for fastmt predict")
                label = None
            elif isinstance(label, int) and 0 <= label < len(label_names):
                label = label_names[label]
        out.add(i + 1, a, b, label)
    ds = out.build(1, "the dataset has no rows")
    if label_names is not None:
        ds.label_names = list(label_names)
    return ds


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------


def label_names_from(labels: list[str]) -> list[str]:
    """The distinct labels in sorted order; numerically sorted when every label is an integer."""
    distinct = set(labels)
    if distinct and all(_INT_RE.match(x) for x in distinct):
        return sorted(distinct, key=lambda x: (int(x), x))
    return sorted(distinct)


def encode_labels(ds: TextDataset, label_names: list[str]) -> list[int]:
    """Map every label of ``ds`` to its position in ``label_names``."""
    if len(ds) and not ds.labels:
        raise data_error(ds.path, ds.lines[0] if ds.lines else 1, "the file has no labels",
                     "add a 'label' column")
    index = {name: i for i, name in enumerate(label_names)}
    out: list[int] = []
    for label, line in zip(ds.labels, ds.lines):
        i = index.get(label)
        if i is None:
            names = _short_list(list(label_names))
            raise data_error(ds.path, line, f"label {label!r} not among the training labels {names}",
                         "use the training set's label values, or add examples of this label "
                         "to the training set")
        out.append(i)
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizing
# --------------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def length_buckets(max_length: int) -> list[int]:
    """Padded lengths a batch may take: powers of two from 16 below ``max_length``, then it.

    ``length_buckets(64) == [16, 32, 64]``, ``length_buckets(100) == [16, 32, 64, 100]``,
    ``length_buckets(8) == [8]``.
    """
    max_length = _check_int("max_length", max_length, 2)
    out = []
    b = 16
    while b < max_length:
        out.append(b)
        b *= 2
    out.append(max_length)
    return out


def _sha(data: str) -> str:
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


_PROBE = [
    "Hello, World! It's 2024: the café's naïve résumé costs $3.50 (or 3,50€).",
    "UNAFFABLE unaffable running ran runner's  tabs\tand\nnewlines",
    "中文 日本語 한국어 emoji 🙂 ß İ ﬁ",
    "a-b_c.d/e\\f@g#h%i^j&k*l+m=n~o`p|q<r>s?t",
]


def tokenizer_key(tokenizer) -> str:
    """A string that is equal for tokenizers that turn the same text into the same ids.

    Built from the vocabulary, the special token ids and the ids the tokenizer gives for a fixed
    set of probe texts (single and paired), so it does not depend on the tokenizer's class or on
    transient truncation and padding settings.
    """
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    h.update(_sha(json.dumps(sorted(vocab.items()), ensure_ascii=False)).encode())
    special = {
        name: getattr(tokenizer, f"{name}_token_id", None)
        for name in ("pad", "unk", "cls", "sep", "bos", "eos", "mask")
    }
    h.update(json.dumps(special, sort_keys=True, default=str).encode())
    singles = tokenizer(_PROBE, truncation=False, padding=False)["input_ids"]
    pairs = tokenizer(_PROBE[:2], _PROBE[2:], truncation=False, padding=False)
    probe = {"single": singles, "pair": pairs["input_ids"], "types": pairs.get("token_type_ids")}
    h.update(json.dumps(probe, default=str).encode())
    return f"{type(tokenizer).__name__}-{len(vocab)}-{h.hexdigest()[:16]}"


@dataclass
class Encoded:
    """One tokenizer's view of a dataset: unpadded ids, truncated to ``max_length``."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    pad_id: int
    _packed: Any = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.input_ids)

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(flat ids, flat token types, offsets, lengths) as int64 arrays, built once and cached."""
        if self._packed is None:
            lengths = np.fromiter((len(x) for x in self.input_ids), dtype=np.int64,
                                  count=len(self.input_ids))
            offsets = np.zeros(len(lengths), dtype=np.int64)
            if len(lengths) > 1:
                np.cumsum(lengths[:-1], out=offsets[1:])
            total = int(lengths.sum())
            ids = np.fromiter(itertools.chain.from_iterable(self.input_ids), dtype=np.int64,
                              count=total)
            for i, (a, b) in enumerate(zip(self.input_ids, self.token_type_ids)):
                if len(a) != len(b):
                    raise ValueError(f"example {i}: {len(a)} input ids but {len(b)} token type ids")
            types = np.fromiter(itertools.chain.from_iterable(self.token_type_ids),
                                dtype=np.int64, count=total)
            self._packed = (ids, types, offsets, lengths)
        return self._packed


def _as_list(x: Any) -> list[list[int]]:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def encode(tokenizer, ds: TextDataset, max_length: int) -> Encoded:
    """Tokenize ``ds``, truncating to ``max_length`` (longest first for pairs); no padding."""
    _check_int("max_length", max_length, 2)
    truncation: Any = "longest_first" if ds.text_b is not None else True
    input_ids: list[list[int]] = []
    token_type_ids: list[list[int]] = []
    n = len(ds)
    for start in range(0, n, _ENCODE_CHUNK):
        a = ds.text_a[start:start + _ENCODE_CHUNK]
        b = ds.text_b[start:start + _ENCODE_CHUNK] if ds.text_b is not None else None
        enc = tokenizer(a, b, truncation=truncation, max_length=int(max_length),
                        padding=False, return_token_type_ids=True, return_attention_mask=False)
        ids = _as_list(enc["input_ids"])
        types = enc.get("token_type_ids") if hasattr(enc, "get") else None
        types = _as_list(types) if types is not None else [[0] * len(x) for x in ids]
        input_ids.extend(ids)
        token_type_ids.extend(types)
    pad = getattr(tokenizer, "pad_token_id", None)
    return Encoded(input_ids, token_type_ids, int(pad) if pad is not None else 0)


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Batch:
    """A batch: labels, each tokenizer's padded inputs, and the examples' dataset positions."""

    labels: torch.Tensor  # [B] int64
    # tokenizer key -> {"input_ids", "attention_mask", "token_type_ids"}, each [B, L]
    inputs: dict[str, dict[str, torch.Tensor]]
    index: torch.Tensor  # [B] int64

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device``."""
        return Batch(
            labels=self.labels.to(device, non_blocking=non_blocking),
            inputs={k: {n: t.to(device, non_blocking=non_blocking) for n, t in v.items()}
                    for k, v in self.inputs.items()},
            index=self.index.to(device, non_blocking=non_blocking),
        )


def num_batches(n: int, batch_size: int) -> int:
    """How many batches :func:`iterate_batches` yields for ``n`` examples (last may be partial)."""
    _check_int("batch_size", batch_size, 1)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return (int(n) + int(batch_size) - 1) // int(batch_size)


def _collate(packed, pad_id: int, idx: np.ndarray, buckets: np.ndarray) -> dict[str, torch.Tensor]:
    ids, types, offsets, lengths = packed
    lens = lengths[idx]
    longest = int(lens.max()) if len(lens) else 0
    width = int(buckets[np.searchsorted(buckets, longest)])
    cols = np.arange(width, dtype=np.int64)
    mask = cols[None, :] < lens[:, None]
    pos = offsets[idx][:, None] + cols[None, :]
    pos = np.where(mask, pos, 0)
    if len(ids):
        out_ids = np.where(mask, ids[pos], pad_id)
        out_types = np.where(mask, types[pos], 0)
    else:
        out_ids = np.full(mask.shape, pad_id, dtype=np.int64)
        out_types = np.zeros(mask.shape, dtype=np.int64)
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(out_ids, dtype=np.int64)),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        "token_type_ids": torch.from_numpy(np.ascontiguousarray(out_types, dtype=np.int64)),
    }


GROUP_BATCHES = 50  # batches per sorted run when grouping shuffled batches by length


def _grouped(order: np.ndarray, lengths: np.ndarray, batch_size: int, generator) -> np.ndarray:
    """``order`` rearranged so that each batch holds examples of similar length (see iterate_batches)."""
    if generator is None:
        return order[np.argsort(-lengths[order], kind="stable")]
    run = GROUP_BATCHES * batch_size
    runs = [order[i:i + run] for i in range(0, len(order), run)]
    runs = [r[np.argsort(-lengths[r], kind="stable")] for r in runs]
    grouped = np.concatenate(runs)
    full = len(grouped) // batch_size
    batches = grouped[:full * batch_size].reshape(full, batch_size)
    visit = torch.randperm(full, generator=generator).numpy()
    return np.concatenate([batches[visit].reshape(-1), grouped[full * batch_size:]])


def iterate_batches(
    encodings: dict[str, Encoded],
    labels: list[int],
    batch_size: int,
    buckets: list[int],
    shuffle: bool,
    generator: torch.Generator | None = None,
    skip_batches: int = 0,
    group_by_length: bool = False,
) -> Iterator[Batch]:
    """Yield batches of ``batch_size`` examples (the last one may be smaller).

    The order is ``torch.randperm(n, generator=generator)`` when ``shuffle`` is true, else the file
    order; the first ``skip_batches`` batches of that order are left out (a resumed epoch).  Each
    tokenizer's inputs are padded to the smallest bucket that holds the batch's longest
    sequence for that tokenizer, so different keys may get different lengths.

    ``group_by_length`` puts examples of similar length in the same batch, so batches carry little
    padding. Shuffled: the random order is cut into runs of ``GROUP_BATCHES`` batches, each run is
    sorted by length (longest first, ties in random order) and cut into batches, and the full
    batches are then visited in a random order (from ``generator``), the partial one last; every
    example is still seen once per epoch. Not shuffled: the whole set is sorted by length (for
    prediction, where the order does not matter). The length of an example is its longest view.
    """
    _check_int("batch_size", batch_size, 1)
    if not buckets:
        raise ValueError("buckets must not be empty")
    bucket_arr = np.array(sorted(set(int(b) for b in buckets)), dtype=np.int64)
    if bucket_arr[0] < 1:
        raise ValueError(f"buckets must be positive, got {list(buckets)}")
    n = len(labels)
    packed = {}
    for key, enc in encodings.items():
        if len(enc.input_ids) != n:
            raise ValueError(f"encodings[{key!r}] has {len(enc.input_ids)} examples but there are "
                             f"{n} labels")
        packed[key] = enc.packed()
        lengths = packed[key][3]
        if len(lengths) and int(lengths.max()) > int(bucket_arr[-1]):
            raise ValueError(f"encodings[{key!r}] has a sequence of length {int(lengths.max())}, "
                             f"longer than the largest bucket {int(bucket_arr[-1])} (encode with "
                             f"max_length <= the largest bucket)")
    label_t = torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1))
    if shuffle:
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n, dtype=torch.int64)
    order_np = order.numpy()
    if group_by_length and n:
        longest = np.max(np.stack([packed[key][3] for key in encodings]), axis=0)
        order_np = _grouped(order_np, longest, int(batch_size), generator if shuffle else None)
    for start in range(int(skip_batches) * int(batch_size), n, int(batch_size)):
        idx = order_np[start:start + int(batch_size)]
        index = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
        inputs = {key: _collate(packed[key], encodings[key].pad_id, idx, bucket_arr)
                  for key in encodings}
        yield Batch(labels=label_t[index], inputs=inputs, index=index)


def host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A host tensor bound for a GPU goes through pinned memory, so the copy is
    truly asynchronous: the host queues it and goes on preparing the next step instead of waiting
    for the GPU to reach the copy (a copy from pageable memory holds the host until it is done)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_device(inputs: dict[str, dict[str, torch.Tensor]], device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    return {k: {n: host_to(t, device) for n, t in v.items()} for k, v in inputs.items()}
