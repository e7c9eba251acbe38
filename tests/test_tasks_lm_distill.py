"""``fastmt distill-lm`` and ``fastmt eval-lm`` on tiny causal LMs made here (no downloads): two Llama
teachers of different depths sharing one word-level tokenizer, a student cut from the first."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import fastmt  # noqa: F401 - first: from the checkout root, `kernels` must be Hugging Face's (fastmt/__init__.py)
from conftest import REPO, run_cli

WORDS = ("the a film movie story actor plot scene was is very quite rather good bad great dull fine funny slow "
         "moving long short and but it this that with".split())


def _tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def _llama(path, tok, layers, width=32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _text(path, n, seed):
    """Reviews from a small grammar (article noun verb adverb adjective): text a model can learn."""
    g = torch.Generator().manual_seed(seed)
    parts = [("the", "a"), ("film", "movie", "story", "plot"), ("was", "is"), ("very", "quite", "rather"),
             ("good", "bad", "great", "dull", "fine", "funny", "slow")]
    lines = [" ".join(p[int(torch.randint(0, len(p), (1,), generator=g))] for p in parts) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    tok = _tokenizer(d / "tok")
    _llama(d / "t0", tok, layers=3, seed=1)
    _llama(d / "t1", tok, layers=2, seed=2)
    _text(d / "train.txt", 120, seed=3)
    _text(d / "dev.txt", 20, seed=4)
    return d


def _argv(d, out, *extra):
    return ["distill-lm", "--teacher", d / "t0", "--teacher", d / "t1", "--student-layers", "1",
            "--train", d / "train.txt", "--dev", d / "dev.txt", "--out", out, "--epochs", "2", "--batch-size", "4",
            "--max-length", "16", "--device", "cpu", "--precision", "fp32", "--no-progress", "--log-every", "2",
            "--lr", "1e-3", *extra]


@pytest.fixture(scope="module")
def finished(lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "student"
    r = run_cli(*_argv(lm_dir, out, "--alpha-hidden", "1"))
    assert r.returncode == 0, r.stderr
    return out, r


def test_distill_lm_writes_a_causal_lm_that_pipeline_loads(finished):
    from transformers import AutoModelForCausalLM, pipeline

    out, r = finished
    assert "student saved to" in r.stdout and "dev perplexity" in r.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1
    gen = pipeline("text-generation", model=str(out), device="cpu")
    text = gen("the film was", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("the film was")
    run = json.loads((out / "fastmt_run.json").read_text())
    assert run["command"] == "distill-lm" and run["alpha_hidden"] == 1.0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [x for x in rows if "kd" in json.dumps(x)]
    assert train_rows, rows[:3]  # the KD term is logged beside the task's
    assert not (out / "checkpoint").exists()


def test_eval_lm_reports_each_model(finished, lm_dir, tmp_path):
    out, _ = finished
    js = tmp_path / "ppl.json"
    r = run_cli("eval-lm", "--model", out, "--model", lm_dir / "t0", "--model", lm_dir / "t1", "--data",
                lm_dir / "dev.txt", "--max-length", "16", "--device", "cpu", "--json", js)
    assert r.returncode == 0, r.stderr
    rows = json.loads(js.read_text())["models"]
    assert [x["model"] for x in rows] == [str(out), str(lm_dir / "t0"), str(lm_dir / "t1")]
    for x in rows:
        assert x["tokens"] > 0 and 1.0 < x["perplexity"] < 10 * len(WORDS) and 0 <= x["accuracy"] <= 1
    assert "perplexity" in r.stdout and str(out) in r.stdout


def test_training_lowers_the_students_perplexity(finished, lm_dir, tmp_path):
    """The distilled student beats the same cut of teacher 0 before training on held-out text."""
    from fastmt.data.packed import pack, read_texts
    from fastmt.models.causal_lm import cut_layers, load_lm, load_tokenizer
    from fastmt.tasks.lm.evaluate import lm_scores

    out, _ = finished
    tok = load_tokenizer(str(out), "--model")
    enc = pack(tok, read_texts(str(lm_dir / "dev.txt")), 16)
    before = lm_scores(cut_layers(load_lm(str(lm_dir / "t0"), "t"), 1), enc, 8, torch.device("cpu"))
    after = lm_scores(load_lm(str(out), "s"), enc, 8, torch.device("cpu"))
    assert after["nll"] < before["nll"] - 0.05, (before, after)


def test_fused_and_reference_losses_give_the_same_step(lm_dir):
    """One step's loss terms with --kernels fused (no N x V logits) and reference (materialised)."""
    from fastmt.data.dataset import iterate_batches
    from fastmt.data.packed import pack, read_texts
    from fastmt.losses import layer_map
    from fastmt.models.causal_lm import LMStudent, cut_layers, load_lm, load_tokenizer
    from fastmt.tasks.lm.common import KEY
    from fastmt.config.settings import DistillLMArgs
    from fastmt.tasks.lm.step import LMStep
    import fastmt.kernels as fused
    from fastmt import losses as reference

    teachers = [load_lm(str(lm_dir / t), "t") for t in ("t0", "t1")]
    enc = pack(load_tokenizer(str(lm_dir / "t0"), "t"), read_texts(str(lm_dir / "train.txt")), 16)
    batch = next(iter(iterate_batches({KEY: enc}, [0] * len(enc), 4, [16], False)))
    got = {}
    for name, mod in (("fused", fused), ("reference", reference)):
        args = DistillLMArgs(train="-", dev="", out="-", teacher=["a", "b"], student_layers=1, alpha_hidden=1.0,
                             temperature=2.0, weighting="softmax", precision="fp32", device="cpu")
        student = LMStudent(cut_layers(teachers[0], 1), 2, 1, 32, 32, True)
        maps = [layer_map(1, 3), layer_map(1, 2)]
        loss, parts = LMStep(student, teachers, args, mod, torch.device("cpu"), maps)(batch.inputs, batch.labels)
        loss.backward()
        got[name] = (loss.detach(), {k: v for k, v in parts.items()},
                     student.model.get_output_embeddings().weight.grad.clone())
    (lf, pf, gf), (lr_, pr, gr) = got["fused"], got["reference"]
    assert set(pf) == {"task", "kd", "hidden"}
    assert torch.allclose(lf, lr_, rtol=1e-5, atol=1e-6), (lf, lr_)
    for k in pf:
        assert torch.allclose(pf[k], pr[k], rtol=1e-5, atol=1e-6), (k, pf[k], pr[k])
    assert torch.allclose(gf, gr, rtol=1e-4, atol=1e-7)


