"""Choose MAC-Attention's threshold ``tau`` for one model (``macopt calibrate --method mac``).

Why calibrate: a MAC hit needs the squared L2 distance between the current pre-RoPE query and a
recent one below ``2 D (1 - tau)^2``, an *absolute* radius on unnormalised queries. Query
scales differ between models and between the layers of one model (the tiny model's median
nearest-neighbour distance is 0 in layer 0, ~3 in layer 1 and ~100 in layer 3), and so does
how much a reused state costs in quality, so no fixed ``tau`` transfers.

The method (a loss-targeted search on calibration text):

1. **Data.** ``len(windows)`` windows of ``prefill + decode + 1`` tokens of calibration text,
   like the model's training text and disjoint from the text it is evaluated on.
2. **Exact reference.** Per window, one exact prefill of ``prefill`` tokens (recording every
   layer's pre-/post-RoPE queries, keys and values with
   :class:`~macopt.evaluation.capture.AttentionTap`) and the next ``decode`` tokens as
   teacher-forced decode steps with exact attention: their next-token distributions, and for
   every decode query its squared distance to the nearest of the previous ``ring_size``
   pre-RoPE queries (what MAC's match step computes).
3. **Candidates.** A radius below which a share ``s`` of a layer's distances fall (a
   quantile) becomes ``tau = 1 - sqrt(radius / 2D)``; the share is about the hit rate it gives.
   Each radius is tried at every candidate offset ``S`` (``offsets``; default: the base's
   alone). ``S`` does not change which steps hit (distances are between queries) but what a
   hit costs and risks: it reuses the matched query's state over all but its ``S`` most
   recent keys and reads about ``S + (t - j*)`` keys exactly, so a larger ``S`` keeps more of
   the recent keys, where local heads put their mass, exact, for more reads per hit.
4. **Quality of a setting.** MAC is simulated on the decode steps: the ring starts as the
   prefill writes it (exact entries of the last ``ring_size`` prompt positions) and each layer
   runs the MAC step (match, amend, complete, ring write, chain depth: the math of
   :func:`macopt.kernels.mac_reference.mac_decode_step`, restricted to the keys a step can
   attend) on each decode query in order. A teacher-forced chunk of decode steps through the
   model computes what one-token decode steps compute (a position only sees earlier ones).
   The loss is the mean ``KL(exact || MAC)`` of the decode steps' next-token distributions:
   the expected log-perplexity increase when text follows the model, with far less variance
   than the perplexity of a few hundred tokens (which is measured and reported as well).
5. **Search** (``per_layer``, the default): each layer alone under MAC at every (offset,
   share) pair (the other layers exact) gives a set of (keys read, KL) options per layer; KL
   is close to additive over layers at these sizes, so one option per layer is allocated
   (an exact multiple-choice knapsack) to read the fewest keys with the summed KL within
   ``log(1 + target)``, then the combination is measured with every layer under MAC.
   If it is over target the budget shrinks in proportion and the allocation repeats
   (``refine`` times). A layer whose best option is "never match" gets ``tau = 1.0``.
   ``global`` (one tau for all layers at the base offset, the paper's setting) tries shares
   from strict to loose until the target is exceeded, then bisects ``refine`` times. With
   both, the one reading fewer keys within target wins; if nothing is within target,
   ``tau = 1.0`` (exact).

The result is a JSON file (:func:`write_result`) that ``macopt patch --config``, ``macopt eval
--methods mac:FILE`` and :func:`load_result` read: ``{"config": MACConfig.to_dict(),
"overrides": {attention module: MACConfig.to_dict()}, "calibration": {settings, the chosen
setting, every setting measured}}``; a per-layer setting's overrides carry each layer's tau
and offset.

>>> result = calibrate_mac(model, windows, MACCalibration(target=0.005))  # doctest: +SKIP
>>> write_result(result, "mac_calibrated.json")                          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from macopt._hf_compat import cache_kwargs
from macopt.config import MACConfig, MethodConfig
from macopt.evaluation.capture import AttentionCall, AttentionTap
from macopt.kernels.mac_reference import (
    MACRing,
    _gather_slot,
    _write_slot,
    match,
    prefix_end,
    range_state,
)
from macopt.kernels.reference import merge_state

Tensor = torch.Tensor
Progress = Callable[[str], None]
CALIBRATED_FILENAME = "mac_calibrated.json"
FAMILIES = ("per_layer", "global")


@dataclass(frozen=True)
class MACCalibration:
    """What to search and on how much text.

    ``target``: largest expected decode-step perplexity increase accepted (0.005: +0.5%).
    ``base``: ring size, ``t_min``, sinks and chain depth are kept; ``tau`` is chosen, and per
    layer also the offset, among ``offsets`` (None: ``(base.offset,)``, tau alone; the
    ``global`` family always uses ``base.offset``). ``prefill`` must reach ``base.t_min`` for
    any decode step to match.
    """

    target: float = 0.005
    prefill: int = 4096
    decode: int = 64
    shares: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
    refine: int = 2
    families: tuple[str, ...] = ("per_layer",)
    base: MACConfig = field(default_factory=MACConfig)
    offsets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.prefill < self.base.t_min:
            raise ValueError(f"MACCalibration: prefill {self.prefill} is below t_min "
                             f"{self.base.t_min}; no decode step could match")
        unknown = set(self.families) - set(FAMILIES)
        if unknown or not self.families:
            raise ValueError(f"MACCalibration.families: expected some of {FAMILIES}, "
                             f"got {self.families}")
        if not self.shares or not all(0.0 < x < 1.0 for x in self.shares):
            raise ValueError(f"MACCalibration.shares: expected values in (0, 1), "
                             f"got {self.shares}")
        offsets = (self.base.offset,) if self.offsets is None else tuple(self.offsets)
        if not offsets:
            raise ValueError("MACCalibration.offsets: expected at least one offset, got ()")
        for offset in offsets:  # each must make a valid MACConfig (an int >= 0)
            try:
                dataclasses.replace(self.base, offset=offset)
            except ValueError as err:
                raise ValueError(f"MACCalibration.offsets: {err}") from None
        object.__setattr__(self, "offsets", tuple(sorted(set(offsets))))

    @property
    def ring_offsets(self) -> tuple[int, ...]:
        """The offsets whose prefill rings the search needs (``global`` uses the base's)."""
        extra = (self.base.offset,) if "global" in self.families else ()
        return tuple(sorted(set(self.offsets) | set(extra)))

    @property
    def kl_budget(self) -> float:
        return math.log1p(self.target)


@dataclass
class _Window:
    """One calibration window after its exact run."""

    cache: Any  # the prefill's DynamicCache (cropped back to the prefill after each run)
    rings: dict[int, dict[int, MACRing]]  # per offset S, per layer: the prefill's ring
    chunk: Tensor  # [1, decode] decode-step input ids
    targets: Tensor  # [decode] the tokens they predict
    exact_logp: Tensor  # [decode, vocab] fp32 log-probabilities of the exact decode steps
    distances: dict[int, Tensor]  # per layer: [Hq, steps past t_min] nearest-ring distances
    names: dict[int, str]  # per layer: the attention module's qualified name


@dataclass
class Setting:
    """One measured setting: a tau and an offset per attention module and what it cost."""

    kind: str  # "global", "per_layer" (a combination), or "layer" (one layer alone)
    taus: dict[str, float]  # attention module name -> tau (1.0: never match)
    share: float | None = None  # the quantile the taus came from (global, layer)
    offsets: dict[str, int] = field(default_factory=dict)  # module -> S (absent: base's)
    kl: float = math.nan  # mean KL(exact || MAC) of the decode steps' next-token distributions
    ppl_ratio: float = math.nan  # measured decode-step perplexity ratio
    hit_rate: float = math.nan  # over every layer's decode steps past t_min
    read_fraction: float = math.nan  # keys read / full attention's, past t_min
    layer_hit_rates: list[float] = field(default_factory=list)
    layer_read_fractions: list[float] = field(default_factory=list)
    within: bool = False  # exp(kl) - 1 <= the calibration's target

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "share": self.share, "taus": self.taus,
                "offsets": self.offsets, "kl": self.kl,
                "expected_ppl_ratio": math.exp(self.kl), "ppl_ratio": self.ppl_ratio,
                "hit_rate": self.hit_rate, "read_fraction": self.read_fraction,
                "layer_hit_rates": self.layer_hit_rates,
                "layer_read_fractions": self.layer_read_fractions, "within_target": self.within}


