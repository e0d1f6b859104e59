"""The checks decode and prefill sites share: what the kernels take, what the method needs."""

from __future__ import annotations

from macopt.config import MethodConfig
from macopt.kernels.limits import MAX_GQA_GROUP, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from macopt.passes.graph_utils import fake
from macopt.passes.rope import RopeMatch, pre_rope_heads_dim
from macopt.passes.sites import AttentionSite


def kernel_skip_reason(site: AttentionSite) -> str | None:
    """Why the kernels cannot take the site's head dim or dtype, or None."""
    q_val, k_val = fake(site.q), fake(site.k)
    if site.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {site.head_dim} is not one of {SUPPORTED_HEAD_DIMS}"
    if q_val is None or k_val is None or q_val.dtype not in SUPPORTED_DTYPES:
        return f"dtype {getattr(q_val, 'dtype', None)} is not one of {SUPPORTED_DTYPES}"
    return None


def method_skip_reason(site: AttentionSite, rope: RopeMatch | None, config: MethodConfig
                       ) -> str | None:
    """Why the site's GQA group or pre-RoPE query does not suit ``config``, or None."""
    if site.group is None or site.group > MAX_GQA_GROUP:
        return f"GQA group {site.group} (q heads / kv heads) is not supported"
    if config.needs_pre_rope_query and rope is None:
        return f"no RoPE found; method {config.method!r} needs the pre-RoPE query"
    if config.needs_pre_rope_query and pre_rope_heads_dim(rope, site.q) is None:
        return "the pre-RoPE query is neither [B,Hq,S,D] nor [B,S,Hq,D]"
    return None