def test_sigkill_then_resume_gives_the_uninterrupted_model(finished, lm_dir, tmp_path):
    out, _ = finished
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "fastmt", *map(str, _argv(lm_dir, run, "--alpha-hidden", "1", "--save-every", "3"))]
    import os

    env = dict(os.environ, FASTMT_FAULT_KILL_AFTER_STEP="7")
    killed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    r = run_cli(*_argv(lm_dir, run, "--alpha-hidden", "1", "--save-every", "3", "--resume"))
    assert r.returncode == 0, r.stderr
    a, b = load_file(out / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change, message", [
    (lambda d: ["--teacher", d / "other"], "vocabulary of"),
    (lambda d: ["--train", d / "missing.txt"], "missing.txt: no such file"),
    (lambda d: ["--teacher", d / "train.txt"], "not a causal language model"),
])
def test_user_mistakes_are_one_line(change, message, lm_dir, tmp_path):
    if not (lm_dir / "other").exists():  # a teacher with one more word in its vocabulary
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig.from_pretrained(lm_dir / "t1")
        cfg.vocab_size += 1
        LlamaForCausalLM(cfg).save_pretrained(lm_dir / "other")
        _tokenizer(lm_dir / "other")
    argv = [str(x) for x in _argv(lm_dir, tmp_path / "out")]
    extra = [str(x) for x in change(lm_dir)]
    flag = extra[0]
    if flag == "--teacher":
        argv[argv.index("--teacher") + 3] = extra[1]  # replace the second teacher
    else:
        argv[argv.index(flag) + 1] = extra[1]
    r = run_cli(*argv)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) >= 1 and message in lines[-1] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_ensemble_target_is_the_kl_to_the_mean_logits(lm_dir):
    """--kd-target ensemble: the KD term equals the reference KL to the teachers' averaged logits."""
    from fastmt.data.dataset import iterate_batches
    from fastmt.data.packed import next_tokens, pack, read_texts
    from fastmt.models.causal_lm import LMStudent, cut_layers, load_lm, load_tokenizer
    from fastmt.tasks.lm.common import KEY
    from fastmt.config.settings import DistillLMArgs
    from fastmt.tasks.lm.step import LMStep
    import fastmt.kernels as fused
    from fastmt import losses

    teachers = [load_lm(str(lm_dir / t), "t") for t in ("t0", "t1")]
    enc = pack(load_tokenizer(str(lm_dir / "t0"), "t"), read_texts(str(lm_dir / "train.txt")), 16)
    batch = next(iter(iterate_batches({KEY: enc}, [0] * len(enc), 4, [16], False)))
    args = DistillLMArgs(train="-", dev="", out="-", teacher=["a", "b"], student_layers=1, kd_target="ensemble",
                         temperature=2.0, precision="fp32", device="cpu")
    student = LMStudent(cut_layers(teachers[0], 1), 2, 1, 32, 32, False)
    _, parts = LMStep(student, teachers, args, fused, torch.device("cpu"), [[]])(batch.inputs, batch.labels)
    ids, mask = batch.inputs[KEY]["input_ids"], batch.inputs[KEY]["attention_mask"]
    with torch.no_grad():
        mean = torch.stack([t(input_ids=ids, attention_mask=mask).logits for t in teachers]).mean(0)
        s = student.model(input_ids=ids, attention_mask=mask).logits
        want = losses.lm_kl_loss(s.reshape(-1, s.shape[-1]).double(), mean.reshape(1, -1, mean.shape[-1]).double(),
                                 next_tokens(ids, mask).reshape(-1), "uniform", 2.0)
    assert torch.allclose(parts["kd"].double(), want, rtol=1e-5), (parts["kd"], want)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU and compiled Triton")


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_fused_step_matches_the_reference(lm_dir, precision):
    """On the GPU (compiled kernels, the chunks backend): one step's terms and d W, fused vs reference.
    fp32 with TF32 off agrees to float32 rounding; bf16 to a few of bf16's epsilons (the reference rounds
    its materialised logits to bf16, the fused loss keeps them in float32)."""
    from fastmt.data.dataset import iterate_batches
    from fastmt.data.packed import pack, read_texts
    from fastmt.losses import layer_map
    from fastmt.models.causal_lm import LMStudent, cut_layers, load_lm, load_tokenizer
    from fastmt.tasks.lm.common import KEY
    from fastmt.config.settings import DistillLMArgs
    from fastmt.tasks.lm.step import LMStep
    import fastmt.kernels as fused
    from fastmt import losses as reference

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    teachers = [load_lm(str(lm_dir / t), "t").to(dev).eval() for t in ("t0", "t1")]
    enc = pack(load_tokenizer(str(lm_dir / "t0"), "t"), read_texts(str(lm_dir / "train.txt")), 16)
    batch = next(iter(iterate_batches({KEY: enc}, [0] * len(enc), 8, [16], False)))
    inputs = {KEY: {k: v.to(dev) for k, v in batch.inputs[KEY].items()}}
    got = {}
    for name, mod in (("fused", fused), ("reference", reference)):
        args = DistillLMArgs(train="-", dev="", out="-", teacher=["a", "b"], student_layers=1, alpha_hidden=1.0,
                             temperature=2.0, weighting="paper", precision=precision, device="cuda")
        torch.manual_seed(0)
        student = LMStudent(cut_layers(load_lm(str(lm_dir / "t0"), "t"), 1), 2, 1, 32, 32, True).to(dev)
        maps = [layer_map(1, 3), layer_map(1, 2)]
        loss, parts = LMStep(student, teachers, args, mod, dev, maps)(inputs, None)
        loss.backward()
        got[name] = (loss.detach().float(), {k: v.float() for k, v in parts.items()},
                     student.model.get_output_embeddings().weight.grad.float().clone())
    (lf, pf, gf), (lr_, pr, gr) = got["fused"], got["reference"]
    # fp32: summation order only (GPU reductions), far below any fault's size; bf16: a few roundings.
    tol = 1e-4 if precision == "fp32" else 8 * torch.finfo(torch.bfloat16).eps
    gtol = 1e-4 if precision == "fp32" else 4 * torch.finfo(torch.bfloat16).eps
    assert set(pf) == {"task", "kd", "hidden"}
    assert torch.isfinite(lf) and torch.allclose(lf, lr_, rtol=tol, atol=tol), (lf, lr_)
    for k in pf:
        assert torch.allclose(pf[k], pr[k], rtol=tol, atol=tol), (k, pf[k], pr[k])
    scale = gr.abs().max()
    assert scale > 0 and (gf - gr).abs().max() <= gtol * scale, ((gf - gr).abs().max(), scale)


