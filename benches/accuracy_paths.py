"""Does the default (fast) path keep accuracy? ``fastmt distill`` with its defaults against the fp32
reference path, on the same data, teachers and seeds.

    python benches/accuracy_paths.py --teachers runs/t --train train.tsv --dev dev.tsv \\
        [--rows 4000] [--epochs 1] [--seeds 1,2,3] [--out row.json]

For every seed both commands run in turn, each in its own process: the defaults (the path printed
by fastmt, whatever this machine makes of ``auto``) and ``--precision fp32 --no-compile --kernels
reference --no-stack-teachers --cache-teachers off --no-group-by-length``. Writes one JSON row: each
run's best dev accuracy, samples/s and path, the two means and their difference in points.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ["--precision", "fp32", "--no-compile", "--kernels", "reference", "--no-stack-teachers",
             "--cache-teachers", "off", "--no-group-by-length"]


def _rows_file(train: str, rows: int | None, tmp: Path) -> str:
    if not rows:
        return train
    lines = Path(train).read_text().splitlines()
    out = tmp / ("train-%d%s" % (rows, Path(train).suffix))
    out.write_text("\n".join(lines[: rows + 1]) + "\n")  # header + rows
    return str(out)


def run(a, train: str, out: Path, seed: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fastmt", "distill", "--teachers", a.teachers, "--student-layers", str(a.student_layers),
           "--train", train, "--dev", a.dev, "--out", str(out), "--epochs", str(a.epochs), "--batch-size",
           str(a.batch_size), "--max-length", str(a.max_length), "--lr", str(a.lr), "--seed", str(seed),
           "--no-progress", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if a.cache_dir:
        env["FASTMT_CACHE"] = a.cache_dir
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"fastmt distill failed:\n{r.stderr[-2000:]}")
    done = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"done"' in x][-1]
    path = next((ln.split("path: ", 1)[1] for ln in r.stderr.splitlines() if "distill path:" in ln), "reference")
    return {"seed": seed, "dev_accuracy": done["best_dev_accuracy"], "wall_s": wall, "train_s": done["train_s"],
            "path": path}


def _teachers_info(d: str) -> dict:
    """What the teachers are and how they were trained (from their run config)."""
    cfg = json.loads((Path(d) / "config.json").read_text())
    run = cfg.get("run", {})
    return {"names": [t["name"] for t in cfg["teachers"]],
            **{k: run.get(k) for k in ("train", "epochs", "precision", "max_length", "seed")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--dev", required=True)
    p.add_argument("--rows", type=int, default=None, help="use the first N training rows")
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--cache-dir", default=None, help="FASTMT_CACHE for the default runs' teacher cache")
    p.add_argument("--out", default=None, help="JSON row to write (default: print only)")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    runs = {"default": [], "reference": []}
    with tempfile.TemporaryDirectory(prefix="fastmt-acc-") as d:
        tmp = Path(d)
        train = _rows_file(a.train, a.rows, tmp)
        n = len(Path(train).read_text().splitlines()) - 1
        for seed in seeds:
            for name, extra in (("default", []), ("reference", REFERENCE)):
                r = run(a, train, tmp / f"{name}-{seed}", seed, extra)
                r["samples_per_s"] = n * a.epochs / r["wall_s"]
                runs[name].append(r)
                print(f"seed {seed} {name}: dev accuracy {r['dev_accuracy']:.4f}, {r['wall_s']:.1f} s "
                      f"({r['samples_per_s']:.1f} samples/s)", flush=True)
    mean = {k: statistics.mean(r["dev_accuracy"] for r in v) for k, v in runs.items()}
    speed = {k: statistics.mean(r["samples_per_s"] for r in v) for k, v in runs.items()}
    row = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "rows": n,
           "epochs": a.epochs, "batch_size": a.batch_size, "max_length": a.max_length,
           "student_layers": a.student_layers, "teachers": _teachers_info(a.teachers), "seeds": seeds, "runs": runs,
           "mean_dev_accuracy": mean, "difference_points": 100 * (mean["default"] - mean["reference"]),
           "mean_samples_per_s": speed, "speedup": speed["default"] / speed["reference"]}
    print(f"mean dev accuracy: default {mean['default']:.4f}, reference {mean['reference']:.4f} "
          f"({row['difference_points']:+.2f} points); default {row['speedup']:.2f}x the reference's samples/s")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
