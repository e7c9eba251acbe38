"""Small-budget check of co-finetuning: are the co-finetuned teachers at least as accurate as each
encoder fine-tuned alone the usual way, and does the distilled student beat a given bar?

    python benches/small_budget.py --teacher M1 --teacher M2 --train train.tsv --dev dev.tsv \\
        [--rows 2000] [--seeds 1,2,3] [--pooling mean] [--out row.json]

Per seed, each in a process or loop of its own, on the same rows (one epoch, max length 48, batch 32):
- alone: each encoder fine-tuned by itself the usual way for sentence-transformers checkpoints
  (masked mean pooling, one linear layer, plain AdamW at --lr, linear warm-up/decay), in plain torch;
- fastmt cofinetune of all encoders through the shared head (``--pooling``, ``--head-lr`` auto);
- fastmt distill of a ``--student-layers`` student from those teachers (its defaults).
Writes one JSON row with every dev accuracy and the means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from peer_textbrewer import rows_file  # noqa: E402
from fastmt.engine.fileio import write_json  # noqa: E402


def alone(model_dir: str, train: str, dev: str, seed: int, lr: float, max_length: int, batch_size: int) -> float:
    """Dev accuracy of one encoder + masked mean pooling + a linear layer, fine-tuned for one epoch."""
    import torch

    from fastmt.data.dataset import encode, encode_labels, iterate_batches, label_names_from, read_dataset
    from fastmt.models.classifier import load_encoder, load_tokenizer

    torch.manual_seed(seed)
    enc, tok = load_encoder(model_dir), load_tokenizer(model_dir)
    tr, dv = read_dataset(train), read_dataset(dev)
    names = label_names_from(tr.labels)
    head = torch.nn.Linear(enc.config.hidden_size, len(names))
    model = torch.nn.ModuleDict({"enc": enc, "head": head})
    steps = math.ceil(len(tr) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, int(0.1 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    widths = list(range(1, max_length + 1))

    def logits(inputs):
        h = enc(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        m = inputs["attention_mask"].unsqueeze(-1).float()
        return head((h * m).sum(1) / m.sum(1).clamp_min(1.0))

    e_tr, e_dv = encode(tok, tr, max_length), encode(tok, dv, max_length)
    y_tr, y_dv = encode_labels(tr, names), encode_labels(dv, names)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for b in iterate_batches({"k": e_tr}, y_tr, batch_size, widths, True, gen):
        loss = torch.nn.functional.cross_entropy(logits(b.inputs["k"]), b.labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    right = 0
    with torch.inference_mode():
        for b in iterate_batches({"k": e_dv}, y_dv, 128, widths, False, group_by_length=True):
            right += int((logits(b.inputs["k"]).argmax(-1) == b.labels).sum())
    return right / len(dv)


def fastmt(args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "fastmt", *args, "--no-progress"], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"fastmt {args[0]} failed:\n{r.stderr[-2000:]}")


def _best(run_dir: Path, key: str) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["event"] == "eval"]
    best = max(evals, key=lambda r: r["dev_accuracy"])
    return {k: v for k, v in best.items() if k.startswith(key)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", action="append", required=True, help="an encoder dir (repeat)")
    p.add_argument("--train", required=True)
    p.add_argument("--dev", required=True)
    p.add_argument("--rows", type=int, default=2000, help="use the first N training rows")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--pooling", default="mean", choices=["cls", "mean", "auto"])
    p.add_argument("--lr", type=float, default=5e-5, help="encoders' learning rate (alone and co-finetuned)")
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--student-lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None, help="JSON row to write (default: print only)")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    runs = []
    common = ["--epochs", "1", "--max-length", str(a.max_length), "--batch-size", str(a.batch_size)]
    with tempfile.TemporaryDirectory(prefix="fastmt-small-") as d:
        tmp = Path(d)
        train = rows_file(a.train, a.rows, tmp)
        for seed in seeds:
            t0 = time.perf_counter()
            row = {"seed": seed, "alone": [alone(t, train, a.dev, seed, a.lr, a.max_length, a.batch_size) for t in a.teacher]}
            teachers = tmp / f"teachers-{seed}"
            fastmt(["cofinetune", *[x for t in a.teacher for x in ("--teacher", t)], "--train", train, "--dev", a.dev,
                    "--out", str(teachers), "--lr", str(a.lr), "--pooling", a.pooling, "--seed", str(seed), *common])
            best = _best(teachers, "dev_accuracy")
            row["cofinetuned"] = [best[f"dev_accuracy_{i}"] for i in range(len(a.teacher))]
            row["ensemble"] = best["dev_accuracy"]
            student = tmp / f"student-{seed}"
            fastmt(["distill", "--teachers", str(teachers), "--student-layers", str(a.student_layers), "--train", train,
                    "--dev", a.dev, "--out", str(student), "--lr", str(a.student_lr), "--seed", str(seed), *common])
            row["student"] = _best(student, "dev_accuracy")["dev_accuracy"]
            row["seconds"] = time.perf_counter() - t0
            runs.append(row)
            print(json.dumps(row), flush=True)
    mean = lambda xs: statistics.mean(xs)  # noqa: E731
    out = {"teachers": a.teacher, "rows": a.rows, "seeds": seeds, "pooling": a.pooling, "lr": a.lr,
           "student_lr": a.student_lr, "max_length": a.max_length, "batch_size": a.batch_size, "runs": runs,
           "mean": {"alone": [mean([r["alone"][i] for r in runs]) for i in range(len(a.teacher))],
                    "cofinetuned": [mean([r["cofinetuned"][i] for r in runs]) for i in range(len(a.teacher))],
                    "ensemble": mean([r["ensemble"] for r in runs]), "student": mean([r["student"] for r in runs])}}
    print(json.dumps(out["mean"]))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
