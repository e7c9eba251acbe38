"""``fastmt demo``: the whole method on a task fastmt generates itself. CPU only, no downloads.

The task ("review clauses") is deterministic, three-class and not solvable from a bag of words:
a sentence is one or two clauses such as "the plot was not very good", joined by "but", "and" or
"although". A clause's polarity is its adjective's, flipped by "not". The label is

    one clause            -> that clause's polarity (positive / negative)
    "A but B", "although A , B"  -> B's polarity (the contrast decides)
    "A and B"             -> the common polarity, or "mixed" when they disagree

so "good but not bad" and "not good but bad" hold the same words and have opposite labels. A share
of the training labels is flipped at random (annotators disagree); dev labels are clean. Teachers of
different shapes are built from configs with random weights, co-finetuned, and a smaller student is
then trained alone and distilled from them with MT-BERT, all through the same functions the CLI runs.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from fastmt.config.settings import DistillArgs, TrainArgs
from fastmt.models.classifier import Teachers, count_parameters
from fastmt.models.modeldir import quiet_transformers
from fastmt.tasks.classification.cofinetune import cofinetune
from fastmt.tasks.classification.distill import distill
from fastmt.tasks.classification.evaluate import evaluate_dir

SUBJECTS = ["the movie", "the plot", "the acting", "the music", "the ending", "the cast", "the script",
            "the pacing", "the dialogue", "the camera work", "the story", "the film"]
POSITIVE = ["good", "great", "fine", "superb", "moving", "clever", "charming", "fresh", "solid", "funny"]
NEGATIVE = ["bad", "awful", "dull", "weak", "boring", "clumsy", "tedious", "stale", "flat", "messy"]
ADVERBS = ["very", "really", "quite", "rather", "truly", "mostly"]
LABELS = ["mixed", "negative", "positive"]


def _clause(rng: random.Random) -> tuple[str, int]:
    pos = rng.random() < 0.5
    adj = rng.choice(POSITIVE if pos else NEGATIVE)
    neg = rng.random() < 0.4
    words = [rng.choice(SUBJECTS), "was"]
    if neg:
        words.append("not")
    if rng.random() < 0.4:
        words.append(rng.choice(ADVERBS))
    words.append(adj)
    polarity = (1 if pos else -1) * (-1 if neg else 1)
    return " ".join(words), polarity


def _example(rng: random.Random) -> tuple[str, str]:
    name = {1: "positive", -1: "negative"}
    form = rng.random()
    a, pa = _clause(rng)
    if form < 0.2:
        return a, name[pa]
    b, pb = _clause(rng)
    if form < 0.5:
        return f"{a} but {b}", name[pb]
    if form < 0.65:
        return f"although {a} , {b}", name[pb]
    return f"{a} and {b}", name[pa] if pa == pb else "mixed"


def label_of(text: str) -> str:
    """The task's rule, read back from a sentence (the generator's labels must agree with it)."""

    def polarity(clause: list[str]) -> int:
        sign = 1 if clause[-1] in POSITIVE else -1
        return -sign if "not" in clause else sign

    name = {1: "positive", -1: "negative"}
    words = text.split()
    if words[0] == "although":
        cut = words.index(",")
        return name[polarity(words[cut + 1 :])]
    for joint in ("but", "and"):
        if joint in words:
            cut = words.index(joint)
            a, b = polarity(words[:cut]), polarity(words[cut + 1 :])
            if joint == "but":
                return name[b]
            return name[a] if a == b else "mixed"
    return name[polarity(words)]


def make_task(n_train: int, n_dev: int, seed: int = 0, label_noise: float = 0.15) -> tuple[list, list]:
    """Deterministic (text, label) lists; training labels flipped with probability ``label_noise``."""
    rng = random.Random(seed)
    train, dev, seen = [], [], set()
    while len(train) + len(dev) < n_train + n_dev:
        text, label = _example(rng)
        if text in seen:
            continue
        seen.add(text)
        if len(dev) < n_dev:
            dev.append((text, label))
        else:
            if rng.random() < label_noise:
                label = rng.choice([x for x in LABELS if x != label])
            train.append((text, label))
    return train, dev


def write_tsv(rows: list[tuple[str, str]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        for text, label in rows:
            f.write(f"{text}\t{label}\n")


def build_tokenizer(out_dir: Path, reverse: bool = False, extra_words: tuple[str, ...] = (),
                    split_punctuation: bool = False):
    """A word-level tokenizer over the task's vocabulary, saved in Hugging Face format.

    ``reverse`` numbers the words the other way round: a tokenizer that splits text identically but
    gives other ids (handy to exercise teachers whose tokenizers differ). ``split_punctuation`` also
    splits "good," into "good" and ",": texts with commas get other lengths than with the default.
    """
    words = sorted({w for phrase in SUBJECTS + POSITIVE + NEGATIVE + ADVERBS for w in phrase.split()}
                   | {"was", "not", "but", "and", "although", ","})
    words = (words[::-1] if reverse else words) + list(extra_words)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", model_max_length=64)
    fast.save_pretrained(out_dir)
    return fast


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int


TEACHERS = [Shape("teacher-a", 4, 128, 4), Shape("teacher-b", 3, 96, 4)]
STUDENT = Shape("student", 2, 64, 2)


def build_encoder(shape: Shape, tokenizer, out_dir: Path, seed: int, positions: int = 64) -> Path:
    quiet_transformers()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, intermediate_size=4 * shape.hidden,
                        max_position_embeddings=positions, type_vocab_size=2, pad_token_id=tokenizer.pad_token_id)
    d = out_dir / shape.name
    BertModel(config, add_pooling_layer=False).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def run_demo(out: str | None = None, seed: int = 0, fast: bool = False, progress: bool = True) -> list[dict]:
    """Build everything, train everything, print one table; returns its rows."""
    with tempfile.TemporaryDirectory(prefix="fastmt-demo-") as tmp:
        root = Path(out) if out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        n_train, n_dev = (600, 200) if fast else (4000, 1000)
        train_rows, dev_rows = make_task(n_train, n_dev, seed)
        data = root / "data"
        data.mkdir(exist_ok=True)
        write_tsv(train_rows, data / "train.tsv")
        write_tsv(dev_rows, data / "dev.tsv")
        base = root / "init"
        base.mkdir(exist_ok=True)
        tok = build_tokenizer(base / "tokenizer")
        teacher_dirs = [build_encoder(s, tok, base, seed + i) for i, s in enumerate(TEACHERS)]
        student_dir = build_encoder(STUDENT, tok, base, seed + 100)
        # The student starts from a config only (random weights of its own shape) in both runs.
        (student_dir / "model.safetensors").unlink()

        # The plain path on every machine (fp32, reference losses, no compile, cache or grouping): the
        # demo prints the same table wherever it runs.
        common = dict(train=str(data / "train.tsv"), dev=str(data / "dev.tsv"), max_length=24, seed=seed,
                      batch_size=32, progress=progress, overwrite=True, log_every=25, device="cpu", precision="fp32",
                      compile=False, group_by_length=False, pooling="cls", head_lr=None)
        t0 = time.perf_counter()
        cofinetune([str(d) for d in teacher_dirs],
                          TrainArgs(out=str(root / "teachers"), epochs=2 if fast else 10, lr=5e-4, **common))
        distill_common = dict(teachers=str(root / "teachers"), student_layers=STUDENT.layers,
                              student_init=str(student_dir), epochs=2 if fast else 10, lr=2e-3, kernels="reference",
                              stack_teachers=False, cache_teachers=None, **common)
        alone = distill(DistillArgs(out=str(root / "student_alone"), alpha_kd=0.0, hidden_loss="none", **distill_common))
        # The projected-MSE term is ~10x the others at the start here; 0.1 keeps it from drowning them.
        mt = distill(DistillArgs(out=str(root / "student_mtbert"), temperature=2.0, alpha_hidden=0.1, **distill_common))
        total_s = time.perf_counter() - t0

        dev = str(data / "dev.tsv")
        teach = evaluate_dir(str(root / "teachers"), dev)
        teachers, _ = Teachers.load(root / "teachers")
        rows = []
        for i, t in enumerate(teach["teachers"]):
            params = count_parameters(teachers.encoders[i]) + count_parameters(teachers.adapters[i]) + count_parameters(teachers.head)
            rows.append({"model": f"{TEACHERS[i].name} ({TEACHERS[i].layers}L/{TEACHERS[i].hidden}H)",
                         "dev_acc": t["accuracy"], "params": params, "infer_sps": t["samples_per_s"]})
        rows.append({"model": "teacher ensemble", "dev_acc": teach["accuracy"], "params": count_parameters(teachers),
                     "infer_sps": teach["samples_per_s"]})
        for label, res in (("student alone", alone), ("MT-BERT student", mt)):
            ev = evaluate_dir(res.out, dev)
            rows.append({"model": f"{label} ({STUDENT.layers}L/{STUDENT.hidden}H)", "dev_acc": ev["accuracy"],
                         "params": res.extra["parameters"], "infer_sps": ev["samples_per_s"]})
        print_table(rows, n_train, n_dev, total_s, Path(out) if out else None)
        return rows


def print_table(rows: list[dict], n_train: int, n_dev: int, total_s: float, out: Path | None) -> None:
    print()
    print(f"fastmt demo: 3-class review-clause task, {n_train} train (15% of labels flipped), {n_dev} clean dev; "
          f"CPU, {torch.get_num_threads()} threads; training took {total_s:.0f}s")
    head = f"{'model':30s} {'dev acc':>8s} {'params':>10s} {'samples/s':>10s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:30s} {r['dev_acc']:8.4f} {r['params']:10,d} {r['infer_sps']:10.0f}")
    print("samples/s: dev-set inference throughput (batch 128) on this machine.")
    if out:
        print(f"runs kept in {out}")
