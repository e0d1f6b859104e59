"""The method registry: a config type -> its rewrites, one line per method.

A method is one file per layer (docs/LAYOUT.md): its config (a frozen ``MethodConfig``
subclass in ``macopt/config.py``), its rewrites (``passes/<method>_rewrite.py``, whose
``REWRITES`` is registered here), its ops and state (``macopt/<method>_ops.py``, built on
``macopt.site_params``) and its kernels and reference (``kernels/<method>*.py``). The pass
manager finds a site's method here, by the type of the site's config (torchao keys its
handlers so): nothing else branches on method names.
"""

from __future__ import annotations

from macopt.config import ExactConfig, MACConfig, MACTopKPhiConfig, MethodConfig, TopKPhiConfig
from macopt.passes import exact_rewrite, mac_rewrite, mac_topk_phi_rewrite, topk_phi_rewrite
from macopt.passes.method_rewrites import MethodRewrites

METHODS: dict[type[MethodConfig], MethodRewrites] = {
    ExactConfig: exact_rewrite.REWRITES,
    MACConfig: mac_rewrite.REWRITES,
    TopKPhiConfig: topk_phi_rewrite.REWRITES,
    MACTopKPhiConfig: mac_topk_phi_rewrite.REWRITES,
}


def register_method(config_type: type[MethodConfig], rewrites: MethodRewrites) -> None:
    """Make ``config_type``'s sites take ``rewrites`` (a method defined outside this file)."""
    if not (isinstance(config_type, type) and issubclass(config_type, MethodConfig)):
        raise TypeError(f"expected a MethodConfig subclass, got {config_type!r}")
    METHODS[config_type] = rewrites


def rewrites_for(config: MethodConfig) -> MethodRewrites | None:
    """The rewrites registered for ``config``'s type or its nearest registered base class
    (a subclass that only changes class-level settings keeps its base's rewrites)."""
    for cls in type(config).__mro__:
        if cls in METHODS:
            return METHODS[cls]
    return None
