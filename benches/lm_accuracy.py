"""Does multi-teacher distillation help a small causal LM? Held-out perplexity, side by side.

    python benches/lm_accuracy.py --data ../shared/data/rotten_tomatoes --tokenizer ../shared/models/minilm-l6-h384 \
        --work /tmp/lm-acc --out benches/results/lm-accuracy-<machine>.json

Two teachers are trained here from scratch on the training text (no causal LM that transformers can
load offline ships in a package), different in width, depth and seed, with the tokenizer they share
(a pre-trained WordPiece vocabulary). A smaller student, freshly initialised per seed, is then trained
for the same steps in five ways, all through ``fastmt distill-lm``:

- ``alone``: the next-token cross-entropy only (``--alpha-kd 0``)
- ``kd-A``, ``kd-B``: plus the KL to one teacher
- ``ensemble``: plus one KL to the two teachers' averaged logits (``--kd-target ensemble``)
- ``mt-weighted``: plus MT-BERT's loss: one KL per teacher, each weighted per token by how well that
  teacher predicts the actual next token (``--weighting paper``)
- ``mt-top16``, ``mt-top128``: the same loss on the teachers' top-k next tokens plus a tail bucket
  (``--cache-teachers``; one cache per k in ``--work``: the first seed fills it, the later seeds read it
  and run no teacher)

and scored with ``fastmt eval-lm`` on the dev text (perplexity, next-token accuracy), for each of
``--seeds``. Runs already finished in ``--work`` are reused, so an interrupted study continues.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "alone": ["--alpha-kd", "0"],
    "kd-A": ["--alpha-kd", "1"],
    "kd-B": ["--alpha-kd", "1"],
    "ensemble": ["--alpha-kd", "1", "--kd-target", "ensemble"],
    "mt-weighted": ["--alpha-kd", "1", "--weighting", "paper"],
    "mt-top16": ["--alpha-kd", "1", "--weighting", "paper", "--top-k", "16"],
    "mt-top128": ["--alpha-kd", "1", "--weighting", "paper", "--top-k", "128"],
}
TOPK = {"mt-top16": 16, "mt-top128": 128}


def run_facts(log: Path) -> dict:
    """Training seconds and, for a cached run, the batches the teachers ran on, from a run's log."""
    import re

    text = log.read_text() if log.exists() else ""
    facts = {}
    m = re.search(r"student saved to .*, ([0-9.]+)s$", text, re.M)
    if m:
        facts["train_s"] = float(m.group(1))
    m = re.search(r"the teachers ran on (\d+) batches", text)
    if m:
        facts["teacher_batches"] = int(m.group(1))
    return facts