@dataclass
class CalibrationResult:
    config: MACConfig
    overrides: dict[str, MACConfig]
    chosen: Setting | None
    measured: list[Setting]
    exact_decode_ppl: float
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "overrides": {name: c.to_dict() for name, c in self.overrides.items()},
            "calibration": {
                **self.settings,
                "exact_decode_perplexity": self.exact_decode_ppl,
                "chosen": None if self.chosen is None else self.chosen.to_dict(),
                "measured": [c.to_dict() for c in self.measured],
            },
        }


# --- the MAC step on one sequence --------------------------------------------------------------


def mac_step(q: Tensor, q_pre: Tensor, k: Tensor, v: Tensor, ring: MACRing, t: int,
             scale: float, config: MACConfig) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`~macopt.kernels.mac_reference.mac_decode_step` for one row (``q, q_pre[1, Hq,
    D]``, keys ``[0, t]`` of ``k, v[1, Hkv, N, D]``), attending only the key range a step can
    read (a hit's band and the tail) instead of masking all ``N``. Returns ``(o, hit, keys
    read)`` as the reference does; updates ``ring``."""
    q_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    position, start = torch.tensor([t], device=q.device), torch.zeros(1, dtype=torch.long,
                                                                       device=q.device)
    found = match(q_pre, ring, position, start, offset=config.offset, sinks=config.sinks,
                  tau=config.tau, t_min=config.t_min, max_depth=config.max_chain_depth)
    e_t = int(prefix_end(position, start, config.offset))
    lo = 0 if config.sinks else min(int(found.start.min()), e_t)
    keys = torch.arange(lo, t + 1, device=q.device)
    kf, vf = k[0, :, lo:t + 1].float(), v[0, :, lo:t + 1].float()
    group = q_heads // kv_heads
    scores = torch.einsum("hgd,hnd->hgn", q[0].float().view(kv_heads, group, head_dim), kf)
    scores = scores.reshape(q_heads, -1) * scale

    def state(attend: Tensor) -> tuple[Tensor, Tensor]:
        masked = scores.masked_fill(~attend, float("-inf"))
        lse = torch.logsumexp(masked, dim=-1)
        weights = torch.exp(masked - lse.nan_to_num(neginf=0.0)[:, None])
        o = torch.einsum("hgn,hnd->hgd", weights.view(kv_heads, group, -1), vf)
        return o.reshape(q_heads, head_dim), lse

    prefix = (keys >= found.start[0][:, None]) & (keys < e_t)
    tail = (keys >= e_t)[None].expand(q_heads, -1)
    if config.sinks:
        tail = tail | (keys < min(config.sinks, e_t))[None]
    o_a, lse_a = state(prefix)
    entry_o = _gather_slot(ring.o, found.slot)[0]
    entry_lse = torch.where(found.hit[0], _gather_slot(ring.lse, found.slot)[0], float("-inf"))
    o_c, lse_c = merge_state(o_a, lse_a, entry_o, entry_lse)
    o_t, lse_t = state(tail)
    out, _ = merge_state(o_c, lse_c, o_t, lse_t)
    depth = torch.where(found.hit, _gather_slot(ring.depth, found.slot) + 1, 0)
    _write_slot(ring, position, q_pre, o_c[None], lse_c[None], depth)
    keys_read = (prefix | tail).sum(-1).to(torch.int32)[None]
    return out[None].to(q.dtype), found.hit, keys_read


def prefill_ring(call: AttentionCall, config: MACConfig) -> MACRing:
    """The ring MAC's prefill writes for one prompt (one row, starting at position 0): exact
    entries of its last ``ring_size`` positions (as
    :func:`~macopt.kernels.mac_reference.prefill_entries`, computed for those positions only)."""
    _, q_heads, n, head_dim = call.q.shape
    lo = max(n - config.ring_size, 0)
    positions = torch.arange(lo, n, device=call.q.device)
    keys = torch.arange(n, device=call.q.device)
    ends = prefix_end(positions, torch.zeros_like(positions), config.offset)
    attend = (keys >= config.sinks) & (keys[None, :] < ends[:, None])  # [L, N]
    attend = attend[None, None].expand(1, q_heads, -1, -1)
    o, lse = range_state(call.q[:, :, lo:], call.k[:, :, :n], call.v[:, :, :n], call.scale,
                         attend)
    ring = MACRing.empty(1, q_heads, config.ring_size, head_dim, call.q_pre.dtype,
                         call.q.device)
    slots = positions % config.ring_size
    ring.q[0, :, slots] = matched_query(call.q_pre[0, :, lo:], config).to(ring.q.dtype)
    ring.o[0, :, slots] = o[0].float()
    ring.lse[0, :, slots] = lse[0].float()
    ring.pos[0, :, slots] = positions.to(torch.int32)
    return ring


class _MACAttention:
    """The attention of a decode chunk under MAC: per layer, the chunk's queries in order."""

    def __init__(self, rings: dict[int, MACRing], configs: dict[int, MACConfig], start: int):
        self.rings, self.configs, self.start = rings, configs, start
        self.hits: dict[int, int] = {}
        self.read: dict[int, int] = {}
        self.full: dict[int, int] = {}
        self.steps: dict[int, int] = {}

    def __call__(self, call: AttentionCall, sdpa: Callable[[], Tensor]) -> Tensor:
        config = self.configs[call.layer]
        q_heads, exact = call.q.shape[1], config.tau >= 1.0  # tau 1: nothing ever matches
        ring = None if exact else self.rings[call.layer]
        outputs = []
        for i in range(call.q.shape[2]):
            t = self.start + i
            if exact:
                hits, keys = 0, (t + 1) * q_heads
            else:
                o, hit, read = mac_step(call.q[:, :, i],
                                        matched_query(call.q_pre[:, :, i], config), call.k, call.v,
                                        ring, t, call.scale, config)
                outputs.append(o)
                hits, keys = int(hit.sum()), int(read.sum())
            if t >= config.t_min:
                layer = call.layer
                self.hits[layer] = self.hits.get(layer, 0) + hits
                self.read[layer] = self.read.get(layer, 0) + keys
                self.full[layer] = self.full.get(layer, 0) + (t + 1) * q_heads
                self.steps[layer] = self.steps.get(layer, 0) + q_heads
        if exact:  # the same as MAC at tau 1 (every step a miss), at SDPA's speed
            return sdpa()
        return torch.stack(outputs, dim=2).transpose(1, 2)  # [1, L, Hq, D]


