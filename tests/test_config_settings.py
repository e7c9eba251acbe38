"""The settings are the command line: each flag of a command that builds settings is a field of its
class (default, type, choices and help written there once), a Python caller and the command line make
equal objects, and every ``auto`` is resolved by the rules registered in ``fastmt.config.auto``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
from typing import ClassVar

import pytest
import torch

from conftest import REPO
from fastmt import cli
from fastmt.config import auto, flags
from fastmt.config.settings import CACHE_DEFAULT, DistillArgs, DistillLMArgs, KDArgs, TrainArgs
from fastmt.errors import UsageError

# command -> its settings class, what a Python caller must give, and what the command line must give.
COMMANDS = {
    "cofinetune": (TrainArgs, dict(train="t.tsv", dev="d.tsv", out="o"),
                   ["--teacher", "a", "--train", "t.tsv", "--dev", "d.tsv", "--out", "o"]),
    "distill": (DistillArgs, dict(train="t.tsv", dev="d.tsv", out="o", teachers="T", student_layers=2),
                ["--teachers", "T", "--student-layers", "2", "--train", "t.tsv", "--dev", "d.tsv", "--out", "o"]),
    "distill-lm": (DistillLMArgs, dict(train="t.txt", out="o", teacher=["a", "b"], student_layers=1),
                   ["--teacher", "a", "--teacher", "b", "--student-layers", "1", "--train", "t.txt", "--out", "o"]),
}
# The flags of each command that set no field: the command line's own, and cofinetune's teachers (an
# argument of cofinetune(), recorded beside the settings).
COMMAND_LINE_ONLY = {"help", "config", "debug", "quiet"}
NOT_SETTINGS = {"cofinetune": COMMAND_LINE_ONLY | {"teacher"}, "distill": COMMAND_LINE_ONLY,
                "distill-lm": COMMAND_LINE_ONLY}


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_python_and_the_command_line_make_the_same_settings(command):
    cls, need, argv = COMMANDS[command]
    api = cls(**need)
    from_cli = cli.settings_from(cli.build_parser().parse_args([command, *argv]), cls)
    assert dataclasses.asdict(api) == dataclasses.asdict(from_cli)
    assert type(from_cli) is cls


def test_distill_lm_trains_one_epoch_from_python_as_from_the_command_line():
    cls, need, argv = COMMANDS["distill-lm"]
    assert cls(**need).epochs == 1 and cls(**need).lr == 1e-4
    ns = cli.build_parser().parse_args(["distill-lm", *argv])
    assert ns.epochs == 1 and ns.dev == "" and ns.cache_teachers is None
    # The shared flags keep their own defaults for the other commands.
    assert TrainArgs(**COMMANDS["cofinetune"][1]).epochs == DistillArgs(**COMMANDS["distill"][1]).epochs == 3


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_is_a_field_and_every_field_a_flag(command):
    cls = COMMANDS[command][0]
    dests = {a.dest for a in _subparser(command)._actions}
    names = {f.name for f in dataclasses.fields(cls)}
    assert dests - names == NOT_SETTINGS[command]
    assert names - dests == set(cls.not_flags)
    assert "eval_batch_size" in cls.not_flags
    assert {"pooling", "head_lr"} <= (names - dests if command != "cofinetune" else dests)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_flag_says_what_its_field_says(command):
    cls = COMMANDS[command][0]
    actions = {a.dest: a for a in _subparser(command)._actions}
    for f in flags.flag_fields(cls):
        action, meta = actions[f.name], f.metadata
        assert action.option_strings[0] == flags.flag_name(f), f.name
        assert action.help == meta["help"], f.name
        assert (tuple(action.choices) if action.choices is not None else None) == meta["choices"], f.name
        if action.required:
            assert action.default is None, f.name
        elif f.default is not dataclasses.MISSING:
            assert action.default == f.default, f.name


def test_commands_differ_where_their_fields_do():
    """One field each, restated by a command whose default or wording differs."""
    by = {c: {a.dest: a for a in _subparser(c)._actions} for c in COMMANDS}
    assert [by[c]["lr"].default for c in COMMANDS] == [3e-5, 5e-5, 1e-4]
    assert by["distill"]["alpha_hidden"].default == 1.0 and by["distill-lm"]["alpha_hidden"].default == 0.0
    assert by["distill"]["cache_teachers"].default == CACHE_DEFAULT and by["distill-lm"]["cache_teachers"].default is None
    assert by["distill-lm"]["metric"].help == argparse.SUPPRESS and "accuracy" not in _subparser("distill-lm").format_help()
    assert by["distill"]["weighting"].help != by["distill-lm"]["weighting"].help
    assert "not used with --cache-teachers" in by["distill-lm"]["kernels"].help
    assert by["cofinetune"]["compile"].help != by["distill"]["compile"].help != by["distill-lm"]["compile"].help
    assert by["distill"]["dev"].required and not by["distill-lm"]["dev"].required  # distill-lm: a share of --train


def test_the_command_line_builds_its_flags_without_torch():
    code = ("import sys\nfrom fastmt import cli\n"
            "sub = next(a for a in cli.build_parser()._actions if a.dest == 'command')\n"
            "assert '--top-k' in ''.join(p.format_help() for p in sub.choices.values())\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
    r = subprocess.run([sys.executable, "-m", "fastmt", "distill-lm", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--top-k" in r.stdout, r.stderr


# --------------------------------------------------------------------------------------------------
# The flags, from a class made here


@dataclasses.dataclass(kw_only=True)
class Toy:
    not_flags: ClassVar[tuple[str, ...]] = ("kept",)

    name: str = flags.opt(help="a name", metavar="N")
    count: int = flags.opt(3, "how many")
    rate: float = flags.opt(0.5, "how fast")
    on: bool = flags.opt(False, "switch it on")
    shown: bool = flags.opt(True, "hide it", flag="--no-show")
    maybe: bool | None = flags.opt(None, "left to auto")
    items: list[str] = flags.opt(help="repeat it", factory=list)
    kind: str = flags.opt("a", "a kind", choices=("a", "b"))
    kept: int = flags.opt(7, "no flag")
    left: str | None = flags.opt(None, "one side", one_of="side")
    right: int = flags.opt(0, "the other side", one_of="side")


@dataclasses.dataclass(kw_only=True)
class BigToy(Toy):
    extra: int = flags.opt(1, "its own")
    count: int = flags.override(Toy, "count", default=5)


def _toy(cls, *argv):
    p = cli._Parser(prog="toy")
    flags.add_flags(p, cls)
    return cls(**flags.settings_kwargs(p.parse_args(list(argv)), cls))


def test_the_annotation_picks_the_flag_form():
    t = _toy(Toy, "--name", "x", "--right", "2", "--count", "4", "--rate", "0.25", "--on", "--no-show", "--no-maybe",
             "--items", "a", "--items", "b", "--kind", "b")
    assert (t.name, t.count, t.rate, t.on, t.shown, t.maybe, t.items, t.kind, t.kept, t.left, t.right) == (
        "x", 4, 0.25, True, False, False, ["a", "b"], "b", 7, None, 2)
    assert type(t.count) is int and type(t.rate) is float
    plain = _toy(Toy, "--name", "x", "--left", "l")
    assert plain == Toy(name="x", left="l")  # the defaults are the fields' (the list a fresh one)
    assert plain.items == [] and plain.maybe is None and plain.shown is True


@pytest.mark.parametrize("argv, needle", [
    (["--right", "1"], "--name"),  # a field without a default is a required flag
    (["--name", "x"], "one of the arguments --left --right is required"),
    (["--name", "x", "--left", "l", "--right", "1"], "not allowed with argument"),
    (["--name", "x", "--left", "l", "--kind", "c"], "--kind c: choose one of a, b"),
    (["--name", "x", "--left", "l", "--count", "many"], "--count"),
    (["--name", "x", "--left", "l", "--kept", "1"], "--kept"),  # not a flag
])
def test_flag_mistakes_are_one_line(argv, needle):
    with pytest.raises(UsageError, match=needle):
        _toy(Toy, *argv)


def test_a_subclass_lists_its_own_flags_first_and_restates_inherited_ones():
    assert [f.name for f in flags.flag_fields(BigToy)][:2] == ["extra", "name"]
    assert _toy(BigToy, "--name", "x", "--left", "l").count == 5 and Toy(name="x").count == 3
    assert BigToy.__dataclass_fields__["count"].metadata["help"] == "how many"
    with pytest.raises(TypeError, match="unknown"):
        flags.override(Toy, "count", hepl="typo")


# --------------------------------------------------------------------------------------------------
# The checks every distillation command shares, and distill-lm's own


@pytest.mark.parametrize("command", ["distill", "distill-lm"])
@pytest.mark.parametrize("kw, needle", [
    (dict(temperature=0.0), "--temperature"),
    (dict(weighting="best"), "--weighting"),
    (dict(kd_target="mean"), "--kd-target"),
    (dict(kernels="magic"), "--kernels"),
    (dict(alpha_kd=-1.0), "--alpha-kd"),
    (dict(cache_teachers=" "), "--cache-teachers: give a dir"),
    (dict(cache_budget_gb=-1.0), "--cache-budget-gb"),
    (dict(epochs=0), "--epochs"),
])
def test_the_shared_checks_refuse_alike(command, kw, needle):
    cls, need, _ = COMMANDS[command]
    assert issubclass(cls, KDArgs)
    with pytest.raises(UsageError, match=needle):
        cls(**need, **kw)


@pytest.mark.parametrize("kw, needle", [
    (dict(cache_teachers="c", alpha_hidden=1.0), "--alpha-hidden 1.0 needs their hidden states"),
    (dict(cache_teachers="c", kd_target="ensemble"), "--kd-target teachers or --cache-teachers off"),
    (dict(cache_teachers="c", alpha_kd=0.0), "--alpha-kd 0 turns it off"),
    (dict(top_k=0), "--top-k 0: must be at least 1"),
    (dict(student="s"), "give one of --student DIR"),
    (dict(teacher=[]), "--teacher: give at least one"),
    (dict(metric="f1"), "next-token accuracy"),
])
def test_distill_lm_refuses_what_its_cache_and_student_cannot_do(kw, needle):
    with pytest.raises(UsageError, match=needle):
        DistillLMArgs(**{**COMMANDS["distill-lm"][1], **kw})


def test_off_turns_either_cache_off():
    assert DistillLMArgs(**COMMANDS["distill-lm"][1], cache_teachers="off").cache_teachers is None
    assert DistillArgs(**COMMANDS["distill"][1], cache_teachers="off").cache_teachers is None
    assert DistillLMArgs(**COMMANDS["distill-lm"][1], cache_teachers="c", alpha_hidden=0.0).cache_teachers == "c"


# --------------------------------------------------------------------------------------------------
# One resolver


def test_each_command_that_builds_settings_has_its_rules():
    assert set(COMMANDS) <= set(auto.RULES)
    with pytest.raises(ValueError, match="no rules for 'nope'"):
        auto.resolve("nope", None, torch.device("cpu"), 1)


@pytest.mark.parametrize("command", ["distill", "distill-lm"])
@pytest.mark.parametrize("runs", [False, True])
def test_kernels_auto_is_fused_on_cuda_only_where_the_kernels_run(command, runs):
    """The rule both distillation commands share: on CUDA, asked whether the kernels run there."""
    cls, need, _ = COMMANDS[command]
    asked = []

    def fused_available(device):
        asked.append(device.type)
        return runs

    args = cls(**need, precision="fp32", compile=False)
    auto.resolve(command, args, torch.device("cuda"), 10, fused_available=fused_available)
    assert args.kernels == ("fused" if runs else "reference") and asked == ["cuda"]
    args = cls(**need, precision="fp32", compile=False)
    line = auto.resolve(command, args, torch.device("cpu"), 10, fused_available=fused_available)
    assert args.kernels == "reference" and "kernels reference (CPU)" in line and asked == ["cuda"]


def test_distill_lm_says_kernels_play_no_part_with_its_cache():
    cls, need, _ = COMMANDS["distill-lm"]
    cached = cls(**need, precision="fp32", cache_teachers="c", alpha_hidden=0.0)
    line = auto.resolve("distill-lm", cached, torch.device("cpu"), 10)
    assert "--kernels not used with --cache-teachers" in line and "compile off (10 steps < 1000)" in line
    explicit = cls(**need, precision="fp32", kernels="fused", compile=False, cache_teachers="c")
    assert auto.resolve("distill-lm", explicit, torch.device("cpu"), 10) == \
        "--kernels not used with --cache-teachers (the top-k loss is its own)"
    plain = cls(**need, precision="fp32", compile=False)
    assert auto.resolve("distill-lm", plain, torch.device("cpu"), 10) == "kernels reference (CPU)"
    # distill-lm leaves what it has no rule for as it was.
    assert (plain.group_by_length, plain.cache_teachers) == (None, None)


def test_data_parallel_runs_use_no_teacher_cache_asked_for_or_not(caplog):
    cls, need, _ = COMMANDS["distill"]
    default = cls(**need, precision="fp32", compile=False, epochs=3)
    line = auto.resolve("distill", default, torch.device("cpu"), 10, data_parallel=True)
    assert default.cache_teachers is None and "teacher cache off (data-parallel)" in line
    given = cls(**need, precision="fp32", compile=False, epochs=3, cache_teachers="/some/dir")
    with caplog.at_level(logging.WARNING, logger="fastmt"):
        auto.resolve("distill", given, torch.device("cpu"), 10, data_parallel=True)
    assert given.cache_teachers is None and "not used in data-parallel runs" in caplog.text
    one = cls(**need, precision="fp32", compile=False, epochs=3, cache_teachers="/some/dir")
    auto.resolve("distill", one, torch.device("cpu"), 10, data_parallel=False)
    assert one.cache_teachers == "/some/dir"


def test_the_resolved_settings_are_plain_values():
    """What a run records (config.json, fastmt_run.json) is JSON, with no ``auto`` left for the rules."""
    for command, (cls, need, _) in COMMANDS.items():
        args = cls(**need)
        auto.resolve(command, args, torch.device("cpu"), 5000, stackable=True, native_bf16=False)
        recorded = json.loads(json.dumps(dataclasses.asdict(args)))
        assert recorded["precision"] == "fp32" and recorded["compile"] is True, command
        assert "auto" not in (recorded.get("kernels"), recorded["head_lr"], recorded["device"]), command
