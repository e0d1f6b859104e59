"""Attention-output fidelity of Top-K vs Top-K + phi on a real model's attention (CPU, fp32).

The Top-K + phi issue's fidelity bar: *on real attention data, Top-K + phi has lower output
error than Top-K at every matched budget on high-entropy heads, and the per-head switch keeps
low-entropy heads no worse.* This script measures it on ``examples/tiny-lm`` (a trained 4-layer
Llama, 8 query / 2 KV heads, head dim 128, 8K context):

1. **Data.** The held-out documents are split by document: the first half calibrates, the
   second half evaluates (disjoint text). Each half is packed as in training (every document
   followed by ``<|endoftext|>``) and cut into evenly spaced windows of ``--context`` tokens.
   Calibration windows are of two kinds: phi training windows and switch-decision windows.
2. **Capture.** One fp32 forward per window records every layer's post-RoPE q, k and v
   (:func:`macopt.calibrate_phi.capture_attention`). Decode queries are ``--queries``
   evenly spaced positions ``p`` in ``[context / 2, context)``; query ``p`` attends keys
   ``[0, p]``, which are its prompt (as :func:`macopt.bench.topk.attention_output_errors` treats
   captured data): sinks ``[0, 4)``, tail ``[p - 15, p]``, the middle in between.
3. **Calibration.** :func:`macopt.calibrate_phi.calibrate_feature_maps` on the training windows
   (backbone frozen): by default the probe init (:mod:`macopt.phi_init`: probes, their mean
   keys and a per-head log-mass bias measured on the training windows) and ``--steps`` 0
   gradient steps of the paper's loss (``--steps`` > 0 trains on; ``--init prf`` starts from
   random features instead). "+phi PRF" is the data-free positive random features.
4. **Errors.** Per layer and query head: relative L1 of the output against full attention,
   ``sum |o - o_full| / sum |o_full|`` over the split's queries and dims, and the attention
   entropy (nats, over keys ``[0, p]``). Selection is per KV head (the group shares it), by
   exact scores (``exact``: the paper's oracle) or by page bounds (``page``: deployable).
5. **Matched budgets.** A budget fraction ``f`` is ``B = ceil(f * context)`` token-equivalents
   read per KV head and step beyond the anchors (the fraction is of the cache capacity, as
   ``TopKPhiConfig.budget_tokens``). Top-K retrieves ``B`` keys; Top-K + phi also reads its
   summary (:func:`macopt.topk_phi_select.summary_token_equivalent`: 16.25 tokens for
   ``d_phi = 16`` (the default here), 130 for ``d_phi = D = 128``, bf16 cache), so it retrieves
   ``B - ceil(summary)`` (no entry when negative): exactly what the op retrieves with
   ``TopKPhiConfig(budget=B, summary_in_budget=True)``. The page selector rounds both up to
   whole pages, as the config does (result files written before that change hold round-down
   counts; ``--render`` keeps the counts a file was measured with). ``topk_same_k`` is Top-K
   at Top-K + phi's ``K`` (the paper's comparison, and what a head with completion off runs
   inside a summary-reading group).
6. **Switch** (decided per budget and selector on the switch-decision windows, never on the
   evaluation split). ``switch_head`` (for comparison): completion on for a query head iff
   calibrated Top-K + phi beats Top-K at the same ``K`` there. ``switch_group`` (the verdict's
   switch): each head's flag as in ``switch_head``, and a KV group keeps the summary iff some
   head of it is on and no head of it, on its own variant, is worse than Top-K at the full
   matched budget (an off head inside the group runs Top-K at the group's ``K``: equal to the
   full budget's only where whole pages make the two ``K`` equal); otherwise all its heads are
   off and the group retrieves the full ``B``, which is exactly Top-K. Each row's
   ``switch.config`` in the JSON is the ``TopKPhiConfig`` that deploys it
   (``summary_in_budget=True`` and ``completion_overrides``).

The evaluation core computes exactly what ``macopt.topk_phi_state.decode`` computes on CPU (the
reference), but subtracts the retrieved keys' share from the summary by gathering the ``K``
selected keys instead of masking all ``N`` (the test checks both agree).

About 9 minutes on 1 CPU thread at d_phi 16 (under 1 of them for the probe init; 5 minutes at
d_phi 2; each gradient step adds ~11 s at d_phi 128). The saved maps (8 MB at d_phi 16, with
the unused MLP weights) are not committed; ``--save-maps`` writes them and ``--maps`` reuses
them. examples/topk_phi_fidelity.md holds the d_phi 16 run (its ``--json`` is
``macopt/bench/results/cpu_topk_phi_tiny_lm.json``) and the d_phi 2 one
(``cpu_topk_phi_tiny_lm_dphi2.json``)::

    python examples/topk_phi_fidelity.py --threads 1 \\
        --json macopt/bench/results/cpu_topk_phi_tiny_lm.json \\
        --markdown examples/topk_phi_fidelity.md --save-maps /tmp/tiny_lm_phi.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import platform
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from macopt.calibrate_phi import (
    INITS,
    CalibrationConfig,
    CapturedLayer,
    calibrate_feature_maps,
    capture_attention,
    evaluate,
    initial_maps,
    site_name,
)
from macopt.config import TopKPhiConfig
from macopt.kernels import topk_phi_reference as ref
from macopt.kernels.feature_maps import (
    FeatureMaps,
    load_feature_maps,
    log_features,
    save_feature_maps,
)
from macopt.topk_phi_select import retrieved_tokens, select, summary_token_equivalent

Tensor = torch.Tensor
EOS = "<|endoftext|>"
SELECTORS = ("exact", "page")
PHI_VARIANTS = ("phi_init", "phi_cal")
VARIANTS = ("topk", "topk_same_k", *PHI_VARIANTS)


# --- data ------------------------------------------------------------------------------------


def split_documents(text: str) -> tuple[list[str], list[str]]:
    """Held-out text (documents joined by EOS) -> (calibration half, evaluation half)."""
    docs = text.split(EOS)
    half = len(docs) // 2
    return docs[:half], docs[half:]


def pack(tokenizer, docs: list[str], eos_id: int) -> Tensor:
    """One token stream, every document followed by EOS (the training packing)."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(docs, add_special_tokens=False):
        ids += encoding.ids
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: Tensor, length: int, count: int) -> Tensor:
    """``count`` evenly spaced windows ``[count, length]`` of ``stream`` (disjoint if it allows)."""
    if stream.numel() < length:
        raise ValueError(f"a stream of {stream.numel()} tokens has no window of {length}")
    starts = torch.linspace(0, stream.numel() - length, count).long()
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