# --- exact runs ----------------------------------------------------------------------------


def _drop_decode(cache: Any, prefill: int) -> None:
    """Crop a DynamicCache back to its prefill (a negative count: the form every supported
    transformers version reads as "remove this many")."""
    cache.crop(-(cache.get_seq_length() - prefill))


def _log_probs(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits[0].float(), dim=-1)


def nearest_ring_distances(q_pre: Tensor, first: int, ring_size: int) -> Tensor:
    """``[Hq, L - first]``: for each query at index ``i >= first`` of ``q_pre[Hq, L, D]``, the
    squared L2 distance (fp32) to the nearest of the ``ring_size`` queries before it."""
    q = q_pre.float()
    out = []
    for i in range(first, q.shape[1]):
        window = q[:, max(i - ring_size, 0):i]
        out.append(((window - q[:, i:i + 1]) ** 2).sum(-1).min(-1).values)
    return torch.stack(out, dim=1)


@torch.no_grad()
def exact_window(model: torch.nn.Module, ids: Tensor, settings: MACCalibration) -> _Window:
    """The exact prefill and decode chunk of one window ``ids[prefill + decode + 1]``."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    p, d = settings.prefill, settings.decode
    ids = ids.to(device)
    cache = DynamicCache(config=model.config)
    with AttentionTap(model) as tap:
        model(ids[None, :p], **cache_kwargs(model, cache), use_cache=True)
    prefill_calls = {c.layer: c for c in tap.calls}
    # The entries cover [0, E(p)), which moves with S; the nearest distances below do not.
    rings = {offset: {layer: prefill_ring(call, dataclasses.replace(settings.base,
                                                                    offset=offset))
                      for layer, call in prefill_calls.items()}
             for offset in settings.ring_offsets}
    chunk, targets = ids[None, p:p + d], ids[p + 1:p + d + 1]
    with AttentionTap(model) as tap:
        logits = model(chunk, **cache_kwargs(model, cache), use_cache=True).logits
    _drop_decode(cache, p)
    distances = {}
    first_step = max(settings.base.t_min - p, 0)
    for call in tap.calls:
        before = prefill_calls[call.layer].q_pre[0, :, -settings.base.ring_size:]
        q_pre = matched_query(torch.cat([before, call.q_pre[0]], dim=1), settings.base)
        distances[call.layer] = nearest_ring_distances(q_pre, before.shape[1] + first_step,
                                                       settings.base.ring_size)
    names = {layer: call.name for layer, call in prefill_calls.items()}
    return _Window(cache, rings, chunk, targets, _log_probs(logits), distances, names)


# --- candidates ----------------------------------------------------------------------------


def matched_query(q_pre: Tensor, config: MACConfig) -> Tensor:
    """The pre-RoPE queries as the ring and the match see them: scaled to norm ``sqrt(D)``
    under ``radius="relative"`` (as the rewrite does), unchanged under "absolute"; so the taus
    calibrated here mean what the optimized model's sites do with them."""
    if config.radius != "relative":
        return q_pre
    x = q_pre.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-12)


