"""Tests for fastmt.data.dataset: file reading, labels, tokenizing and length-bucketed batching."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED
from fastmt.data.dataset import (
    Batch,
    DataError,
    Encoded,
    TextDataset,
    encode,
    encode_labels,
    iterate_batches,
    label_names_from,
    length_buckets,
    num_batches,
    read_dataset,
    tokenizer_key,
)


WORDS = ["the", "a", "film", "movie", "is", "was", "good", "bad", "great", "dull", "not", "very",
         "plot", "acting", "and", "but", "it", "fun", "long", "short", ".", ","]


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


def build_tokenizer(words=WORDS, lowercase=True):
    """A tiny BERT-like word-level tokenizer: [CLS] a [SEP] (b [SEP]), type ids 0/1."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {tok: i for i, tok in enumerate(specials + list(words))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


@pytest.fixture
def tokenizer():
    return build_tokenizer()


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def expect_error(path, fragment: str, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_dataset(path, **kwargs)
    msg = str(info.value)
    assert fragment in msg, msg
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------------


def test_tsv_single_sentence_keeps_quotes(tmp_path):
    p = write(tmp_path / "train.tsv",
              'sentence\tlabel\nit is "great" , "really\t1\n"unbalanced quote\t0\nplain\t1\n')
    ds = read_dataset(p)
    assert ds.text_a == ['it is "great" , "really', '"unbalanced quote', "plain"]
    assert ds.text_b is None
    assert ds.labels == ["1", "0", "1"]
    assert ds.lines == [2, 3, 4]
    assert len(ds) == 3
    assert ds.path == str(p)


def test_tsv_crlf_bom_and_blank_lines(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_bytes(b"\xef\xbb\xbfsentence\tlabel\r\nfine film\t1\r\n\r\nbad film\t0\r\n\r\n")
    ds = read_dataset(p)
    assert ds.text_a == ["fine film", "bad film"]
    assert ds.labels == ["1", "0"]
    assert ds.lines == [2, 4]


def test_csv_with_quoted_commas_and_quotes(tmp_path):
    p = tmp_path / "d.csv"
    with p.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerow(["pos", 'good, "very" good'])
        w.writerow(["neg", "two\nlines"])
        w.writerow(["neg", "bad"])
    ds = read_dataset(p)
    assert ds.text_a == ['good, "very" good', "two\nlines", "bad"]
    assert ds.labels == ["pos", "neg", "neg"]
    assert ds.lines == [2, 3, 5]  # the second example spans lines 3-4


def test_csv_unclosed_quote_names_its_line(tmp_path):
    p = write(tmp_path / "d.csv", 'text,label\nok,1\n"never closed,0\nmore,1\n')
    expect_error(p, f"{p}:3:")


def test_jsonl_int_float_and_string_labels(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": 1}\n\n   \n{"text": "b", "label": 0.0}\n'
                 '{"text": "c", "label": " 2 "}\n', encoding="utf-8")
    ds = read_dataset(p)
    assert ds.text_a == ["a", "b", "c"]
    assert ds.labels == ["1", "0", "2"]
    assert ds.lines == [1, 4, 5]


def test_json_extension_reads_json_lines(tmp_path):
    p = write_jsonl(tmp_path / "d.json", [{"sentence1": "x", "sentence2": "y", "label": "a"}])
    ds = read_dataset(p)
    assert ds.text_a == ["x"] and ds.text_b == ["y"] and ds.labels == ["a"]


@pytest.mark.parametrize("value", [True, None, 0.5, [1], {"a": 1}])
def test_jsonl_bad_label_values(tmp_path, value):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": value}])
    expect_error(p, f"{p}:2:")


def test_jsonl_missing_key_on_later_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0},
                                           {"label": 1}])
    msg = expect_error(p, f"{p}:3:")
    assert "'text'" in msg


