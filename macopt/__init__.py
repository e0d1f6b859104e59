"""macopt: fast long-context decoding by rewriting attention to macopt's Triton kernels."""

from macopt import ops, topk_phi_ops  # noqa: F401  (register torch.ops.macopt.*)

__version__ = "0.1.0"
from macopt.api import backend, explain, install_passes, optimize  # noqa: E402
from macopt.config import ExactConfig, MethodConfig, TopKPhiConfig  # noqa: E402

__all__ = ["ExactConfig", "MethodConfig", "TopKPhiConfig", "backend", "explain", "install_passes",
           "optimize"]