def tau_for_radius(radius: float, head_dim: int) -> float:
    """The ``tau`` whose match radius ``2 D (1 - tau)^2`` is ``radius``.

    >>> round(tau_for_radius(2 * 128 * 0.55 ** 2, 128), 6)
    0.45
    """
    return 1.0 - math.sqrt(max(radius, 0.0) / (2.0 * head_dim))


def radius_for_share(distances: Tensor, share: float) -> float:
    """A radius that about ``share`` of ``distances`` fall below. A hit needs a distance
    strictly below the radius, so the quantile itself is nudged up: in a first layer, whose
    queries depend on the token alone, most distances are exactly 0 (a repeated token)."""
    value = float(torch.quantile(distances.flatten().float(), share))
    return value * (1 + 1e-6) + 1e-6


@torch.no_grad()
def simulate_decode(model: torch.nn.Module, window: _Window, configs: dict[int, MACConfig],
                    prefill: int) -> tuple[Tensor, _MACAttention]:
    """The decode steps of ``window`` under MAC (``configs``: per layer): their logits
    ``[1, decode, vocab]`` and the attention object holding the hit and key counts. A layer
    that can match starts from the prefill ring of its config's offset."""
    rings = {layer: window.rings[config.offset][layer].clone()
             for layer, config in configs.items() if config.tau < 1.0}
    attention = _MACAttention(rings, configs, prefill)
    with AttentionTap(model, attend=attention, keep=False):
        logits = model(window.chunk, **cache_kwargs(model, window.cache), use_cache=True).logits
    _drop_decode(window.cache, prefill)
    return logits, attention


