"""``fastmt export``: rewrite a student or teachers dir in today's layout (Hugging Face loadable).

    fastmt export --model runs/student [--out runs/student-hf]

Without ``--out`` the dir is rewritten in place, as one unit (a kill leaves the old files or the new
ones). A student dir becomes a stock ``*ForSequenceClassification`` dir with fastmt's extras beside
it; each ``teacher_i/`` of a teachers dir becomes one with the shared head folded in (``fastmt.models.hf``).
Where no stock class computes the head (mean pooling, a wide adapter, another architecture), the dir
gets the remote-code form instead (``trust_remote_code=True``). ``--format onnx``: ``fastmt.serve.onnx``.
metrics.jsonl is copied along to ``--out``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fastmt.errors import UsageError
from fastmt.models.classifier import Student, Teachers
from fastmt.models.hf import is_code_dir
from fastmt.models.modeldir import STUDENT_KIND, TEACHERS_KIND, read_run_kind

STUDENT_KEYS = {"kind", "encoder", "num_labels", "num_teachers", "teacher_hidden", "label_names", "run", "model_type"}


def run_dir_kind(model_dir: str) -> tuple[Path, str]:
    """``(dir, kind)`` of a student or teachers dir named by ``--model``, or one line saying what it is not."""
    src = Path(model_dir)
    kind = read_run_kind(src, strict=True)
    if kind not in (STUDENT_KIND, TEACHERS_KIND):
        if not src.is_dir():
            raise UsageError(f"--model {model_dir}: no such directory")
        raise UsageError(f"--model {model_dir}: not a fastmt student or teachers dir")
    return src, kind


def export_dir(model_dir: str, out: str | None = None) -> dict:
    src, kind = run_dir_kind(model_dir)
    dst = Path(out) if out else src
    if dst != src:
        if dst.exists() and any(dst.iterdir()):
            raise UsageError(f"--out {out}: exists and is not empty; give a new dir")
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():  # the logs and anything else the save below does not write
            if f.is_file() and f.name in ("metrics.jsonl",):
                shutil.copy2(f, dst / f.name)
    if kind == STUDENT_KIND:
        student, cfg = Student.load(src, "--model")
        extra = {k: v for k, v in cfg.items() if k not in STUDENT_KEYS}
        student.save(dst, cfg.get("run", {}), list(cfg["label_names"]), extra)
    else:
        teachers, cfg = Teachers.load(src, "--model")
        teachers.save(dst, cfg.get("run", {}), list(cfg["label_names"]))
    stock = not any(is_code_dir(d) for d in [dst, *sorted(dst.glob("teacher_*"))] if d.is_dir())
    return {"kind": "student" if kind == STUDENT_KIND else "teachers", "out": str(dst), "stock": stock}