@needs_cuda
def test_distill_lm_trains_on_cuda_with_the_fused_loss(lm_dir, tmp_path):
    """The command on the GPU: bf16, --kernels auto (the fused loss there); the output loads and scores."""
    out = tmp_path / "student"
    argv = [str(x) for x in _argv(lm_dir, out, "--alpha-hidden", "1")]
    argv[argv.index("--device") + 1] = "cuda"
    argv[argv.index("--precision") + 1] = "bf16"
    r = run_cli(*argv)
    assert r.returncode == 0, r.stderr
    assert "dev perplexity" in r.stdout
    run = json.loads((out / "fastmt_run.json").read_text())
    assert run["kernels"] == "fused", run
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


# --------------------------------------------------------------------------------------------------
# --cache-teachers: the teachers' top-k stored on the first pass, read back after


def _cached_setup(lm_dir, tmp_path, top_k, **kw):
    from fastmt.data.dataset import iterate_batches
    from fastmt.data.packed import pack, read_texts
    from fastmt.models.causal_lm import LMStudent, cut_layers, load_lm, load_tokenizer
    from fastmt.tasks.lm.common import KEY
    from fastmt.config.settings import DistillLMArgs
    from fastmt.tasks.lm.cached import CachedLMStep, fit_top_k, open_cache

    teachers = [load_lm(str(lm_dir / t), "t").eval() for t in ("t0", "t1")]
    enc = pack(load_tokenizer(str(lm_dir / "t0"), "t"), read_texts(str(lm_dir / "train.txt")), 16)
    args = DistillLMArgs(train="-", dev="", out="-", teacher=["a", "b"], student_layers=1, temperature=2.0,
                         weighting="softmax", precision="fp32", device="cpu", top_k=top_k, max_length=16,
                         cache_teachers=str(tmp_path / "cache"), **kw)
    fit_top_k(args, len(WORDS) + 3)  # as distill_lm does, before the settings are kept
    cache = open_cache(args, [str(lm_dir / "t0"), str(lm_dir / "t1")], str(lm_dir / "t0"), enc.input_ids, len(WORDS) + 3)
    torch.manual_seed(0)
    student = LMStudent(cut_layers(teachers[0], 1), 2, 1, 32, 32, False)
    step = CachedLMStep(student, teachers, args, torch.device("cpu"), cache)
    batch = next(iter(iterate_batches({KEY: enc}, [0] * len(enc), 4, [16], False)))
    return step, student, teachers, args, batch


