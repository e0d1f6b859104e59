"""macopt: fast long-context decoding by rewriting attention to macopt's Triton kernels."""

from macopt import mac_ops, ops, topk_phi_ops, topk_phi_site  # noqa: F401  (register ops)

__version__ = "0.1.0"
from macopt.api import backend, explain, install_passes, optimize  # noqa: E402
from macopt.config import ExactConfig, MACConfig, MethodConfig, TopKPhiConfig  # noqa: E402
from macopt.pretrained import from_pretrained  # noqa: E402
from macopt.stats import stats  # noqa: E402

__all__ = ["ExactConfig", "MACConfig", "MethodConfig", "TopKPhiConfig", "backend", "explain",
           "from_pretrained", "install_passes", "optimize", "stats"]
