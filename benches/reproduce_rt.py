"""MT-BERT vs. single-teacher KD vs. a student alone, on rotten_tomatoes with two MiniLM teachers.

    python benches/reproduce_rt.py                 # run what is missing, then write the report
    python benches/reproduce_rt.py --report-only   # table + chart from the results file

Every run is the real ``fastmt`` CLI in a subprocess. Finished runs are recorded in the results
file (``benches/results/rt_reproduction.json``) as they end, so a stopped script resumes where it
stopped; run dirs live under ``--work`` (git-ignored ``runs/rt`` by default).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastmt.io import atomic_write_text  # noqa: E402

VARIANTS = [
    # (variant, what, default seeds)
    ("teacher_l6", "MiniLM-L6 fine-tuned alone (its own head)", "teacher"),
    ("teacher_l3", "MiniLM-L3 fine-tuned alone (its own head)", "teacher"),
    ("cofinetuned_l6", "L6 after co-finetuning with the shared head", "teacher"),
    ("cofinetuned_l3", "L3 after co-finetuning with the shared head", "teacher"),
    ("cofinetuned_ensemble", "the two co-finetuned teachers, logits averaged", "teacher"),
    ("student_alone", "3-layer student, labels only", "student"),
    ("kd_l6", "student distilled from co-finetuned L6 alone", "student"),
    ("kd_l3", "student distilled from co-finetuned L3 alone", "student"),
    ("mtbert", "student distilled from both (paper weighting)", "student"),
    ("mtbert_no_hidden", "MT-BERT without the hidden loss", "ablation"),
    ("mtbert_no_kd", "MT-BERT without the distillation loss", "ablation"),
    ("mtbert_uniform", "MT-BERT with uniform teacher weights", "ablation"),
]
STUDENT_FLAGS = {
    "student_alone": ["--alpha-kd", "0", "--hidden-loss", "none"],
    "kd_l6": ["--teacher-subset", "0"],
    "kd_l3": ["--teacher-subset", "1"],
    "mtbert": [],
    "mtbert_no_hidden": ["--hidden-loss", "none"],
    "mtbert_no_kd": ["--alpha-kd", "0"],
    "mtbert_uniform": ["--weighting", "uniform"],
}


def machine() -> str:
    import torch

    from fastmt.bench import device_name

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return f"{device_name(dev)}, torch {torch.__version__}"


class Results:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"rows": []}
        self.data.setdefault("rows", [])
        self.data.setdefault("commands", [])

    def row(self, variant: str) -> dict:
        for r in self.data["rows"]:
            if r["variant"] == variant:
                return r
        r = {"variant": variant, "seeds": [], "dev_acc": [], "train_s": []}
        self.data["rows"].append(r)
        self.data["rows"].sort(key=lambda r: [v for v, _, _ in VARIANTS].index(r["variant"]))
        return r

    def has(self, variant: str, seed: int) -> bool:
        return any(r["variant"] == variant and seed in r["seeds"] for r in self.data["rows"])

    def add(self, variant: str, seed: int, acc: float, train_s: float, cmd: list[str], meta: dict) -> None:
        r = self.row(variant)
        r["seeds"].append(seed)
        r["dev_acc"].append(round(acc, 6))
        r["train_s"].append(round(train_s, 1))
        line = " ".join(shlex.quote(c) for c in cmd)
        if line not in self.data["commands"]:
            self.data["commands"].append(line)
        self.data.update(meta)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n")


def read_metrics(run_dir: Path) -> tuple[dict, list[dict]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    done = [r for r in rows if r["event"] == "done"]
    if not done:
        raise RuntimeError(f"{run_dir}: no 'done' row in metrics.jsonl")
    evals = [r for r in rows if r["event"] == "eval"]
    best = [r for r in evals if r["epoch"] == done[-1]["best_epoch"]][-1]
    return done[-1], best


def fastmt(args: list[str], log_path: Path) -> None:
    cmd = [sys.executable, "-m", "fastmt", *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"fastmt {' '.join(args[:1])} failed (exit {proc.returncode}); see {log_path}:\n  " + "\n  ".join(tail))


def display(cmd: list[str], shared: Path, work: Path) -> list[str]:
    """The command as a user would type it, with the shared and work dirs written symbolically."""
    out = []
    for c in cmd:
        c = c.replace(str(shared), "$SHARED").replace(str(work), "$WORK")
        out.append(c)
    return ["fastmt", *out]


def run_all(a) -> None:
    shared, work = Path(a.shared).resolve(), Path(a.work).resolve()
    data, models = shared / "data" / "rotten_tomatoes", shared / "models"
    for p in (data / "train.tsv", data / "dev.tsv", models / "minilm-l6-h384", models / "minilm-l3-h384"):
        if not p.exists():
            raise SystemExit(f"--shared {a.shared}: {p} not found")
    res = Results(Path(a.results))
    from fastmt.bench import git_sha

    meta = {"machine": machine(), "git_sha": git_sha(),
            "settings": {"epochs_teachers": a.teacher_epochs, "epochs_students": a.student_epochs, "batch_size": a.batch_size,
                         "max_length": a.max_length, "precision": a.precision, "lr_teachers": a.teacher_lr,
                         "lr_students": a.student_lr, "student_layers": 3, "student_init": "teacher:0"}}
    old = res.data.get("settings")
    if old and old != meta["settings"] and res.data["rows"]:
        raise SystemExit(f"{a.results} holds runs made with other settings ({old}); pass another --results or the same flags")
    common = ["--train", str(data / "train.tsv"), "--dev", str(data / "dev.tsv"), "--batch-size", str(a.batch_size),
              "--max-length", str(a.max_length), "--precision", a.precision, "--no-progress", "--overwrite"]
    only = set(a.only.split(",")) if a.only else None
    seeds = [int(s) for s in a.seeds.split(",")]
    jobs: list[tuple[str, int]] = []
    for variant, _, kind in VARIANTS:
        if only and variant not in only:
            continue
        for seed in (seeds if kind == "student" else seeds[:1]):
            if not res.has(variant, seed):
                jobs.append((variant, seed))
    if not jobs:
        print("every run is in", a.results)
        return
    print(f"{len(jobs)} runs to go: " + ", ".join(f"{v}/{s}" for v, s in jobs), flush=True)
    teachers_dir = work / "cofinetuned"
    t_start = time.time()

    def teacher_run(name: str, sources: list[str], seed: int) -> tuple[Path, list[str], float]:
        out = work / name
        cmd = ["cofinetune", *[x for s in sources for x in ("--teacher", str(models / s))], *common, "--out", str(out),
               "--epochs", str(a.teacher_epochs), "--lr", str(a.teacher_lr), "--seed", str(seed)]
        t0 = time.time()
        fastmt(cmd, work / "logs" / f"{name}.log")
        return out, cmd, time.time() - t0

    def ensure_cofinetuned() -> None:
        if (teachers_dir / "config.json").exists() and (teachers_dir / "model.safetensors").exists():
            return
        print("  cofinetune (teachers for the students)", flush=True)
        out, cmd, _ = teacher_run("cofinetuned", ["minilm-l6-h384", "minilm-l3-h384"], seeds[0])
        done, best = read_metrics(out)
        for variant, key in (("cofinetuned_l6", "dev_accuracy_0"), ("cofinetuned_l3", "dev_accuracy_1"), ("cofinetuned_ensemble", "dev_accuracy")):
            if not res.has(variant, seeds[0]):
                res.add(variant, seeds[0], best[key], done["train_s"], display(cmd, shared, work), meta)

    for n, (variant, seed) in enumerate(jobs, 1):
        if res.has(variant, seed):  # written by an earlier job of this loop (the co-finetuning rows)
            continue
        print(f"[{n}/{len(jobs)}] {variant} seed {seed}  ({(time.time() - t_start) / 60:.0f} min so far)", flush=True)
        if variant.startswith("cofinetuned"):
            ensure_cofinetuned()
            continue
        if variant.startswith("teacher_"):
            src = {"teacher_l6": "minilm-l6-h384", "teacher_l3": "minilm-l3-h384"}[variant]
            out, cmd, _ = teacher_run(variant, [src], seed)
            done, best = read_metrics(out)
            res.add(variant, seed, best["dev_accuracy"], done["train_s"], display(cmd, shared, work), meta)
            continue
        ensure_cofinetuned()
        out = work / f"{variant}-s{seed}"
        cmd = ["distill", "--teachers", str(teachers_dir), "--student-layers", "3", "--student-init", "teacher:0", *common,
               "--out", str(out), "--epochs", str(a.student_epochs), "--lr", str(a.student_lr), "--seed", str(seed),
               *STUDENT_FLAGS[variant]]
        fastmt(cmd, work / "logs" / f"{variant}-s{seed}.log")
        done, best = read_metrics(out)
        res.add(variant, seed, best["dev_accuracy"], done["train_s"], display(cmd, shared, work), meta)
        print(f"    dev {best['dev_accuracy']:.4f}, train {done['train_s']:.0f} s", flush=True)
    print(f"all runs done in {(time.time() - t_start) / 60:.1f} min", flush=True)


def summarize(rows: list[dict]) -> list[tuple[str, int, float, float, float]]:
    out = []
    for r in rows:
        accs = r["dev_acc"]
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        out.append((r["variant"], len(accs), statistics.mean(accs), sd, statistics.mean(r["train_s"])))
    return out


def report(a) -> None:
    path = Path(a.results)
    if not path.exists():
        raise SystemExit(f"{a.results}: no results yet; run this script without --report-only first")
    data = json.loads(path.read_text())
    what = {v: w for v, w, _ in VARIANTS}
    lines = ["| variant | what | seeds | dev accuracy (mean ± std) | train s / run |", "|---|---|---:|---:|---:|"]
    for variant, n, mean, sd, ts in summarize(data["rows"]):
        spread = f" ± {100 * sd:.2f}" if n > 1 else ""
        lines.append(f"| `{variant}` | {what.get(variant, '')} | {n} | {100 * mean:.2f}{spread} | {ts:.0f} |")
    table = "\n".join(lines)
    print(table)
    if a.markdown:
        atomic_write_text(Path(a.markdown), table + "\n")
    if a.png:
        plot(data, Path(a.png))
        print(f"chart: {a.png}")


def plot(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(data["rows"])
    names = [r[0] for r in rows]
    means = [100 * r[2] for r in rows]
    sds = [100 * r[3] if r[1] > 1 else 0.0 for r in rows]
    colors = ["#8c8c8c" if n.startswith("teacher") else "#5b8fd1" if n.startswith("cofinetuned") else
              "#e07b39" if n == "mtbert" else "#f2b48c" if n.startswith("mtbert_") else "#7fb77e" for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.bar(range(len(rows)), means, yerr=sds, color=colors, capsize=3)
    for x, r in enumerate(rows):
        seeds = data["rows"][x]["dev_acc"]
        ax.scatter([x] * len(seeds), [100 * s for s in seeds], color="black", s=8, zorder=3)
    ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
    lo = min(100 * min(r["dev_acc"]) for r in data["rows"])
    ax.set_ylim(max(0, lo - 3), min(100, max(means) + 2))
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title("rotten_tomatoes dev: teachers, students, ablations (bars: mean ± std over seeds; dots: runs)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    from fastmt.io import atomic_path

    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(REPO.parent / "shared"), help="dir holding data/ and models/")
    p.add_argument("--work", default=str(REPO / "runs" / "rt"), help="run dirs and logs")
    p.add_argument("--results", default=str(REPO / "benches" / "results" / "rt_reproduction.json"))
    p.add_argument("--seeds", default="0,1,2", help="student seeds (teachers and ablations use the first)")
    p.add_argument("--only", default=None, help="comma-separated variants")
    p.add_argument("--teacher-epochs", type=int, default=1)
    p.add_argument("--student-epochs", type=int, default=1)
    p.add_argument("--teacher-lr", type=float, default=5e-5)
    p.add_argument("--student-lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--precision", default="bf16", help="fp32, bf16 (CPU autocast) or fp16")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--markdown", default=str(REPO / "benches" / "results" / "rt_reproduction.md"))
    p.add_argument("--png", default=str(REPO / "benches" / "results" / "rt_reproduction.png"))
    a = p.parse_args()
    if not a.report_only:
        run_all(a)
    report(a)


if __name__ == "__main__":
    main()
