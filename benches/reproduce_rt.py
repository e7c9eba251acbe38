"""Does MT-BERT beat its best single teacher on real data? Review sentiment, three co-finetuned teachers.

    python benches/reproduce_rt.py                  # run what is missing, then write the report
    python benches/reproduce_rt.py --report-only    # table, significance and chart from the results file

The protocol, chosen so that nothing reported is also what was tuned on:

- data: the first ``--rows`` rows of ``train.tsv`` train every model; the next ``--val-rows`` rows are a
  held-out validation set that picks each run's best epoch and the sweep's winner; ``dev.tsv`` (1,275
  rows) is touched only to report, through the saved best model of each run.
- teachers: one ``fastmt cofinetune`` of MiniLM-L6, MiniLM-L6 again and MiniLM-L3 through one shared
  head (mean pooling, the way both checkpoints were trained to be read). The two L6 copies start equal
  and drift apart through their own dropout masks.
- sweep: MT-BERT (seed 1) over temperature, then the hidden-loss weight, then the distillation-loss
  weight, each step keeping the best on validation; the winner's settings are used by every variant.
- variants, one run per seed: the student alone (labels only), KD from each single teacher (MT-BERT's
  losses with that teacher only), KD from the teachers' averaged logits (one KL term, no hidden loss:
  the usual multi-teacher rule, e.g. TextBrewer's), MT-BERT (paper weighting), and its ablations.
- significance: a paired bootstrap over dev examples (the mean-over-seeds accuracy difference,
  examples resampled together for both sides), and the per-seed differences.

Every training run is the real ``fastmt`` CLI in a subprocess; its dev predictions are made in this
process from the run's saved model. Finished runs are written to the results JSON as they end, so a
stopped script resumes where it stopped; run dirs live under ``--work`` (git-ignored ``runs/`` by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastmt.engine.fileio import atomic_write_text  # noqa: E402

TEACHERS = ["minilm-l6-h384", "minilm-l6-h384", "minilm-l3-h384"]
TEACHER_NAMES = ["L6-a", "L6-b", "L3"]

# variant -> (what, extra flags given the chosen settings)
def variant_flags(variant: str, hp: dict) -> list[str]:
    t, kd, hid = str(hp["temperature"]), str(hp["alpha_kd"]), str(hp["alpha_hidden"])
    mt = ["--temperature", t, "--alpha-kd", kd, "--alpha-hidden", hid]
    if variant == "student_alone":
        return ["--alpha-kd", "0", "--hidden-loss", "none"]
    if variant.startswith("kd_t"):
        return ["--teacher-subset", variant[4:], *mt]
    if variant == "ensemble_kd":
        return ["--kd-target", "ensemble", "--hidden-loss", "none", "--temperature", t, "--alpha-kd", kd]
    if variant == "mtbert":
        return mt
    if variant == "mtbert_no_hidden":
        return ["--hidden-loss", "none", "--temperature", t, "--alpha-kd", kd]
    if variant == "mtbert_no_kd":
        return ["--alpha-kd", "0", "--alpha-hidden", hid]
    if variant == "mtbert_uniform":
        return [*mt, "--weighting", "uniform"]
    if variant == "mtbert_softmax":
        return [*mt, "--weighting", "softmax"]
    raise KeyError(variant)


VARIANTS = [
    ("student_alone", "3-layer student, gold labels only"),
    ("kd_t0", "KD from teacher L6-a alone (MT-BERT losses, one teacher)"),
    ("kd_t1", "KD from teacher L6-b alone"),
    ("kd_t2", "KD from teacher L3 alone"),
    ("ensemble_kd", "KD from the 3 teachers' averaged logits (one KL term, no hidden loss)"),
    ("mtbert", "MT-BERT: 3 teachers, paper weighting, hidden + KD losses"),
    ("mtbert_no_hidden", "MT-BERT without the hidden loss"),
    ("mtbert_no_kd", "MT-BERT without the distillation loss"),
    ("mtbert_uniform", "MT-BERT with uniform teacher weights"),
    ("mtbert_softmax", "MT-BERT with softmax teacher weights"),
]
WHAT = dict(VARIANTS)


def machine() -> str:
    import platform

    import torch

    from fastmt.tools.bench import device_name

    return f"{device_name(torch.device('cpu'))}, torch {torch.__version__}, Python {platform.python_version()}"


class Results:
    """The results JSON: settings, and one record per finished run (keyed by its name)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}
        self.data.setdefault("runs", {})

    def get(self, name: str) -> dict | None:
        return self.data["runs"].get(name)

    def put(self, name: str, record: dict) -> None:
        self.data["runs"][name] = record
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n")