def measure(model: torch.nn.Module, windows: Sequence[_Window], setting: Setting,
            settings: MACCalibration) -> Setting:
    """Fill ``setting``'s KL, perplexity ratio, hit rates and read fractions over
    ``windows``; within target when ``exp(kl) - 1 <= settings.target``."""
    names = windows[0].names
    base = settings.base
    configs = {layer: dataclasses.replace(base, tau=setting.taus[name],
                                          offset=setting.offsets.get(name, base.offset))
               for layer, name in names.items()}
    kl, nll_gap = [], []
    totals: dict[str, dict[int, int]] = {"hits": {}, "read": {}, "full": {}, "steps": {}}
    for window in windows:
        logits, attention = simulate_decode(model, window, configs, settings.prefill)
        logp = _log_probs(logits)
        kl.append((window.exact_logp.exp() * (window.exact_logp - logp)).sum(-1))
        picked = window.targets[:, None]
        nll_gap.append((window.exact_logp.gather(1, picked) - logp.gather(1, picked))[:, 0])
        for key, counts in totals.items():
            for layer, n in getattr(attention, key).items():
                counts[layer] = counts.get(layer, 0) + n
    setting.kl = max(float(torch.cat(kl).mean()), 0.0)
    setting.ppl_ratio = math.exp(float(torch.cat(nll_gap).mean()))
    layers = sorted(totals["steps"])
    setting.layer_hit_rates = [totals["hits"][i] / totals["steps"][i] for i in layers]
    setting.layer_read_fractions = [totals["read"][i] / totals["full"][i] for i in layers]
    steps, full = sum(totals["steps"].values()), sum(totals["full"].values())
    setting.hit_rate = sum(totals["hits"].values()) / steps if steps else 0.0
    setting.read_fraction = sum(totals["read"].values()) / full if full else 1.0
    setting.within = math.expm1(setting.kl) <= settings.target
    return setting


