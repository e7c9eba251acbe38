"""Draw the kernel benchmark rows (``benches/results/kernels.jsonl``) as one PNG of bar charts.

    python benches/plot_kernels.py [--rows benches/results/kernels.jsonl] [--out benches/results/kernels.png]

One panel per (op, dtype, shape); bars are p50 milliseconds per mode and provider, with p20-p80
whiskers. Only the newest run of each (device, op, provider, mode, dtype, shape) is drawn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = ["fused", "eager", "compiled", "liger"]
MODES = ["fwd", "bwd", "full"]


def case_label(r: dict) -> str:
    """A row's shape, and its temperature where it has one (the KL is measured at several)."""
    tau = r.get("temperature")
    return json.dumps(r["shape"]) + (f" tau={tau:g}" if tau is not None else "")


def load(path: Path, device: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "error" not in r and (device is None or r["device"] == device)]
    newest = {}
    for r in rows:  # later lines win
        newest[(r["device"], r["op"], r["provider"], r["mode"], r["dtype"], case_label(r))] = r
    return list(newest.values())


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["op"], r["dtype"], case_label(r)) for r in rows})
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels)), squeeze=False)
    width = 0.8 / len(PROVIDERS)
    for ax, (op, dtype, shape) in zip(axes[:, 0], panels):
        for j, prov in enumerate(PROVIDERS):
            sel = {r["mode"]: r for r in rows if (r["op"], r["dtype"], case_label(r), r["provider"]) == (op, dtype, shape, prov)}
            if not sel:
                continue
            xs = [i + j * width for i, m in enumerate(MODES) if m in sel]
            p50 = [sel[m]["ms_p50"] for m in MODES if m in sel]
            err = [[sel[m]["ms_p50"] - sel[m]["ms_p20"] for m in MODES if m in sel],
                   [sel[m]["ms_p80"] - sel[m]["ms_p50"] for m in MODES if m in sel]]
            ax.bar(xs, p50, width, yerr=err, label=prov)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(MODES))], MODES)
        ax.set_ylabel("ms (p50, log)")
        ax.set_yscale("log")
        ax.set_title(f"{op}  {dtype}  {shape}", fontsize=9)
        ax.legend(fontsize=8)
    device = rows[0]["device"] if rows else ""
    fig.suptitle(f"fastmt kernels on {device}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=str(ROOT / "benches" / "results" / "kernels.jsonl"))
    p.add_argument("--out", default=str(ROOT / "benches" / "results" / "kernels.png"))
    p.add_argument("--device", default=None, help="only rows from this device")
    a = p.parse_args(argv)
    rows = load(Path(a.rows), a.device)
    if not rows:
        print(f"no rows in {a.rows}")
        return 1
    print(plot(rows, Path(a.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
