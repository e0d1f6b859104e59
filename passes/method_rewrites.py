"""The contract between the passes and a method's rewrite module.

The passes find a site, lift its pre-RoPE query and build the site's inputs
(:class:`DecodeInputs`, :class:`PrefillInputs`); a method's rewrite module
(``passes/<method>_rewrite.py``) turns them into its op and exports a :class:`MethodRewrites`,
which :mod:`.methods` registers under the method's config type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.fx import Graph, Node

from macopt.config import MethodConfig
from macopt.passes.rope import RopeMatch
from macopt.passes.sites import AttentionSite


@dataclass(frozen=True)
class DecodeInputs:
    """Graph nodes (or Python numbers) for a decode op's arguments."""

    q: Node
    k: Node
    v: Node
    starts: Node
    ends: Node
    key_mask: Node | None
    scale: float
    rope: RopeMatch | None
    site_id: int | None = None  # a graph constant: keys per-site state (stateful methods)
    valid_rows: Node | None = None  # [B or 1,1,1]: rows whose float mask passed a run-time check


@dataclass(frozen=True)
class PrefillInputs:
    """Graph nodes (or Python numbers) for a prefill state builder's arguments."""

    out: Node  # the attention output [B,Hq,N,D]
    q: Node  # post-RoPE queries [B,Hq,N,D]
    k: Node  # un-repeated keys [B,Hkv,Nk,D] (the cache)
    v: Node
    key_starts: Node  # [B] int32: each row's first prompt key (left padding)
    ends: Node  # [B] int32: one past each row's last prompt key
    scale: float
    rope: RopeMatch | None
    site_id: int
    valid_rows: Node | None = None  # [B or 1,1,1]: rows whose float mask passed a run-time check


# Each receives the graph, the site, its inputs and the site's config; returns the node
# holding o[B,Hq,D] (decode) or a tensor equal to the attention output (prefill).
DecodeRewrite = Callable[[Graph, AttentionSite, DecodeInputs, MethodConfig], Node]
PrefillRewrite = Callable[[Graph, AttentionSite, PrefillInputs, MethodConfig], Node]


@dataclass(frozen=True)
class MethodRewrites:
    """A method's rewrites. ``prefill``: the state builder given to prefill sites (methods
    with per-site state); None leaves prefill graphs alone. ``honours_mask_holes``: the decode
    op reads the whole key mask; otherwise it reads each row's keys as one range and rows with
    holes in the mask are given exact attention (:mod:`.mask_holes`)."""

    decode: DecodeRewrite
    prefill: PrefillRewrite | None = None
    honours_mask_holes: bool = False

    def description(self, decode: bool) -> str:
        """First paragraph of the rewrite's docstring, on one line (the site report's)."""
        fn = self.decode if decode else self.prefill
        doc = fn.__doc__ or fn.__name__
        return " ".join(doc.split("\n\n")[0].split())