class _Search:
    """The measurements of one calibration: windows, candidate taus and every setting run."""

    def __init__(self, model, windows: list[_Window], settings: MACCalibration,
                 tick: Progress):
        self.model, self.windows, self.settings, self.tick = model, windows, settings, tick
        self.names = windows[0].names
        some_rings = next(iter(windows[0].rings.values()))
        self.head_dim = next(iter(some_rings.values())).q.shape[-1]
        self.distances = {layer: torch.cat([w.distances[layer] for w in windows], dim=1)
                          for layer in self.names}
        self.measured: list[Setting] = []

    def tau(self, layer: int | None, share: float) -> float:
        """The tau at which ``share`` of the distances (of ``layer``; None: all) fall."""
        pool = (torch.cat([d.flatten() for d in self.distances.values()]) if layer is None
                else self.distances[layer])
        return tau_for_radius(radius_for_share(pool, share), self.head_dim)

    def run(self, setting: Setting, what: str, layer: int | None = None) -> Setting:
        measure(self.model, self.windows, setting, self.settings)
        self.measured.append(setting)
        hits, keys = ((setting.hit_rate, setting.read_fraction) if layer is None else
                      (setting.layer_hit_rates[layer], setting.layer_read_fractions[layer]))
        self.tick(f"{what}: KL {setting.kl:.1e}, hits {hits:.2f}, keys read {keys:.3f}")
        return setting

    def global_tau(self) -> Setting | None:
        """One tau for every layer: shares strict to loose, then bisection."""
        def run(share: float) -> Setting:
            tau = self.tau(None, share)
            names = self.names.values()
            return self.run(Setting("global", dict.fromkeys(names, tau), share,
                                    dict.fromkeys(names, self.settings.base.offset)),
                            f"global tau {tau:.3f}")

        best, failed = None, None
        for share in sorted(self.settings.shares):
            setting = run(share)
            if not setting.within:
                failed = setting
                break
            best = setting
        for _ in range(self.settings.refine if failed is not None else 0):
            setting = run(((best.share if best else 0.0) + failed.share) / 2)
            best, failed = (setting, failed) if setting.within else (best, setting)
        return best

    def per_layer(self) -> Setting | None:
        """Per-layer options, an exact allocation, then the combination verified."""
        base_offset = self.settings.base.offset
        exact = dict.fromkeys(self.names.values(), 1.0)
        exact_offsets = dict.fromkeys(self.names.values(), base_offset)
        # Per layer, first "never match" (its offset does not matter), then every measured one.
        curves = {layer: [_Option(1.0, base_offset, 1.0, 0.0)] for layer in self.names}
        for share in sorted(self.settings.shares):
            for offset in self.settings.offsets:
                for layer, name in self.names.items():
                    tau = self.tau(layer, share)
                    setting = self.run(Setting("layer", {**exact, name: tau}, share,
                                               {**exact_offsets, name: offset}),
                                       f"layer {layer} S {offset} tau {tau:.3f}", layer)
                    curves[layer].append(_Option(tau, offset,
                                                 setting.layer_read_fractions[layer],
                                                 setting.kl))
        budget, best, tried = self.settings.kl_budget, None, []
        for _ in range(1 + self.settings.refine):
            picked = {self.names[layer]: option
                      for layer, option in _allocate(curves, budget).items()}
            taus = {name: option.tau for name, option in picked.items()}
            offsets = {name: option.offset for name, option in picked.items()}
            if (taus, offsets) in tried:
                break
            tried.append((taus, offsets))
            setting = self.run(Setting("per_layer", taus, offsets=offsets),
                               "per-layer combination")
            if setting.within and (best is None or _better(setting, best)):
                best = setting
            # Layers interact a little: rescale the budget by how far the sum predicted off.
            budget *= self.settings.kl_budget / max(setting.kl, 1e-12)
        return best