def test_jsonl_text_must_be_string(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": None, "label": 0}])
    expect_error(p, f"{p}:2:")


def test_jsonl_invalid_json_line(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    expect_error(p, f"{p}:2:")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n["b", 0]\n')
    msg = expect_error(p, f"{p}:2:")
    assert "object" in msg


def test_jsonl_array_file_gets_a_hint(tmp_path):
    p = write(tmp_path / "d.json", '[{"text": "a", "label": 1},\n {"text": "b", "label": 0}]\n')
    msg = expect_error(p, f"{p}:1:")
    assert "JSON Lines" in msg


# --------------------------------------------------------------------------------------------------
# columns
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, a, b",
    [
        (["sentence", "label"], "sentence", None),
        (["text", "label"], "text", None),
        (["review", "label"], "review", None),
        (["question", "label"], "question", None),
        (["index", "sentence1", "sentence2", "label"], "sentence1", "sentence2"),  # RTE/MRPC
        (["index", "question", "sentence", "label"], "question", "sentence"),  # QNLI
        (["id", "qid1", "qid2", "question1", "question2", "label"], "question1", "question2"),
        (["premise", "hypothesis", "label"], "premise", "hypothesis"),
        (["question", "passage", "label"], "question", "passage"),
        (["Sentence1", "SENTENCE2", "Label"], "Sentence1", "SENTENCE2"),  # case-insensitive
    ],
)
@pytest.mark.parametrize("ext", ["tsv", "csv", "jsonl"])
def test_column_sets(tmp_path, header, a, b, ext):
    rows = []
    for i in range(3):
        row = {h: f"{h}-{i}" for h in header}
        row[header[-1]] = str(i % 2)
        rows.append(row)
    p = tmp_path / f"d.{ext}"
    if ext == "jsonl":
        write_jsonl(p, rows)
    else:
        sep = "\t" if ext == "tsv" else ","
        write(p, sep.join(header) + "\n" + "".join(sep.join(r[h] for h in header) + "\n" for r in rows))
    ds = read_dataset(p)
    assert ds.text_a == [f"{a}-{i}" for i in range(3)]
    if b is None:
        assert ds.text_b is None
    else:
        assert ds.text_b == [f"{b}-{i}" for i in range(3)]
    assert ds.labels == ["0", "1", "0"]


def test_mnli_style_tsv_with_extra_columns(tmp_path):
    header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
              "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
              "sentence2", "label1", "label2", "label3", "label4", "label5", "gold_label"]
    rows = []
    for i, gold in enumerate(["neutral", "entailment", "contradiction"]):
        r = [str(i), "31193", "31193n", "government", "( ( x ) )", "( y )", "(ROOT (S x))",
             "(ROOT y)", f'premise "{i}"', f"hypothesis {i}", gold, gold, gold, gold, gold, gold]
        rows.append("\t".join(r))
    p = write(tmp_path / "dev_matched.tsv", "\t".join(header) + "\n" + "\n".join(rows) + "\n")
    ds = read_dataset(p)
    assert ds.text_a == ['premise "0"', 'premise "1"', 'premise "2"']
    assert ds.text_b == ["hypothesis 0", "hypothesis 1", "hypothesis 2"]
    assert ds.labels == ["neutral", "entailment", "contradiction"]
    assert label_names_from(ds.labels) == ["contradiction", "entailment", "neutral"]


def test_missing_columns(tmp_path):
    p = write(tmp_path / "d.tsv", "words\tlabel\nx\t1\n")
    msg = expect_error(p, f"{p}:1: header has columns ['words', 'label']")
    assert "need a 'label' column and 'sentence'" in msg
    p2 = write(tmp_path / "e.tsv", "sentence\tscore\nx\t1\n")
    expect_error(p2, f"{p2}:1: header has columns")
    p3 = write_jsonl(tmp_path / "f.jsonl", [{"sentence": "x"}])
    expect_error(p3, f"{p3}:1: header has columns")


def test_unlabelled_file_when_labels_not_required(tmp_path):
    p = write(tmp_path / "test.tsv", "index\tsentence\n0\tx\n1\ty\n")
    ds = read_dataset(p, require_labels=False)
    assert ds.text_a == ["x", "y"] and ds.labels == []
    p2 = write(tmp_path / "test2.tsv", "sentence\tlabel\nx\t\ny\t\n")
    assert read_dataset(p2, require_labels=False).labels == []
    expect_error(p2, f"{p2}:2:")  # required by default
    p3 = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}])
    assert read_dataset(p3, require_labels=False).labels == []


def test_empty_label_is_an_error(tmp_path):
    p = write(tmp_path / "d.tsv", "sentence\tlabel\nx\t1\ny\t  \n")
    msg = expect_error(p, f"{p}:3:")
    assert "label" in msg


# --------------------------------------------------------------------------------------------------
# file errors
# --------------------------------------------------------------------------------------------------


def test_ragged_tsv_row(tmp_path):
    p = write(tmp_path / "d.tsv", "sentence\tlabel\ngood\t1\nbad\t0\textra\nok\t1\n")
    msg = expect_error(p, f"{p}:3:")
    assert "3" in msg and "2" in msg
    p2 = write(tmp_path / "e.tsv", "sentence\tlabel\ngood\t1\nno label here\n")
    expect_error(p2, f"{p2}:3:")


