"""Top-K + phi on explicit state: the state buffers (:class:`TopKPhiState`) and the custom ops
that write and read them (``torch.ops.macopt.topk_phi_prefill`` / ``topk_phi_decode``), each
taking every buffer as an argument. The site ops (:mod:`macopt.topk_phi_ops`) find a site's
state and call these; the selectors are :mod:`macopt.topk_phi_select`.

Approximate by design (docs/ALGORITHMS.md, section 2): a decode step attends exactly to the sinks,
the tail, every generated key and ``budget`` retrieved middle keys, and completes the rest of
the prompt's middle from a fixed-size feature summary built at prefill.

- ``macopt::topk_phi_prefill`` writes a site's state: the max-shifted summary ``(m, u~, T~)``
  of the middle keys per (row, KV head), the middle range per row, and (page selector) the
  per-page key bounds. It mutates preallocated buffers, so the state keeps static addresses
  for CUDA graphs.
- ``macopt::topk_phi_decode`` selects (page bounds or exact scores; ``torch.topk`` on the
  device, no host sync), then runs the decode kernel: exact state over sinks + tail +
  generated + retrieved keys merged with the completion state.
- :func:`decode_impl` with ``state=True``: the same step's fp32 state ``(o, lse)``, for
  merging with other states (MAC + Top-K + phi takes it as a miss's prefix state).

CPU runs the reference (:mod:`macopt.kernels.topk_phi_reference`), CUDA the Triton kernels
(:mod:`macopt.kernels.topk_phi`); ``MACOPT_CPU_KERNELS=triton`` runs Triton on CPU through the
interpreter, as for the other ops. Feature maps enter in folded form as six tensors
(``lin_w, lin_b, in_w, in_b, out_w, sq_norm``, :class:`~macopt.kernels.feature_maps.
FoldedFeatureMap`) plus a ``has_mlp`` flag.

>>> state = TopKPhiState.allocate(batch=1, n_q_heads=8, n_kv_heads=2, n_keys=1024,
...                               head_dim=64, dtype=torch.float32, device="cpu", d_phi=64)
>>> prefill(state, k, v, starts, prefill_ends, TopKPhiConfig())     # doctest: +SKIP
>>> out = decode(state, q, k, v, starts, ends, scale, TopKPhiConfig())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from macopt.config import TopKPhiConfig
from macopt.exact_ops import _use_triton
from macopt.kernels import topk_phi_reference as ref
from macopt.kernels.feature_maps import FeatureMaps, FoldedFeatureMap, log_features
from macopt.topk_phi_select import (
    build_sketch,
    n_pages,
    parse_selector,
    select,
    sketch_shapes,
    summary_budget_tokens,
    summary_counts,
)
from macopt.validation import check_decode_inputs

Tensor = torch.Tensor
_FOLDED_FIELDS = ("lin_w", "lin_b", "in_w", "in_b", "out_w", "sq_norm")


def _folded(tensors: list[Tensor], has_mlp: bool) -> FoldedFeatureMap:
    return FoldedFeatureMap(*tensors, has_mlp=has_mlp)


# --- validation ------------------------------------------------------------------------------


def _check_phi(name: str, tensors: list[Tensor], n_heads: int, head_dim: int, d_phi: int | None,
               device: torch.device) -> int:
    """Check one folded map (``name``: phi_q or phi_k); return its d_phi."""
    if len(tensors) != len(_FOLDED_FIELDS):
        raise ValueError(f"{name}: expected the {len(_FOLDED_FIELDS)} folded tensors "
                         f"{_FOLDED_FIELDS} (FeatureMap.folded()), got {len(tensors)}")
    lin_w = tensors[0]
    if lin_w.dim() != 3 or lin_w.shape[0] != n_heads or lin_w.shape[2] != head_dim:
        raise ValueError(f"{name}: expected lin_w [{n_heads}, d_phi, {head_dim}], "
                         f"got {tuple(lin_w.shape)}")
    if d_phi is not None and lin_w.shape[1] != d_phi:
        raise ValueError(f"{name}: expected d_phi {d_phi} (the summary's), got {lin_w.shape[1]}")
    for field, t in zip(_FOLDED_FIELDS, tensors, strict=True):
        if t.device != device or t.dtype != torch.float32:
            raise ValueError(f"{name}.{field}: expected float32 on {device}, got {t.dtype} on "
                             f"{t.device}")
    return lin_w.shape[1]


def _check_range(name: str, t: Tensor, batch: int, device: torch.device) -> None:
    if t.shape != (batch,) or t.dtype not in (torch.int32, torch.int64) or t.device != device:
        raise ValueError(f"{name}: expected an int32/int64 [{batch}] tensor on {device}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")


def _check_summary(m: Tensor, u: Tensor, t: Tensor, mid_start: Tensor, mid_end: Tensor,
                   k: Tensor) -> int:
    """Check the summary buffers against ``k[B, Hkv, N, D]``; return d_phi."""
    batch, n_kv_heads, _, head_dim = k.shape
    d_phi = m.shape[-1] if m.dim() == 3 else -1
    expected = {"m": (m, (batch, n_kv_heads, d_phi)), "u": (u, (batch, n_kv_heads, d_phi)),
                "t": (t, (batch, n_kv_heads, d_phi, head_dim))}
    for name, (x, shape) in expected.items():
        if x.shape != shape or x.dtype != torch.float32 or x.device != k.device:
            raise ValueError(f"{name}: expected a float32 {list(shape)} summary tensor on "
                             f"{k.device}, got {x.dtype} {tuple(x.shape)} on {x.device}")
    _check_range("mid_start", mid_start, batch, k.device)
    _check_range("mid_end", mid_end, batch, k.device)
    return d_phi


def _check_bounds(kmin: Tensor | None, kmax: Tensor | None, k: Tensor, page_size: int,
                  needed: bool | str) -> None:
    """Check the selector's prefill-written index: page bounds ``(kmin, kmax)`` in ``k.dtype``,
    or the sketch ``(codes uint8, scales fp32)`` when ``kmin`` is uint8. ``needed``: the
    decode's selector name ("page" / "sketch" need their index), or a bool (page bounds)."""
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size: expected a power of two, got {page_size}")
    if needed is True:
        needed = "page"
    if kmin is None or kmax is None:
        if needed in ("page", "sketch"):
            what = "page bounds" if needed == "page" else "key sketch (codes, scales)"
            raise ValueError(f"kmin: the {needed} selector needs the {what} that "
                             "topk_phi_prefill writes; got None")
        return
    batch, n_kv_heads, n_keys, head_dim = k.shape
    if kmin.dtype == torch.uint8:
        if needed == "page":
            raise ValueError("kmin: the page selector needs page bounds, got a key sketch "
                             "(uint8 codes); allocate the state for the page selector")
        codes_shape, scales_shape = sketch_shapes(batch, n_kv_heads, n_keys, head_dim)
        if (kmin.dim() != 4 or kmin.shape[:3] != codes_shape[:3]
                or kmin.shape[3] > codes_shape[3] or not kmin.is_contiguous()):
            raise ValueError(f"kmin: expected contiguous uint8 sketch codes [{batch}, "
                             f"{n_kv_heads}, {head_dim}, <= {codes_shape[3]}], got "
                             f"{tuple(kmin.shape)}")
        if kmax.shape != scales_shape or kmax.dtype != torch.float32 or kmax.device != k.device:
            raise ValueError(f"kmax: expected float32 sketch scales {list(scales_shape)} on "
                             f"{k.device}, got {kmax.dtype} {tuple(kmax.shape)} on {kmax.device}")
        return
    if needed == "sketch":
        raise ValueError("kmin: the sketch selector needs the key sketch (uint8 codes), got "
                         f"{kmin.dtype} page bounds; allocate the state with sketch=True")
    # A growing cache may hold more pages at decode than the prompt's bounds cover.
    most = n_pages(n_keys, page_size)
    for name, x in (("kmin", kmin), ("kmax", kmax)):
        if (x.dim() != 4 or x.shape[:2] != (batch, n_kv_heads) or x.shape[3] != head_dim
                or x.shape[2] > most or x.dtype != k.dtype or not x.is_contiguous()):
            raise ValueError(f"{name}: expected contiguous {k.dtype} [{batch}, {n_kv_heads}, "
                             f"<= {most}, {head_dim}] page bounds (page_size {page_size}), got "
                             f"{x.dtype} {tuple(x.shape)}")


