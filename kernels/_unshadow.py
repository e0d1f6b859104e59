"""Keep the repository's top-level folders from shadowing installed packages.

``kernels/`` and ``passes/`` install as ``macopt.kernels`` and ``macopt.passes``. When the
repository root is on ``sys.path`` (``python -m pytest``, ``python -m macopt.cli``, a script run
from the root), ``import kernels`` would find this folder before PyPI's ``kernels`` package,
which transformers imports. ``hand_over`` replaces such a top-level import with the installed
package. Where none is installed, the import still gives what an empty namespace package is
(nothing in it, no ``__file__``), not an error: the caller was already told by
``importlib.util.find_spec`` that the name exists (it found this folder), and transformers then
imports it to read a version, inside its own lazy imports, where an error broke
``from transformers import LlamaConfig`` (transformers 5.17 without PyPI's ``kernels``, on the
GPU machine); it reads an empty namespace package as "not installed". It imports nothing of
macopt's: transformers may be half-imported when it runs.
"""

import importlib.machinery
import importlib.util
import os
import sys
import types


def hand_over(name: str, package_file: str) -> None:
    """Make ``import name`` give the installed package ``name`` instead of this folder."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(package_file)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        empty = types.ModuleType(name, f"Not installed (the folder {name}/ in {root} is "
                                       f"macopt.{name}, not a top-level package).")
        empty.__path__ = []  # a package with nothing in it: `from {name} import x` fails
        sys.modules[name] = empty
        return
    module = importlib.util.module_from_spec(spec)
    # The import system returns whatever sys.modules holds once this package's body ends.
    sys.modules[name] = module
    spec.loader.exec_module(module)
