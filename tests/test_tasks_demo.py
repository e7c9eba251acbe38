"""``fastmt demo`` runs end to end (the quick version) and prints its table."""

from conftest import run_cli


def _accuracies(stdout: str) -> dict[str, str]:
    """Model name -> dev accuracy as printed (the samples/s column is left out: it is a timing)."""
    names = ("teacher-a", "teacher-b", "teacher ensemble", "student alone", "MT-BERT student")
    out = {}
    for line in stdout.splitlines():
        for name in names:
            if line.startswith(name):
                out[name] = line[30:].split()[0]
    return out


def test_demo_prints_the_table_and_repeats_exactly(tmp_path):
    """The README says the demo's accuracies repeat exactly on rerun: two runs print the same ones."""
    r = run_cli("demo", "--fast", "--quiet", "--out", tmp_path / "demo")
    assert r.returncode == 0, r.stderr
    first = _accuracies(r.stdout)
    assert len(first) == 5, r.stdout
    for d in ("teachers", "student_alone", "student_mtbert"):
        assert (tmp_path / "demo" / d / "model.safetensors").is_file()
    again = run_cli("demo", "--fast", "--quiet", "--out", tmp_path / "demo2")
    assert again.returncode == 0, again.stderr
    assert _accuracies(again.stdout) == first


def test_demo_task_is_deterministic_and_not_a_bag_of_words():
    from fastmt.tasks.demo import label_of, make_task

    train, dev = make_task(300, 200, seed=3)
    assert (train, dev) == make_task(300, 200, seed=3)
    # Dev labels follow the rule exactly; train labels are flipped for about 15% of rows.
    assert all(label_of(t) == y for t, y in dev)
    flipped = sum(label_of(t) != y for t, y in train) / len(train)
    assert 0.08 < flipped < 0.22
    assert {y for _, y in dev} == {"positive", "negative", "mixed"}
    # Same words, different labels: order decides, so a bag of words cannot.
    a = "the plot was good but the acting was not bad"
    b = "the plot was not good but the acting was bad"
    assert sorted(a.split()) == sorted(b.split())
    assert (label_of(a), label_of(b)) == ("positive", "negative")
