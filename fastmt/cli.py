"""The ``fastmt`` command: subcommands mapped onto the library, and the one place errors become one line."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from fastmt import __version__
from fastmt.config.flags import add_flags, flag_name, settings_kwargs
from fastmt.config.settings import (DATA_HELP, DEVICE_HELP, LM_DATA_HELP, DistillArgs, DistillLMArgs, TrainArgs,
                                    parse_device, resolve_device)
from fastmt.engine import stopping
from fastmt.errors import DataError, FastmtError, UsageError

log = logging.getLogger("fastmt")


class _Help(argparse.HelpFormatter):
    """Help that shows each flag's default where it has a meaningful one (not None, not a switch's,
    not already spelled out in the help text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if ("default" in text or d is None or d is argparse.SUPPRESS or not action.option_strings
                or isinstance(action, (argparse._StoreConstAction, argparse._VersionAction))):
            return text
        return f"{text} (default: {d})" if text else f"default: {d}"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the flag, not a usage dump."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _Help)
        super().__init__(*a, **kw)

    def error(self, message: str):  # noqa: D401 - argparse's hook
        # "argument --preset: invalid choice: 'huge' (choose from tiny, base)" -> "--preset huge: choose ..."
        m = re.match(r"argument ([-\w]+)(?:/[-\w]+)*: invalid choice: '(.*)' \(choose from (.*)\)$", message)
        if m:
            choices = m.group(3).replace("'", "")
            message = f"{m.group(1)} {m.group(2)}: choose one of {choices}"
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_columns(p: argparse.ArgumentParser, names=("text_column", "text_pair_column", "label_column")) -> None:
    """The column flags of a command without settings, as the training commands have them (``TrainArgs``)."""
    for name in names:
        f = TrainArgs.__dataclass_fields__[name]
        p.add_argument(flag_name(f), default=None, metavar=f.metadata["metavar"], help=f.metadata["help"])


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="replay the run saved in FILE (a run's config.json, or its dir); flags given here override it")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastmt", description="Multi-teacher distillation (MT-BERT) for text classification and causal language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--version", action="version", version=f"fastmt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _add_demo(sub)
    _add_cofinetune(sub)
    _add_distill(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_export(sub)
    _add_check(sub)
    _add_bench(sub)
    _add_bench_serve(sub)
    _add_memory(sub)
    _add_distill_lm(sub)
    _add_eval_lm(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and errors")
    return parser


def _add_demo(sub) -> None:
    """``fastmt demo``: the embedded example."""
    p = sub.add_parser("demo", help="the embedded end-to-end example: CPU, no downloads, a few minutes")
    p.add_argument("--out", default=None, metavar="DIR", help="keep the runs here (default: a temporary dir)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the models and the training")
    p.add_argument("--fast", action="store_true", help="a smaller, quicker version (for tests)")


def _add_cofinetune(sub) -> None:
    """``fastmt cofinetune``: the teachers' co-finetuning (its flags: ``TrainArgs``'s fields)."""
    p = sub.add_parser("cofinetune", help="fine-tune teachers jointly through one shared head")
    p.add_argument("--teacher", action="append", required=True, metavar="M", help="HF model name or dir (repeat)")
    _add_config(p)
    add_flags(p, TrainArgs)


def _add_distill(sub) -> None:
    """``fastmt distill``: the student's distillation (its flags: ``DistillArgs``'s fields)."""
    p = sub.add_parser("distill", help="distil a student from co-finetuned teachers")
    _add_config(p)
    add_flags(p, DistillArgs)


def _add_distill_lm(sub) -> None:
    """``fastmt distill-lm``: a causal LM from several that share its tokenizer (its flags:
    ``DistillLMArgs``'s fields)."""
    p = sub.add_parser("distill-lm", help="distil a small causal LM from several that share its tokenizer")
    _add_config(p)
    add_flags(p, DistillLMArgs)


def _add_eval_lm(sub) -> None:
    """``fastmt eval-lm``: perplexity of causal LMs on a text."""
    p = sub.add_parser("eval-lm", help="perplexity and next-token accuracy of causal LMs (a student, teachers) on a text")
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="a causal-LM dir (a distill-lm output, or a teacher); repeat to compare several")
    p.add_argument("--data", required=True, metavar="F", help="text: " + LM_DATA_HELP)
    _add_columns(p, ["text_column"])
    p.add_argument("--max-length", type=int, default=128, help="tokens per packed block")
    p.add_argument("--device", type=parse_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=int, default=16, help="blocks per forward pass")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON")


def _add_model_on_data(p: argparse.ArgumentParser, data_help: str) -> None:
    """The flags of a command that runs a run dir over a file: ``eval`` and ``predict``."""
    p.add_argument("--model", required=True, metavar="DIR", help="a student dir or a teachers dir")
    p.add_argument("--data", required=True, metavar="F", help=data_help + DATA_HELP)
    _add_columns(p)
    p.add_argument("--device", type=parse_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=int, default=128, help="examples per forward pass")


def _add_eval(sub) -> None:
    """``fastmt eval``: scores of a run dir."""
    p = sub.add_parser("eval", help="accuracy of a student dir, or of each teacher and the ensemble")
    _add_model_on_data(p, "labelled data: ")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON")


def _add_predict(sub) -> None:
    """``fastmt predict``: labels for every row of a file."""
    p = sub.add_parser("predict", help="labels and probabilities of a student (or teachers' ensemble) for every row of a file")
    _add_model_on_data(p, "data to label (a label column is optional): ")
    p.add_argument("--out", required=True, metavar="P", help="predictions file; .tsv, .csv or .jsonl by extension")
    p.add_argument("--max-length", type=int, default=None, help="longest tokenized input (default: the training run's)")


def _add_export(sub) -> None:
    """``fastmt export``: a run dir rewritten in stock form."""
    p = sub.add_parser("export", help="rewrite a student or teachers dir so that Hugging Face loads it as it is, "
                                          "or write it as ONNX (--format onnx)")
    p.add_argument("--model", required=True, metavar="DIR", help="a student dir or a teachers dir")
    p.add_argument("--out", default=None, metavar="DIR", help="write here instead of rewriting DIR in place")
    p.add_argument("--format", default="hf", choices=["hf", "onnx"],
                   help="hf: a dir transformers loads (default); onnx: model.onnx for ONNX Runtime, beside the model "
                        "(a teachers dir: one per teacher), checked against fastmt's logits (needs fastmt[onnx])")


def _add_check(sub) -> None:
    """``fastmt check``: kernels against the reference."""
    p = sub.add_parser("check", help="fused kernels vs reference vs float64: values and gradients, per dtype")
    p.add_argument("--device", type=parse_device, default="auto", help=DEVICE_HELP + "; on cpu the kernels run in "
                   "Triton's interpreter")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the rows as JSON")


def _add_bench(sub) -> None:
    """``fastmt bench``: training-step throughput."""
    p = sub.add_parser("bench", help="training-step throughput of several modes, side by side")
    p.add_argument("--device", type=parse_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--preset", default="tiny", choices=["tiny", "base"], help="tiny (CPU-sized) or base (3 BERT-base teachers)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the rows as JSON")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode")
    p.add_argument("--modes", default=None, help="comma-separated subset of the ladder")
    p.add_argument("--rounds", type=int, default=None,
                   help="deal each mode's timed steps out round-robin in this many turns (default 5 on CPU, 1 on CUDA)")
    p.add_argument("--profile", action="store_true",
                   help="also split each mode's step into teachers' forward, student forward, losses, backward and "
                        "optimizer (CUDA events on a GPU, wall clock on a CPU) and list its top kernels")


def _add_bench_serve(sub) -> None:
    """``fastmt bench-serve``: serving latency and throughput of the student next to its teachers."""
    p = sub.add_parser("bench-serve", help="serving speed of the student vs each teacher and their ensemble, "
                                           "PyTorch vs ONNX Runtime, side by side")
    p.add_argument("--student", required=True, metavar="DIR", help="a student dir (fastmt distill)")
    p.add_argument("--teachers", required=True, metavar="DIR", help="its teachers dir (fastmt cofinetune)")
    p.add_argument("--data", required=True, metavar="F", help="rows to serve, in order: " + DATA_HELP)
    p.add_argument("--batch-sizes", default="1,32", metavar="B,B", help="batch sizes to time (default 1,32)")
    p.add_argument("--batches", type=int, default=40, help="timed batches per batch size and model (default 40)")
    p.add_argument("--max-length", type=int, default=None, help="longest tokenized row (default: the student's run's)")
    p.add_argument("--no-onnx", action="store_true", help="PyTorch only (no ONNX Runtime column)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the rows as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_memory(sub) -> None:
    """``fastmt memory``: peak memory by phase."""
    p = sub.add_parser("memory", help="peak GPU memory by phase, fast vs reference, and the largest batch")
    p.add_argument("--device", type=parse_device, default="auto", help=DEVICE_HELP + "; the report needs a GPU")
    p.add_argument("--preset", default="tiny", choices=["tiny", "base"], help="tiny (CPU-sized) or base (3 BERT-base teachers)")
    p.add_argument("--out", default=None, metavar="DIR", help="report dir (default ./memory-report)")
    p.add_argument("--budget-gb", type=float, default=None, help="memory budget for the largest batch (default 90%% of the GPU)")
    p.add_argument("--search-s", type=float, default=10.0, metavar="S",
                   help="time for the largest-batch search, per mode (default 10; 0 tries the preset's batch only)")
    p.add_argument("--snapshot-mb", type=float, default=15.0, metavar="MB",
                   help="largest allocator snapshot to write; stack frames are cut to fit (default 15; 0: none)")


def settings_from(ns: argparse.Namespace, cls):
    """The settings object ``cls`` that the parsed flags give (``--quiet`` also hides the progress bar)."""
    kw = settings_kwargs(ns, cls)
    kw["progress"] = kw["progress"] and not ns.quiet
    return cls(**kw)


def _columns(ns):
    from fastmt.data.dataset import Columns  # here: it imports torch (see the handlers below)

    return Columns(ns.text_column, ns.text_pair_column, ns.label_column)


def _score(res) -> str:
    if res.metric == "accuracy":
        return f"accuracy {res.best_dev_accuracy:.4f}"
    return f"{res.metric} {res.best_dev_score:.4f} (accuracy {res.best_dev_accuracy:.4f})"


def run(ns: argparse.Namespace) -> int:
    handler = COMMANDS.get(ns.command)
    if handler is None:
        raise UsageError("no command given (see fastmt --help)")
    handler(ns)
    return 0


# The handlers import their task where they run it, not at the top: the tasks import torch and
# transformers (measured on 2 cores: 4-7 s), and `fastmt --help` takes 0.2 s without them.


def _cofinetune(ns: argparse.Namespace) -> None:
    from fastmt.tasks.classification.cofinetune import cofinetune

    res = cofinetune(ns.teacher, settings_from(ns, TrainArgs))
    print(f"teachers saved to {res.out}: best dev {_score(res)} (ensemble) at epoch {res.best_epoch}, {res.train_s:.1f}s")


def _distill(ns: argparse.Namespace) -> None:
    from fastmt.tasks.classification.distill import distill

    res = distill(settings_from(ns, DistillArgs))
    print(f"student saved to {res.out}: best dev {_score(res)} at epoch {res.best_epoch}, {res.train_s:.1f}s")


def _eval(ns: argparse.Namespace) -> None:
    if ns.batch_size < 1:
        raise UsageError(f"--batch-size {ns.batch_size}: must be at least 1")
    from fastmt.tasks.classification.evaluate import evaluate_dir

    result = evaluate_dir(ns.model, ns.data, ns.device, ns.batch_size, columns=_columns(ns))
    if result["kind"] == "teachers":
        for t in result["teachers"]:
            print(f"teacher {t['name']}: accuracy {t['accuracy']:.4f} (n={t['n']})")
    who = "ensemble" if result["kind"] == "teachers" else "student"
    print(f"{who}: accuracy {result['accuracy']:.4f}, macro-F1 {result['f1']:.4f}, MCC {result['mcc']:.4f} (n={result['n']})")
    width = max([len(k) for k in result["per_class"]] + [5])
    print(f"  {'class':<{width}}  precision  recall      f1  support")
    for name, row in result["per_class"].items():
        print(f"  {name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  {row['support']:7d}")
    if ns.json:
        from fastmt.engine.fileio import write_json

        write_json(ns.json, result)


def _predict(ns: argparse.Namespace) -> None:
    from fastmt.serve.predict import predict_file

    if ns.max_length is not None and ns.max_length < 2:
        raise UsageError(f"--max-length {ns.max_length}: must be at least 2")
    res = predict_file(ns.model, ns.data, ns.out, resolve_device(ns.device), ns.batch_size, ns.max_length, _columns(ns))
    counts = ", ".join(f"{k} {v}" for k, v in res["counts"].items())
    print(f"{res['n']} predictions written to {res['out']} ({counts})")


def _export(ns: argparse.Namespace) -> None:
    if ns.format == "onnx":
        from fastmt.serve.onnx import export_onnx

        res = export_onnx(ns.model, ns.out)
        for f in res["files"]:
            print(f"{f['path']}: written; ONNX Runtime gives fastmt's logits to {f['max_abs_diff']:.1e}")
        return
    from fastmt.serve.export import export_dir

    res = export_dir(ns.model, ns.out)
    print(f"{res['kind']} dir written to {res['out']}: loads with AutoModelForSequenceClassification.from_pretrained"
          + ("" if res.get("stock", True) else " (trust_remote_code=True: its head has no stock class)"))


def _demo(ns: argparse.Namespace) -> None:
    from fastmt.tasks.demo import run_demo

    run_demo(out=ns.out, seed=ns.seed, fast=ns.fast, progress=not ns.quiet)


def _check(ns: argparse.Namespace) -> None:
    from fastmt.tools.check import run_check

    failed = run_check(ns.device, ns.quick, ns.json)
    if failed:
        raise FastmtError(f"fastmt check: {failed} case(s) over tolerance")


def _bench(ns: argparse.Namespace) -> None:
    from fastmt.tools.bench import run_bench

    run_bench(ns.device, ns.preset, ns.json, ns.steps, ns.modes, ns.rounds, ns.profile)


def _bench_serve(ns: argparse.Namespace) -> None:
    from fastmt.serve import bench as bench_serve

    try:
        sizes = [int(x) for x in ns.batch_sizes.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes {ns.batch_sizes}: expected comma-separated integers, e.g. 1,32") from None
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-sizes {ns.batch_sizes}: each must be at least 1")
    if ns.batches < 1:
        raise UsageError(f"--batches {ns.batches}: must be at least 1")
    def bar(bs, done, total):
        print(f"\rbatch size {bs}: {done}/{total} batches", end="\n" if done == total else "", file=sys.stderr, flush=True)

    show = not ns.no_progress and not getattr(ns, "quiet", False)
    res = bench_serve.run_bench(ns.student, ns.teachers, ns.data, sizes, ns.batches, ns.max_length, not ns.no_onnx,
                                progress=bar if show else None)
    print(f"{res['machine']}, torch {res['torch']}" + (f", onnxruntime {res['onnxruntime']}" if res["onnxruntime"] else "")
          + f"; {res['timed_batches']} timed batches per cell; rows of {res['token_lengths']['mean']:.0f} tokens on average")
    print(bench_serve.format_table(res))
    if ns.json:
        bench_serve.write_json(ns.json, res)


def _memory(ns: argparse.Namespace) -> None:
    from fastmt.tools.memory import run_memory

    if ns.budget_gb is not None and not ns.budget_gb > 0:
        raise UsageError(f"--budget-gb {ns.budget_gb}: must be positive")
    run_memory(ns.device, ns.preset, ns.out, ns.budget_gb, search_s=ns.search_s, snapshot_mb=ns.snapshot_mb)


def _distill_lm(ns: argparse.Namespace) -> None:
    from fastmt.tasks.lm.distill import distill_lm

    res = distill_lm(settings_from(ns, DistillLMArgs))
    d = res.extra["dev"]
    print(f"student saved to {res.out}: dev perplexity {d['perplexity']:.2f}, next-token accuracy {d['accuracy']:.4f} "
          f"(best epoch {res.best_epoch}), {res.train_s:.1f}s")


def _eval_lm(ns: argparse.Namespace) -> None:
    from fastmt.engine.fileio import write_json
    from fastmt.tasks.lm.evaluate import eval_lm

    if ns.max_length < 2:
        raise UsageError(f"--max-length {ns.max_length}: a block needs at least 2 tokens")
    if ns.batch_size < 1:
        raise UsageError(f"--batch-size {ns.batch_size}: must be at least 1")
    rows = eval_lm(ns.model, ns.data, ns.max_length, ns.batch_size, ns.device, ns.text_column)
    width = max(len(r["model"]) for r in rows)
    print(f"{'model':<{width}}  {'tokens':>8}  {'perplexity':>10}  {'next-token acc':>14}")
    for r in rows:
        print(f"{r['model']:<{width}}  {r['tokens']:>8}  {r['perplexity']:>10.2f}  {r['accuracy']:>14.4f}")
    if ns.json:
        write_json(ns.json, {"data": ns.data, "max_length": ns.max_length, "models": rows})


# Each command and the function that runs it (its flags: the _add_<command> builders above).
COMMANDS = {"cofinetune": _cofinetune, "distill": _distill, "eval": _eval, "predict": _predict, "export": _export,
            "demo": _demo, "check": _check, "bench": _bench, "bench-serve": _bench_serve, "memory": _memory,
            "distill-lm": _distill_lm, "eval-lm": _eval_lm}


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


REPLAY_SKIP = {"resume", "overwrite", "progress", "config", "debug", "quiet", "help"}


def _replay(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--config FILE`` (a run's config.json, or its run dir): the flags that reproduce that run,
    placed before the command line's own flags, which therefore win (a repeated ``--teacher`` on the
    command line replaces the saved list). ``--resume``/``--overwrite`` are never replayed."""
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return argv
    cmd = next((a for a in argv if not a.startswith("-")), None)
    rest, path = [], None
    it = iter(argv)
    for a in it:
        if a == "--config":
            path = next(it, None)
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
    if cmd not in ("cofinetune", "distill"):
        raise UsageError("--config replays a cofinetune or distill run: put it after one of those commands")
    if not path:
        raise UsageError("--config: give a run's config.json (or its run dir)")
    from fastmt.engine.fileio import read_json  # here, as the handlers' imports: these import torch
    from fastmt.models.modeldir import fastmt_block

    f = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    try:
        run_cfg = (fastmt_block(read_json(f)) or {}).get("run")
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"--config {path}: cannot read a run config ({e.__class__.__name__})") from None
    if not isinstance(run_cfg, dict) or run_cfg.get("command") != cmd:
        saved = run_cfg.get("command") if isinstance(run_cfg, dict) else None
        raise UsageError(f"--config {path}: not a {cmd} run" + (f" (it is a {saved} run)" if saved else ""))
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    given = {a.split("=", 1)[0] for a in rest if a.startswith("--")}
    flags: list[str] = []
    for action in sub._actions:
        dest = action.dest
        if not action.option_strings or dest in REPLAY_SKIP or set(action.option_strings) & given:
            continue
        value = run_cfg.get("teachers" if dest == "teacher" else dest)
        if value is None:
            continue
        name = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            flags.append(name if value else action.option_strings[1])
        elif isinstance(action, argparse._StoreTrueAction):
            flags += [name] if value else []
        elif isinstance(action, argparse._AppendAction):
            for v in value:
                flags += [name, str(v)]
        elif isinstance(value, list):
            flags += [name, ",".join(str(v) for v in value)]
        else:
            flags += [name, str(value)]
    i = rest.index(cmd) + 1
    return rest[:i] + flags + rest[i:]


def main(argv: list[str] | None = None) -> int:
    argv = _attach_negative_numbers(sys.argv[1:] if argv is None else list(argv))
    debug = "--debug" in argv
    parser = build_parser()
    try:
        stopping.command_line = list(argv)  # before --config is replayed: what the user typed
        argv = _replay(parser, argv)
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
        code = 2 if isinstance(e, (UsageError, DataError)) else getattr(e, "exit_code", 1)
        if isinstance(e, OSError) and not isinstance(e, FastmtError):
            msg = f"{e.filename}: {e.strerror}" if getattr(e, "filename", None) else str(e)
        else:
            msg = str(e)
        from fastmt.engine.faults import StoppedBySignal  # here, as the handlers' imports: it imports torch

        said = "fastmt: " if isinstance(e, StoppedBySignal) else "fastmt: error: "  # asked for, not an error
        print(f"{said}{' '.join(msg.split()) or type(e).__name__}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
