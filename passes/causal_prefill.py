"""Prefill attention takes SDPA's causal path when its mask is causal (``macopt_eager``, and
optimized modules' sites under Inductor).

Dynamo traces transformers' mask construction with the static cache's write counter as a
tensor, so where eager passes ``is_causal=True`` (an empty cache, no padding) the traced graph
attends through a materialised boolean mask over the whole cache: no causal kernel, repeated
KV heads, ~1.6x eager's prefill at 8K tokens on an H100 (BENCHMARKS.md 5b). This pass gives
every prefill site with a boolean key mask ``[B or 1, 1, C, N]``
``macopt::causal_prefill_attention``, which checks the mask at run time
(``macopt::causal_offset``, once per mask node): a causal mask (a prompt, or a chunk continuing
one) attends only the keys it reaches through SDPA's causal path, any other the mask as eager
transformers does (:mod:`macopt.causal_prefill_ops`). Every branch computes SDPA with the mask
the graph built, so the rewrite is exact; what the method's state builder reads (the
attention output, q, k, v, the mask) is the same tensor values as before.

A prompt into an empty cache with no padding never gets here with a mask: the routed forward
has transformers build none for it (:mod:`macopt.prompt_mask`; the mask itself was 16 GiB a row
at a 128K prompt). This pass serves the prompts that check cannot decide and the masks it must
keep: a chunk continuing a sequence (in eager transformers it attends the whole static cache
under the mask; here only the keys before it and its own), left padding.

Every prefill site of the graph qualifies, tagged or not: it is a property of the route (run
the traced forward as eager would), so the traced control without any tag (``macopt bench
e2e``'s ``unmodified-traced``) runs the same attention as the routed methods. The decision per
site comes back as a :class:`CausalPrefill`.

Under Inductor (generate()'s own compile runs every prefill chunk through it, BENCHMARKS.md
22) the pass runs only at the sites of optimized modules, and only where torch has the
``cudagraph_unsafe`` tag: both ops carry it, so Inductor runs them between its CUDA graphs and
their host-side branch breaks no capture (on an H100, a 2 x 128K prompt in chunks of 4096 took
9.4 s against 27.0 s, BENCHMARKS.md 23). ``MACOPT_COMPILED_CAUSAL_PREFILL=0`` turns it off
there (the eager route keeps it).
"""

from __future__ import annotations

import os
from collections.abc import Container
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from macopt import causal_prefill_ops
from macopt.passes._compat import statically_known_true
from macopt.passes.decode_rewrite import is_decode
from macopt.passes.graph_insert import call
from macopt.passes.graph_utils import fake, static_int
from macopt.passes.masks import key_mask_source
from macopt.passes.sites import AttentionSite, find_attention_sites

REWRITTEN = ("SDPA's causal path over the keys a causal mask reaches (checked at run time), "
             "else the mask")


@dataclass(frozen=True)
class CausalPrefill:
    """One prefill site: rewritten (``reason`` None) or kept with its mask, and why."""

    site: AttentionSite
    reason: str | None

    @property
    def description(self) -> str:
        return REWRITTEN if self.reason is None else f"kept as traced: {self.reason}"


def under_inductor() -> bool:
    """Whether Inductor graphs get this pass too (see the module's docstring)."""
    return (os.environ.get("MACOPT_COMPILED_CAUSAL_PREFILL") != "0"
            and causal_prefill_ops.CUDAGRAPH_UNSAFE is not None)


def rewrite_causal_prefill(graph: Graph, only: Container[Node] | None = None
                           ) -> list[CausalPrefill]:
    """Rewrite every eligible prefill site of ``graph`` (``only``: the sites whose attention
    node is in it, None: all); one :class:`CausalPrefill` per prefill site considered."""
    outcomes = []
    for site in find_attention_sites(graph):
        if is_decode(site) or (only is not None and site.node not in only):
            continue
        mask, reason = causal_skip_reason(site)
        if reason is None:
            _rewrite(graph, site, mask)
        outcomes.append(CausalPrefill(site, reason))
    if any(o.reason is None for o in outcomes):
        graph.eliminate_dead_code()  # the replaced SDPA, its float mask, the repeated KV heads
        graph.lint()
    return outcomes


