"""The README and docs/ tell the truth about the command line and link to what exists.

Every ``fastmt ...`` line in a shell code block (``bash``/``sh``/untagged; ``text`` blocks hold program
output) goes through the real parser, continuation lines and comments included; every relative link
points at a file that exists, and at a heading of that file when it names one.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO
from fastmt.cli import build_parser

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _commands(page: Path):
    fence, tag, pending = False, "", ""
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            fence, tag = (not fence), line[3:].strip()
            continue
        if not fence or tag not in ("", "bash", "sh", "shell", "console"):
            continue
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        words = shlex.split(text, comments=True)
        if words[:1] == ["fastmt"]:
            yield n, words[1:]


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


CASES = [(p, n, argv) for p in PAGES for n, argv in _commands(p)]


def test_the_pages_hold_commands():
    assert len(CASES) >= 8 and {p.name for p, _, _ in CASES} >= {"README.md", "cli.md"}


@pytest.mark.parametrize("page, line, argv", CASES, ids=[f"{p.name}:{n}" for p, n, _ in CASES])
def test_every_command_in_the_docs_parses(page, line, argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's way of refusing
        pytest.fail(f"{page.name}:{line}: `fastmt {' '.join(argv)}` does not parse (exit {e.code})")


def test_every_relative_link_resolves():
    bad = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                heads = {_slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)}
                if anchor not in heads:
                    bad.append(f"{page.name}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


def test_the_readme_is_a_five_minute_read():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    head = "\n".join(lines[:80])
    assert "## Quick start" in head and "## Where things are" in head
    prose = [x for x in lines if not x.startswith(("|", "    ")) and not x.startswith("fastmt demo:")]
    assert max(map(len, prose)) <= 110