def fastmt(args: list[str], log_path: Path) -> float:
    cmd = [sys.executable, "-m", "fastmt", *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"fastmt {args[0]} failed (exit {proc.returncode}); see {log_path}:\n  " + "\n  ".join(tail))
    return time.time() - t0


def done_row(run_dir: Path) -> tuple[dict, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    done = [r for r in rows if r["event"] == "done"]
    if not done:
        raise RuntimeError(f"{run_dir}: no 'done' row in metrics.jsonl")
    best = [r for r in rows if r["event"] == "eval" and r["epoch"] == done[-1]["best_epoch"]][-1]
    return done[-1], best


def dev_correct(model_dir: Path, dev: str) -> list[str]:
    """Per dev example, 1 where the saved model is right: one string for a student, one per teacher + the
    ensemble (averaged logits, as fastmt evaluates it) for a teachers dir."""
    import torch

    from fastmt.data.dataset import read_dataset
    from fastmt.serve.predict import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(str(model_dir), torch.device("cpu"))
    ds = read_dataset(dev)
    with torch.no_grad():
        logits = model.logits(ds, 128, None)
    names = model.label_names

    def bits(z) -> str:
        return "".join("1" if names[p] == g else "0" for p, g in zip(z.argmax(-1).tolist(), ds.labels))

    if model.kind == "teachers":
        return [bits(z) for z in logits] + [bits(logits.mean(0))]
    return [bits(logits)]


def acc(b: str) -> float:
    return b.count("1") / len(b)


def display(cmd: list[str], shared: Path, work: Path) -> str:
    return " ".join(["fastmt", *(shlex.quote(c.replace(str(shared), "$SHARED").replace(str(work), "$WORK")) for c in cmd)])


def split_train(train: Path, rows: int, val_rows: int, work: Path) -> tuple[Path, Path]:
    lines = train.read_text().splitlines()
    if rows + val_rows > len(lines) - 1:
        raise SystemExit(f"--rows {rows} + --val-rows {val_rows}: {train} has only {len(lines) - 1} rows")
    work.mkdir(parents=True, exist_ok=True)
    a, b = work / f"train-{rows}.tsv", work / f"val-{rows}-{val_rows}.tsv"
    for path, part in ((a, lines[1: rows + 1]), (b, lines[rows + 1: rows + 1 + val_rows])):
        text = "\n".join([lines[0], *part]) + "\n"
        if not path.exists() or path.read_text() != text:
            atomic_write_text(path, text)
    return a, b


def run_all(a) -> None:
    shared, work = Path(a.shared).resolve(), Path(a.work).resolve()
    data, models = shared / "data" / "rotten_tomatoes", shared / "models"
    for p in (data / "train.tsv", data / "dev.tsv", *(models / t for t in set(TEACHERS))):
        if not p.exists():
            raise SystemExit(f"--shared {a.shared}: {p} not found")
    dev = str(data / "dev.tsv")
    train, val = split_train(data / "train.tsv", a.rows, a.val_rows, work)
    res = Results(Path(a.results))
    settings = {"rows": a.rows, "val_rows": a.val_rows, "epochs": a.epochs, "batch_size": a.batch_size,
                "max_length": a.max_length, "teacher_lr": a.teacher_lr, "student_lr": a.student_lr,
                "student_layers": a.student_layers, "pooling": "mean", "teachers": TEACHER_NAMES,
                "teacher_seed": a.teacher_seed}
    old = res.data.get("settings")
    if old and old != settings and res.data["runs"]:
        raise SystemExit(f"{a.results} holds runs made with other settings ({old}); pass another --results or the same flags")
    from fastmt.engine.machine import git_sha

    res.data.update(settings=settings, machine=machine(), git_sha=git_sha())
    res.save()
    common = ["--train", str(train), "--dev", str(val), "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
              "--epochs", str(a.epochs), "--no-progress", "--overwrite"]
    t_start = time.time()

    def elapsed() -> str:
        return f"{(time.time() - t_start) / 60:.0f} min"

    # 1. teachers
    teachers = work / "teachers"
    if res.get("teachers") is None:
        print(f"[{elapsed()}] cofinetune {', '.join(TEACHER_NAMES)}", flush=True)
        cmd = ["cofinetune", *[x for t in TEACHERS for x in ("--teacher", str(models / t))], *common, "--out", str(teachers),
               "--lr", str(a.teacher_lr), "--pooling", "mean", "--seed", str(a.teacher_seed)]
        wall = fastmt(cmd, work / "logs" / "teachers.log")
        done, best = done_row(teachers)
        bits = dev_correct(teachers, dev)
        res.put("teachers", {"cmd": display(cmd, shared, work), "wall_s": round(wall, 1), "train_s": done["train_s"],
                             "best_epoch": done["best_epoch"],
                             "val_acc": [best[f"dev_accuracy_{i}"] for i in range(len(TEACHERS))] + [best["dev_accuracy"]],
                             "dev_acc": [acc(b) for b in bits], "dev_correct": bits})
        print(f"    dev: " + ", ".join(f"{n} {acc(b):.4f}" for n, b in zip(TEACHER_NAMES + ["ensemble"], bits)), flush=True)

    def student(name: str, flags: list[str], seed: int) -> dict:
        rec = res.get(name)
        if rec is not None:
            return rec
        out = work / name
        cmd = ["distill", "--teachers", str(teachers), "--student-layers", str(a.student_layers), "--student-init", "teacher:0",
               *common, "--out", str(out), "--lr", str(a.student_lr), "--seed", str(seed), *flags]
        print(f"[{elapsed()}] {name}: {' '.join(flags)}", flush=True)
        wall = fastmt(cmd, work / "logs" / f"{name}.log")
        done, best = done_row(out)
        bits = dev_correct(out, dev)[0]
        rec = {"cmd": display(cmd, shared, work), "flags": flags, "seed": seed, "wall_s": round(wall, 1),
               "train_s": done["train_s"], "best_epoch": done["best_epoch"], "val_acc": best["dev_accuracy"],
               "dev_acc": acc(bits), "dev_correct": bits}
        res.put(name, rec)
        print(f"    val {rec['val_acc']:.4f}  dev {rec['dev_acc']:.4f}  ({wall:.0f} s)", flush=True)
        return rec

    # 2. sweep (MT-BERT, first seed), one knob at a time, each kept at its best on validation
    seed0 = a.seeds[0]
    hp = {"temperature": 1.0, "alpha_kd": 1.0, "alpha_hidden": 1.0}
    sweep = []
    grid = (("temperature", [1.0, 2.0, 4.0]), ("alpha_hidden", [0.1, 1.0, 10.0]), ("alpha_kd", [0.5, 1.0, 2.0]))
    for knob, values in (grid if a.sweep else ()):
        scores = {}
        for v in values:
            trial = {**hp, knob: v}
            name = f"sweep-T{trial['temperature']:g}-kd{trial['alpha_kd']:g}-hid{trial['alpha_hidden']:g}-s{seed0}"
            rec = student(name, variant_flags("mtbert", trial), seed0)
            scores[v] = rec["val_acc"]
            sweep.append({"name": name, **trial, "val_acc": rec["val_acc"], "dev_acc": rec["dev_acc"]})
        hp[knob] = max(values, key=lambda v: (scores[v], -abs(v - 1.0)))  # ties: the value nearer the default
    res.data["sweep"] = sweep
    res.data["chosen"] = hp
    res.save()
    print(f"[{elapsed()}] chosen on validation: {hp}", flush=True)

    # 3. every variant, every seed (the sweep's own run is reused where the flags are the same)
    for variant, _ in VARIANTS:
        if a.variants and variant not in a.variants:
            continue
        for seed in a.seeds:
            flags = variant_flags(variant, hp)
            same = [n for n, r in res.data["runs"].items() if n.startswith("sweep-") and r.get("flags") == flags and r.get("seed") == seed]
            if same and res.get(f"{variant}-s{seed}") is None:
                res.put(f"{variant}-s{seed}", {**res.get(same[0]), "same_run_as": same[0]})
            student(f"{variant}-s{seed}", flags, seed)
    print(f"[{elapsed()}] every run is in {a.results}", flush=True)


# ------------------------------------------------------------------------------------------------
# Report


def bootstrap(a_bits: list[str], b_bits: list[str], n_boot: int, seed: int = 0) -> dict:
    """Paired bootstrap over dev examples of mean-over-seeds accuracy(a) - accuracy(b).

    ``a_bits``/``b_bits`` hold one 0/1 string per seed; one resample of example indices is applied to
    every run on both sides. Returns the observed difference, a 95% interval and the one-sided
    probability that the difference is <= 0 under resampling.
    """
    import numpy as np

    A = np.array([[c == "1" for c in b] for b in a_bits], dtype=np.float64).mean(0)
    B = np.array([[c == "1" for c in b] for b in b_bits], dtype=np.float64).mean(0)
    d = A - B
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(1)
    return {"diff": float(d.mean()), "lo": float(np.quantile(boots, 0.025)), "hi": float(np.quantile(boots, 0.975)),
            "p_le_0": float((boots <= 0).mean())}


def summary(data: dict) -> dict:
    runs = data["runs"]
    out = {}
    for variant, _ in VARIANTS:
        recs = [r for n, r in runs.items() if n.startswith(variant + "-s") and n[len(variant) + 2:].isdigit()]
        if recs:
            d = [r["dev_acc"] for r in recs]
            out[variant] = {"n": len(recs), "mean": statistics.mean(d), "sd": statistics.stdev(d) if len(d) > 1 else float("nan"),
                            "val": statistics.mean(r["val_acc"] for r in recs), "train_s": statistics.median(r["train_s"] for r in recs),
                            "seeds": sorted(r["seed"] for r in recs),
                            "by_seed": {r["seed"]: r["dev_acc"] for r in recs},
                            "bits": [r["dev_correct"] for r in sorted(recs, key=lambda r: r["seed"])]}
    return out


def report(a) -> None:
    path = Path(a.results)
    if not path.exists():
        raise SystemExit(f"{a.results}: no results yet; run this script without --report-only first")
    data = json.loads(path.read_text())
    s = data.get("settings", {})
    t = data["runs"].get("teachers")
    lines = []
    if t:
        lines += ["| teacher | validation acc | dev acc |", "|---|---:|---:|"]
        for i, n in enumerate(TEACHER_NAMES + ["ensemble (averaged logits)"]):
            lines.append(f"| {n} | {100 * t['val_acc'][i]:.2f} | {100 * t['dev_acc'][i]:.2f} |")
        best_i = max(range(len(TEACHER_NAMES)), key=lambda i: t["val_acc"][i])  # chosen on validation, not dev
        margin = t["dev_acc"][-1] - t["dev_acc"][best_i]
        lines.append("")
        lines.append(f"Best single teacher on validation: {TEACHER_NAMES[best_i]}; the ensemble is "
                     f"{100 * margin:+.2f} points against it on dev.")
        lines.append("")
    summ = summary(data)
    if "chosen" in data:
        c = data["chosen"]
        how = (f"chosen on validation (MT-BERT, seed {data['sweep'][0]['name'].rsplit('-s', 1)[1]})" if data.get("sweep")
               else "no sweep (--no-sweep)")
        lines.append(f"Settings, {how}: temperature {c['temperature']:g}, alpha_kd {c['alpha_kd']:g}, alpha_hidden {c['alpha_hidden']:g}.")
        lines.append("")
        if data.get("sweep"):
            lines += ["| sweep run | validation acc | dev acc |", "|---|---:|---:|"]
            seen = set()
            for r in data["sweep"]:
                if r["name"] in seen:
                    continue
                seen.add(r["name"])
                lines.append(f"| T={r['temperature']:g} kd={r['alpha_kd']:g} hidden={r['alpha_hidden']:g} | "
                             f"{100 * r['val_acc']:.2f} | {100 * r['dev_acc']:.2f} |")
            lines.append("")
    lines += ["| variant | what | seeds | validation acc (mean) | dev acc (mean ± std) | dev acc per seed | train s / run (median) |",
              "|---|---|---:|---:|---:|---|---:|"]
    for variant, info in summ.items():
        per = ", ".join(f"{100 * info['by_seed'][k]:.2f}" for k in sorted(info["by_seed"]))
        sd = f" ± {100 * info['sd']:.2f}" if info["n"] > 1 else ""
        lines.append(f"| `{variant}` | {WHAT[variant]} | {info['n']} | {100 * info['val']:.2f} | {100 * info['mean']:.2f}{sd} | "
                     f"{per} | {info['train_s']:.0f} |")
    sig = {}
    if "mtbert" in summ and t:
        best_kd = f"kd_t{best_i}"
        lines.append("")
        lines.append(f"Paired bootstrap over the {len(t['dev_correct'][0])} dev examples ({a.n_boot} resamples; the "
                     "difference of mean-over-seeds accuracy, both sides resampled together; seeds paired where both have them):")
        lines.append("")
        lines += ["| comparison | difference (points) | 95% interval | P(diff <= 0) | per-seed differences |", "|---|---:|---:|---:|---|"]
        others = [best_kd, "ensemble_kd", "student_alone", "mtbert_no_hidden", "mtbert_uniform", "mtbert_softmax", "mtbert_no_kd"]
        others += [f"kd_t{i}" for i in range(len(TEACHER_NAMES)) if f"kd_t{i}" != best_kd]
        for other in others:
            if other not in summ:
                continue
            seeds = sorted(set(summ["mtbert"]["by_seed"]) & set(summ[other]["by_seed"]))
            if not seeds:
                continue
            pick = lambda v: [data["runs"][f"{v}-s{k}"]["dev_correct"] for k in seeds]  # noqa: E731
            b = bootstrap(pick("mtbert"), pick(other), a.n_boot)
            per = ", ".join(f"{100 * (summ['mtbert']['by_seed'][k] - summ[other]['by_seed'][k]):+.2f}" for k in seeds)
            label = f"mtbert − {other}" + (" (best single teacher)" if other == best_kd else "")
            lines.append(f"| {label} | {100 * b['diff']:+.2f} | [{100 * b['lo']:+.2f}, {100 * b['hi']:+.2f}] | {b['p_le_0']:.3f} | {per} |")
            sig[other] = b
        # the ensemble of teachers vs its best member, over dev examples
        b = bootstrap([t["dev_correct"][-1]], [t["dev_correct"][best_i]], a.n_boot)
        lines.append(f"| teacher ensemble − {TEACHER_NAMES[best_i]} | {100 * b['diff']:+.2f} | [{100 * b['lo']:+.2f}, {100 * b['hi']:+.2f}] | "
                     f"{b['p_le_0']:.3f} | (one teacher run) |")
        sig["teacher_ensemble_vs_best"] = b
    text = "\n".join(lines)
    header = (f"Review sentiment (rotten_tomatoes): {s.get('rows')} training rows, {s.get('val_rows')} held-out validation rows "
              f"(best epoch and sweep), dev {len(t['dev_correct'][0]) if t else '?'} rows (reported only); {s.get('epochs')} epochs "
              f"for teachers and students, batch {s.get('batch_size')}, max length {s.get('max_length')}, "
              f"{s.get('student_layers')}-layer student from L6-a. Machine: {data.get('machine')}.\n\n")
    print(header + text)
    if a.markdown:
        atomic_write_text(Path(a.markdown), header + text + "\n")
    if a.png and summ:
        plot(data, summ, Path(a.png))
        print(f"chart: {a.png}")


def plot(data: dict, summ: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = data["runs"].get("teachers")
    names, means, sds, dots, colors = [], [], [], [], []
    if t:
        for i, n in enumerate(TEACHER_NAMES + ["ensemble"]):
            names.append(f"teacher {n}")
            means.append(100 * t["dev_acc"][i])
            sds.append(0.0)
            dots.append([])
            colors.append("#5b8fd1")
    for v, info in summ.items():
        names.append(v)
        means.append(100 * info["mean"])
        sds.append(100 * info["sd"] if info["n"] > 1 else 0.0)
        dots.append([100 * x for x in info["by_seed"].values()])
        colors.append("#e07b39" if v == "mtbert" else "#f2b48c" if v.startswith("mtbert_") else
                      "#7fb77e" if v.startswith(("kd_", "ensemble")) else "#8c8c8c")
    fig, ax = plt.subplots(figsize=(10, 4.4))
    ax.bar(range(len(names)), means, yerr=sds, color=colors, capsize=3)
    for x, ds in enumerate(dots):
        ax.scatter([x] * len(ds), ds, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    lo = min(min(means), min((min(d) for d in dots if d), default=100))
    ax.set_ylim(max(0, lo - 2), min(100, max(means) + 1.5))
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title("rotten_tomatoes dev: co-finetuned teachers, students and ablations\n"
                 "(bars: mean ± std over seeds; dots: single runs)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    from fastmt.engine.fileio import atomic_path

    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(REPO.parent / "shared"), help="dir holding data/ and models/")
    p.add_argument("--work", default=str(REPO / "runs" / "rt"), help="run dirs and logs")
    p.add_argument("--results", default=str(REPO / "benches" / "results" / "rt_reproduction.json"))
    p.add_argument("--rows", type=int, default=2000, help="training rows (the first N of train.tsv)")
    p.add_argument("--val-rows", type=int, default=1000, help="held-out validation rows (the next N of train.tsv)")
    p.add_argument("--epochs", type=int, default=3, help="epochs for teachers and students")
    p.add_argument("--seeds", default="1,2,3", help="student seeds")
    p.add_argument("--teacher-seed", type=int, default=1)
    p.add_argument("--teacher-lr", type=float, default=5e-5)
    p.add_argument("--student-lr", type=float, default=1e-4)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples")
    p.add_argument("--variants", default=None, help="comma-separated variants to run (default: all)")
    p.add_argument("--no-sweep", dest="sweep", action="store_false",
                   help="skip the sweep: temperature 1 and both loss weights 1 for every variant")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--markdown", default=str(REPO / "benches" / "results" / "rt_reproduction.md"))
    p.add_argument("--png", default=str(REPO / "benches" / "results" / "rt_reproduction.png"))
    a = p.parse_args()
    a.seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    a.variants = [v for v in a.variants.split(",") if v.strip()] if a.variants else None
    unknown = sorted(set(a.variants or ()) - set(WHAT))
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(WHAT)}")
    if not a.report_only:
        run_all(a)
    report(a)


if __name__ == "__main__":
    main()