def _w_grad(student):
    w = student.model.get_output_embeddings().weight
    g = w.grad.clone()
    w.grad = None
    return g


def test_cached_step_runs_the_teachers_once_then_reads_the_same_values_back(lm_dir, tmp_path):
    step, student, _, _, batch = _cached_setup(lm_dir, tmp_path, top_k=5)
    loss1, parts1 = step(batch.inputs, batch.labels, batch.index)
    loss1.backward()
    g1 = _w_grad(student)
    assert step.teacher_runs == 1 and set(parts1) == {"task", "kd"} and parts1["kd"] > 0
    assert all(step.cache.filled[int(i)] for i in batch.index)
    loss2, parts2 = step(batch.inputs, batch.labels, batch.index)
    loss2.backward()
    assert step.teacher_runs == 1  # read back: no teacher ran
    assert torch.equal(loss1, loss2) and torch.equal(parts1["kd"], parts2["kd"]) and torch.equal(g1, _w_grad(student))


def test_cached_kd_with_every_token_stored_is_the_full_kl(lm_dir, tmp_path):
    """--top-k at the vocabulary size: the cached term equals the exact loss of the run without a cache."""
    from fastmt import losses
    from fastmt.tasks.lm.step import LMStep

    step, student, teachers, args, batch = _cached_setup(lm_dir, tmp_path, top_k=len(WORDS) + 3)
    _, parts = step(batch.inputs, batch.labels, batch.index)
    full = LMStep(student, teachers, args, losses, torch.device("cpu"), [[]])
    _, want = full(batch.inputs, batch.labels)
    assert torch.allclose(parts["kd"], want["kd"], rtol=1e-5, atol=1e-7), (parts["kd"], want["kd"])
    assert torch.allclose(parts["task"], want["task"], rtol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_cached_kd_in_chunks_equals_the_reference_on_materialised_logits(lm_dir, tmp_path, direction):
    """topk_kd (rows in chunks, recomputed in backward) against fastmt.losses.lm_topk_kl_loss on the whole
    student logits and the teachers' top-k of their full logits: value and d W, float64."""
    from fastmt import losses
    from fastmt.cache.topk import topk_from_logits
    from fastmt.data.packed import next_tokens
    from fastmt.tasks.lm.common import KEY
    from fastmt.tasks.lm.cached import topk_kd

    _, student, teachers, args, batch = _cached_setup(lm_dir, tmp_path, top_k=4)
    ids, mask = batch.inputs[KEY]["input_ids"], batch.inputs[KEY]["attention_mask"]
    y = next_tokens(ids, mask).reshape(-1)
    with torch.no_grad():
        t_logits = torch.stack([t(input_ids=ids, attention_mask=mask).logits for t in teachers]).flatten(1, 2)
        h = student.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1)
    top_ids, top_lp, tail, target = topk_from_logits(t_logits.double(), y, 4, 2.0)
    w = student.model.get_output_embeddings().weight.detach().double().requires_grad_()
    h = h.double()
    got = topk_kd(h, w, top_ids, top_lp, tail, target, y, "paper", 2.0, direction, rows=7)
    (g_got,) = torch.autograd.grad(got, w)
    want = losses.lm_topk_kl_loss(h @ w.t(), top_ids, top_lp, y, "paper", 2.0, -100, direction,
                                  target_logprobs=target, tail_logprobs=tail)
    (g_want,) = torch.autograd.grad(want, w)
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12), (got, want)
    assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-15)
    full = losses.lm_kl_loss(h @ w.t(), t_logits.double(), y, "paper", 2.0, -100, direction) if direction == "forward" else None
    if full is not None:  # merging cells never raises the KL
        assert float(want.detach()) <= float(full.detach()) + 1e-9


