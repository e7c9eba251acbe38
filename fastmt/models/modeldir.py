"""Model dirs on disk, read without building a model: which kind of run a dir holds, fastmt's own block
of its config.json, an encoder built from a config, and the one-line error for weights that do not fit.

``fastmt.models.hf`` (stock Hugging Face dirs) and ``fastmt.models.classifier`` (teachers and student) both read and
write through these; neither is imported here.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch.nn as nn
import transformers
from transformers import AutoConfig, AutoModel

from fastmt.engine.fileio import read_json, reading, recover
from fastmt.errors import UsageError

TEACHERS_KIND = "fastmt-teachers"
STUDENT_KIND = "fastmt-student"


def quiet_transformers() -> None:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*were not initialized.*")


def encoder_from_config(config_dict: dict) -> nn.Module:
    quiet_transformers()
    cfg = dict(config_dict)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)


def encoder_config_dict(encoder: nn.Module) -> dict:
    d = encoder.config.to_diff_dict()
    d["model_type"] = encoder.config.model_type
    for k in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"):
        d.pop(k, None)
    return d


@contextmanager
def fitting(path: Path, fix: str):
    """Tensors of ``path`` loaded into a model inside: a missing, extra or misshapen one is one line."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError) as e:
        lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
        detail = next((x for x in lines if not x.endswith(":")), lines[0] if lines else type(e).__name__)
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        if path.name == "config.json":
            raise UsageError(f"{path} lacks or misstates a setting the model needs ({detail}); {fix}") from e
        raise UsageError(f"{path} does not fit the model its config.json describes ({detail}); {fix}") from e


def recover_dir(d: Path) -> None:
    try:
        recover(d)  # finish (or drop) a save that was killed half-way
    except OSError:
        pass  # a read-only dir: read what is there


def fastmt_block(cfg) -> dict | None:
    """fastmt's own settings in a config.json: the whole file (a teachers dir, an older student dir)
    or its ``fastmt`` entry (a student dir, which is also a Hugging Face model dir)."""
    if not isinstance(cfg, dict):
        return None
    if cfg.get("kind"):
        return cfg
    block = cfg.get("fastmt")
    return block if isinstance(block, dict) and block.get("kind") else None


def read_run_kind(d: str | Path, strict: bool = False) -> str | None:
    """The ``kind`` of a run dir's config.json; None when there is none. With ``strict``, a
    config.json that exists but cannot be read is one line naming it."""
    if Path(d).is_dir():
        recover_dir(Path(d))
    path = Path(d) / "config.json"
    try:
        cfg = read_json(path)
    except (OSError, ValueError):
        if strict and path.is_file():
            with reading(path, "write the dir again with `fastmt cofinetune` or `fastmt distill`, or restore it from a copy"):
                read_json(path)
        return None
    block = fastmt_block(cfg)
    return block.get("kind") if block else None