def test_ragged_csv_row(tmp_path):
    p = write(tmp_path / "d.csv", 'sentence,label\n"a, b",1\nc,d,0\n')
    expect_error(p, f"{p}:3:")


def test_non_utf8_bytes_name_their_line(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_bytes(b"sentence\tlabel\na\t1\nb\t0\nbad \xff\xfe bytes\t1\nc\t0\n")
    msg = expect_error(p, f"{p}:4:")
    assert "UTF-8" in msg
    q = tmp_path / "d.jsonl"
    q.write_bytes(b'{"text": "a", "label": 1}\n{"text": "caf\xe9", "label": 1}\n')
    expect_error(q, f"{q}:2:")


def test_empty_file_and_header_only(tmp_path):
    for name, text in [("empty.tsv", ""), ("header.tsv", "sentence\tlabel\n"),
                       ("empty.csv", ""), ("header.csv", "sentence,label\n"),
                       ("empty.jsonl", ""), ("blank.jsonl", "\n\n")]:
        p = write(tmp_path / name, text)
        expect_error(p, "no examples")
        expect_error(p, f"{p}:1:")


def test_unknown_extension(tmp_path):
    p = write(tmp_path / "data.txt", "sentence\tlabel\nx\t1\n")
    msg = expect_error(p, str(p))
    assert ".tsv" in msg and ".csv" in msg and ".jsonl" in msg


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.tsv", "nope.tsv")


# --------------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------------


def test_string_labels_sorted():
    assert label_names_from(["pos", "neg", "neutral", "neg"]) == ["neg", "neutral", "pos"]


def test_int_labels_numeric_order():
    assert label_names_from(["10", "2", "9", "2", "-1"]) == ["-1", "2", "9", "10"]
    # not all integers: plain string order
    assert label_names_from(["10", "2", "x"]) == ["10", "2", "x"]
    assert label_names_from([]) == []


def test_encode_labels_and_unseen_dev_label(tmp_path):
    train = read_dataset(write(tmp_path / "train.tsv", "sentence\tlabel\na\t10\nb\t2\nc\t10\n"))
    names = label_names_from(train.labels)
    assert names == ["2", "10"]
    assert encode_labels(train, names) == [1, 0, 1]
    dev_path = write(tmp_path / "dev.tsv", "sentence\tlabel\na\t2\nb\t10\nc\t7\n")
    dev = read_dataset(dev_path)
    with pytest.raises(DataError) as info:
        encode_labels(dev, names)
    assert str(info.value).startswith(f"{dev_path}:4: label '7' not among the training labels ['2', '10']")


def test_encode_labels_needs_labels(tmp_path):
    ds = read_dataset(write(tmp_path / "t.tsv", "sentence\nx\n"), require_labels=False)
    with pytest.raises(DataError):
        encode_labels(ds, ["0", "1"])


# --------------------------------------------------------------------------------------------------
# buckets and tokenizing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length, expected", [
    (64, [16, 32, 64]), (100, [16, 32, 64, 100]), (8, [8]), (16, [16]), (17, [16, 17]),
    (2, [2]), (512, [16, 32, 64, 128, 256, 512]),
])
def test_length_buckets(max_length, expected):
    assert length_buckets(max_length) == expected


@pytest.mark.parametrize("bad", [1, 0, -5])
def test_length_buckets_rejects_small(bad):
    with pytest.raises(ValueError):
        length_buckets(bad)


def _ds(a, b=None, labels=None):
    return TextDataset("mem.tsv", list(a), None if b is None else list(b),
                       list(labels) if labels is not None else ["0"] * len(a),
                       list(range(2, len(a) + 2)))


def test_encode_single_truncates(tokenizer):
    ds = _ds(["the film is good", "the plot is very very very long and dull", "fun"])
    enc = encode(tokenizer, ds, max_length=6)
    assert isinstance(enc, Encoded)
    assert [len(x) for x in enc.input_ids] == [6, 6, 3]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    for ids in enc.input_ids:
        assert ids[0] == cls and ids[-1] == sep
    vocab = tokenizer.get_vocab()
    assert enc.input_ids[0] == [cls, vocab["the"], vocab["film"], vocab["is"], vocab["good"], sep]
    assert enc.token_type_ids == [[0] * len(x) for x in enc.input_ids]
    assert enc.pad_id == tokenizer.pad_token_id == 0


