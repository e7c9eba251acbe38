"""fastmt distill against TextBrewer's MultiTeacherDistiller on the same job, side by side.

    pip install textbrewer            # a peer to measure against, not a dependency of fastmt
    python benches/peer_textbrewer.py --teachers runs/t --train train.tsv --dev dev.tsv [--rows 2000]

Same co-finetuned teachers (a fastmt teachers dir), same student (fastmt's ``teacher:0`` init with
``--student-layers`` layers), same rows, max length, batch size, epochs and learning rate. fastmt
runs as a user would: the ``fastmt distill`` command with its defaults (fast by default: the path it
picks is printed). TextBrewer runs its ``MultiTeacherDistiller`` (averaged teacher logits, KD plus
the hard-label loss, AdamW with linear warm-up) on shuffled batches padded to their longest
example's bucket, as a data loader with dynamic padding gives them. Each side runs in a process of
its own, started and timed the same way: the whole job (interpreter start, imports, loading,
tokenizing, training, one dev evaluation per epoch, saving) and training alone. Note that fastmt's
default objective also has the hidden-state loss, which TextBrewer's multi-teacher distiller does
not support: fastmt does more work per step.

Writes one JSON row (``--out``) with both sides' samples/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fastmt.engine.fileio import write_json  # noqa: E402 - the checkout's fastmt


def rows_file(train: str, rows: int | None, tmp: Path) -> str:
    """The first ``rows`` examples of ``train`` (header kept) as a file in ``tmp``; ``train`` itself if no ``rows``."""
    if not rows:
        return train
    lines = Path(train).read_text().splitlines()
    out = tmp / ("train-%d%s" % (rows, Path(train).suffix))
    out.write_text("\n".join(lines[: rows + 1]) + "\n")  # header + rows
    return str(out)


def add_job_args(p: argparse.ArgumentParser) -> None:
    """The job both sides run (also used by benches/accuracy_paths.py)."""
    p.add_argument("--teachers", required=True, help="a fastmt teachers dir")
    p.add_argument("--train", required=True)
    p.add_argument("--dev", required=True)
    p.add_argument("--rows", type=int, default=None, help="use the first N training rows")
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--lr", type=float, default=5e-5)


def run_distill(a, train: str, out: Path, extra: list[str] = (), seed: int | None = None, env: dict | None = None) -> dict:
    """``fastmt distill`` on the job, in a process of its own: wall time, training time, best dev accuracy, path."""
    cmd = [sys.executable, "-m", "fastmt", "distill", "--teachers", a.teachers, "--student-layers", str(a.student_layers),
           "--train", train, "--dev", a.dev, "--out", str(out), "--epochs", str(a.epochs), "--batch-size",
           str(a.batch_size), "--max-length", str(a.max_length), "--lr", str(a.lr), "--no-progress",
           *(["--seed", str(seed)] if seed is not None else []), *extra]
    env = dict(os.environ, **(env or {}), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"fastmt distill failed:\n{r.stderr[-2000:]}")
    done = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"done"' in x][-1]
    path = next((ln.split("path: ", 1)[1] for ln in r.stderr.splitlines() if "distill path:" in ln), "")
    return {"wall_s": wall, "train_s": done["train_s"], "dev_accuracy": done["best_dev_accuracy"], "path": path,
            "command": " ".join(cmd[1:])}


def run_fastmt(a, train: str, tmp: Path) -> dict:
    return run_distill(a, train, tmp / "fastmt-student")


def run_textbrewer(a, train: str, tmp: Path) -> dict:
    """TextBrewer's side in a fresh process (so that its imports count, as fastmt's do)."""
    row = tmp / "textbrewer.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "textbrewer", "--side-train", train,
           "--side-tmp", str(tmp), "--out", str(row)] + [x for k, v in vars(a).items()
                                                        if k not in ("out", "rows", "side", "side_train", "side_tmp")
                                                        and v is not None for x in ("--" + k.replace("_", "-"), str(v))]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"TextBrewer side failed:\n{r.stderr[-2000:]}")
    return {**json.loads(row.read_text()), "wall_s": wall}


def textbrewer_side(a, train: str, tmp: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from textbrewer import DistillationConfig, MultiTeacherDistiller, TrainingConfig
    from transformers import get_linear_schedule_with_warmup

    from fastmt.data.dataset import iterate_batches
    from fastmt.models.classifier import StudentSpec, Teachers, build_student
    from fastmt.models.inference import student_logits
    from fastmt.engine.checkpoint import seed_everything
    from fastmt.tasks.classification.common import prepare_splits
    from fastmt.tasks.classification.evaluate import accuracy

    torch.manual_seed(a.seed)
    teachers, tcfg = Teachers.load(a.teachers)
    teachers.eval().requires_grad_(False)
    seed_everything(a.seed)
    student, _ = build_student(StudentSpec(a.student_layers, "teacher:0"), teachers)
    key = student.key
    if any(k != key for k in teachers.keys):
        raise SystemExit("the teachers tokenize differently from the student: give teachers that share a tokenizer")
    splits = prepare_splits(train, a.dev, [student.tokenizer], a.max_length, list(tcfg["label_names"]))

    class TeacherLogits(torch.nn.Module):
        def __init__(self, i):
            super().__init__()
            self.i = i

        def forward(self, input_ids, attention_mask, token_type_ids, labels=None):
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return {"logits": teachers.forward_teacher(self.i, inputs)[0]}

    class StudentLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.student = student

        def forward(self, input_ids, attention_mask, token_type_ids, labels=None):
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return {"logits": self.student(inputs, want_hidden=False)[0]}

    def adaptor_t(batch, out):
        return {"logits": out["logits"]}

    def adaptor_s(batch, out):
        return {"logits": out["logits"], "losses": [F.cross_entropy(out["logits"], batch["labels"])]}

    gen = torch.Generator().manual_seed(a.seed)

    class Batches:
        def __len__(self):
            return (len(splits.train_labels) + a.batch_size - 1) // a.batch_size

        def __iter__(self):
            for b in iterate_batches({key: splits.train_enc[key]}, splits.train_labels, a.batch_size, splits.buckets,
                                     True, gen):
                yield {**b.inputs[key], "labels": b.labels}

    model_s = StudentLogits()
    steps = len(Batches()) * a.epochs
    opt = torch.optim.AdamW([p for p in model_s.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.01)
    distiller = MultiTeacherDistiller(
        TrainingConfig(device="cpu", output_dir=str(tmp / "tb-out"), log_dir=str(tmp / "tb-log")),
        DistillationConfig(temperature=1.0, kd_loss_type="ce", kd_loss_weight=1.0, hard_label_weight=1.0),
        [TeacherLogits(i) for i in range(len(teachers))], model_s, adaptor_t, adaptor_s)
    accs, eval_s = [], [0.0]

    def evaluate(model, step):  # the dev evaluation fastmt runs after every epoch, timed apart
        t = time.perf_counter()
        logits = student_logits(student, splits.dev_enc, len(splits.dev_labels), 128, splits.buckets,
                                torch.device("cpu"))
        accs.append(accuracy(logits, splits.dev_labels))
        model.train()
        eval_s[0] += time.perf_counter() - t

    t_train = time.perf_counter()
    distiller.train(opt, Batches(), num_epochs=a.epochs, scheduler_class=get_linear_schedule_with_warmup,
                    scheduler_args={"num_warmup_steps": int(0.1 * steps), "num_training_steps": steps},
                    max_grad_norm=1.0, callback=evaluate)
    end = time.perf_counter()
    return {"train_s": end - t_train - eval_s[0], "dev_accuracy": max(accs) if accs else None,
            "note": "training time excludes the dev evaluation, includes TextBrewer's own per-epoch checkpoint"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_args(p)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None, help="JSON row to write (default: print only)")
    p.add_argument("--side", choices=["textbrewer"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--side-train", default=None, help=argparse.SUPPRESS)
    p.add_argument("--side-tmp", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side == "textbrewer":
        Path(a.out).write_text(json.dumps(textbrewer_side(a, a.side_train, Path(a.side_tmp))))
        return 0
    with tempfile.TemporaryDirectory(prefix="fastmt-peer-") as d:
        tmp = Path(d)
        train = rows_file(a.train, a.rows, tmp)
        n = len(Path(train).read_text().splitlines()) - 1
        fm = run_fastmt(a, train, tmp)
        print(f"fastmt distill: {fm['wall_s']:.1f} s whole job, {fm['train_s']:.1f} s training ({fm['path']})", flush=True)
        tb = run_textbrewer(a, train, tmp)
        print(f"TextBrewer MultiTeacherDistiller: {tb['wall_s']:.1f} s whole job, {tb['train_s']:.1f} s training", flush=True)
    samples = n * a.epochs
    row = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "rows": n,
           "epochs": a.epochs, "batch_size": a.batch_size, "max_length": a.max_length, "student_layers": a.student_layers,
           "fastmt": {**fm, "samples_per_s": samples / fm["wall_s"], "train_samples_per_s": samples / fm["train_s"]},
           "textbrewer": {**tb, "samples_per_s": samples / tb["wall_s"], "train_samples_per_s": samples / tb["train_s"]}}
    row["ratio_whole_job"] = row["fastmt"]["samples_per_s"] / row["textbrewer"]["samples_per_s"]
    row["ratio_training"] = row["fastmt"]["train_samples_per_s"] / row["textbrewer"]["train_samples_per_s"]
    print(f"fastmt / TextBrewer samples/s: whole job {row['ratio_whole_job']:.2f}x, training {row['ratio_training']:.2f}x")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(a.out, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