def decode_positions(context: int, count: int) -> Tensor:
    """``count`` evenly spaced query positions in ``[context // 2, context)``."""
    return torch.linspace(context // 2, context - 1, count).round().long()


@dataclass
class Window:
    """One window's attention at one layer: ``q[R, Hq, D]`` at ``positions[R]``, the window's
    ``k, v[Hkv, N, D]``."""

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    positions: Tensor


def capture_windows(model: torch.nn.Module, rows: Tensor, positions: Tensor
                    ) -> list[dict[int, Window]]:
    """Per window (row of ``rows``), per layer: the queries at ``positions`` and all keys and
    values (one window at a time, so only the kept queries stay in memory)."""
    out = []
    for row in rows:
        captured = capture_attention(model, row[None], values=True)
        out.append({layer: Window(c.q[0, :, positions].transpose(0, 1).contiguous(), c.k[0],
                                  c.v[0], c.scale, positions)
                    for layer, c in captured.items()})
    return out


# --- budgets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """A matched token-equivalent budget: ``tokens`` per KV head and step; Top-K retrieves
    ``topk_k`` keys, Top-K + phi ``phi_k`` (None: its summary alone exceeds the budget)."""

    fraction: float
    tokens: int
    topk_k: int
    phi_k: int | None


def matched_budget(fraction: float, context: int, summary_tokens: float, page_size: int | None
                   ) -> Budget:
    """Both methods get ``B = ceil(fraction * context)`` token-equivalents; Top-K + phi gives
    ``ceil(summary_tokens)`` of them to its summary. The counts are the deployed op's with
    ``TopKPhiConfig(budget=B, summary_in_budget=True)``
    (:func:`macopt.topk_phi_select.retrieved_tokens`): the page selector (``page_size``) rounds
    each up to whole pages, as the config does.

    >>> matched_budget(0.05, 8192, 130.0, None)
    Budget(fraction=0.05, tokens=410, topk_k=410, phi_k=280)
    >>> matched_budget(0.05, 8192, 130.0, 32)
    Budget(fraction=0.05, tokens=410, topk_k=416, phi_k=288)
    """
    tokens = math.ceil(fraction * context)
    summary = math.ceil(summary_tokens)
    phi_k = retrieved_tokens(tokens, summary, page_size) if tokens >= summary else None
    return Budget(fraction, tokens, retrieved_tokens(tokens, 0, page_size), phi_k)


# --- one layer's errors ------------------------------------------------------------------------


@dataclass
class LayerMaps:
    """One layer's feature maps in the form decode reads them."""

    log_phi_q: Tensor  # [R, Hq, F]
    log_phi_k: Tensor  # [Hkv, N, F]
    summary: ref.PhiSummary


def layer_maps(maps: FeatureMaps, w: Window, mid_start: Tensor, mid_end: Tensor) -> LayerMaps:
    """Feature maps (folded, as the ops apply them) and the per-query prefill summary."""
    log_phi_q = log_features(w.q, maps.phi_q.folded())
    log_phi_k = log_features(w.k[None], maps.phi_k.folded())[0]
    rows = w.q.shape[0]
    summary = ref.build_summary(w.v[None].expand(rows, -1, -1, -1),
                                log_phi_k[None].expand(rows, -1, -1, -1), mid_start, mid_end)
    return LayerMaps(log_phi_q, log_phi_k, summary)


def retrieved_share(lm: LayerMaps, v: Tensor, selected: Tensor) -> tuple[Tensor, Tensor]:
    """The summary's ``(u~, T~)`` minus the selected keys' share, per KV head: the math of
    ``ref.subtract_retrieved`` over the ``K`` selected keys instead of a mask over all ``N``.

    ``selected[R, Hkv, K]`` (distinct per head; entries outside the middle region ignored).
    """
    s = lm.summary
    n_kv_heads, n_keys = v.shape[0], v.shape[1]
    index = selected.long()
    valid = (index >= s.mid_start[:, None, None]) & (index < s.mid_end[:, None, None])
    index = index.clamp(0, n_keys - 1)
    heads = torch.arange(n_kv_heads)[None, :, None]
    shift = torch.where(torch.isfinite(s.m), s.m, 0.0)[:, :, None, :]
    weights = torch.where(valid[..., None],
                          torch.exp(lm.log_phi_k[heads, index] - shift), 0.0)  # [R, Hkv, K, F]
    u_r = s.u - weights.sum(dim=2)
    t_r = s.t - torch.einsum("rhkf,rhkd->rhfd", weights, v[heads, index])
    return u_r, t_r


def completion(lm: LayerMaps, v: Tensor, selected: Tensor, group: int, eps: float = 1e-6
               ) -> tuple[Tensor, Tensor]:
    """Completion state ``(y_R[R, Hq, D], log Z_R[R, Hq])`` of the unretrieved middle keys."""
    u_r, t_r = retrieved_share(lm, v, selected)
    u_r = u_r.repeat_interleave(group, dim=1).clamp(min=eps)
    t_r = t_r.repeat_interleave(group, dim=1)
    m_q = lm.summary.m.repeat_interleave(group, dim=1)
    return ref.completion_state(lm.log_phi_q, m_q, u_r, t_r)


def attention_scores(w: Window) -> Tensor:
    """``scale * q.k`` of each query head over every key: ``[R, Hq, N]`` (GQA aware)."""
    rows, n_q_heads, head_dim = w.q.shape
    n_kv_heads, n_keys = w.k.shape[0], w.k.shape[1]
    grouped = w.q.view(rows, n_kv_heads, -1, head_dim)
    return torch.einsum("rhgd,hnd->rhgn", grouped, w.k).reshape(rows, n_q_heads, n_keys) * w.scale


def masked_state(scores: Tensor, v: Tensor, attend: Tensor) -> tuple[Tensor, Tensor]:
    """State ``(o[R, Hq, D], lse[R, Hq])`` of each query head over its keys ``attend[R, Hq, N]``:
    ``ref.exact_state`` from precomputed scores and unexpanded ``v[Hkv, N, D]``."""
    rows, n_q_heads, n_keys = scores.shape
    masked = scores.masked_fill(~attend, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1)
    weights = torch.exp(masked - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    grouped = weights.view(rows, v.shape[0], -1, n_keys)
    return torch.einsum("rhgn,hnd->rhgd", grouped, v).reshape(rows, n_q_heads, -1), lse


def attention_entropy(scores: Tensor, current: Tensor) -> Tensor:
    """Entropy (nats) of each head's full attention over its ``current`` keys: ``[R, Hq]``."""
    probs = torch.softmax(scores.masked_fill(~current, float("-inf")), dim=-1)
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)


@dataclass
class HeadSums:
    """Relative-L1 numerators and denominators per query head, summed over queries."""

    diff: Tensor
    norm: Tensor

    def __iadd__(self, other: HeadSums) -> HeadSums:
        self.diff += other.diff
        self.norm += other.norm
        return self

    def relative_l1(self) -> list[float]:
        return (self.diff / self.norm.clamp_min(1e-30)).tolist()


def l1_sums(out: Tensor, reference: Tensor) -> HeadSums:
    return HeadSums((out - reference).abs().sum(dim=(0, 2)).double(),
                    reference.abs().sum(dim=(0, 2)).double())


def layer_outputs(w: Window, maps: dict[str, FeatureMaps], budgets: dict[str, list[Budget]],
                  sinks: int, tail: int, page_size: int
                  ) -> tuple[Tensor, dict[tuple, Tensor], Tensor]:
    """One layer of one window: full attention ``[R, Hq, D]``, every variant's output by
    ``(selector, fraction, variant)``, and the attention entropy ``[R, Hq]``.

    ``maps`` by variant name (``phi_init``, ``phi_cal``); ``budgets`` by selector.
    """
    rows, n_q_heads, _ = w.q.shape
    n_kv_heads, n_keys = w.k.shape[0], w.k.shape[1]
    group = n_q_heads // n_kv_heads
    k = w.k[None].expand(rows, -1, -1, -1)
    zeros = torch.zeros(rows, dtype=torch.long)
    ends = w.positions + 1
    current = ref.positions_in(zeros, ends, n_keys)[:, None, :].expand(-1, n_q_heads, -1)
    scores = attention_scores(w)
    full, _ = masked_state(scores, w.v, current)
    mid_start, mid_end = ref.mid_range(zeros, ends, sinks, tail)
    anchors = current & ~ref.positions_in(mid_start, mid_end, n_keys)[:, None, :]
    prepared = {name: layer_maps(m, w, mid_start, mid_end) for name, m in maps.items()}
    bounds = ref.build_page_bounds(k, mid_start, mid_end, page_size)
    outputs: dict[tuple, Tensor] = {}
    for selector, selector_budgets in budgets.items():
        states = {}  # K -> (selection, exact state over anchors + retrieved)
        for n_retrieved in sorted({b.topk_k for b in selector_budgets}
                                  | {b.phi_k for b in selector_budgets if b.phi_k is not None}):
            selected = _select(w, k, mid_start, mid_end, bounds, n_retrieved, page_size,
                               selector)
            retrieved = ref.selection_mask(selected, n_q_heads, mid_start, mid_end, n_keys)
            states[n_retrieved] = (selected, masked_state(scores, w.v, anchors | retrieved))
        for b in selector_budgets:
            outputs[(selector, b.fraction, "topk")] = states[b.topk_k][1][0]
            if b.phi_k is None:
                continue
            selected, (o_exact, lse_exact) = states[b.phi_k]
            outputs[(selector, b.fraction, "topk_same_k")] = o_exact
            for name, lm in prepared.items():
                y, log_z = completion(lm, w.v, selected, group)
                outputs[(selector, b.fraction, name)] = ref.merge_state(o_exact, lse_exact, y,
                                                                        log_z)[0]
    return full, outputs, attention_entropy(scores, current)


def _select(w: Window, k: Tensor, mid_start: Tensor, mid_end: Tensor, bounds: ref.PageBounds,
            n_retrieved: int, page_size: int, selector: str) -> Tensor:
    """The op's own selection (``macopt.topk_phi_select.select``, CPU path) of ``n_retrieved``."""
    if n_retrieved == 0:
        return torch.zeros(w.q.shape[0], k.shape[1], 0, dtype=torch.int32)
    return select(w.q, k, w.scale, mid_start, mid_end, bounds.kmin, bounds.kmax, n_retrieved,
                  page_size, selector, triton_path=False)


# --- a split's errors ------------------------------------------------------------------------


@dataclass
class SplitResult:
    """Per-head relative L1 ``errors[(selector, fraction, variant)][layer][head]`` and mean
    entropy ``entropy[layer][head]`` (nats) over a split's queries."""

    errors: dict[tuple, list[list[float]]]
    entropy: list[list[float]]
    queries: int


def measure_split(windows_: Iterable[dict[int, Window]], maps: dict[str, dict[str, FeatureMaps]],
                  budgets: dict[str, list[Budget]], sinks: int, tail: int, page_size: int,
                  log=print) -> SplitResult:
    """Errors of every variant over the windows. ``maps[variant][site_name(layer)]``."""
    sums: dict[tuple, dict[int, HeadSums]] = {}
    entropy: dict[int, Tensor] = {}
    queries = 0
    for index, window in enumerate(windows_):
        start = time.perf_counter()
        for layer, w in window.items():
            layer_maps_ = {name: by_site[site_name(layer)] for name, by_site in maps.items()}
            full, outputs, layer_entropy = layer_outputs(w, layer_maps_, budgets, sinks, tail,
                                                         page_size)
            for key, out in outputs.items():
                per_layer = sums.setdefault(key, {})
                if layer in per_layer:
                    per_layer[layer] += l1_sums(out, full)
                else:
                    per_layer[layer] = l1_sums(out, full)
            h = layer_entropy.sum(dim=0).double()
            entropy[layer] = entropy[layer] + h if layer in entropy else h
        queries += next(iter(window.values())).q.shape[0]
        log(f"  window {index + 1}: {time.perf_counter() - start:.1f} s")
    layers = sorted(entropy)
    return SplitResult(
        errors={key: [per_layer[layer].relative_l1() for layer in layers]
                for key, per_layer in sums.items()},
        entropy=[(entropy[layer] / queries).tolist() for layer in layers],
        queries=queries)


# --- switch ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Switch:
    """Per-layer, per-head completion flags at a fixed ``K`` (``completion``: the per-head
    switch), and per (layer, KV head) whether the group reads the summary (``use_summary``:
    the group switch; off: every head off, Top-K at the full matched budget)."""

    completion: list[list[bool]]
    use_summary: list[list[bool]]

    def overrides(self) -> dict[int, dict[int, bool]]:
        """``TopKPhiConfig.completion_overrides`` for :attr:`completion` (per-head switch)."""
        return {layer: dict(enumerate(heads)) for layer, heads in enumerate(self.completion)}

    def group_overrides(self, group: int) -> dict[int, dict[int, bool]]:
        """``completion_overrides`` deploying the group switch (with ``summary_in_budget``):
        a group that keeps the summary keeps its heads' own flags, every head of the others
        is off."""
        return {layer: {h: on and groups[h // group] for h, on in enumerate(heads)}
                for layer, (heads, groups) in enumerate(zip(self.completion, self.use_summary,
                                                            strict=True))}


def decide_switch(topk: list[list[float]], topk_same_k: list[list[float]],
                  phi: list[list[float]], group: int) -> Switch:
    """Per head: completion on iff Top-K + phi beats Top-K at the same ``K``. Per KV group:
    the group keeps the summary iff some head of it is on and *no* head of it, on its own
    variant (Top-K + phi if on, Top-K at the same ``K`` if off), is worse than Top-K at the
    full matched budget; otherwise all its heads are off and it retrieves the full budget.
    (Inside a summary-reading group an off head runs Top-K at the group's ``K``: no worse than
    the full budget only where the two ``K`` are equal, as whole pages often make them.)
    Inputs: per-head calibration errors.

    >>> switch = decide_switch(topk=[[1.0, 1.0, 1.0, 1.0]], topk_same_k=[[1.0, 1.0, 1.1, 1.1]],
    ...                        phi=[[0.5, 1.2, 0.5, 1.2]], group=2)
    >>> switch.use_summary, switch.completion
    ([[True, False]], [[True, False, True, False]])
    """
    completion = [[p < t for p, t in zip(ps, ts, strict=True)]
                  for ps, ts in zip(phi, topk_same_k, strict=True)]
    use_summary = []
    for on, ps, ts, full in zip(completion, phi, topk_same_k, topk, strict=True):
        no_worse = [(p if c else t) <= f for c, p, t, f in zip(on, ps, ts, full, strict=True)]
        use_summary.append([any(on[g:g + group]) and all(no_worse[g:g + group])
                            for g in range(0, len(on), group)])
    return Switch(completion, use_summary)


def switched_errors(switch: Switch, topk: list[list[float]], topk_same_k: list[list[float]],
                    phi: list[list[float]], group: int) -> tuple[list[list[float]], ...]:
    """Per-head errors of ``switch_head`` (flags at the same ``K``) and ``switch_group`` (a
    group with the summary runs each head's own variant at the group's ``K``, one without it
    Top-K at the full budget)."""
    per_head = [[p if c else t for c, p, t in zip(on, ps, ts, strict=True)]
                for on, ps, ts in zip(switch.completion, phi, topk_same_k, strict=True)]
    per_group = [[e if summary[h // group] else f
                  for h, (e, f) in enumerate(zip(es, fs, strict=True))]
                 for es, fs, summary in zip(per_head, topk, switch.use_summary, strict=True)]
    return per_head, per_group


# --- report ----------------------------------------------------------------------------------


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _flat(per_layer: list[list[float]]) -> list[float]:
    return [x for heads in per_layer for x in heads]


def _split_means(errors: list[list[float]], high: list[bool]) -> dict[str, float]:
    flat = _flat(errors)
    return {"all": _mean(flat),
            "high": _mean(e for e, h in zip(flat, high, strict=True) if h),
            "low": _mean(e for e, h in zip(flat, high, strict=True) if not h)}


def _count(pairs: Iterable[tuple[bool, bool]], want_high: bool) -> int:
    return sum(ok for ok, h in pairs if h == want_high)


def summarise_budget(selector: str, b: Budget, calibration: SplitResult,
                     evaluation: SplitResult, high: list[bool], group: int,
                     deploy: dict | None = None) -> dict:
    """One (selector, budget) row: the switch decided on calibration data, and per variant
    the evaluation split's mean error over all / high- / low-entropy heads. ``deploy``: the
    ``TopKPhiConfig`` fields of the run (sinks, tail, page size, d_phi), to which the row adds
    the ones deploying its group switch (``switch.config``)."""
    row: dict = {"selector": selector, "fraction": b.fraction, "tokens": b.tokens,
                 "topk_k": b.topk_k, "phi_k": b.phi_k}
    ev = {v: evaluation.errors[(selector, b.fraction, v)] for v in VARIANTS
          if (selector, b.fraction, v) in evaluation.errors}
    if b.phi_k is not None:
        cal = {v: calibration.errors[(selector, b.fraction, v)] for v in VARIANTS}
        switch = decide_switch(cal["topk"], cal["topk_same_k"], cal["phi_cal"], group)
        group_overrides = switch.group_overrides(group)
        row["switch"] = {"completion_overrides": switch.overrides(),
                         "use_summary": switch.use_summary,
                         "completion_on": sum(_flat(switch.completion)),
                         "groups_with_summary": sum(_flat(switch.use_summary)),
                         "config": TopKPhiConfig(**(deploy or {}), budget=b.tokens,
                                                 selector=selector, summary_in_budget=True,
                                                 completion_overrides=group_overrides
                                                 ).to_dict()}
        ev["switch_head"], ev["switch_group"] = switched_errors(
            switch, ev["topk"], ev["topk_same_k"], ev["phi_cal"], group)
    row["mean_error"] = {v: _split_means(e, high) for v, e in ev.items()}
    if b.phi_k is None:
        return row
    topk, same_k = _flat(ev["topk"]), _flat(ev["topk_same_k"])
    beats = {v: list(zip([e < t for e, t in zip(_flat(ev[v]), topk, strict=True)], high,
                         strict=True))
             for v in ("phi_init", "phi_cal", "switch_head", "switch_group")}
    row["beats_matched_topk"] = {v: {"high": _count(pairs, True), "low": _count(pairs, False)}
                                 for v, pairs in beats.items()}
    not_worse = {"switch_head": same_k, "switch_group": topk}
    row["switch_not_worse_low"] = {
        v: _count(zip([e <= t for e, t in zip(_flat(ev[v]), base, strict=True)], high,
                      strict=True), False)
        for v, base in not_worse.items()}
    return row


def summarise(calibration: SplitResult, evaluation: SplitResult, budgets: dict[str, list[Budget]],
              group: int, deploy: dict | None = None) -> dict:
    """Switches (decided on calibration data), mean errors and the bar's verdict (evaluation).

    High-entropy heads: the upper half by mean entropy on the calibration (switch) split. The
    verdict's switch half is the group switch (``deploy``: see :func:`summarise_budget`).
    """
    entropy = _flat(calibration.entropy)
    threshold = sorted(entropy)[len(entropy) // 2]
    high = [e >= threshold for e in entropy]
    rows = [summarise_budget(selector, b, calibration, evaluation, high, group, deploy)
            for selector, selector_budgets in budgets.items() for b in selector_budgets]
    n_high, n_low = sum(high), len(high) - sum(high)
    return {"rows": rows, "high_entropy": high, "verdict": {
        "high_entropy_heads": n_high, "low_entropy_heads": n_low,
        "entropy_threshold_nats": threshold,
        "phi_cal_beats_matched_topk_on_every_high_entropy_head_and_budget": all(
            r["phi_k"] is not None and r["beats_matched_topk"]["phi_cal"]["high"] == n_high
            for r in rows),
        "switch_group_not_worse_on_every_low_entropy_head_and_budget": all(
            r["phi_k"] is None or r["switch_not_worse_low"]["switch_group"] == n_low
            for r in rows),
    }}


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _cell(row: dict, variant: str) -> str:
    means = row["mean_error"].get(variant)
    return "n/a" if means is None else f"{_pct(means['all'])} ({_pct(means['high'])})"


def markdown(result: dict) -> str:
    """Summary table (mean relative L1 over heads, evaluation split) and the verdict."""
    s, config = result["summary"], result["config"]
    v = s["verdict"]
    lines = [
        f"Relative L1 error of the attention output vs full attention, mean over all "
        f"{v['high_entropy_heads'] + v['low_entropy_heads']} heads (over the "
        f"{v['high_entropy_heads']} high-entropy heads), evaluation split, "
        f"{result['evaluation']['queries']} decode queries at {config['context'] // 2}-"
        f"{config['context']} context. `B`: matched token-equivalent budget per KV head and "
        f"step; Top-K+phi pays {config['summary_tokens']:g} of it for its summary "
        f"(d_phi {config['d_phi']}, bf16 cache), so it retrieves `K_phi` keys. Last column: "
        "heads where calibrated Top-K+phi beats Top-K at the matched budget (high / low "
        "entropy).",
        "",
        "| selector | budget | B | K_topk | K_phi | Top-K | Top-K at K_phi | +phi PRF | "
        "+phi cal | switch (head) | switch (group) | cal beats Top-K |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        beats = r.get("beats_matched_topk", {}).get("phi_cal")
        lines.append(" | ".join([
            f"| {r['selector']}", f"{100 * r['fraction']:g}%", str(r["tokens"]),
            str(r["topk_k"]), "n/a" if r["phi_k"] is None else str(r["phi_k"]),
            *(_cell(r, name) for name in (*VARIANTS, "switch_head", "switch_group")),
            "n/a" if beats is None else f"{beats['high']} / {beats['low']}"]) + " |")
    lines += [
        "",
        "Bar: calibrated Top-K+phi beats matched Top-K on every high-entropy head at every "
        f"budget: **{v['phi_cal_beats_matched_topk_on_every_high_entropy_head_and_budget']}**;"
        " the matched-budget switch is no worse than Top-K on every low-entropy head: "
        f"**{v['switch_group_not_worse_on_every_low_entropy_head_and_budget']}**."]
    if "train_windows" in config:
        lines += ["", f"Data: held-out documents of {config['model']} split by document, first "
                  f"half calibration ({config['train_windows']} phi training + "
                  f"{config['switch_windows']} switch windows), second half evaluation "
                  f"({config['eval_windows']} windows); {config['queries']} decode queries per "
                  f"window; sinks {config['sinks']}, tail {config['tail']}, page size "
                  f"{config['page_size']}; selection per KV head."]
    cal = result.get("calibration", {})
    if "loss_history" in cal:
        init = config.get("init", "prf")
        start = ("probe init (margin " + f"{config.get('margin', 1.0):g}" + " std)"
                 if init == "probe" else "PRF init")
        lines += ["", f"Calibration (`+phi cal`): {start} + {len(cal['loss_history'])} gradient "
                  f"steps, {cal['seconds']:.0f} s; distillation loss (all layers; untrained "
                  f"query positions of the training windows) {cal['eval_loss_before']:.2f} at "
                  f"init -> {cal['eval_loss_after']:.2f}. `+phi PRF`: the data-free positive "
                  "random features."]
    detail = config.get("detail")
    if detail and "errors" in result["evaluation"]:
        selector, fraction = detail.split("@")
        lines += ["", *per_head_table(result, selector, float(fraction))]
    return "\n".join(lines) + "\n"


def _by_index(mapping: dict, index: int):
    """``mapping[index]``, also after a JSON round trip turned the int keys into strings."""
    return mapping[index] if index in mapping else mapping[str(index)]


def per_head_table(result: dict, selector: str, fraction: float) -> list[str]:
    """Per-head errors at one (selector, budget) on the evaluation split, by entropy."""
    errors = {(e["selector"], e["fraction"], e["variant"]): e["per_head"]
              for e in result["evaluation"]["errors"]}
    row = next(r for r in result["summary"]["rows"]
               if r["selector"] == selector and r["fraction"] == fraction)
    if row["phi_k"] is None:
        return []
    switch = row["switch"]
    cal_entropy, ev_entropy = result["switch_split"]["entropy"], result["evaluation"]["entropy"]
    group = result["config"]["group"]
    heads = sorted(((layer, head) for layer in range(len(ev_entropy))
                    for head in range(len(ev_entropy[layer]))),
                   key=lambda lh: -cal_entropy[lh[0]][lh[1]])
    lines = [f"Per head, {selector} selector, budget {100 * fraction:g}% (B {row['tokens']}, "
             f"K_topk {row['topk_k']}, K_phi {row['phi_k']}), evaluation split, sorted by "
             "calibration-split entropy; `on`: completion switched on (decided on the "
             "calibration split), `summary`: the head's KV group keeps the summary.",
             "",
             "| layer.head | entropy cal / eval (nats) | Top-K | Top-K at K_phi | +phi PRF "
             "| +phi cal | on | summary |",
             "|---|---|---|---|---|---|---|---|"]
    for layer, head in heads:
        get = lambda v: _pct(errors[(selector, fraction, v)][layer][head])  # noqa: B023, E731
        flag = _by_index(_by_index(switch["completion_overrides"], layer), head)
        lines.append(
            f"| {layer}.{head} | {cal_entropy[layer][head]:.2f} / {ev_entropy[layer][head]:.2f}"
            f" | {get('topk')} | {get('topk_same_k')} | {get('phi_init')} | {get('phi_cal')} | "
            f"{'on' if flag else 'off'} | "
            f"{'yes' if switch['use_summary'][layer][head // group] else 'no'} |")
    return lines


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", type=Path, default=Path("examples/tiny-lm"))
    a("--text", type=Path, default=None,
      help="held-out text, documents joined by <|endoftext|> (default MODEL/heldout.txt.gz)")
    a("--context", type=int, default=8192, help="window length = cache capacity")
    a("--train-windows", type=int, default=3, help="calibration windows phi trains on")
    a("--switch-windows", type=int, default=3, help="calibration windows the switch is decided on")
    a("--eval-windows", type=int, default=6, help="evaluation windows")
    a("--queries", type=int, default=8, help="decode positions per window")
    a("--budgets", default="0.01,0.02,0.05,0.1", help="budget fractions of the context")
    a("--selectors", default="exact,page")
    a("--page-size", type=int, default=32)
    a("--sinks", type=int, default=4)
    a("--tail", type=int, default=16)
    a("--d-phi", type=int, default=16, help="features per map (0: the head dim)")
    a("--kv-itemsize", type=int, default=2, help="bytes per cached K/V element (bf16: 2)")
    a("--init", choices=INITS, default="probe",
      help="calibrated maps' start: probe features measured on the training windows, or PRF")
    a("--margin", type=float, default=1.0,
      help="probe init: std devs of calibration log-mass error kept under the mean")
    a("--steps", type=int, default=0,
      help="gradient steps of the paper's loss after the init (~11 s each at d_phi 128)")
    a("--queries-per-step", type=int, default=8)
    a("--lr", type=float, default=3e-3)
    a("--seed", type=int, default=0)
    a("--maps", type=Path, default=None, help="calibrated maps to load instead of calibrating")
    a("--save-maps", type=Path, default=None, help="write the calibrated maps here")
    a("--threads", type=int, default=None)
    a("--detail", default="exact@0.05", help="SELECTOR@FRACTION of the per-head table")
    a("--json", type=Path, default=None)
    a("--markdown", type=Path, default=None)
    a("--render", type=Path, default=None,
      help="re-summarise an earlier --json result from its stored per-head errors (switches, "
           "means, verdict; no capture) and print its markdown; with --json, write the "
           "updated result there (may be the same file)")
    return p.parse_args(argv)


def _load_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return handle.read()


def _calibrate(model, rows: Tensor, config: CalibrationConfig, log) -> tuple[dict, dict]:
    captured = capture_attention(model, rows)
    start = time.perf_counter()
    init = initial_maps(captured, config)
    before = evaluate(init, captured, config)

    def on_step(step: int, loss: float) -> None:
        if step % 5 == 0 or step + 1 == config.steps:
            log(f"  step {step + 1}/{config.steps}: loss {loss:.4f} "
                f"({time.perf_counter() - start:.0f} s)")

    maps, history = calibrate_feature_maps(captured, config, on_step=on_step)
    info = {"loss_history": history, "eval_loss_before": before,
            "eval_loss_after": evaluate(maps, captured, config),
            "seconds": time.perf_counter() - start}
    return maps, info


def random_feature_maps(n_layers: int, n_q_heads: int, n_kv_heads: int, head_dim: int,
                        config: CalibrationConfig) -> dict[str, FeatureMaps]:
    """The data-free maps: positive random features (:func:`initial_maps` with ``init="prf"``,
    scale ``head_dim ** -0.5``), which read only the captured shapes."""
    shapes = {layer: CapturedLayer(torch.empty(0, n_q_heads, 0, head_dim),
                                   torch.empty(0, n_kv_heads, 0, head_dim), head_dim**-0.5)
              for layer in range(n_layers)}
    return initial_maps(shapes, dataclasses.replace(config, init="prf"))


def _interleave(first: int, second: int) -> list[int]:
    """Window indices: ``first`` ones spread evenly among ``first + second``, then the rest.

    >>> _interleave(3, 3)
    [0, 2, 4, 1, 3, 5]
    """
    total = first + second
    chosen = sorted({round(i * total / first) for i in range(first)}) if first else []
    return chosen + [i for i in range(total) if i not in chosen]


def _windows_iter(model, rows: Tensor, positions: Tensor) -> Iterator[dict[int, Window]]:
    for row in rows:
        yield capture_windows(model, row[None], positions)[0]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.render is not None:
        result = resummarise(json.loads(args.render.read_text()))
        result["config"]["detail"] = args.detail
        table = markdown(result)
        log(table)
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        if args.markdown is not None:
            args.markdown.write_text(table)
        return result
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    eos_id = tokenizer.token_to_id(EOS)
    cal_docs, eval_docs = split_documents(_load_text(args.text or args.model / "heldout.txt.gz"))
    cal_stream, eval_stream = pack(tokenizer, cal_docs, eos_id), pack(tokenizer, eval_docs, eos_id)
    log(f"split: calibration {len(cal_docs)} documents / {cal_stream.numel()} tokens, "
        f"evaluation {len(eval_docs)} documents / {eval_stream.numel()} tokens")
    cal_rows = windows(cal_stream, args.context, args.train_windows + args.switch_windows)
    eval_rows = windows(eval_stream, args.context, args.eval_windows)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    body = model.model.eval().requires_grad_(False)  # the attention inputs need no LM head

    config = CalibrationConfig(d_phi=args.d_phi or None, sinks=args.sinks, tail=args.tail,
                               steps=args.steps, queries_per_step=args.queries_per_step,
                               lr=args.lr, seed=args.seed, init=args.init, margin=args.margin)
    # Interleaved, so that both kinds span the calibration half.
    order = _interleave(args.train_windows, args.switch_windows)
    train_rows, switch_rows = cal_rows[order[:args.train_windows]], cal_rows[
        order[args.train_windows:]]
    if args.maps is not None:
        log(f"loading calibrated maps from {args.maps}")
        calibrated, calibration_info = load_feature_maps(args.maps), {"loaded": str(args.maps)}
    else:
        log(f"calibrating phi on {len(train_rows)} x {args.context} tokens, {config}")
        calibrated, calibration_info = _calibrate(body, train_rows, config, log)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    group = c.num_attention_heads // c.num_key_value_heads
    init = random_feature_maps(c.num_hidden_layers, c.num_attention_heads,
                               c.num_key_value_heads, head_dim, config)
    if args.save_maps is not None:
        save_feature_maps({n: m.cpu() for n, m in calibrated.items()}, args.save_maps)
        log(f"saved maps to {args.save_maps} ({args.save_maps.stat().st_size} bytes)")

    d_phi = next(iter(calibrated.values())).phi_q.d_phi
    summary_tokens = summary_token_equivalent(head_dim, d_phi, args.kv_itemsize)
    fractions = [float(f) for f in args.budgets.split(",")]
    selectors = args.selectors.split(",")
    budgets = {s: [matched_budget(f, args.context, summary_tokens,
                                  args.page_size if s == "page" else None) for f in fractions]
               for s in selectors}
    positions = decode_positions(args.context, args.queries)
    maps = {"phi_init": init, "phi_cal": calibrated}
    measure = lambda rows: measure_split(  # noqa: E731
        _windows_iter(body, rows, positions), maps, budgets, args.sinks, args.tail,
        args.page_size, log)
    log(f"switch-decision split: {len(switch_rows)} windows x {args.queries} queries")
    calibration = measure(switch_rows)
    log(f"evaluation split: {len(eval_rows)} windows x {args.queries} queries")
    evaluation = measure(eval_rows)

    result = {
        "what": "attention-output relative L1 vs full attention, Top-K vs Top-K+phi at matched "
                "token-equivalent budgets, per layer/query head, examples/tiny-lm (fp32, CPU)",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
                  | {"summary_tokens": summary_tokens, "d_phi": d_phi, "head_dim": head_dim,
                     "group": group, "positions": positions.tolist(),
                     "split": "held-out documents: first half calibration (phi training "
                              "windows, then switch windows), second half evaluation"},
        "budgets": {s: [vars(b) for b in bs] for s, bs in budgets.items()},
        "calibration": calibration_info,
        "switch_split": _split_json(calibration),
        "evaluation": _split_json(evaluation),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "machine": platform.machine()},
    }
    result["summary"] = summarise(calibration, evaluation, budgets, group,
                                  _deploy_fields(result["config"]))
    result["seconds"] = time.perf_counter() - t0
    table = markdown(result)
    log(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(table)
    return result


def _deploy_fields(config: dict) -> dict:
    """The run's ``TopKPhiConfig`` fields that every row's deployed config shares."""
    return {"sinks": config["sinks"], "tail": config["tail"], "page_size": config["page_size"],
            "d_phi": config["d_phi"]}


def _split_from_json(split: dict) -> SplitResult:
    return SplitResult(errors={(e["selector"], e["fraction"], e["variant"]): e["per_head"]
                               for e in split["errors"]},
                       entropy=split["entropy"], queries=split["queries"])


def resummarise(result: dict) -> dict:
    """``result`` (an earlier ``--json``) with its summary recomputed from the stored per-head
    errors and budgets: the current switch rules and verdict, without re-measuring."""
    budgets = {s: [Budget(**b) for b in bs] for s, bs in result["budgets"].items()}
    result["summary"] = summarise(_split_from_json(result["switch_split"]),
                                  _split_from_json(result["evaluation"]), budgets,
                                  result["config"]["group"], _deploy_fields(result["config"]))
    return result


def _split_json(split: SplitResult) -> dict:
    return {"queries": split.queries, "entropy": split.entropy,
            "errors": [{"selector": s, "fraction": f, "variant": v, "per_head": e}
                       for (s, f, v), e in split.errors.items()]}


if __name__ == "__main__":
    main()
