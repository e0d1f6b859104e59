"""Rows whose key mask has holes take exact attention, at sites of key-range methods.

MAC, Top-K + phi and their composition read each row's keys as one range ``[s0, t]``
(:mod:`.key_range`). A row's mask can mask keys inside that range: right padding (pads between
the prompt and the generated tokens), or any hole a user's 2D ``attention_mask`` carries, with
a dynamic or a static cache. Which rows have holes is known only at run time, so the rewrite
adds, after the method's op, the exact decode op over the row's mask for the rows with holes.
Rows without holes get an empty key range in that op: it reads no key for them and passes the
method's output through (``macopt::decode_attention_or``: one extra launch, no host sync). The
row ranges and hole flags are computed once per graph from the model's mask
(:func:`.key_range.row_ranges`), not once per layer.

The method's op still runs on a row with holes and updates its state (ring, counters) as if the
row's keys were ``[s0, t]``; its output is discarded. A later step of that row reusing such an
entry is approximate by design, and while the hole remains that step is exact again.
"""

from __future__ import annotations

from torch.fx import Graph, Node

from macopt import exact_ops
from macopt.passes.graph_insert import call, size_arg
from macopt.passes.graph_utils import fake, prims
from macopt.passes.key_range import row_ranges
from macopt.passes.method_rewrites import DecodeInputs
from macopt.passes.sites import AttentionSite

NOTE = ("Rows whose key mask has holes (e.g. right padding) take exact attention over the "
        "mask instead.")


def exact_where_holes(graph: Graph, site: AttentionSite, inputs: DecodeInputs, out: Node
                      ) -> Node:
    """``out[B,Hq,D]`` with the rows whose ``inputs.key_mask`` is not one key range replaced
    by exact attention over the mask; ``out`` itself without a mask (every key attended)."""
    if inputs.key_mask is None:
        return out
    batch, n_keys = size_arg(graph, site.k, 0, site), size_arg(graph, site.k, 2, site)
    ranges = row_ranges(graph, site, inputs.key_mask, batch, n_keys)
    if fake(out).dtype != fake(inputs.q).dtype:
        out = call(graph, prims.convert_element_type.default, (out, fake(inputs.q).dtype), site)
    # Rows without holes get the empty range [first, first): the exact op reads nothing there
    # and passes their row of `out` through.
    return call(graph, exact_ops.DECODE_ATTENTION_OR,
                (inputs.q, inputs.k, inputs.v, ranges.first, ranges.hole_ends, inputs.key_mask,
                 inputs.scale, out), site)
