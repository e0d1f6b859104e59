"""The repository's top-level ``kernels/`` and ``passes/`` (installed as ``macopt.kernels`` and
``macopt.passes``) never shadow an installed package for a Python started in the repository
root, as ``python -m pytest``, ``python -m macopt.cli`` or a script there are (transformers
5.25 imports PyPI's ``kernels``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_in_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def _installed_elsewhere(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and Path(spec.origin or "").resolve().parent != ROOT / name


@pytest.mark.parametrize("name", ["kernels", "passes"])
def test_a_top_level_import_in_the_root_never_gets_the_repositorys_folder(name):
    run = _run_in_root(f"import {name}; print(getattr({name}, '__file__', None), "
                       f"sorted(n for n in vars({name}) if not n.startswith('__')))")
    assert run.returncode == 0, run.stderr[-2000:]
    origin, names = run.stdout.strip().split(" ", 1)
    if origin == "None":  # not installed: an empty namespace-like package, nothing of ours
        assert names == "[]", run.stdout
    else:
        assert Path(origin).resolve().parent != ROOT / name, run.stdout


# PyPI's kernels package made invisible, as on a machine with transformers < 5.25: its
# distribution metadata and its files are not found (the repository root's folder still is).
_NO_KERNELS_INSTALLED = """
import importlib.machinery, importlib.metadata, sys
_find, _version = importlib.machinery.PathFinder.find_spec, importlib.metadata.version
def find_spec(name, path=None, target=None):
    if name == "kernels" and path is not None and "{root}" not in path:
        return None
    return _find(name, path, target)
def version(name):
    if name == "kernels":
        raise importlib.metadata.PackageNotFoundError(name)
    return _version(name)
importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)
importlib.metadata.version = version
"""


def test_transformers_imports_its_models_in_the_root_without_pypis_kernels():
    # transformers, told by find_spec that `kernels` exists (this folder) but finding no
    # version, imports it to read one; that import must not fail inside transformers' own.
    run = _run_in_root(_NO_KERNELS_INSTALLED.format(root=ROOT) + (
        "from transformers.utils import import_utils\n"
        "import_utils.is_kernels_available.cache_clear()\n"
        "from transformers import LlamaConfig\n"
        "import kernels, macopt.kernels.decode\n"
        "print(import_utils.is_kernels_available(), hasattr(kernels, 'get_kernel'))"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "False"], run.stdout


def test_transformers_and_macopt_import_together_in_the_root():
    run = _run_in_root("import macopt, transformers; from transformers import LlamaForCausalLM; "
                       "import macopt.kernels.decode; print(macopt.kernels.__file__)")
    assert run.returncode == 0, run.stderr[-2000:]
    assert Path(run.stdout.strip()).parent == ROOT / "kernels"


def test_pypis_kernels_package_is_what_import_kernels_gives_when_installed():
    if not _installed_elsewhere("kernels"):
        pytest.skip("PyPI's kernels package is not installed (transformers < 5.25 needs none)")
    run = _run_in_root("import kernels; print(hasattr(kernels, '__version__') or "
                       "kernels.__name__)")
    assert run.returncode == 0, run.stderr[-2000:]
