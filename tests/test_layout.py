"""The package's layout: its import graph, where imports stand, its wings, the kernels' links.

Every import counts in the graph (at the top, inside a function, under ``TYPE_CHECKING``): a circle
anywhere, even one that only an import inside a function closes, means some module cannot be read
without one above it. Imports stand at the top of a module; one inside a function is either an
optional dependency (``OPTIONAL``) or a pair in ``LAZY_IMPORTS``, with the reason it pays. The wings
(``WINGS``) stand in one order, and a module imports nothing from a wing above its own.

The fused kernels live in the repo's top-level ``kernels/`` folder, without ``__init__.py``, so that
it never shadows Hugging Face's ``kernels`` package (which ``transformers`` imports); ``fastmt/kernels``
holds one link per file, so they import as ``fastmt.kernels.*`` and are part of the graph.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastmt"
KERNELS = ROOT / "kernels"
FACE = "api.py"  # the kernels' package face: fastmt/kernels/__init__.py links to it

# Optional dependencies: imported where used, so that the rest works without them.
OPTIONAL = ("onnx", "onnxruntime", "onnxscript", "datasets", "pyarrow", "tensorboard", "torch.utils.tensorboard",
            "triton", "matplotlib", "gguf")

# ``fastmt --help`` and usage errors answer without importing torch. Measured on two cores: ``import
# fastmt.cli`` 0.3 s; each module below imports torch (most, transformers too): 6-10 s.
_CLI_START = "start-up: imported by the one subcommand that needs it, so the command line starts without torch"
# (module, imported module) -> why that import waits inside a function; no kernels module is listed.
LAZY_IMPORTS: dict[tuple[str, str], str] = {
    ("fastmt.cli", "fastmt.data.dataset"): _CLI_START,
    # Triton reads TRITON_INTERPRET when a kernel is defined: `fastmt check` on a CPU sets it, then imports them.
    ("fastmt.tools.check", "fastmt.kernels"): "TRITON_INTERPRET is set by run_check before the kernels are defined",
    ("fastmt.cli", "fastmt.engine.faults"): _CLI_START,
    ("fastmt.cli", "fastmt.engine.fileio"): _CLI_START,
    ("fastmt.cli", "fastmt.models.modeldir"): _CLI_START,
    ("fastmt.cli", "fastmt.serve.bench"): _CLI_START,
    ("fastmt.cli", "fastmt.serve.onnx"): _CLI_START,
    ("fastmt.cli", "fastmt.serve.predict"): _CLI_START,
    ("fastmt.cli", "fastmt.serve.export"): _CLI_START,
    ("fastmt.cli", "fastmt.tasks.classification.cofinetune"): _CLI_START,
    ("fastmt.cli", "fastmt.tasks.classification.distill"): _CLI_START,
    ("fastmt.cli", "fastmt.tasks.classification.evaluate"): _CLI_START,
    ("fastmt.cli", "fastmt.tasks.demo"): _CLI_START,
    ("fastmt.cli", "fastmt.tasks.lm.distill"): _CLI_START,
    ("fastmt.cli", "fastmt.tasks.lm.evaluate"): _CLI_START,
    ("fastmt.cli", "fastmt.tools.bench"): _CLI_START,
    ("fastmt.cli", "fastmt.tools.check"): _CLI_START,
    ("fastmt.cli", "fastmt.tools.memory"): _CLI_START,
    # `fastmt --help` builds every command's flags from the settings classes: they need torch only to
    # answer --device auto.
    ("fastmt.config.settings", "torch"): "start-up: the command line imports the settings; torch only when a run is made",
}

# The wings, lowest first: a module imports from its own wing and the ones below it only.
WINGS = (
    ("fastmt.errors", "fastmt.choices", "fastmt.losses", "fastmt.metrics"),
    ("fastmt.config",),
    ("fastmt.data",),
    ("fastmt.cache",),
    ("fastmt.kernels",),
    ("fastmt.engine",),
    ("fastmt.models",),
    ("fastmt.serve", "fastmt.tasks"),
    ("fastmt.tools",),
    ("fastmt.cli", "fastmt.__main__"),
)


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    """Every module of the package by name (the kernels through their links), and any file in
    ``kernels/`` under the name its link would give it."""
    found = {_module(p): p for p in PACKAGE.rglob("*.py")}
    for p in KERNELS.glob("*.py"):
        found.setdefault("fastmt.kernels" if p.name == FACE else f"fastmt.kernels.{p.stem}", p)
    return found


class Import(NamedTuple):
    line: int
    names: tuple[str, ...]  # import a, b: (a, b); from m import a, b: (m, m.a, m.b), m.a maybe a module
    in_function: bool
    from_module: bool  # a ``from m import ...`` statement

    def modules(self, known: set[str]) -> list[str]:
        """The modules it imports: ``from m import a`` imports m.a where that is a module in ``known``."""
        if not self.from_module:
            return list(self.names)
        return [t for t in self.names[1:] if t in known] or [self.names[0]]


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """The import statements of a module's source, each with whether it stands inside a function."""
    out: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.append(Import(child.lineno, tuple(a.name for a in child.names), in_function, False))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the module's own package upwards
                    package = module.split(".")[: len(module.split(".")) - (child.level - is_package)]
                    base = ".".join(package + ([base] if base else []))
                names = (base, *(f"{base}.{a.name}" for a in child.names))
                out.append(Import(child.lineno, names, in_function, True))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), False)
    return out


