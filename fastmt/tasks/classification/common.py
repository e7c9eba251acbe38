"""What every classification task does before it trains: read both splits, tokenize them once per tokenizer,
and hand the loop the training set in the form it takes (``fastmt.engine.loop.TrainData``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from fastmt.data.dataset import (Columns, Encoded, encode, encode_labels, label_names_from, length_buckets, num_batches,
                         read_dataset, tokenizer_key)
from fastmt.errors import UsageError
from fastmt.engine.loop import TrainData
from fastmt.models.classifier import check_tokenizer_on, tokenizer_source
from fastmt.config.settings import TrainArgs


@dataclass
class Splits:
    label_names: list[str]
    train_labels: list[int]
    dev_labels: list[int]
    train_enc: dict[str, Encoded]
    dev_enc: dict[str, Encoded]
    buckets: list[int]
    train_path: str
    dev_path: str


def prepare_splits(train: str, dev: str, tokenizers: Iterable, max_length: int, label_names: list[str] | None = None,
                   columns: Columns | None = None) -> Splits:
    """Read both sources, map labels, and tokenize once per distinct tokenizer."""
    train_ds = read_dataset(train, columns=columns)
    dev_ds = read_dataset(dev, columns=columns)
    if label_names is None:
        label_names = train_label_names(train_ds)
    if len(label_names) < 2:
        raise UsageError(f"{train}: only one label ({label_names[0]!r}) in the training set; need at least two")
    train_labels = encode_labels(train_ds, label_names)
    dev_labels = encode_labels(dev_ds, label_names)
    train_enc, dev_enc = {}, {}
    for tok in tokenizers:
        key = tokenizer_key(tok)
        if key not in train_enc:
            check_tokenizer_on(tok, train_ds.text_a[:64], tokenizer_source(tok), f"the training text ({train})")
            train_enc[key] = encode(tok, train_ds, max_length)
            dev_enc[key] = encode(tok, dev_ds, max_length)
    return Splits(label_names, train_labels, dev_labels, train_enc, dev_enc, length_buckets(max_length), str(train), str(dev))


def train_label_names(ds) -> list[str]:
    """The class names: the source's own (a datasets ClassLabel, in its order), else the distinct labels."""
    return list(ds.label_names) if ds.label_names else label_names_from(ds.labels)


def encodings_for(splits: Splits, keys: list[str]) -> dict[str, Encoded]:
    return {k: splits.train_enc[k] for k in dict.fromkeys(keys)}


def train_data(splits: Splits, keys: list[str]) -> TrainData:
    """The training set of ``splits`` as the loop takes it, for the tokenizers ``keys`` name."""
    return TrainData(encodings_for(splits, keys), splits.train_labels, splits.buckets)


def columns_of(args: TrainArgs) -> Columns:
    """The columns ``--text-column``, ``--text-pair-column`` and ``--label-column`` name (None: guessed)."""
    return Columns(args.text_column, args.text_pair_column, args.label_column)


def total_steps(args: TrainArgs, splits: Splits) -> int:
    return num_batches(len(splits.train_labels), args.batch_size) * args.epochs
