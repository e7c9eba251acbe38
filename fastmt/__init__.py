"""fastmt: multi-teacher distillation (MT-BERT) for text classification."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

__version__ = "0.1.0"

# A source checkout keeps the fused kernels in the top-level ``kernels/`` dir; only an install maps
# it to ``fastmt.kernels`` (setup.py's package_dir). The two hooks below give a plain checkout (the
# repo root on sys.path, nothing installed) the installed layout:
# - ``fastmt.kernels`` resolves to that dir, asked last, so an install's own mapping still wins;
# - the checkout root, as a sys.path entry, no longer offers ``kernels/`` as a top-level package.
#   That name belongs to Hugging Face's ``kernels``, which transformers probes for and imports: from
#   the repo root it would otherwise import this project's dir under that name (or hide the real one).
# Both only look at paths; nothing here imports Triton or torch.

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_KERNELS = os.path.join(_ROOT, "kernels")


def _is_checkout() -> bool:
    # An install never ships setup.py/pyproject.toml next to the package, so a site-packages dir
    # that happens to hold some other ``kernels/`` is never mistaken for this repo.
    has_project = any(os.path.isfile(os.path.join(_ROOT, f)) for f in ("setup.py", "pyproject.toml"))
    return has_project and os.path.isfile(os.path.join(_KERNELS, "kl.py"))


class _CheckoutKernelsFinder:
    """Meta-path finder for exactly ``fastmt.kernels`` in a source checkout."""

    _fastmt_checkout = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "fastmt.kernels" or not _is_checkout():
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(_KERNELS, "__init__.py"), submodule_search_locations=[_KERNELS])

    def invalidate_caches(self):
        pass


_LOADERS = [
    (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
    (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
]


class _CheckoutRootFinder(importlib.machinery.FileFinder):
    """The ordinary finder for the checkout root, less the top-level name ``kernels``."""

    def find_spec(self, fullname, target=None):
        if fullname == "kernels":
            return None
        return super().find_spec(fullname, target)


def _real(entry: str) -> str:
    return os.path.realpath(entry or os.getcwd())


def _root_path_hook(entry: str):
    if not isinstance(entry, str) or _real(entry) != _REAL_ROOT:
        raise ImportError("not the fastmt checkout root")
    return _CheckoutRootFinder(entry, *_LOADERS)


_root_path_hook._fastmt_checkout = True
_REAL_ROOT = os.path.realpath(_ROOT)


def _install_checkout_hooks() -> None:
    if not any(getattr(f, "_fastmt_checkout", False) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutKernelsFinder())
    if not _is_checkout() or any(getattr(h, "_fastmt_checkout", False) for h in sys.path_hooks):
        return
    sys.path_hooks.insert(0, _root_path_hook)
    # Entries already cached (the root itself, from importing this package) get the new finder.
    for entry in list(sys.path_importer_cache):
        if isinstance(entry, str) and _real(entry) == _REAL_ROOT:
            del sys.path_importer_cache[entry]


_install_checkout_hooks()