def fresh_lm(path: Path, tokenizer_dir: str, width: int, layers: int, seed: int) -> Path:
    """A randomly initialised Llama-style causal LM with the shared tokenizer, saved to ``path``."""
    import fastmt  # noqa: F401 - first (the checkout's import hooks)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                      num_attention_heads=max(1, width // 32), num_key_value_heads=max(1, width // 32),
                      max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                      bos_token_id=tok.cls_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def fastmt(*args, log: Path) -> None:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "fastmt", *map(str, args)], cwd=REPO, stdout=f,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"fastmt {args[0]} failed ({log}):\n" + log.read_text()[-2000:])
    print(f"    {args[0]} done in {time.perf_counter() - t0:.0f}s ({log})", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a dir with train.tsv and dev.tsv (a text column)")
    p.add_argument("--tokenizer", required=True, help="the shared tokenizer (a model dir)")
    p.add_argument("--work", required=True, help="where the teachers, students and logs go")
    p.add_argument("--out", required=True, help="the results (JSON)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1, help="the students'")
    p.add_argument("--batch-size", type=int, default=32, help="the students' (the teachers' is 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="the students' peak learning rate")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--train-limit", type=int, default=0, help="use the first N training reviews (0: all)")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    train, dev = Path(a.data) / "train.tsv", Path(a.data) / "dev.tsv"
    if a.train_limit:
        lines = train.read_text().splitlines()
        train = work / "train.tsv"
        train.write_text("\n".join(lines[: a.train_limit + 1]) + "\n")
    common = ["--train", train, "--dev", dev, "--max-length", a.max_length, "--device", "cpu", "--precision", "fp32",
              "--no-progress", "--log-every", 50]
    teachers = {}
    for name, width, layers, seed in (("A", 192, 4, 11), ("B", 128, 3, 12)):
        out = work / f"teacher-{name}"
        if not (out / "model.safetensors").exists():
            print(f"teacher {name}: width {width}, {layers} layers", flush=True)
            init = fresh_lm(work / f"init-{name}", a.tokenizer, width, layers, seed)
            fastmt("distill-lm", "--teacher", init, "--student", init, "--alpha-kd", "0", "--out", out,
                   "--epochs", a.teacher_epochs, "--lr", "1e-3", "--seed", seed, "--batch-size", 32, "--overwrite",
                   *common,
                   log=work / f"teacher-{name}.log")
        teachers[name] = out
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        init = fresh_lm(work / f"init-student-{seed}", a.tokenizer, 64, 2, 100 + seed)
        for method in a.methods.split(","):
            out = work / f"{method}-{seed}"
            use = {"kd-A": ["A"], "kd-B": ["B"]}.get(method, ["A", "B"])
            if not (out / "model.safetensors").exists():
                print(f"{method}, seed {seed}", flush=True)
                tflags = [x for t in use for x in ("--teacher", teachers[t])]
                cache = ["--cache-teachers", work / f"cache-top{TOPK[method]}"] if method in TOPK else []
                fastmt("distill-lm", *tflags, "--student", init, "--out", out, "--epochs", a.epochs, "--lr", a.lr,
                       "--seed", seed, "--temperature", a.temperature, "--batch-size", a.batch_size, "--overwrite",
                       *METHODS[method], *cache, *common,
                       log=work / f"{method}-{seed}.log")
            rows.append({"method": method, "seed": seed, "dir": str(out), **run_facts(work / f"{method}-{seed}.log")})
    js = work / "eval.json"
    fastmt("eval-lm", *[x for r in rows for x in ("--model", r["dir"])], "--model", teachers["A"], "--model",
           teachers["B"], "--data", dev, "--max-length", a.max_length, "--device", "cpu", "--json", js,
           log=work / "eval.log")
    scores = {m["model"]: m for m in json.loads(js.read_text())["models"]}
    for r in rows:
        r.update({k: scores[r["dir"]][k] for k in ("perplexity", "accuracy", "nll", "tokens")})
    summary = {}
    print(f"\n{'method':<12} {'perplexity (mean ± sd over seeds)':>34} {'next-token acc':>15}")
    for method in a.methods.split(","):
        ppl = [r["perplexity"] for r in rows if r["method"] == method]
        acc = [r["accuracy"] for r in rows if r["method"] == method]
        sd = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        summary[method] = {"perplexity_mean": statistics.mean(ppl), "perplexity_sd": sd, "perplexities": ppl,
                           "accuracy_mean": statistics.mean(acc),
                           "train_s": [r.get("train_s") for r in rows if r["method"] == method]}
        print(f"{method:<12} {statistics.mean(ppl):>26.2f} ± {sd:<5.2f} {statistics.mean(acc):>15.4f}")
    for t in ("A", "B"):
        s = scores[str(teachers[t])]
        summary[f"teacher-{t}"] = {"perplexity": s["perplexity"], "accuracy": s["accuracy"]}
        print(f"{'teacher ' + t:<12} {s['perplexity']:>26.2f}         {s['accuracy']:>15.4f}")
    Path(a.out).write_text(json.dumps({"settings": vars(a), "rows": rows, "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