def test_encode_pairs_have_segment_ids(tokenizer):
    ds = _ds(["the film", "the plot is very very long and dull"], ["is good", "it was bad"])
    enc = encode(tokenizer, ds, max_length=8)
    assert len(enc.input_ids[0]) == 7  # [CLS] the film [SEP] is good [SEP]
    assert enc.token_type_ids[0] == [0, 0, 0, 0, 1, 1, 1]
    assert len(enc.input_ids[1]) == 8  # truncated, longest first: both sides keep tokens
    assert 1 in enc.token_type_ids[1]
    assert enc.input_ids[1].count(tokenizer.sep_token_id) == 2


class CountingTokenizer:
    """A tokenizer that records how many texts each call to it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, text, text_pair=None, **kw):
        self.calls.append(len(text) if isinstance(text, list) else 1)
        return self.tokenizer(text, text_pair, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def assert_encoded_in_batches(tokenizer, ds, max_length: int):
    """``encode`` hands the fast (Rust) tokenizer thousands of texts per call, where its batch
    encoding runs fast; one call per text would make tokenizing a large file slow."""
    from fastmt.data.dataset import _ENCODE_CHUNK

    assert tokenizer.is_fast
    counting = CountingTokenizer(tokenizer)
    enc = encode(counting, ds, max_length=max_length)
    n = len(ds)
    assert counting.calls == [min(_ENCODE_CHUNK, n - start) for start in range(0, n, _ENCODE_CHUNK)]
    assert _ENCODE_CHUNK >= 1000
    assert len(enc.input_ids) == n
    return enc


def test_encode_hands_the_tokenizer_whole_batches(tokenizer):
    ds = _ds([" ".join(WORDS[(i + j) % len(WORDS)] for j in range(i % 30 + 1)) for i in range(10_000)])
    enc = assert_encoded_in_batches(tokenizer, ds, max_length=16)
    assert max(len(x) for x in enc.input_ids) == 16
    for i in (0, 17, 8191, 8192, 9999):  # batches encode each text as it is encoded alone
        assert enc.input_ids[i] == tokenizer(ds.text_a[i], truncation=True, max_length=16)["input_ids"]


def test_tokenizer_key():
    a, b = build_tokenizer(), build_tokenizer()
    assert tokenizer_key(a) == tokenizer_key(b)
    assert isinstance(tokenizer_key(a), str)
    other = build_tokenizer(WORDS + ["extra"])
    assert tokenizer_key(other) != tokenizer_key(a)
    swapped = build_tokenizer(list(reversed(WORDS)))  # same tokens and size, different ids
    assert tokenizer_key(swapped) != tokenizer_key(a)
    cased = build_tokenizer(lowercase=False)
    assert tokenizer_key(cased) != tokenizer_key(a)


def test_tokenizer_key_survives_save_after_use(tokenizer, tmp_path):
    # A tokenizer saved after encoding (truncation state set) must reload with the same key.
    before = tokenizer_key(tokenizer)
    encode(tokenizer, _ds(["the film was good"]), max_length=5)
    tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    assert tokenizer_key(AutoTokenizer.from_pretrained(tmp_path / "tok")) == before


def test_tokenizer_key_ignores_call_state(tokenizer):
    before = tokenizer_key(tokenizer)
    encode(tokenizer, _ds(["the film"]), max_length=5)
    assert tokenizer_key(tokenizer) == before


# --------------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------------


def _encoded(lengths, pad_id=0, base=100):
    ids = [[base + i * 1000 + j for j in range(n)] for i, n in enumerate(lengths)]
    types = [[j % 2 for j in range(n)] for n in lengths]
    return Encoded(ids, types, pad_id)


def test_iterate_batches_shapes_masks_and_values():
    lengths = [3, 20, 5, 40, 1, 16, 17]
    enc = _encoded(lengths, pad_id=7)
    labels = [0, 1, 2, 0, 1, 2, 0]
    batches = list(iterate_batches({"t": enc}, labels, 3, [16, 32, 64], shuffle=False))
    assert len(batches) == 3 == num_batches(7, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    widths = [b.inputs["t"]["input_ids"].shape[1] for b in batches]
    assert widths == [32, 64, 32]
    for b, width in zip(batches, widths):
        assert isinstance(b, Batch)
        assert b.labels.dtype == b.index.dtype == torch.int64
        assert b.labels.tolist() == [labels[i] for i in b.index.tolist()]
        x = b.inputs["t"]
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            assert x[name].dtype == torch.int64
            assert x[name].shape == (len(b), width)
        for row, i in enumerate(b.index.tolist()):
            n = lengths[i]
            assert x["attention_mask"][row].tolist() == [1] * n + [0] * (x["input_ids"].shape[1] - n)
            assert x["input_ids"][row, :n].tolist() == enc.input_ids[i]
            assert (x["input_ids"][row, n:] == 7).all()
            assert x["token_type_ids"][row, :n].tolist() == enc.token_type_ids[i]
            assert (x["token_type_ids"][row, n:] == 0).all()
    assert torch.cat([b.index for b in batches]).tolist() == list(range(7))


def test_iterate_batches_smallest_bucket():
    enc = _encoded([16, 2])
    (b,) = iterate_batches({"t": enc}, [0, 1], 8, [16, 32], shuffle=False)
    assert b.inputs["t"]["input_ids"].shape == (2, 16)
    enc = _encoded([17, 2])
    (b,) = iterate_batches({"t": enc}, [0, 1], 8, [16, 32], shuffle=False)
    assert b.inputs["t"]["input_ids"].shape == (2, 32)


def test_iterate_batches_shuffled_epoch_covers_every_index_once():
    n = 103
    enc = _encoded([(i * 7) % 30 + 1 for i in range(n)])
    labels = [i % 3 for i in range(n)]
    g = torch.Generator().manual_seed(1)
    batches = list(iterate_batches({"t": enc}, labels, 10, length_buckets(32), True, g))
    assert len(batches) == num_batches(n, 10) == 11
    assert len(batches[-1]) == 3
    seen = torch.cat([b.index for b in batches]).tolist()
    assert sorted(seen) == list(range(n))
    assert seen != list(range(n))
    for b in batches:
        for row, i in enumerate(b.index.tolist()):
            assert b.inputs["t"]["input_ids"][row, : len(enc.input_ids[i])].tolist() == enc.input_ids[i]


def test_iterate_batches_deterministic_with_seed():
    n = 50
    enc = _encoded([i % 20 + 1 for i in range(n)])
    labels = [i % 2 for i in range(n)]

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [b.index.tolist() for b in iterate_batches({"t": enc}, labels, 8, [16, 32], True, g)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def _grouped_run(lengths, batch_size, seed, skip=0, widths=None):
    enc = _encoded(lengths)
    g = torch.Generator().manual_seed(seed)
    return list(iterate_batches({"t": enc}, [0] * len(lengths), batch_size, widths or list(range(1, 65)), True, g,
                                skip_batches=skip, group_by_length=True))


def test_group_by_length_sees_every_example_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 61, size=1003).tolist()
    batches = _grouped_run(lengths, 8, seed=5)
    seen = torch.cat([b.index for b in batches]).tolist()
    assert sorted(seen) == list(range(1003))
    assert [len(b) for b in batches] == [8] * 125 + [3]  # the partial batch comes last
    padded = sum(b.inputs["t"]["input_ids"].numel() for b in batches)
    g = torch.Generator().manual_seed(5)
    plain = sum(b.inputs["t"]["input_ids"].numel()
                for b in iterate_batches({"t": _encoded(lengths)}, [0] * 1003, 8, list(range(1, 65)), True, g))
    real = sum(lengths)
    # Runs of 50 batches (400 examples) sorted by length: a batch spans ~2% of the length range.
    assert padded - real < 0.05 * real < plain - real
    for b in batches:  # values and masks are still each example's own
        for row, i in enumerate(b.index.tolist()):
            assert b.inputs["t"]["attention_mask"][row].sum() == lengths[i]
    # Not everything in one sorted order: batch widths go up and down over the epoch.
    widths = [b.inputs["t"]["input_ids"].shape[1] for b in batches]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


def test_group_by_length_is_reproducible_and_resumable():
    lengths = [(i * 37) % 50 + 1 for i in range(300)]
    a = [b.index.tolist() for b in _grouped_run(lengths, 7, seed=2)]
    assert a == [b.index.tolist() for b in _grouped_run(lengths, 7, seed=2)]
    assert a != [b.index.tolist() for b in _grouped_run(lengths, 7, seed=3)]
    assert [b.index.tolist() for b in _grouped_run(lengths, 7, seed=2, skip=10)] == a[10:]


def test_group_by_length_uses_the_longest_view_and_sorts_unshuffled_sets():
    a = _encoded([5, 30, 2, 9])
    b = _encoded([40, 3, 1, 9], base=7)
    batches = list(iterate_batches({"a": a, "b": b}, [0, 1, 0, 1], 2, [64], False, group_by_length=True))
    assert [x.index.tolist() for x in batches] == [[0, 1], [3, 2]]  # by max(5,40), max(30,3), 9, 2


def test_iterate_batches_pads_each_tokenizer_independently():
    a = _encoded([3, 4, 5, 6], pad_id=0)
    b = _encoded([30, 10, 50, 8], pad_id=1, base=5)
    (batch,) = iterate_batches({"a": a, "b": b}, [0, 1, 0, 1], 4, [16, 32, 64], shuffle=False)
    assert batch.inputs["a"]["input_ids"].shape == (4, 16)
    assert batch.inputs["b"]["input_ids"].shape == (4, 64)
    assert batch.inputs["b"]["attention_mask"].sum(1).tolist() == [30, 10, 50, 8]
    assert batch.inputs["b"]["input_ids"][1, 10:].eq(1).all()
    assert batch.inputs["a"]["input_ids"][0, 3:].eq(0).all()


def test_iterate_batches_with_real_encoding(tokenizer):
    ds = _ds(["the film is good", "bad", "the plot is very long and dull , not fun"],
             ["it was great", "fun", "no"])
    enc = encode(tokenizer, ds, max_length=16)
    (b,) = iterate_batches({tokenizer_key(tokenizer): enc}, [1, 0, 1], 4, length_buckets(16), False)
    x = b.inputs[tokenizer_key(tokenizer)]
    assert x["input_ids"].shape == (3, 16)
    assert x["attention_mask"][1].tolist() == [1] * 5 + [0] * 11
    assert x["token_type_ids"][1].tolist() == [0, 0, 0, 1, 1] + [0] * 11


def test_iterate_batches_argument_checks():
    enc = _encoded([3, 4])
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            list(iterate_batches({"t": enc}, [0, 1], bad, [16], False))
        with pytest.raises(ValueError, match="batch_size"):
            num_batches(2, bad)
    with pytest.raises(ValueError):
        list(iterate_batches({"t": enc}, [0, 1, 1], 2, [16], False))  # length mismatch
    with pytest.raises(ValueError):
        list(iterate_batches({"t": _encoded([20])}, [0], 2, [16], False))  # longer than buckets
    assert num_batches(0, 4) == 0 and num_batches(8, 4) == 2 and num_batches(9, 4) == 3
    assert list(iterate_batches({"t": Encoded([], [], 0)}, [], 4, [16], True)) == []


def test_batch_to_device():
    enc = _encoded([3, 4])
    (b,) = iterate_batches({"t": enc}, [0, 1], 2, [16], False)
    moved = b.to("cpu")
    assert torch.equal(moved.inputs["t"]["input_ids"], b.inputs["t"]["input_ids"])
    assert torch.equal(moved.labels, b.labels)


# --------------------------------------------------------------------------------------------------
# real data (skipped when the shared data is absent)
# --------------------------------------------------------------------------------------------------


@pytest.mark.shared("data/rotten_tomatoes/train.tsv", "data/rotten_tomatoes/dev.tsv", "models/minilm-l6-h384")
def test_rotten_tomatoes():
    from transformers import AutoTokenizer

    train_path = SHARED / "data" / "rotten_tomatoes" / "train.tsv"
    train = read_dataset(train_path)
    assert len(train) == 10201
    assert set(train.labels) == {"0", "1"}
    assert label_names_from(train.labels) == ["0", "1"]
    # texts with quote characters come through exactly as written in the file
    raw = train_path.read_text(encoding="utf-8").split("\n")
    quoted = [i for i, line in enumerate(raw[1:], start=2) if any(q in line for q in "\"“”'")]
    assert quoted
    for line_no in quoted[:50]:
        k = train.lines.index(line_no)
        assert train.text_a[k] == raw[line_no - 1].rsplit("\t", 1)[0]

    dev = read_dataset(SHARED / "data" / "rotten_tomatoes" / "dev.tsv")
    encode_labels(dev, label_names_from(train.labels))
    tok = AutoTokenizer.from_pretrained(str(SHARED / "models" / "minilm-l6-h384"))
    enc = assert_encoded_in_batches(tok, dev, max_length=128)
    assert max(len(x) for x in enc.input_ids) <= 128
    assert tokenizer_key(tok) == tokenizer_key(AutoTokenizer.from_pretrained(
        str(SHARED / "models" / "minilm-l6-h384")))
