"""``fastmt demo`` runs end to end (the quick version) and prints its table."""

from conftest import run_cli


def test_demo_prints_the_table(tmp_path):
    r = run_cli("demo", "--fast", "--quiet", "--out", tmp_path / "demo")
    assert r.returncode == 0, r.stderr
    for name in ("teacher-a", "teacher-b", "teacher ensemble", "student alone", "MT-BERT student"):
        assert name in r.stdout
    for d in ("teachers", "student_alone", "student_mtbert"):
        assert (tmp_path / "demo" / d / "model.safetensors").is_file()


def test_demo_task_is_deterministic_and_not_a_bag_of_words():
    from fastmt.demo import _example, make_task

    assert make_task(50, 20, seed=3) == make_task(50, 20, seed=3)
    # Same words, opposite labels: order decides.
    import random

    labels = {}
    rng = random.Random(0)
    for _ in range(20000):
        text, label = _example(rng)
        labels.setdefault(tuple(sorted(text.split())), set()).add(label)
    assert sum(len(v) > 1 for v in labels.values()) > 100