@functools.lru_cache(maxsize=None)
def _imports(name: str) -> list[Import]:
    path = modules()[name]
    return imports_of(path.read_text(), name, path.name == "__init__.py" or path.name == FACE)


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name in mods:
        for imp in _imports(name):
            graph[name].update(t for t in imp.names if t in mods and t != name and t != "fastmt")
    return graph


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circles():
    circle = _circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_no_kernels_module_imports_the_package_face():
    """``from fastmt.kernels import kl`` inside ``kernels/`` would import the face (``api.py``), which
    imports the families: they import each other by full name (``from fastmt.kernels.kl import ...``)."""
    graph = import_graph()
    families = [m for m in graph if m.startswith("fastmt.kernels.")]
    assert "fastmt.kernels.lm_tiled" in families
    assert not [m for m in families if "fastmt.kernels" in graph[m]]


def test_an_import_inside_a_function_is_an_edge_of_the_graph():
    """A circle that only a function-level import closes is still found: the graph holds that edge,
    and a relative import resolves to the module it names."""
    source = ("import torch\n"
              "try:\n    import triton\nexcept ImportError:\n    triton = None\n"
              "class A:\n    def f(self):\n        from fastmt.kernels.kl import x\n"
              "def g():\n    return lambda: 0\n"
              "from .sibling import y\n")
    found = imports_of(source, "fastmt.pkg.mod")
    assert [(i.names[0], i.in_function) for i in found] == [
        ("torch", False), ("triton", False), ("fastmt.kernels.kl", True), ("fastmt.pkg.sibling", False)]
    assert imports_of("from . import z\n", "fastmt.pkg", is_package=True)[0].names == ("fastmt.pkg", "fastmt.pkg.z")
    assert _circle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _circle({"a": {"b"}, "b": set()}) is None


def test_settings_and_the_loop_import_no_task():
    graph = import_graph()

    def reach(m: str) -> set[str]:
        seen, todo = set(), [m]
        while todo:
            for n in graph[todo.pop()] - seen:
                seen.add(n)
                todo.append(n)
        return seen

    tasks = {m for m in graph if m.startswith("fastmt.tasks")} | {"fastmt.cli"}
    assert not reach("fastmt.config.settings") & (tasks | {"fastmt.engine.loop", "fastmt.engine.optim"})
    assert not reach("fastmt.engine.loop") & tasks
    assert "fastmt.errors" not in graph or not graph["fastmt.errors"]  # the ground floor


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imports_not_at_the_top(name: str, found: list[Import], known: set[str]) -> list[str]:
    """``module:line imported`` for each import inside a function that is neither an optional
    dependency (``OPTIONAL``) nor a pair in ``LAZY_IMPORTS``."""
    return [f"{name}:{imp.line} {target}" for imp in found if imp.in_function for target in imp.modules(known)
            if not _within(target, OPTIONAL) and (name, target) not in LAZY_IMPORTS]


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_stand_at_the_top(name):
    """An import inside a function is an optional dependency or an allowed pair (``LAZY_IMPORTS``);
    everything else stands at the top of its module, where its cost and its place in the graph show."""
    mods = modules()
    bad = imports_not_at_the_top(name, _imports(name), set(mods))
    assert not bad, "imports inside functions (move them to the top, or say why in LAZY_IMPORTS):\n" + "\n".join(bad)