# --- prefill ---------------------------------------------------------------------------------


@torch.library.custom_op(
    "macopt::topk_phi_prefill",
    mutates_args=("m", "u", "t", "mid_start", "mid_end", "kmin", "kmax"),
)
def topk_phi_prefill(
    k: Tensor, v: Tensor, starts: Tensor, prefill_ends: Tensor,
    phi_k: list[Tensor], phi_k_mlp: bool, n_sink: int, n_tail: int, page_size: int,
    m: Tensor, u: Tensor, t: Tensor, mid_start: Tensor, mid_end: Tensor,
    kmin: Tensor | None, kmax: Tensor | None,
) -> None:
    """Write a site's Top-K + phi state from its prefill cache ``k, v[B, Hkv, N, D]``.

    Row ``b``'s prompt is keys ``[starts[b], prefill_ends[b])``; its middle region
    ``[starts + n_sink, prefill_ends - n_tail)`` is summarised into ``m, u[B, Hkv, F]``,
    ``t[B, Hkv, F, D]`` (fp32) and its bounds into ``mid_start, mid_end[B]``; page bounds
    ``kmin, kmax[B, Hkv, ceil(N / page_size), D]`` (``k.dtype``) when given, or, when ``kmin``
    is uint8, the sketch selector's key sketch (``kmin``: codes ``[B, Hkv, D, ceil(N / 2)]``,
    ``kmax``: scales ``[B, Hkv, D]`` fp32; :func:`~macopt.topk_phi_select.build_sketch`).
    """
    _check_prefill(k, v, starts, prefill_ends, phi_k, m, u, t, mid_start, mid_end, kmin, kmax,
                   page_size)
    lo, hi = ref.mid_range(starts.to(mid_start.dtype), prefill_ends.to(mid_end.dtype),
                           n_sink, n_tail)
    mid_start.copy_(lo)
    mid_end.copy_(hi)
    folded = _folded(phi_k, phi_k_mlp)
    if kmin is not None and kmin.dtype == torch.uint8:  # the sketch selector's index
        build_sketch(k, mid_start, mid_end, kmin, kmax)
        kmin = kmax = None
    if _use_triton(k.device):
        from macopt.kernels import topk_phi

        summary = topk_phi.build_summary(k, v, folded, mid_start, mid_end)
        if kmin is not None:
            topk_phi.build_page_bounds(k, mid_start, mid_end, page_size, out=ref.PageBounds(
                kmin, kmax))
    else:
        summary = ref.build_summary(v, log_features(k, folded), mid_start, mid_end)
        if kmin is not None:
            bounds = ref.build_page_bounds(k, mid_start, mid_end, page_size)
            kmin.copy_(bounds.kmin)
            kmax.copy_(bounds.kmax)
    m.copy_(summary.m)
    u.copy_(summary.u)
    t.copy_(summary.t)


