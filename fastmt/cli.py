"""The ``fastmt`` command: subcommands mapped onto the library, and the one place errors become one line."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from fastmt.errors import FastmtError, UsageError

log = logging.getLogger("fastmt")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the flag, not a usage dump."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_common(p: argparse.ArgumentParser, *, defaults: dict) -> None:
    p.add_argument("--train", required=True, metavar="F", help="training file (TSV, CSV or JSONL)")
    p.add_argument("--dev", required=True, metavar="F", help="dev file, evaluated after every epoch")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to create")
    p.add_argument("--epochs", type=int, default=defaults["epochs"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=defaults["lr"])
    p.add_argument("--max-length", type=int, default=128, help="longest tokenized input; longer is truncated")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto (default): bf16 where the GPU or CPU multiplies it natively (fp16 on a GPU "
                        "without bf16), else fp32")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps for linear warm-up")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=20, help="steps between metrics.jsonl rows")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--save-every", type=int, default=0, metavar="STEPS", help="checkpoint the whole training state every STEPS steps into OUT/checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out from its checkpoint")
    p.add_argument("--max-bad-steps", type=int, default=20, metavar="N", help="stop after N non-finite losses in a row (default 20)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=None,
                   help="batch examples of similar length together, so batches carry little padding (default: on)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastmt", description="Multi-teacher distillation (MT-BERT) for text classification.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("demo", help="the embedded end-to-end example: CPU, no downloads, a few minutes")
    p.add_argument("--out", default=None, metavar="DIR", help="keep the runs here (default: a temporary dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a smaller, quicker version (for tests)")

    p = sub.add_parser("cofinetune", help="fine-tune teachers jointly through one shared head")
    p.add_argument("--teacher", action="append", required=True, metavar="M", help="HF model name or dir (repeat)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the teachers' forward and losses (one graph per length bucket); "
                        "default: on for jobs of 1000 steps or more")
    _add_common(p, defaults={"epochs": 3, "lr": 3e-5})

    p = sub.add_parser("distill", help="distil a student from co-finetuned teachers")
    p.add_argument("--teachers", required=True, metavar="DIR", help="a dir written by fastmt cofinetune")
    p.add_argument("--student-layers", type=int, required=True, metavar="K")
    p.add_argument("--student-init", default="teacher:0", help="teacher:I, random, or a model dir")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--weighting", default="paper", help="per-example teacher weights: paper, softmax or uniform")
    p.add_argument("--hidden-loss", default="tokens", help="tokens, cls or none")
    p.add_argument("--weight-hidden", action="store_true", help="weight the hidden loss by the teacher weights too")
    p.add_argument("--kernels", default="auto", choices=["auto", "fused", "reference"],
                   help="auto (default): the fused Triton kernels on CUDA, the reference losses on a CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the step's forward and losses; default: on for jobs of 1000 steps or more")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the compiled step as CUDA graphs (needs --device cuda); default: with --compile on CUDA")
    p.add_argument("--alpha-task", type=float, default=1.0)
    p.add_argument("--alpha-kd", type=float, default=1.0)
    p.add_argument("--alpha-hidden", type=float, default=1.0)
    p.add_argument("--teacher-subset", default=None, metavar="I,J", help="distil from these teachers only")
    p.add_argument("--stack-teachers", action=argparse.BooleanOptionalAction, default=None,
                   help="run same-architecture teachers as one stacked module (one batched GEMM per layer for all "
                        "of them); default: on CUDA, and on a CPU in bf16")
    p.add_argument("--cache-teachers", default="default", metavar="DIR|auto|off",
                   help="store the frozen teachers' outputs per example in DIR (auto: ~/.cache/fastmt/teachers/...) "
                        "on the first pass and read them back in every later epoch and run on the same data and "
                        "teachers; default: auto when more than one epoch runs")
    p.add_argument("--cache-budget-gb", type=float, default=8.0,
                   help="most disk the teacher cache may take (default 8); --hidden-loss tokens stores every token's states")
    _add_common(p, defaults={"epochs": 3, "lr": 5e-5})

    p = sub.add_parser("eval", help="accuracy of a student dir, or of each teacher and the ensemble")
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--data", required=True, metavar="F")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128)

    p = sub.add_parser("check", help="fused kernels vs reference vs float64: values and gradients, per dtype")
    p.add_argument("--device", default="cpu", help="cpu (Triton interpreter) or cuda")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the rows as JSON")

    p = sub.add_parser("bench", help="training-step throughput of several modes, side by side")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="tiny", help="tiny (CPU-sized) or base (3 BERT-base teachers)")
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode")
    p.add_argument("--modes", default=None, help="comma-separated subset of the ladder")
    p.add_argument("--rounds", type=int, default=None,
                   help="deal each mode's timed steps out round-robin in this many turns (default 5 on CPU, 1 on CUDA)")
    p.add_argument("--profile", action="store_true",
                   help="also split each mode's step into teachers' forward, student forward, losses, backward and "
                        "optimizer (CUDA events on a GPU, wall clock on a CPU) and list its top kernels")

    p = sub.add_parser("memory", help="peak GPU memory by phase, fast vs reference, and the largest batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="tiny", help="tiny or base")
    p.add_argument("--out", default=None, metavar="DIR", help="report dir (default ./memory-report)")
    p.add_argument("--budget-gb", type=float, default=None, help="memory budget for the largest batch (default 90%% of the GPU)")
    p.add_argument("--search-s", type=float, default=10.0, metavar="S",
                   help="time for the largest-batch search, per mode (default 10; 0 tries the preset's batch only)")
    p.add_argument("--snapshot-mb", type=float, default=15.0, metavar="MB",
                   help="largest allocator snapshot to write; stack frames are cut to fit (default 15; 0: none)")
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and errors")
    return parser


def _train_kwargs(ns: argparse.Namespace, cls) -> dict:
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in vars(ns).items() if k in names}
    kw["progress"] = not ns.no_progress and not ns.quiet
    return kw


def _parse_subset(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        idx = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--teacher-subset {text}: expected comma-separated teacher indices, e.g. 0,2") from None
    if not idx:
        raise UsageError("--teacher-subset: empty")
    return idx


def run(ns: argparse.Namespace) -> int:
    from fastmt import train

    if ns.command == "cofinetune":
        res = train.cofinetune(ns.teacher, train.TrainArgs(**_train_kwargs(ns, train.TrainArgs)))
        print(f"teachers saved to {res.out}: best dev accuracy (ensemble) {res.best_dev_accuracy:.4f} at epoch {res.best_epoch}, {res.train_s:.1f}s")
        return 0
    if ns.command == "distill":
        kw = _train_kwargs(ns, train.DistillArgs)
        kw["teacher_subset"] = _parse_subset(ns.teacher_subset)
        res = train.distill(train.DistillArgs(**kw))
        print(f"student saved to {res.out}: best dev accuracy {res.best_dev_accuracy:.4f} at epoch {res.best_epoch}, {res.train_s:.1f}s")
        return 0
    if ns.command == "eval":
        if ns.batch_size < 1:
            raise UsageError(f"--batch-size {ns.batch_size}: must be at least 1")
        result = train.evaluate_dir(ns.model, ns.data, ns.device, ns.batch_size)
        if result["kind"] == "teachers":
            for t in result["teachers"]:
                print(f"teacher {t['name']}: accuracy {t['accuracy']:.4f} (n={t['n']})")
            print(f"ensemble: accuracy {result['accuracy']:.4f} (n={result['n']})")
        else:
            print(f"student: accuracy {result['accuracy']:.4f} (n={result['n']})")
        if ns.json:
            from fastmt.io import write_json

            write_json(ns.json, result)
        return 0
    if ns.command == "demo":
        from fastmt.demo import run_demo

        run_demo(out=ns.out, seed=ns.seed, fast=ns.fast, progress=not ns.quiet)
        return 0
    if ns.command == "check":
        from fastmt.check import run_check

        failed = run_check(ns.device, ns.quick, ns.json)
        if failed:
            raise FastmtError(f"fastmt check: {failed} case(s) over tolerance")
        return 0
    if ns.command == "bench":
        from fastmt.bench import run_bench

        run_bench(ns.device, ns.preset, ns.json, ns.steps, ns.modes, ns.rounds, ns.profile)
        return 0
    if ns.command == "memory":
        from fastmt.memory import run_memory

        if ns.budget_gb is not None and not ns.budget_gb > 0:
            raise UsageError(f"--budget-gb {ns.budget_gb}: must be positive")
        run_memory(ns.device, ns.preset, ns.out, ns.budget_gb, search_s=ns.search_s, snapshot_mb=ns.snapshot_mb)
        return 0
    raise UsageError("no command given (see fastmt --help)")


def _attach_negative_numbers(argv: list[str]) -> list[str]:
    """``--lr -1e-4`` -> ``--lr=-1e-4``: argparse reads a value like -1e-4 as an unknown flag."""
    out: list[str] = []
    for tok in argv:
        prev = out[-1] if out else ""
        if tok.startswith("-") and prev.startswith("--") and "=" not in prev:
            try:
                float(tok)
            except ValueError:
                pass
            else:
                out[-1] = f"{prev}={tok}"
                continue
        out.append(tok)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _attach_negative_numbers(sys.argv[1:] if argv is None else list(argv))
    debug = "--debug" in argv
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
        logging.basicConfig(level=logging.WARNING if ns.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
        if ns.command is None:
            parser.print_help()
            return 2
        return run(ns)
    except KeyboardInterrupt:
        print("fastmt: interrupted", file=sys.stderr)
        return 130
    except (FastmtError, ValueError, OSError) as e:
        if debug:
            raise
        from fastmt.data import DataError

        code = 2 if isinstance(e, (UsageError, DataError)) else getattr(e, "exit_code", 1)
        if isinstance(e, OSError) and not isinstance(e, FastmtError):
            msg = f"{e.filename}: {e.strerror}" if getattr(e, "filename", None) else str(e)
        else:
            msg = str(e)
        print(f"fastmt: error: {' '.join(msg.split()) or type(e).__name__}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