def test_what_counts_as_an_import_not_at_the_top():
    known = {"fastmt.kernels", "fastmt.kernels.kl", "fastmt.tools.check", "fastmt.serve", "fastmt.serve.bench"}
    source = ("import os\n"
              "def f():\n    import json\n    import triton.language as tl\n    from fastmt.kernels import kl\n"
              "    from torch.utils.tensorboard import SummaryWriter\n    from fastmt.tools.check import run_check\n"
              "    from fastmt.serve import bench\n")
    assert imports_not_at_the_top("fastmt.kernels.x", imports_of(source, "fastmt.kernels.x"), known) == [
        "fastmt.kernels.x:3 json", "fastmt.kernels.x:5 fastmt.kernels.kl", "fastmt.kernels.x:7 fastmt.tools.check",
        "fastmt.kernels.x:8 fastmt.serve.bench"]
    # The command line's pairs are allowed there, and only there.
    assert imports_not_at_the_top("fastmt.cli", imports_of(source, "fastmt.cli"), known) == [
        "fastmt.cli:3 json", "fastmt.cli:5 fastmt.kernels.kl"]


def test_the_lazy_imports_allowed_are_all_made_and_none_in_kernels():
    mods = modules()
    made = {(name, t) for name in mods for imp in _imports(name) if imp.in_function
            for t in imp.modules(set(mods))}
    assert not [pair for pair in LAZY_IMPORTS if pair not in made], "LAZY_IMPORTS lists imports no longer made"
    assert not [pair for pair in LAZY_IMPORTS if _within(pair[0], ["fastmt.kernels"])]


def wing(name: str) -> int | None:
    for level, prefixes in enumerate(WINGS):
        if _within(name, prefixes):
            return level
    return None


@pytest.mark.parametrize("name", sorted(modules()))
def test_a_module_imports_nothing_from_a_higher_wing(name):
    graph = import_graph()
    if name == "fastmt":  # the package itself: its docstring and version
        assert not graph[name]
        return
    level = wing(name)
    assert level is not None, f"{name} is in no wing of WINGS: place it there"
    above = sorted(m for m in graph[name] if (wing(m) or 0) > level)
    assert not above, f"{name} (wing {WINGS[level][0]}) imports from higher wings: {', '.join(above)}"


def test_a_module_is_in_the_wing_its_name_starts_with():
    assert [wing(m) for m in ("fastmt.losses", "fastmt.config.settings", "fastmt.kernels", "fastmt.kernels.lm_tiled",
                              "fastmt.serve.onnx", "fastmt.tasks.lm.distill", "fastmt.cli")] == [0, 1, 4, 4, 7, 7, 9]
    assert wing("fastmt.kernelsx") is None and wing("fastmt") is None


def test_kernels_folder_has_no_init_and_every_file_is_linked_into_the_package():
    assert not (KERNELS / "__init__.py").exists(), "kernels/__init__.py would shadow Hugging Face's kernels package"
    real = sorted(p.name for p in KERNELS.glob("*.py"))
    assert FACE in real
    links = {p.name: p for p in (PACKAGE / "kernels").iterdir() if p.name != "__pycache__"}
    assert sorted(links) == sorted("__init__.py" if n == FACE else n for n in real), (
        "fastmt/kernels/ must hold exactly one link per kernels/*.py (ln -s ../../kernels/NAME.py fastmt/kernels/)")
    for name, link in links.items():
        assert link.is_symlink(), f"fastmt/kernels/{name} is a file; edit kernels/{name} and link it"
        assert not os.path.isabs(os.readlink(link)), f"fastmt/kernels/{name} links by an absolute path"
        target = link.resolve()
        assert target == (KERNELS / (FACE if name == "__init__.py" else name)).resolve() and target.is_file()


def _run_in_repo_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_transformers_imports_from_the_repo_root_and_kernels_is_hugging_faces():
    """``python -c`` in the repo root puts the root first on ``sys.path``: the ``kernels/`` folder
    there must not stand in for Hugging Face's ``kernels`` package, which ``transformers`` imports."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed: nothing here could shadow it")
    run = _run_in_repo_root("import json\nfrom transformers import BertModel\nimport kernels\n"
                            "print(json.dumps([kernels.__file__, list(getattr(kernels, '__path__', []))]))")
    assert run.returncode == 0, run.stderr[-3000:]
    file, path = json.loads(run.stdout.strip().splitlines()[-1])
    assert file is not None, f"import kernels found a namespace package: {path}"
    assert KERNELS.resolve() not in [Path(p).resolve() for p in path] + [Path(file).resolve().parent]
