"""The per-site report: what the passes found at each attention site and what they did."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SiteReport:
    """One attention site in one compiled graph.

    ``decision`` is ``"rewritten"`` (now the method's op), ``"skipped"`` (left untouched:
    ``reason`` says why) or ``"kept"`` (a prefill graph: attention stays as it is).
    ``prefill_attention``: in a prefill graph of the ``macopt_eager`` route, how its attention
    runs (SDPA's causal path when the mask is causal at run time, or kept with its mask and
    why: :mod:`macopt.passes.causal_prefill`); empty elsewhere.
    """

    layer: str
    op: str
    phase: str  # "decode" (query length statically 1) or "prefill"
    query_len: str
    rope_form: str | None
    pre_rope_lifted: bool
    gqa_form: str
    group: int | None
    head_dim: int | None
    method: str
    decision: str
    reason: str
    prefill_attention: str = ""

    @property
    def rewritten(self) -> bool:
        return self.decision == "rewritten"