def _check_prefill(k, v, starts, prefill_ends, phi_k, m, u, t, mid_start, mid_end, kmin, kmax,
                   page_size) -> None:
    if k.dim() != 4:
        raise ValueError(f"k: expected shape [batch, kv_heads, n_keys, head_dim], "
                         f"got {tuple(k.shape)}")
    # The decode checks with one query per KV head cover k, v, starts and prefill_ends.
    check_decode_inputs(k[:, :, 0], k, v, starts, prefill_ends, None)
    n_kv_heads, head_dim = k.shape[1], k.shape[3]
    d_phi = _check_summary(m, u, t, mid_start, mid_end, k)
    _check_phi("phi_k", phi_k, n_kv_heads, head_dim, d_phi, k.device)
    _check_bounds(kmin, kmax, k, page_size, needed=False)
    if kmin is not None and kmin.dtype == torch.uint8 and kmin.shape[3] != -(-k.shape[2] // 2):
        raise ValueError(f"kmin: the prefill writes the sketch of all {k.shape[2]} cache keys: "
                         f"expected codes [..., {-(-k.shape[2] // 2)}], got {tuple(kmin.shape)}")


@topk_phi_prefill.register_fake
def _(k, v, starts, prefill_ends, phi_k, phi_k_mlp, n_sink, n_tail, page_size, m, u, t,
      mid_start, mid_end, kmin, kmax):
    _check_prefill(k, v, starts, prefill_ends, phi_k, m, u, t, mid_start, mid_end, kmin, kmax,
                   page_size)


# --- decode ----------------------------------------------------------------------------------


@torch.library.custom_op("macopt::topk_phi_decode", mutates_args=())
def topk_phi_decode(
    q: Tensor, k: Tensor, v: Tensor, starts: Tensor, ends: Tensor,
    m: Tensor, u: Tensor, t: Tensor, mid_start: Tensor, mid_end: Tensor,
    kmin: Tensor | None, kmax: Tensor | None,
    phi_q: list[Tensor], phi_q_mlp: bool, phi_k: list[Tensor], phi_k_mlp: bool,
    completion: Tensor, scale: float, budget: int, page_size: int, selector: str,
    summary_tokens: int = 0, complete: bool = True,
) -> Tensor:
    """Top-K + phi decode attention ``o[B, Hq, D]`` in ``q``'s dtype (approximate).

    Row ``b`` attends its current keys ``[starts[b], ends[b])``: the middle region that
    ``topk_phi_prefill`` recorded is read only at the ``budget`` selected tokens (``selector``
    "page": ``ceil(budget / page_size)`` pages by key bounds; "exact": the top ``budget`` keys
    by score), the rest of it comes from the summary when ``completion[h]`` is on for query
    head ``h`` (off: Top-K-only renormalised attention).

    ``summary_tokens`` > 0 (``TopKPhiConfig.summary_in_budget``): the budget pays for the
    summary. A KV group with completion on for any of its heads retrieves
    ``max(0, budget - summary_tokens)`` tokens, a group with every head off the full
    ``budget`` (pages: each rounded up to whole pages). The selection keeps its width (static
    shapes); the slots a group gives up hold -1. 0: every group retrieves ``budget``.

    ``complete`` False: the caller knows (statically, from its config) that ``completion`` is
    off for every head; the GPU path then computes no query features, no feature share and no
    completion (a Top-K-only step; the result is the same).
    """
    _check_decode(q, k, v, starts, ends, m, u, t, mid_start, mid_end, kmin, kmax, phi_q, phi_k,
                  completion, budget, page_size, selector, summary_tokens)
    o, _, _ = decode_impl(q, k, v, starts, ends, m, u, t, mid_start, mid_end, kmin, kmax, phi_q,
                          phi_q_mlp, phi_k, phi_k_mlp, completion, scale, budget, page_size,
                          selector, state=False, summary_tokens=summary_tokens,
                          complete=complete)
    return o


def _check_decode(q, k, v, starts, ends, m, u, t, mid_start, mid_end, kmin, kmax, phi_q, phi_k,
                  completion, budget, page_size, selector, summary_tokens=0) -> None:
    check_decode_inputs(q, k, v, starts, ends, None)
    d_phi = _check_summary(m, u, t, mid_start, mid_end, k)
    n_q_heads, head_dim = q.shape[1], q.shape[2]
    _check_phi("phi_q", phi_q, n_q_heads, head_dim, d_phi, q.device)
    _check_phi("phi_k", phi_k, k.shape[1], head_dim, d_phi, q.device)
    parse_selector(selector)
    if budget < 1:
        raise ValueError(f"budget: expected a number of tokens >= 1, got {budget}")
    if summary_tokens < 0:
        raise ValueError(f"summary_tokens: expected the tokens a summary-reading group gives "
                         f"up (>= 0; 0: the summary is not in the budget), got {summary_tokens}")
    _check_bounds(kmin, kmax, k, page_size, needed=parse_selector(selector)[0])
    if completion.shape != (n_q_heads,) or completion.dtype not in (torch.bool, torch.int32):
        raise ValueError(f"completion: expected a bool or int32 [{n_q_heads}] tensor (one "
                         f"switch per query head), got {completion.dtype} "
                         f"{tuple(completion.shape)}")


@topk_phi_decode.register_fake
def _(q, k, v, starts, ends, m, u, t, mid_start, mid_end, kmin, kmax, phi_q, phi_q_mlp, phi_k,
      phi_k_mlp, completion, scale, budget, page_size, selector, summary_tokens=0,
      complete=True):
    _check_decode(q, k, v, starts, ends, m, u, t, mid_start, mid_end, kmin, kmax, phi_q, phi_k,
                  completion, budget, page_size, selector, summary_tokens)
    return torch.empty_like(q)


def decode_impl(
    q: Tensor, k: Tensor, v: Tensor, starts: Tensor, ends: Tensor,
    m: Tensor, u: Tensor, t: Tensor, mid_start: Tensor, mid_end: Tensor,
    kmin: Tensor | None, kmax: Tensor | None,
    phi_q: list[Tensor], phi_q_mlp: bool, phi_k: list[Tensor], phi_k_mlp: bool,
    completion: Tensor, scale: float, budget: int, page_size: int, selector: str, *,
    state: bool, skip: Tensor | None = None, summary_tokens: int = 0, complete: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Selection then the decode kernels (inputs already checked): ``(o, lse, selected)``.

    ``state`` True: ``o`` fp32 and ``lse`` fp32; False: ``o`` in ``q``'s dtype straight from
    the kernel (the output-only path keeps its single cast) and ``lse`` None. ``selected``
    ``[B, Hkv, K']``: the token indices retrieved (entries outside the middle are ignored).
    ``skip[B, Hkv]`` (uint8, optional): groups whose state the caller will not read. The Triton
    path reads nothing for them (no page bounds, keys or summary; the exact selector still
    scores every key) and gives them the empty state; the reference computes them anyway.
    ``summary_tokens``: see :func:`topk_phi_decode`."""
    summary = ref.PhiSummary(m, u, t, mid_start, mid_end)
    folded_q, folded_k = _folded(phi_q, phi_q_mlp), _folded(phi_k, phi_k_mlp)
    triton_path = _use_triton(q.device)
    if triton_path and not complete:  # no head completes: the kernels read no features
        log_phi_q = q.new_empty((*q.shape[:2], 0), dtype=torch.float32)
    elif triton_path:
        from macopt.kernels.topk_phi import query_log_features

        log_phi_q = query_log_features(q, folded_q)
    else:
        log_phi_q = log_features(q, folded_q)
    counts = None
    if summary_tokens:
        counts = summary_counts(completion, budget, summary_tokens,
                                page_size if selector == "page" else None)
    selected = select(q, k, scale, mid_start, mid_end, kmin, kmax, budget, page_size, selector,
                      triton_path, skip, counts)
    if triton_path:
        from macopt.kernels import topk_phi

        args = (q, k, v, scale, starts, ends, summary, selected, log_phi_q, folded_k,
                completion)
        if state:
            return (*topk_phi.topk_phi_decode_state(*args, skip=skip, complete=complete),
                    selected)
        return topk_phi.topk_phi_decode(*args, complete=complete), None, selected
    o, lse = ref.topk_phi_decode_state(q, k, v, scale, starts, ends, summary, selected,
                                       log_phi_q, log_features(k, folded_k), completion)
    return (o, lse, selected) if state else (o.to(q.dtype), None, selected)


# --- the state -------------------------------------------------------------------------------


@dataclass
class TopKPhiState:
    """One attention site's Top-K + phi state, preallocated at fixed addresses.

    ``kmin, kmax``: the selector's index, page bounds (page selector) or the key sketch's codes
    and scales (sketch selector: uint8 ``kmin``), None for the others.

    Buffers written by ``topk_phi_prefill`` (summary, middle range, page bounds) and read by
    ``topk_phi_decode``, plus the site's folded feature maps and per-head completion switches.
    """

    m: Tensor
    u: Tensor
    t: Tensor
    mid_start: Tensor
    mid_end: Tensor
    kmin: Tensor | None
    kmax: Tensor | None
    phi_q: list[Tensor]
    phi_q_mlp: bool
    phi_k: list[Tensor]
    phi_k_mlp: bool
    completion: Tensor
    complete: bool = True  # any head's completion on (static: off skips the features)

    def first_rows(self, batch: int) -> TopKPhiState:
        """The state of the first ``batch`` rows: views at the same addresses, so a state
        allocated for a batch capacity serves smaller batches without moving."""
        if batch > self.m.shape[0]:
            raise ValueError(f"batch {batch} exceeds the {self.m.shape[0]} rows the Top-K + phi "
                             "state was allocated for")
        rows = {name: getattr(self, name)[:batch] for name in
                ("m", "u", "t", "mid_start", "mid_end")}
        bounds = {name: None if x is None else x[:batch]
                  for name, x in (("kmin", self.kmin), ("kmax", self.kmax))}
        return dataclasses.replace(self, **rows, **bounds)

    def tensors(self) -> tuple[Tensor, ...]:
        """Every buffer the state holds (for memory accounting)."""
        optional = [t for t in (self.kmin, self.kmax) if t is not None]
        return (self.m, self.u, self.t, self.mid_start, self.mid_end, *optional, *self.phi_q,
                *self.phi_k, self.completion)

    @classmethod
    def allocate(
        cls, batch: int, n_q_heads: int, n_kv_heads: int, n_keys: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str, d_phi: int | None = None,
        page_size: int | None = 32, maps: FeatureMaps | None = None,
        completion: tuple[bool, ...] | None = None, seed: int = 0, sketch: bool = False,
    ) -> TopKPhiState:
        """Buffers for ``batch`` rows of a cache of ``n_keys`` keys (``page_size`` None: no
        page bounds, for the exact and channel selectors). ``sketch``: the sketch selector's
        key sketch instead of page bounds (``kmin``: uint8 codes ``[B, Hkv, D, ceil(N / 2)]``,
        ``kmax``: fp32 scales ``[B, Hkv, D]``; :func:`~macopt.topk_phi_select.build_sketch`).
        ``maps`` defaults to positive random features for ``exp(q.k / sqrt(D))`` seeded by
        ``seed`` (what works without calibration)."""
        from macopt.kernels.feature_maps import positive_random_features

        if maps is None:
            generator = torch.Generator().manual_seed(seed)
            maps = positive_random_features(n_q_heads, n_kv_heads, head_dim,
                                            d_phi or head_dim, generator=generator)
        maps = maps.to(device)
        d_phi = maps.phi_k.d_phi
        fp32 = {"dtype": torch.float32, "device": device}
        bounds = None
        if sketch:
            codes_shape, scales_shape = sketch_shapes(batch, n_kv_heads, n_keys, head_dim)
            bounds = [torch.full(codes_shape, 8, dtype=torch.uint8, device=device),
                      torch.ones(scales_shape, **fp32)]
        elif page_size is not None:
            shape = (batch, n_kv_heads, n_pages(n_keys, page_size), head_dim)
            bounds = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)]
        folded_q, folded_k = maps.phi_q.folded(), maps.phi_k.folded()
        switches = completion if completion is not None else (True,) * n_q_heads
        return cls(
            m=torch.full((batch, n_kv_heads, d_phi), float("-inf"), **fp32),
            u=torch.zeros(batch, n_kv_heads, d_phi, **fp32),
            t=torch.zeros(batch, n_kv_heads, d_phi, head_dim, **fp32),
            mid_start=torch.zeros(batch, dtype=torch.int32, device=device),
            mid_end=torch.zeros(batch, dtype=torch.int32, device=device),
            kmin=bounds[0] if bounds else None,
            kmax=bounds[1] if bounds else None,
            phi_q=[getattr(folded_q, f).float().contiguous() for f in _FOLDED_FIELDS],
            phi_q_mlp=folded_q.has_mlp,
            phi_k=[getattr(folded_k, f).float().contiguous() for f in _FOLDED_FIELDS],
            phi_k_mlp=folded_k.has_mlp,
            completion=torch.tensor(switches, dtype=torch.bool, device=device),
            complete=any(switches),
        )


def prefill(state: TopKPhiState, k: Tensor, v: Tensor, starts: Tensor, prefill_ends: Tensor,
            config: TopKPhiConfig) -> None:
    """Rebuild ``state`` from a prefill cache (every prefill: nothing leaks across prompts)."""
    torch.ops.macopt.topk_phi_prefill(
        k, v, starts, prefill_ends, state.phi_k, state.phi_k_mlp, config.sinks, config.tail,
        config.page_size, state.m, state.u, state.t, state.mid_start, state.mid_end,
        state.kmin, state.kmax)


def decode(state: TopKPhiState, q: Tensor, k: Tensor, v: Tensor, starts: Tensor, ends: Tensor,
           scale: float, config: TopKPhiConfig) -> Tensor:
    """One Top-K + phi decode step of ``q[B, Hq, D]`` against the cache ``k, v``."""
    budget = config.budget_tokens(k.shape[2])
    return torch.ops.macopt.topk_phi_decode(
        q, k, v, starts, ends, state.m, state.u, state.t, state.mid_start, state.mid_end,
        state.kmin, state.kmax, state.phi_q, state.phi_q_mlp, state.phi_k, state.phi_k_mlp,
        state.completion, scale, budget, config.page_size, config.selector_spec(),
        budget_summary_tokens(config, state.t, k.dtype), state.complete)


def budget_summary_tokens(config: TopKPhiConfig, t: Tensor, kv_dtype: torch.dtype) -> int:
    """The ops' ``summary_tokens`` for ``config``:
    :func:`~macopt.topk_phi_select.summary_budget_tokens` of the summary ``t[B, Hkv, F, D]`` in
    the cache's ``kv_dtype`` when ``summary_in_budget``, else 0 (shapes only: no host sync)."""
    if not config.summary_in_budget:
        return 0
    return summary_budget_tokens(t.shape[-1], t.shape[-2], kv_dtype.itemsize)


__all__ = ["TopKPhiState", "budget_summary_tokens", "decode", "decode_impl", "prefill",
           "topk_phi_decode", "topk_phi_prefill"]
