"""Data from the Hugging Face ecosystem, built and saved locally (no network): parquet, save_to_disk
dirs, ClassLabel names, label -1, column overrides, and one-line errors."""

from __future__ import annotations

import sys

import pytest

from conftest import easy_rows, run_cli
from fastmt.data.dataset import Columns, DataError, read_dataset
from fastmt.data.sources import hub_name

datasets = pytest.importorskip("datasets")


def _dataset(n, seed, names=("bad", "good"), label_col="label", text_col="sentence"):
    rows = easy_rows(n, seed)
    feats = datasets.Features({text_col: datasets.Value("string"), label_col: datasets.ClassLabel(names=list(names)),
                               "idx": datasets.Value("int32")})
    return datasets.Dataset.from_dict({text_col: [r[0] for r in rows], label_col: [list(names).index(r[1]) for r in rows],
                                       "idx": list(range(n))}, features=feats)


def test_parquet_and_save_to_disk_keep_classlabel_names(tmp_path):
    # Class names in a non-alphabetical order: the dataset's order is kept, not re-sorted.
    ds = _dataset(20, 1, names=("good", "bad"))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "validation": _dataset(8, 2, names=("good", "bad"))}).save_to_disk(str(tmp_path / "dd"))
    for spec in (tmp_path / "train.parquet", tmp_path / "one", f"{tmp_path / 'dd'}:train"):
        got = read_dataset(spec)
        assert got.label_names == ["good", "bad"], spec
        assert got.labels == [r[1] for r in easy_rows(20, 1)] and got.text_a == [r[0] for r in easy_rows(20, 1)]
    assert len(read_dataset(f"{tmp_path / 'dd'}:validation")) == 8
    with pytest.raises(DataError, match="holds the splits train, validation"):
        read_dataset(tmp_path / "dd")
    with pytest.raises(DataError, match="no split 'test'"):
        read_dataset(f"{tmp_path / 'dd'}:test")


def test_minus_one_means_unlabelled_and_columns_can_be_named(tmp_path):
    test = _dataset(6, 3).map(lambda r: {"label": -1})
    test.save_to_disk(str(tmp_path / "test"))
    unlabelled = read_dataset(tmp_path / "test", require_labels=False)
    assert unlabelled.labels == [] and len(unlabelled) == 6
    with pytest.raises(DataError, match="label -1"):
        read_dataset(tmp_path / "test")
    odd = _dataset(10, 4, label_col="verdict", text_col="body")
    odd.save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(DataError, match="--text-column"):
        read_dataset(tmp_path / "odd")
    got = read_dataset(tmp_path / "odd", columns=Columns(text="body", label="verdict"))
    assert got.label_names == ["bad", "good"] and len(got.labels) == 10
    with pytest.raises(DataError, match="--label-column nope: no such column"):
        read_dataset(tmp_path / "odd", columns=Columns(text="body", label="nope"))


def test_hub_names_and_their_errors(monkeypatch):
    assert hub_name("glue/sst2") == ("glue", "sst2")
    assert hub_name("imdb") == ("imdb", "")
    assert hub_name("nyu-mll/glue/sst2") == ("nyu-mll/glue", "sst2")
    assert hub_name("stanfordnlp/imdb/") == ("stanfordnlp/imdb", "")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"cannot load 'no-such-dataset-fastmt' config 'x'"):
        read_dataset("no-such-dataset-fastmt/x:train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match="needs the datasets package"):
        read_dataset("glue/sst2:validation")


def test_cli_trains_and_evaluates_from_datasets_sources(tiny_encoders, tmp_path):
    _dataset(96, 1).to_parquet(str(tmp_path / "train.parquet"))
    datasets.DatasetDict({"validation": _dataset(32, 2)}).save_to_disk(str(tmp_path / "dd"))
    r = run_cli("cofinetune", "--teacher", tiny_encoders["a"], "--train", tmp_path / "train.parquet",
                "--dev", f"{tmp_path / 'dd'}:validation", "--out", tmp_path / "t", "--epochs", "1", "--max-length", "16",
                "--no-progress", "--batch-size", "32")
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", "--model", tmp_path / "t", "--data", f"{tmp_path / 'dd'}:validation")
    assert r.returncode == 0, r.stderr
    assert "n=32" in r.stdout
    r = run_cli("eval", "--model", tmp_path / "t", "--data", tmp_path / "missing.parquet")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no such file" in r.stderr
