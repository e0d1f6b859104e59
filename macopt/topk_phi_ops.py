"""Top-K + phi ops (``torch.ops.macopt.topk_phi_site_prefill`` / ``topk_phi_site_decode``):
what the ``topk_phi`` rewrites insert, with the site's params (:class:`TopKPhiDecodeParams`,
:class:`TopKPhiPrefillParams`) and its per-site state.

The ops find the site's :class:`~macopt.topk_phi_state.TopKPhiState` in the per-site registry
(:mod:`macopt.state`, keyed by the site id baked into the graph), allocating it on first use,
and call the explicit-state ops of :mod:`macopt.topk_phi_state`. As for MAC, they are declared
functional and return a fresh tensor the graph uses (the prefill op: a copy of the attention
output), so no compiler drops them.

The site's maps: ``feature_maps`` (a ``macopt calibrate`` file, site ``layer.<layer>``) or,
when empty, positive random features seeded by ``seed``.

Each site counts its prefills and decode steps on the device (:data:`STEP_COUNTERS`, no host
sync), so ``macopt.stats`` shows that decode steps ran through the method: equal tokens alone
cannot tell a rewritten model from one that ran nothing. Keys read are not counted yet.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache

import torch

from macopt import distributed, state
from macopt.config import TopKPhiConfig, check_budget_args, resolve_budget
from macopt.kernels.feature_maps import FeatureMaps
from macopt.phi_files import calibrated_tokens, maps_for_kv_heads, read_feature_maps, site_name
from macopt.site_params import SiteParams, site_op
from macopt.topk_phi_select import summary_budget_tokens
from macopt.topk_phi_state import TopKPhiState, topk_phi_decode, topk_phi_prefill

Tensor = torch.Tensor

STEP_COUNTERS = ("steps", "prefills")  # a Top-K + phi site's counters, in this order


@dataclass(frozen=True)
class TopKPhiDecodeParams(SiteParams):
    """A Top-K + phi site's decode constants (``budget``, ``budget_fraction``: as
    :meth:`TopKPhiConfig.budget_args`; ``selector``: :meth:`TopKPhiConfig.selector_spec`;
    ``d_phi`` 0: the head dim; ``feature_maps`` "": random features of ``seed``)."""

    budget: int
    page_size: int
    selector: str
    d_phi: int
    completion: list[bool]
    feature_maps: str
    seed: int
    summary_in_budget: bool = False
    budget_fraction: float = 0.0

    @classmethod
    def from_config(cls, config: TopKPhiConfig, layer: int, q_heads: int
                    ) -> TopKPhiDecodeParams:
        budget, fraction = config.budget_args()  # a fraction: resolved when the step runs
        return cls(budget, config.page_size, config.selector_spec(), config.d_phi or 0,
                   list(config.completion_for(layer, q_heads)), config.feature_maps or "",
                   config.seed, config.summary_in_budget, fraction)


@dataclass(frozen=True)
class TopKPhiPrefillParams(SiteParams):
    """A Top-K + phi site's prefill constants: the summary covers each row's prompt middle
    ``[s0 + sinks, end - tail)``; ``use_pages`` / ``sketch``: the selector's page bounds or
    key sketch are built too."""

    sinks: int
    tail: int
    page_size: int
    use_pages: bool
    d_phi: int
    completion: list[bool]
    feature_maps: str
    seed: int
    sketch: bool = False

    @classmethod
    def from_config(cls, config: TopKPhiConfig, layer: int, q_heads: int,
                    tail: int | None = None) -> TopKPhiPrefillParams:
        """``tail``: the summary's tail when a composed method needs a longer one."""
        return cls(config.sinks, config.tail if tail is None else tail, config.page_size,
                   config.selector == "page", config.d_phi or 0,
                   list(config.completion_for(layer, q_heads)), config.feature_maps or "",
                   config.seed, config.selector == "sketch")

    def state_args(self) -> tuple:
        """The state's allocation arguments after ``(layer, q_heads, k)``
        (:func:`site_state`, :func:`allocate_state`)."""
        return (self.use_pages, self.page_size, self.d_phi, self.completion, self.feature_maps,
                self.seed, self.sketch)


