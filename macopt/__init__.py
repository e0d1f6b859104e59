"""macopt: fast long-context decoding by rewriting attention to macopt's Triton kernels."""

from macopt import ops  # noqa: F401  (registers torch.ops.macopt.*)

__version__ = "0.1.0"
