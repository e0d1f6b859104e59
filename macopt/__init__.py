"""macopt: fast long-context decoding by rewriting attention to macopt's Triton kernels."""

from macopt.api import backend, explain, install_passes, optimize
from macopt.config import ExactConfig, MACConfig, MACTopKPhiConfig, MethodConfig, TopKPhiConfig
from macopt.pretrained import from_pretrained
from macopt.stats import stats

__version__ = "0.1.0"

__all__ = ["ExactConfig", "MACConfig", "MACTopKPhiConfig", "MethodConfig", "TopKPhiConfig",
           "backend", "explain", "from_pretrained", "install_passes", "optimize", "stats"]