@cache
def _file_maps(path: str) -> dict[str, FeatureMaps]:
    return read_feature_maps(path)  # errors name the file


_WARNED_LENGTHS: set[tuple[str, int]] = set()


def warn_beyond_calibration(path: str, n_keys: int) -> None:
    """Warn once per (file, cache length) when a cache holds more tokens than the phi file's
    calibration sequences: maps fitted on short sequences can fail badly on longer ones."""
    calibrated = calibrated_tokens(path)
    if calibrated is None or n_keys <= calibrated or (path, n_keys) in _WARNED_LENGTHS:
        return
    _WARNED_LENGTHS.add((path, n_keys))
    warnings.warn(
        f"macopt Top-K + phi: the feature maps in {path} were calibrated on {calibrated}-token "
        f"sequences and this cache holds {n_keys}. Maps used past their calibration length can "
        "be far off (SmolLM2: maps from 2K sequences gave exp(KL) 76-91 at 8K; "
        "docs/REAL_MODEL.md). Calibrate with `macopt calibrate ... --seq-len "
        f"{n_keys}` (or longer), or run without completion.", stacklevel=2)


def site_state(site_id: int, layer: int, q_heads: int, k: Tensor, use_pages: bool,
               page_size: int, d_phi: int, completion: list[bool], feature_maps: str,
               seed: int, sketch: bool = False) -> state.SiteState:
    """The state of ``site_id`` for a prefill cache ``k[B, Hkv, N, D]`` (allocated on first
    use; decode steps find it, whatever their cache length, without reallocating): its
    :class:`TopKPhiState` buffers and its :data:`STEP_COUNTERS`."""
    spec = state_spec(k.shape[0], layer, q_heads, k, use_pages, page_size, d_phi, completion,
                      feature_maps, seed, sketch)

    def allocate() -> tuple[TopKPhiState, Tensor]:
        buffers = allocate_state(k.shape[0], layer, q_heads, k, use_pages, page_size, d_phi,
                                 completion, feature_maps, seed, sketch, site_id)
        counters = torch.zeros(len(STEP_COUNTERS), dtype=torch.int64, device=k.device)
        return buffers, counters

    return state.site_state(site_id, "topk_phi", spec, allocate)


def state_spec(rows: int, layer: int, q_heads: int, k: Tensor, use_pages: bool, page_size: int,
               d_phi: int, completion: list[bool], feature_maps: str, seed: int,
               sketch: bool = False) -> tuple:
    """What a site's Top-K + phi state is allocated for (a different spec reallocates)."""
    _, n_kv_heads, n_keys, head_dim = k.shape
    return (rows, q_heads, n_kv_heads, n_keys, head_dim, k.dtype, k.device, use_pages,
            page_size, d_phi, tuple(completion), feature_maps, seed, sketch)


def allocate_state(rows: int, layer: int, q_heads: int, k: Tensor, use_pages: bool,
                   page_size: int, d_phi: int, completion: list[bool], feature_maps: str,
                   seed: int, sketch: bool = False, site_id: int | None = None
                   ) -> TopKPhiState:
    """A Top-K + phi state for ``rows`` rows of a cache like ``k[B, Hkv, N, D]``, with the
    maps of ``layer`` from ``feature_maps`` (empty: positive random features of ``seed``);
    ``use_pages``: page bounds, ``sketch``: the sketch selector's key sketch. A site that
    tensor parallelism shards (``site_id``) takes its rank's heads of the whole site's maps."""
    _, n_kv_heads, n_keys, head_dim = k.shape
    maps = None
    if feature_maps:
        found = _file_maps(feature_maps)  # first: its errors name a missing or corrupt file
        warn_beyond_calibration(feature_maps, n_keys)
        if site_name(layer) not in found:
            raise ValueError(f"{feature_maps} holds no maps for {site_name(layer)} "
                             f"(it has {sorted(found)[:4]}...)")
        maps = found[site_name(layer)]
    shard = distributed.site_heads(site_id) if site_id is not None else None
    if shard is not None:
        maps = distributed.rank_feature_maps(shard, n_kv_heads, head_dim, d_phi, maps, seed)
    elif maps is not None:
        maps = maps_for_kv_heads(maps, n_kv_heads)
    return TopKPhiState.allocate(
        rows, q_heads, n_kv_heads, n_keys, head_dim, k.dtype, k.device,
        d_phi=d_phi or None, page_size=page_size if use_pages else None, maps=maps,
        completion=tuple(completion), seed=seed, sketch=sketch)
