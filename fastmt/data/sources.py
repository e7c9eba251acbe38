"""Data from the Hugging Face ecosystem: parquet files, ``save_to_disk`` dirs and hub names.

``read_source(spec)`` returns ``(name, columns, rows, class_names)`` for ``fastmt.data.dataset`` to check and
turn into a ``TextDataset``: rows are dicts, ``class_names`` maps a ClassLabel column to its names.

- ``F.parquet``: read with pyarrow; class names come from the ``huggingface`` schema metadata that
  ``datasets`` writes (``Dataset.to_parquet``), when present.
- ``DIR`` or ``DIR:SPLIT``: a ``save_to_disk`` dir (a ``Dataset``, or a ``DatasetDict`` and one split).
- ``NAME[/CONFIG][:SPLIT]``: ``datasets.load_dataset(NAME, CONFIG, split=SPLIT)`` (the hub, or its
  local cache when offline).

Everything here needs the optional ``datasets`` package (``pip install fastmt[datasets]``); without it,
or without the network for a hub name that is not cached, the error is one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastmt.errors import data_error


def _need_datasets(spec: str):
    try:  # optional dependency: fastmt[datasets]
        import datasets
    except ImportError:
        raise data_error(spec, None, "reading parquet files, datasets dirs and hub names needs the datasets package",
                     "pip install datasets (or fastmt[datasets]), or give a .tsv/.csv/.jsonl file") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _class_names(features) -> dict[str, list[str]]:
    from datasets import ClassLabel  # optional dependency: fastmt[datasets]

    return {k: list(v.names) for k, v in features.items() if isinstance(v, ClassLabel)}


def _from_dataset(spec: str, ds) -> tuple[str, list[str], list[dict], dict[str, list[str]]]:
    return spec, list(ds.column_names), ds.to_list(), _class_names(ds.features)


def _pick_split(spec: str, dd, split: str | None):
    splits = list(dd.keys())
    if split is None:
        if len(splits) == 1:
            return dd[splits[0]]
        raise data_error(spec, None, f"holds the splits {', '.join(splits)}", f"add one, e.g. {spec}:{splits[0]}")
    if split not in dd:
        raise data_error(spec, None, f"no split '{split}'; the splits are {', '.join(splits)}", "pick one of them")
    return dd[split]


def _read_parquet(spec: str):
    _need_datasets(spec)
    import pyarrow.parquet as pq  # optional dependency: fastmt[datasets]

    try:
        table = pq.read_table(spec)
    except (OSError, ValueError) as e:
        raise data_error(spec, None, f"not a readable parquet file ({str(e).splitlines()[0][:120]})",
                     "check the file; it may be truncated") from None
    names: dict[str, list[str]] = {}
    meta = (table.schema.metadata or {}).get(b"huggingface")
    if meta:
        try:
            feats = json.loads(meta).get("info", {}).get("features", {})
            names = {k: list(v["names"]) for k, v in feats.items()
                     if isinstance(v, dict) and v.get("_type") == "ClassLabel" and "names" in v}
        except (ValueError, AttributeError, TypeError, KeyError):
            names = {}
    return spec, list(table.column_names), table.to_pylist(), names


def hub_name(base: str) -> tuple[str, str]:
    """``glue/sst2`` -> (glue, sst2); ``org/name/config`` -> (org/name, config); ``org/name/`` -> (org/name, "");
    a name without a slash has no config."""
    parts = base.split("/")
    if len(parts) == 1:
        return base, ""
    if len(parts) == 2:
        return parts[0], parts[1]
    return "/".join(parts[:-1]), parts[-1]


def read_source(spec: str) -> tuple[str, list[str], list[dict], dict[str, list[str]]]:
    p = Path(spec)
    if p.suffix.lower() == ".parquet":
        if not p.is_file():
            raise data_error(spec, None, "no such file", "check the path")
        return _read_parquet(spec)
    base, _, split = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not base:
        base, split = spec, ""
    if Path(base).is_dir():
        datasets = _need_datasets(spec)
        try:
            loaded = datasets.load_from_disk(base)
        except (FileNotFoundError, ValueError) as e:
            raise data_error(spec, None, "is a directory but not one written by datasets' save_to_disk "
                                     f"({str(e).splitlines()[0][:120]})", "give a data file, or a save_to_disk dir") from None
        ds = _pick_split(spec, loaded, split or None) if isinstance(loaded, datasets.DatasetDict) else loaded
        return _from_dataset(spec, ds)
    datasets = _need_datasets(spec)
    name, config = hub_name(base)
    try:
        loaded = datasets.load_dataset(name, config or None, split=split or None)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; each becomes one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise data_error(spec, None, f"cannot load '{name}'" + (f" config '{config}'" if config else "")
                     + f" with datasets.load_dataset ({first})",
                     "check the name and split; the hub needs the network unless the dataset is cached") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(spec, loaded, None)
    return _from_dataset(spec, loaded)
