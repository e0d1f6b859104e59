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
    run = _run_in_root(f"import {name}; print({name}.__file__)")
    if run.returncode == 0:
        assert Path(run.stdout.strip()).resolve().parent != ROOT / name, run.stdout
    else:
        assert f"No module named '{name}'" in run.stderr, run.stderr


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