class _Option(NamedTuple):
    """One layer alone under MAC at one (tau, offset): what it read and cost."""

    tau: float
    offset: int
    read: float  # the layer's keys read / full attention's
    kl: float


def _allocate(curves: dict[int, list[_Option]], budget: float) -> dict[int, _Option]:
    """Per layer one option, reading the fewest keys in sum with the summed KL within
    ``budget``: an exact multiple-choice knapsack over the Pareto front of partial sums (a
    Lagrangian sweep only reaches the convex hull's corners, and with a few discrete options
    per layer the corner below the budget can read far more than the best fit). The exact
    option has KL 0, so something always fits a budget >= 0; otherwise each layer's first
    option ("never match")."""
    front: list[tuple[float, float, Any]] = [(0.0, 0.0, None)]  # KL, read, (option, parent)
    for options in curves.values():
        sums = sorted(((kl + o.kl, read + o.read, (o, picks))
                       for kl, read, picks in front for o in options if kl + o.kl <= budget),
                      key=lambda p: (p[0], p[1]))
        front = []
        for point in sums:  # by KL: keep what reads fewer than every point of smaller KL
            if not front or point[1] < front[-1][1]:
                front.append(point)
    if not front:
        return {layer: options[0] for layer, options in curves.items()}
    picks, chain = [], min(front, key=lambda p: p[1])[2]
    while chain is not None:
        picks.append(chain[0])
        chain = chain[1]
    return dict(zip(curves, reversed(picks), strict=True))


def _better(a: Setting, b: Setting) -> bool:
    """Fewer keys read; at equal reads, the smaller loss."""
    return (a.read_fraction, a.kl) < (b.read_fraction, b.kl)