@site_op("macopt::topk_phi_site_prefill", TopKPhiPrefillParams)
def topk_phi_site_prefill(
    attn_out: Tensor, k: Tensor, v: Tensor, key_starts: Tensor, ends: Tensor, site_id: int,
    layer: int, params: TopKPhiPrefillParams,
) -> Tensor:
    """A copy of ``attn_out[B, Hq, L, D]``; rebuilds the site's summary (and page bounds or
    key sketch) from row ``b``'s prompt keys ``[key_starts[b], ends[b])`` of ``k, v``: the
    reset that starts new sequences."""
    found = site_state(site_id, layer, attn_out.shape[1], k, *params.state_args())
    buffers: TopKPhiState = found.buffers
    found.counters[STEP_COUNTERS.index("prefills")] += 1
    topk_phi_prefill(k, v, key_starts, ends, buffers.phi_k, buffers.phi_k_mlp, params.sinks,
                     params.tail, params.page_size, buffers.m, buffers.u, buffers.t,
                     buffers.mid_start, buffers.mid_end, buffers.kmin, buffers.kmax)
    return attn_out.clone()


@topk_phi_site_prefill.register_fake
def _(attn_out, k, v, key_starts, ends, site_id, layer, params):
    return torch.empty_like(attn_out)


@site_op("macopt::topk_phi_site_decode", TopKPhiDecodeParams)
def topk_phi_site_decode(
    q: Tensor, k: Tensor, v: Tensor, key_starts: Tensor, ends: Tensor, scale: float,
    site_id: int, layer: int, params: TopKPhiDecodeParams,
) -> Tensor:
    """Top-K + phi decode ``o[B, Hq, D]`` of row ``b`` over keys ``[key_starts[b], ends[b])``
    with the summary the site's last prefill built (approximate). ``summary_in_budget``: the
    budget pays for the summary (``TopKPhiConfig.summary_in_budget``; its token count from the
    state's shapes and the cache dtype). ``budget_fraction`` > 0: K is that fraction of this
    step's cache length ``k.shape[2]`` (:func:`macopt.config.resolve_budget`; ``budget`` is
    then its floor), resolved here from the shape, so the graph holds no K and a symbolic cache
    length needs no static one."""
    check_budget_args(params.budget, params.budget_fraction)
    budget = resolve_budget(params.budget, params.budget_fraction, k.shape[2])
    found = state.get(site_id)
    if found is None or found.method != "topk_phi":
        raise RuntimeError(f"macopt Top-K + phi: attention site {site_id} decodes before any "
                           "prefill built its summary; run the prompt through the optimized "
                           "model first")
    buffers: TopKPhiState = found.buffers
    found.counters[STEP_COUNTERS.index("steps")] += 1
    return topk_phi_decode(q, k, v, key_starts, ends, buffers.m, buffers.u, buffers.t,
                           buffers.mid_start, buffers.mid_end, buffers.kmin, buffers.kmax,
                           buffers.phi_q, buffers.phi_q_mlp, buffers.phi_k, buffers.phi_k_mlp,
                           buffers.completion, scale, budget, params.page_size,
                           params.selector,
                           _summary_tokens(params.summary_in_budget, buffers, k.dtype),
                           buffers.complete)


def _summary_tokens(summary_in_budget: bool, buffers: TopKPhiState, kv_dtype: torch.dtype
                    ) -> int:
    if not summary_in_budget:
        return 0
    return summary_budget_tokens(buffers.t.shape[-1], buffers.t.shape[-2], kv_dtype.itemsize)


@topk_phi_site_decode.register_fake
def _(q, k, v, key_starts, ends, scale, site_id, layer, params):
    check_budget_args(params.budget, params.budget_fraction)
    return torch.empty_like(q)