def causal_skip_reason(site: AttentionSite) -> tuple[Node | None, str | None]:
    """``(boolean mask [Bm,1,C,N], None)`` when ``site`` can be rewritten, else ``(None,
    reason)``."""
    if site.output is None or site.extra_outputs_used:
        return None, "the site's log-sum-exp or debug outputs are read downstream"
    if site.dropout:
        return None, f"attention dropout {site.dropout}"
    if site.attn_mask is None:
        return None, ("SDPA is_causal already" if site.is_causal
                      else "no mask: every query attends every key")
    if site.is_causal:
        return None, "a mask and is_causal together"
    mask, reason = key_mask_source(site)
    if mask is None:
        return None, reason
    if fake(mask).dtype != torch.bool:
        return None, "float attention mask (an input checked at run time), not a boolean one"
    q_val, k_val, v_val, m_val = fake(site.q), fake(site.k), fake(site.v), fake(mask)
    if site.group is None or v_val is None or v_val.dim() != 4:
        return None, f"GQA group {site.group} (q heads / kv heads) or v of another layout"
    batch = static_int(m_val.shape[0]) if m_val.dim() == 4 else None
    if (m_val.dim() != 4 or static_int(m_val.shape[1]) != 1
            or batch not in (1, static_int(q_val.shape[0]))
            or not _same(m_val.shape[2], q_val.shape[2])
            or not _same(m_val.shape[3], k_val.shape[2])):
        return None, f"attention mask of shape {tuple(m_val.shape)} (expected [B, 1, C, N])"
    if output_layout(site) is None:
        return None, (f"attention output strides {tuple(fake(site.output).stride())}: not a "
                      f"dense layout of [B, Hq, C, Dv] the op can return")
    return mask, None


# Memory orders of the attention output seen in traced graphs, outermost dim first: SDPA's
# fused kernels' [B, C, Hq, Dv] (CUDA flash and memory-efficient, CPU flash for most inputs),
# and a contiguous [B, Hq, C, Dv] (CPU flash with GPT-NeoX's fused-QKV layout).
_LAYOUTS = ((0, 2, 1, 3), (0, 1, 2, 3))


def output_layout(site: AttentionSite) -> list[int] | None:
    """The memory order of ``site``'s output (outermost dim first) among :data:`_LAYOUTS`,
    provably (symbolic strides through the shape environment), or None."""
    out = fake(site.output)
    if out is None or out.dim() != 4:
        return None
    for layout in _LAYOUTS:
        expected, step = [0] * 4, 1
        for dim in reversed(layout):
            expected[dim], step = step, step * out.shape[dim]
        if all(map(_same, out.stride(), expected)):
            return list(layout)
    return None


def _same(a: object, b: object) -> bool:
    """Whether two sizes are provably equal (symbolic ones through the shape environment)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def _rewrite(graph: Graph, site: AttentionSite, mask: Node) -> None:
    with graph.inserting_before(site.node):
        offset = _causal_offset(graph, site, mask)
        args = (site.q, site.k, site.v, mask, offset, site.scale, output_layout(site))
        out = call(graph, causal_prefill_ops.CAUSAL_PREFILL_ATTENTION, args, site)
    site.output.replace_all_uses_with(out)


def _causal_offset(graph: Graph, site: AttentionSite, mask: Node) -> Node:
    """The ``causal_offset`` node of ``mask``: one per mask, shared by the sites reading it,
    placed before the mask's first user so that it precedes them all."""
    target = causal_prefill_ops.CAUSAL_OFFSET
    for user in mask.users:
        if user.target is target:
            return user
    with graph.inserting_before(next(n for n in graph.nodes if n in mask.users)):
        return call(graph, target, (mask,), site)