def _cached_argv(lm_dir, out, cache, *extra):
    return [str(x) for x in _argv(lm_dir, out, "--cache-teachers", cache, "--top-k", "8", *extra)]


def test_distill_lm_with_the_cache_trains_the_same_model_from_stored_teachers(lm_dir, tmp_path):
    """Run 1 fills the cache (the teachers run in epoch 1 only); run 2 reads it all (no teacher runs)
    and trains the same weights, bit for bit; another --top-k rebuilds it, said in one line."""
    cache = tmp_path / "cache"
    r1 = run_cli(*_cached_argv(lm_dir, tmp_path / "a", cache))
    assert r1.returncode == 0, r1.stderr
    assert "the teachers ran on 12 batches" in r1.stderr, r1.stderr  # 45 blocks, batches of 4, 2 epochs
    r2 = run_cli(*_cached_argv(lm_dir, tmp_path / "b", cache))
    assert r2.returncode == 0, r2.stderr
    assert "45 of 45 blocks stored" in r2.stderr and "the teachers ran on 0 batches" in r2.stderr, r2.stderr
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    run = json.loads((tmp_path / "a" / "fastmt_run.json").read_text())
    assert run["cache_teachers"] == str(cache) and run["top_k"] == 8
    r3 = run_cli(*[x if x != "8" else "4" for x in _cached_argv(lm_dir, tmp_path / "c", cache)])
    assert r3.returncode == 0, r3.stderr
    assert "made for other inputs (k differ)" in r3.stderr and "the teachers ran on 12 batches" in r3.stderr


