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
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_textbrewer import add_job_args, rows_file, run_distill  # noqa: E402 - the same job and runner
from fastmt.engine.fileio import write_json  # noqa: E402

REFERENCE = ["--precision", "fp32", "--no-compile", "--kernels", "reference", "--no-stack-teachers",
             "--cache-teachers", "off", "--no-group-by-length"]


def _teachers_info(d: str) -> dict:
    """What the teachers are and how they were trained (from their run config)."""
    cfg = json.loads((Path(d) / "config.json").read_text())
    run = cfg.get("run", {})
    return {"names": [t["name"] for t in cfg["teachers"]],
            **{k: run.get(k) for k in ("train", "epochs", "precision", "max_length", "seed")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_args(p)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--cache-dir", default=None, help="FASTMT_CACHE for the default runs' teacher cache")
    p.add_argument("--out", default=None, help="JSON row to write (default: print only)")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    runs = {"default": [], "reference": []}
    with tempfile.TemporaryDirectory(prefix="fastmt-acc-") as d:
        tmp = Path(d)
        train = rows_file(a.train, a.rows, tmp)
        n = len(Path(train).read_text().splitlines()) - 1
        for seed in seeds:
            for name, extra in (("default", []), ("reference", REFERENCE)):
                r = run_distill(a, train, tmp / f"{name}-{seed}", extra, seed,
                                {"FASTMT_CACHE": a.cache_dir} if a.cache_dir else None)
                r["seed"] = seed
                r["path"] = r["path"] or "reference"
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
        write_json(a.out, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
