"""Keep the repository's top-level folders from shadowing installed packages.

``kernels/`` and ``passes/`` install as ``macopt.kernels`` and ``macopt.passes``. When the
repository root is on ``sys.path`` (``python -m pytest``, ``python -m macopt.cli``, a script run
from the root), ``import kernels`` would find this folder before PyPI's ``kernels`` package,
which transformers imports. ``hand_over`` replaces such a top-level import with the installed
package, or fails as if the folder were not there. It imports nothing of macopt's: transformers
may be half-imported when it runs.
"""

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, package_file: str) -> None:
    """Make ``import name`` give the installed package ``name`` instead of this folder."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(package_file)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        del sys.modules[name]
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {name}/ in {root} is macopt.{name}, "
            "not a top-level package)",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    # The import system returns whatever sys.modules holds once this package's body ends.
    sys.modules[name] = module
    spec.loader.exec_module(module)
