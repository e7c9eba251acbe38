"""A plain checkout runs with only its dependencies installed: nothing of fastmt's is installed.

The repo's files are copied to a temporary dir, and a fresh virtual environment is given the
dependencies through a ``.pth`` line naming this interpreter's site-packages. A dir added by a
``.pth`` line is not itself scanned for ``.pth`` files, so an editable install of fastmt recorded
there stays inactive: the test first shows that ``import fastmt`` fails in that environment.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _repo_files() -> list[str]:
    try:
        r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"git is not usable here ({e})")
    if r.returncode != 0:
        pytest.skip(f"not a git checkout: {r.stderr.decode(errors='replace').strip()}")
    return [f for f in r.stdout.decode().split("\0") if f]


def _inside(path: str, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return False
    return True


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """(copy of the repo, python of a venv holding the dependencies only, environment, a neutral dir)."""
    base = tmp_path_factory.mktemp("checkout")
    copy = base / "repo"
    for rel in _repo_files():
        src = REPO / rel
        if src.is_file():  # tracked but deleted in the work tree: not part of it
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, copy / rel)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    deps = [p for p in site.getsitepackages() if os.path.isdir(p)]
    Path(purelib, "fastmt_deps.pth").write_text("".join(p + "\n" for p in deps))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1")
    # Keep whatever else PYTHONPATH adds, less anything that would lead back to this repo.
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not _inside(p, REPO)]
    env.pop("PYTHONPATH", None)
    if keep:
        env["PYTHONPATH"] = os.pathsep.join(keep)
    neutral = base / "elsewhere"
    neutral.mkdir()
    return copy, py, env, neutral


def _run(py, args, cwd, env, timeout=600):
    return subprocess.run([str(py), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_fastmt_is_not_installed_in_the_bare_environment(checkout):
    copy, py, env, neutral = checkout
    probe = ("import importlib.util; s = importlib.util.find_spec('fastmt'); print(s.origin if s else 'absent'); "
             "import torch, transformers, triton")
    r = _run(py, ["-c", probe], neutral, env)
    assert r.returncode == 0, f"the dependencies do not import through the .pth line:\n{r.stderr}"
    origin = r.stdout.strip().splitlines()[0]
    if origin != "absent" and not _inside(origin, REPO):
        pytest.skip(f"fastmt is installed as a regular package ({origin}); a bare environment cannot hide it")
    assert origin == "absent", f"the editable install leaked into the bare environment: {origin}"


def test_a_plain_checkout_runs_fastmt_check_and_the_scripts(checkout):
    copy, py, env, neutral = checkout
    r = _run(py, ["-m", "fastmt", "check", "--quick", "--json", str(neutral / "check.json")], copy, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "cases pass" in r.stdout and "FAIL" not in r.stdout

    where = ("import importlib.util, fastmt.kernels as k; print(k.__file__); s = importlib.util.find_spec('kernels'); "
             "print(s.origin if s else None)")
    r = _run(py, ["-c", where], copy, env)
    assert r.returncode == 0, r.stderr
    kernels_file, top_level = r.stdout.split()
    assert _inside(kernels_file, copy / "fastmt" / "kernels"), kernels_file
    # The repo's kernels/ is fastmt.kernels only, never the top-level ``kernels`` (Hugging Face's name).
    assert top_level == "None" or not _inside(top_level, copy), top_level

    for script in ("bench_kernels.py", "plot_kernels.py", "reproduce_rt.py"):
        r = _run(py, [str(copy / "benches" / script), "--help"], neutral, env)
        assert r.returncode == 0 and "usage" in r.stdout, (script, r.stderr[-2000:])


def test_the_gpu_suite_runs_from_the_checkout_and_keeps_its_files_few(checkout):
    """Two cheap stages of the suite, dry, in the bare environment: no install, no pip."""
    copy, py, env, neutral = checkout
    if not (shutil.which("bash") and shutil.which("timeout")):
        pytest.skip("needs bash and coreutils' timeout")
    out = neutral / "suite"
    env = dict(env, PATH=f"{py.parent}{os.pathsep}{env.get('PATH', '')}", DEVICE="cpu", PRESET="tiny",
               STAGES="kbench memory")
    r = subprocess.run(["bash", str(copy / "benches" / "gpu_suite.sh"), str(out)], cwd=neutral, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert f"fastmt from {copy / 'fastmt'}" in r.stdout and "every stage passed" in r.stdout
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"suite.log", "kernels.jsonl", "kernels.png"}
    assert all(p.parent == out and p.stat().st_size < 16 * 2**20 for p in files)
    summary = (out / "suite.log").read_text().split("gpu_suite: cpu")[-1]
    assert re.search(r"kbench\s+ok", summary) and re.search(r"memory\s+ok", summary), summary


BLOCKER = """import sys
from importlib.abc import MetaPathFinder

ABSENT = {"pytest", "_pytest", "hypothesis", "matplotlib"}


class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Absent())
"""


def test_the_gpu_suite_skips_what_is_not_installed_and_passes(checkout):
    """Only torch, triton and transformers (pytest, hypothesis and matplotlib made unimportable): the
    tests stage and the chart are skipped and named, the rest runs, and the suite passes."""
    copy, py, env, neutral = checkout
    if not (shutil.which("bash") and shutil.which("timeout")):
        pytest.skip("needs bash and coreutils' timeout")
    blocked = neutral / "without-test-packages"
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text(BLOCKER)
    env = dict(env, PATH=f"{py.parent}{os.pathsep}{env.get('PATH', '')}", DEVICE="cpu", PRESET="tiny",
               STAGES="tests kbench", PYTHONPATH=os.pathsep.join(x for x in (str(blocked), env.get("PYTHONPATH")) if x))
    r = _run(py, ["-c", "import matplotlib"], neutral, env)
    assert r.returncode != 0 and "No module named 'matplotlib'" in r.stderr  # the blocker works
    out = neutral / "suite-bare"
    r = subprocess.run(["bash", str(copy / "benches" / "gpu_suite.sh"), str(out)], cwd=neutral, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "tests: skipped, pytest is not installed" in r.stdout
    assert "kbench: no chart, matplotlib is not installed" in r.stdout
    summary = (out / "suite.log").read_text().split("gpu_suite: cpu")[-1]
    assert re.search(r"tests\s+SKIPPED \(not installed\)", summary) and re.search(r"kbench\s+ok", summary), summary
    assert "skipped (not installed here): tests (no pytest), kbench chart (no matplotlib)" in summary
    assert "every stage that could run here passed" in summary
    assert {p.name for p in out.iterdir()} == {"suite.log", "kernels.jsonl"}
