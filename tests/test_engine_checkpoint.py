"""``--resume`` and the settings a resumed run may change: each settings class names them
(``RESUME_MAY_CHANGE``) and ``fastmt.engine.rundir.check_resume`` refuses any other change in one line.
distill-lm's top-k cache changes the loss, so there ``--cache-teachers`` (with ``--top-k`` and
``--temperature``) must stay as it was; classification's cache is exact, so there it may change."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli
from fastmt.config.settings import DistillArgs, DistillLMArgs, TrainArgs
from fastmt.engine.checkpoint import changed_settings, load_checkpoint, refuse_changed_settings
from fastmt.errors import UsageError
from test_tasks_lm_distill import _cached_argv, lm_dir  # noqa: F401 - lm_dir: the tiny causal LMs, a fixture used here

SETTINGS = (TrainArgs, DistillArgs, DistillLMArgs)


@pytest.mark.parametrize("cls", SETTINGS)
def test_what_a_resume_may_change_are_settings_of_the_class(cls):
    fields = {f.name for f in dataclasses.fields(cls)}
    assert cls.RESUME_MAY_CHANGE <= fields, sorted(cls.RESUME_MAY_CHANGE - fields)
    assert "RESUME_MAY_CHANGE" not in fields  # a class attribute, not a setting a run records
    assert {"save_every", "log_every", "report_to", "resume"} <= cls.RESUME_MAY_CHANGE
    assert not {"lr", "seed", "epochs", "batch_size", "max_length", "precision"} & cls.RESUME_MAY_CHANGE


def test_the_cache_may_change_on_a_classification_resume_only():
    assert {"cache_teachers", "cache_budget_gb"} <= DistillArgs.RESUME_MAY_CHANGE
    assert "cache_budget_gb" in DistillLMArgs.RESUME_MAY_CHANGE
    assert not {"cache_teachers", "top_k", "temperature"} & DistillLMArgs.RESUME_MAY_CHANGE
    assert "temperature" not in DistillArgs.RESUME_MAY_CHANGE


def test_a_refusal_is_one_line_naming_each_flag_with_its_old_and_new_value():
    saved = {"command": "distill-lm", "top_k": 8, "cache_teachers": "/c", "log_every": 2, "layer_maps": [[]]}
    new = {**saved, "top_k": 4, "cache_teachers": None, "log_every": 1, "layer_maps": [[1]]}
    may_change = DistillLMArgs.RESUME_MAY_CHANGE
    assert changed_settings(saved, new, may_change) == ["cache_teachers", "layer_maps", "top_k"]
    with pytest.raises(UsageError) as caught:
        refuse_changed_settings(saved, new, may_change, flags={"top_k", "cache_teachers", "log_every"})
    said = str(caught.value)
    assert "\n" not in said and said.startswith("--resume: these settings differ from the interrupted run (")
    assert "--cache-teachers: '/c' -> None, layer_maps: [[]] -> [[1]], --top-k: 8 -> 4)" in said
    assert "log" not in said  # --log-every may change
    refuse_changed_settings(saved, {**saved, "cache_teachers": None}, DistillArgs.RESUME_MAY_CHANGE)  # no refusal
    refuse_changed_settings(saved, {**saved, "log_every": 9}, TrainArgs.RESUME_MAY_CHANGE)


# ---------------------------------------------------------------------------------------------------
# distill-lm end to end: a cached run stopped after step 3 (its checkpoint at step 2), then resumed


@pytest.fixture(scope="module")
def interrupted(lm_dir, tmp_path_factory):  # noqa: F811 - lm_dir is the imported fixture
    d = tmp_path_factory.mktemp("resume")
    out, cache = d / "run", d / "cache"
    argv = [sys.executable, "-m", "fastmt", *_cached_argv(lm_dir, out, cache, "--save-every", "2")]
    killed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, FASTMT_FAULT_KILL_AFTER_STEP="3"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return out, cache


def _resume_argv(lm_dir, out, cache, *extra):  # noqa: F811 - lm_dir: the dir, not the fixture
    return _cached_argv(lm_dir, out, cache, "--save-every", "2", "--resume", *extra)


def _step(out):
    return json.loads((out / "checkpoint" / "meta.json").read_text())["step"]


@pytest.mark.parametrize("flag, value, said", [
    ("--top-k", "4", "--top-k: 8 -> 4"),
    ("--temperature", "2", "--temperature: 1.0 -> 2.0"),
    ("--cache-teachers", "off", "--cache-teachers: '{cache}' -> None"),
    ("--cache-teachers", "{other}", "--cache-teachers: '{cache}' -> '{other}'"),
])
def test_distill_lm_resume_refuses_a_change_of_what_the_loss_reads(flag, value, said, interrupted, lm_dir,  # noqa: F811
                                                                   tmp_path):
    out, cache = interrupted
    other = tmp_path / "other-cache"
    argv = _resume_argv(lm_dir, out, cache)
    value = value.format(other=other)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    before = {f.name: f.read_bytes() for f in sorted(cache.iterdir()) if f.is_file()}
    r = run_cli(*argv)
    assert r.returncode == 2, r.stderr
    # Refused before the cache opens: the cache the run filled so far is as it was, and no other one is made.
    assert {f.name: f.read_bytes() for f in sorted(cache.iterdir()) if f.is_file()} == before and before
    assert not other.exists()
    errors = [x for x in r.stderr.splitlines() if x.startswith("fastmt: error:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr
    assert said.format(cache=cache, other=other) in errors[0] and "--overwrite" in errors[0], errors[0]
    assert "Traceback" not in r.stderr
    assert _step(out) == 2 and not (out / "model.safetensors").exists()  # the interrupted run as it was


def test_load_checkpoint_compares_settings_only_with_a_rule(interrupted):
    """Without ``may_change`` the state is read whatever ``run_config`` says (``check_resume`` has
    compared them with the settings class's rule before the run was built); with it, refused."""
    out, _ = interrupted
    state = load_checkpoint(out, {"top_k": 1}, mmap=True)
    assert state["run_config"]["top_k"] == 8
    with pytest.raises(UsageError, match=r"top_k: 8 -> 1"):
        load_checkpoint(out, {**state["run_config"], "top_k": 1}, mmap=True, may_change=DistillLMArgs.RESUME_MAY_CHANGE)


def test_distill_lm_resume_with_flags_that_may_change_gives_the_uninterrupted_model(interrupted, lm_dir,  # noqa: F811
                                                                                    tmp_path):
    """--cache-budget-gb and --log-every change nothing the run computes: the resumed run goes on from
    step 2 and ends with the weights of a run never stopped."""
    out, cache = interrupted
    assert _step(out) == 2
    r = run_cli(*_resume_argv(lm_dir, out, cache, "--cache-budget-gb", "9", "--log-every", "1"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if x["event"] == "train"][:3] == [2, 3, 4]  # every 2 steps, then every step
    base = tmp_path / "base"
    r = run_cli(*_cached_argv(lm_dir, base, tmp_path / "base-cache"))
    assert r.returncode == 0, r.stderr
    a, b = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