def search_steps(settings: MACCalibration, layers: int) -> int:
    """At most how many settings :func:`calibrate_mac` measures (a progress bar's total)."""
    steps = 0
    if "per_layer" in settings.families:
        steps += len(settings.shares) * len(settings.offsets) * layers + 1 + settings.refine
    if "global" in settings.families:
        steps += len(settings.shares) + settings.refine
    return steps


def calibrate_mac(model: torch.nn.Module, windows: Sequence[Tensor],
                  settings: MACCalibration, progress: Progress | None = None
                  ) -> CalibrationResult:
    """Run the search (see the module docstring) on ``windows``, 1-D tensors of at least
    ``settings.prefill + settings.decode + 1`` token ids each."""
    tick = progress or (lambda _: None)
    started = time.perf_counter()
    need = settings.prefill + settings.decode + 1
    if not windows or any(w.numel() < need for w in windows):
        raise ValueError(f"calibration windows must each hold prefill + decode + 1 = {need} "
                         "tokens; use more text or a shorter prefill")
    model.eval()
    runs = []
    for i, ids in enumerate(windows):
        runs.append(exact_window(model, ids[:need], settings))
        tick(f"exact window {i + 1}/{len(windows)}")
    search = _Search(model, runs, settings, tick)
    found = [search.per_layer() if family == "per_layer" else search.global_tau()
             for family in settings.families]
    found = [s for s in found if s is not None]
    chosen = min(found, key=lambda s: (s.read_fraction, s.kl)) if found else None
    config, overrides = _configs(chosen, settings.base)
    exact_nll = float(torch.cat([-w.exact_logp.gather(1, w.targets[:, None])[:, 0]
                                 for w in runs]).mean())
    described = {
        "method": "loss-targeted tau search (macopt.calibrate_mac)",
        "target_ppl_increase": settings.target, "loss": "mean KL(exact || MAC), decode steps",
        "prefill": settings.prefill, "decode": settings.decode, "windows": len(runs),
        "shares": list(settings.shares), "offsets": list(settings.offsets),
        "refine": settings.refine,
        "families": list(settings.families),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return CalibrationResult(config, overrides, chosen, search.measured, math.exp(exact_nll),
                             described)


def _configs(chosen: Setting | None, base: MACConfig) -> tuple[MACConfig, dict[str, MACConfig]]:
    """The written configs: one (tau, offset), or the strictest tau at the base offset as the
    base and one override per layer with its tau and offset; ``tau = 1.0`` (never match) when
    nothing met the target."""
    if chosen is None:
        return dataclasses.replace(base, tau=1.0), {}
    pairs = {name: (tau, chosen.offsets.get(name, base.offset))
             for name, tau in chosen.taus.items()}
    if len(set(pairs.values())) == 1:
        tau, offset = next(iter(pairs.values()))
        return dataclasses.replace(base, tau=tau, offset=offset), {}
    strictest = dataclasses.replace(base, tau=max(chosen.taus.values()))
    return strictest, {name: dataclasses.replace(base, tau=tau, offset=offset)
                       for name, (tau, offset) in pairs.items()}


# --- files -----------------------------------------------------------------------------------


def write_result(result: CalibrationResult, path: str | Path, **extra: Any) -> Path:
    """Write ``result`` (plus ``extra`` entries in its ``calibration`` block) as JSON."""
    data = result.to_json()
    data["calibration"].update(extra)
    path = Path(path)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def load_result(path: str | Path) -> tuple[MACConfig, dict[str, MethodConfig | None]]:
    """The config and per-module overrides of a calibration file (or any config file
    ``macopt patch --config`` reads)."""
    from macopt.pretrained import parse_config_file

    config, overrides = parse_config_file(path)
    if not isinstance(config, MACConfig):
        raise ValueError(f"{path}: holds a {config.method!r} config, not a MAC one")
    return config, overrides
