"""Text for causal language models: read documents, tokenize them once, pack them into blocks.

``read_texts`` takes a ``.txt`` file (one document per non-empty line), or anything
``fastmt.data.dataset.read_dataset`` reads (``.tsv``, ``.csv``, ``.jsonl``, ``.parquet``, a ``datasets`` dir, a hub
name: its text column, labels not needed; a pair's two texts are one document). ``pack`` joins the
tokenized documents, each followed by the end-of-text token, and cuts the stream into blocks of
``max_length`` tokens: every position of a block is trained on (the last block is padded, its padding
counts nowhere). A block predicts its own next tokens: position ``j`` is trained to give ``ids[j + 1]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastmt.data.dataset import Columns, Encoded, decoded_lines, read_dataset
from fastmt.errors import UsageError, data_error

IGNORE = -100


def read_texts(path: str, text_column: str | None = None) -> list[str]:
    """The documents of ``path``; one line naming the file (and line) for anything wrong with it."""
    p = Path(path)
    if p.suffix.lower() == ".txt":
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise data_error(str(path), None, "no such file", "check the path") from None
        except IsADirectoryError:
            raise data_error(str(path), None, "is a directory", "give the path of a text file") from None
        except OSError as e:
            raise data_error(str(path), None, f"cannot be read: {e.strerror or e}",
                             "check the path and its permissions") from None
        docs = [line.strip() for line in decoded_lines(str(path), data)]
        docs = [d for d in docs if d]
    else:
        ds = read_dataset(path, require_labels=False, columns=Columns(text_column, None, None))
        docs = [a if b is None else f"{a} {b}" for a, b in zip(ds.text_a, ds.text_b or [None] * len(ds.text_a))]
        docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise data_error(str(path), None, "no text in it", "a causal LM needs at least one non-empty document")
    return docs


def end_token(tokenizer) -> int:
    """The token that ends each packed document: EOS, else SEP (a BERT-style vocabulary)."""
    for name in ("eos_token_id", "sep_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return int(tid)
    raise UsageError("the tokenizer has neither an end-of-text (eos) nor a separator (sep) token to end documents "
                     "with; give models whose tokenizer has one")


def pack(tokenizer, docs: list[str], max_length: int) -> Encoded:
    """Blocks of ``max_length`` tokens from the documents, as ``fastmt.data.dataset.Encoded`` (every block full
    but maybe the last). Documents are tokenized without special tokens and each ends with ``end_token``."""
    if max_length < 2:
        raise UsageError(f"--max-length {max_length}: a block needs at least 2 tokens")
    end = end_token(tokenizer)
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream = np.fromiter((t for doc in ids for t in (*doc, end)), dtype=np.int64)
    blocks = [stream[i: i + max_length].tolist() for i in range(0, len(stream), max_length)]
    if len(blocks[-1]) < 2:  # a lone last token predicts nothing
        blocks.pop()
    if not blocks:
        raise UsageError("the text is a single token once tokenized; a causal LM needs at least two")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    return Encoded(blocks, [[0] * len(b) for b in blocks], int(pad))


def next_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` targets: ``ids[:, j + 1]`` at position ``j``, ``IGNORE`` at each row's last position
    and wherever the next position is padding."""
    targets = torch.full_like(input_ids, IGNORE)
    nxt = input_ids[:, 1:]
    targets[:, :-1] = torch.where(attention_mask[:, 1:].bool(), nxt, IGNORE)
    return targets


def token_count(enc: Encoded) -> int:
    """Tokens trained on in ``enc``: one fewer than each block's length."""
    return sum(len(b) - 1 for b in enc.input_ids)
