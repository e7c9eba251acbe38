"""How far is the KL against teachers kept as their top-k (plus one tail cell) from the full KL, on real text?

    python benches/lm_topk.py --teacher DIR_A --teacher DIR_B --student DIR --data dev.tsv --k 16,64,128 \
        --out benches/results/lm-topk-<machine>.json

For every counted token of ``--data`` (packed as ``fastmt distill-lm`` packs it), each teacher's
distribution at ``--temperature`` is stored as ``fastmt.cache.topk.topk_from_logits`` stores it (top-k ids,
their log-probabilities, the exact log-mass of the rest), and the student's KL to it is computed on those
``k + 1`` cells (``fastmt.losses.lm_topk_kl_loss``) and over the whole vocabulary
(``fastmt.losses.lm_kl_loss``), per teacher, uniform weights. Printed per k: the mean full KL, the mean
top-k KL, their ratio, the mean tail mass and the share of tokens whose teacher puts more than 10% of its
mass outside its top k. Bytes a token and teacher in the cache: ``8k + 8``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import fastmt  # noqa: F401 - first (the checkout's import hooks)
    from fastmt import losses
    from fastmt.data.dataset import iterate_batches
    from fastmt.cache.topk import topk_from_logits
    from fastmt.data.packed import next_tokens, pack, read_texts
    from fastmt.models.causal_lm import load_lm, load_tokenizer
    from fastmt.tasks.lm.common import KEY

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", action="append", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--k", default="16,64,128")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    ks = [int(x) for x in a.k.split(",")]
    tok = load_tokenizer(a.teacher[0], "--teacher")
    enc = pack(tok, read_texts(a.data), a.max_length)
    teachers = [load_lm(t, "--teacher").eval() for t in a.teacher]
    student = load_lm(a.student, "--student").eval()
    sums = {k: {"topk": 0.0, "tail": 0.0, "tail_over_10": 0} for k in ks}
    full_sum, count = 0.0, 0
    with torch.no_grad():
        for batch in iterate_batches({KEY: enc}, [0] * len(enc), a.batch_size, [a.max_length], False):
            ids, mask = batch.inputs[KEY]["input_ids"], batch.inputs[KEY]["attention_mask"]
            y = next_tokens(ids, mask).reshape(-1)
            keep = y != -100
            y = y[keep]
            s = student(input_ids=ids, attention_mask=mask).logits.reshape(-1, student.config.vocab_size)[keep]
            t = torch.stack([m(input_ids=ids, attention_mask=mask).logits.reshape(-1, s.shape[-1])[keep]
                             for m in teachers])
            n = int(y.numel())
            full_sum += float(losses.lm_kl_loss(s.double(), t.double(), y, "uniform", a.temperature)) * n
            for k in ks:
                top_ids, top_lp, tail, target = topk_from_logits(t, y, k, a.temperature)
                kl = losses.lm_topk_kl_loss(s.double(), top_ids.long(), top_lp.double(), y, "uniform", a.temperature,
                                            target_logprobs=target.double(), tail_logprobs=tail.double())
                sums[k]["topk"] += float(kl) * n
                mass = tail.exp()  # [T, n]
                sums[k]["tail"] += float(mass.mean(0).sum())
                sums[k]["tail_over_10"] += int((mass > 0.1).sum())
            count += n
    t_count = count * len(teachers)
    full = full_sum / count
    rows = []
    print(f"{count} tokens, {len(teachers)} teachers, vocabulary {student.config.vocab_size}, "
          f"temperature {a.temperature}; KL summed over teachers, averaged over tokens")
    print(f"{'k':>5} {'bytes/token/teacher':>20} {'full KL':>9} {'top-k KL':>9} {'top-k / full':>12} "
          f"{'mean tail mass':>15} {'tail > 10%':>11}")
    for k in ks:
        r = {"k": k, "bytes_per_token_teacher": 8 * k + 8, "full_kl": full, "topk_kl": sums[k]["topk"] / count,
             "ratio": sums[k]["topk"] / count / full, "mean_tail_mass": sums[k]["tail"] / count,
             "share_tail_over_10pct": sums[k]["tail_over_10"] / t_count}
        rows.append(r)
        print(f"{k:>5} {r['bytes_per_token_teacher']:>20} {full:>9.4f} {r['topk_kl']:>9.4f} {r['ratio']:>12.3f} "
              f"{r['mean_tail_mass']:>15.4f} {r['share_tail_over_10pct']:>11.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"settings": vars(a), "tokens": count, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