def test_sigkill_while_the_cache_fills_then_resume_gives_the_uninterrupted_model(lm_dir, tmp_path):
    import os

    base = tmp_path / "base"
    assert run_cli(*_cached_argv(lm_dir, base, tmp_path / "c0")).returncode == 0
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "fastmt", *_cached_argv(lm_dir, run, tmp_path / "c1", "--save-every", "3")]
    env = dict(os.environ, FASTMT_FAULT_KILL_AFTER_STEP="7")
    killed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    r = run_cli(*_cached_argv(lm_dir, run, tmp_path / "c1", "--save-every", "3", "--resume"))
    assert r.returncode == 0, r.stderr
    assert "the teachers ran on 5 batches" in r.stderr, r.stderr  # steps 8..12 of epoch 1; 1..7 were stored
    a, b = load_file(base / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, message", [
    (["--alpha-hidden", "1"], "--alpha-hidden 1.0 needs their hidden states"),
    (["--kd-target", "ensemble"], "--kd-target teachers or --cache-teachers off"),
    (["--top-k", "0"], "--top-k 0: must be at least 1"),
    (["--cache-budget-gb", "0.0001", "--top-k", "8"], "lower --top-k or raise --cache-budget-gb"),
])
def test_cache_mistakes_are_one_line(extra, message, lm_dir, tmp_path):
    argv = [str(x) for x in _argv(lm_dir, tmp_path / "out", "--cache-teachers", tmp_path / "cache", *extra)]
    r = run_cli(*argv)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


@needs_cuda
def test_cached_teachers_on_cuda(lm_dir, tmp_path):
    """--cache-teachers on the GPU in bf16: the first run fills the cache, the second runs no teacher."""
    cache = tmp_path / "cache"
    outs = []
    for name in ("a", "b"):
        argv = _cached_argv(lm_dir, tmp_path / name, cache)
        argv[argv.index("--device") + 1] = "cuda"
        argv[argv.index("--precision") + 1] = "bf16"
        outs.append(run_cli(*argv))
        assert outs[-1].returncode == 0, outs[-1].stderr
    assert "the teachers ran on 12 batches" in outs[0].stderr, outs[0].stderr
    assert "the teachers ran on 0 batches" in outs[1].stderr, outs[1].stderr
    ppl = [float(r.stdout.split("dev perplexity ")[1].split(",")[0]) for r in outs]
    assert all(math.isfinite(p) and p < 10 * len(WORDS) for p in ppl), ppl


def test_compiled_bodies_give_the_eager_step(lm_dir):
    """--compile: the models' bodies under torch.compile; the step's terms and d W equal the eager
    step's, batch after batch, including a shorter last batch (one more graph per body, at most)."""
    import torch._dynamo
    from fastmt.data.dataset import iterate_batches
    from fastmt.data.packed import pack, read_texts
    from fastmt.losses import layer_map
    from fastmt.models.causal_lm import LMStudent, cut_layers, load_lm, load_tokenizer
    from fastmt.tasks.lm.common import KEY
    from fastmt.config.settings import DistillLMArgs
    from fastmt.tasks.lm.step import LMStep
    from fastmt import losses

    torch._dynamo.reset()
    teachers = [load_lm(str(lm_dir / t), "t").eval() for t in ("t0", "t1")]
    enc = pack(load_tokenizer(str(lm_dir / "t0"), "t"), read_texts(str(lm_dir / "train.txt")), 16)
    enc = type(enc)(enc.input_ids[:13], enc.token_type_ids[:13], enc.pad_id)
    batches = list(iterate_batches({KEY: enc}, [0] * 13, 4, [16], False))  # 4, 4, 4 and a last one of 1
    assert [len(b) for b in batches] == [4, 4, 4, 1]
    student = LMStudent(cut_layers(teachers[0], 1), 2, 1, 32, 32, True)
    steps = {}
    for compile in (False, True):
        args = DistillLMArgs(train="-", dev="", out="-", teacher=["a", "b"], student_layers=1, alpha_hidden=1.0,
                             temperature=2.0, precision="fp32", device="cpu", compile=compile)
        steps[compile] = LMStep(student, teachers, args, losses, torch.device("cpu"), [layer_map(1, 3), layer_map(1, 2)])
    w = student.model.get_output_embeddings().weight
    torch._dynamo.utils.counters.clear()
    for batch in batches:
        got = []
        for compile in (False, True):
            loss, parts = steps[compile](batch.inputs, batch.labels)
            loss.backward()
            got.append((loss.detach(), parts, w.grad.clone()))
            w.grad = None
        (le, pe, ge), (lc, pc, gc) = got
        assert torch.allclose(lc, le, rtol=1e-5), (lc, le)
        assert all(torch.allclose(pc[k], pe[k], rtol=1e-5, atol=1e-7) for k in pe)
        assert torch.allclose(gc, ge, rtol=1e-4, atol=1e-7)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 3 <= graphs <= 6, graphs  # three bodies, each at most once more for the last batch
