"""Probe init of the Top-K + phi feature maps from calibration statistics (no training).

Why not positive random features on real attention: their estimate of ``exp(s q.k)`` has a
relative variance of about ``exp(s ||q + k||^2)``, and post-RoPE queries and keys of a trained
model have ``s ||q + k||^2`` of 40-160 (examples/tiny-lm), also after centring by the mean
query and key (RoPE leaves little mean), so the typical estimate lies ~10 nats under the mean.

**Centring.** With a query centre ``p`` and a key centre ``c``, exactly::

    s q.k = s q.c + s p.k - s p.c + s (q - p).(k - c)

The first three terms are separable (a linear ``log phi_q`` and ``log phi_k``); positive random
features would estimate ``exp`` of the last, centred interaction. The probe init drops that
interaction instead and replaces it with a per-query-head constant measured on calibration
data. Per feature ``f`` of a KV group (``d_phi`` features)::

    log phi_k(k)[f] = s p_f.k
    log phi_q(q)[f] = s (q - p_f).c_f + b_h

- probes ``p_f``: k-means centres of the group's calibration queries (``d_phi = 1``: their
  mean, i.e. plain centring);
- ``c_f``: probe ``p_f``'s attention-weighted mean key over calibration middle regions, so
  the completion's ``u~_R[f]`` is exactly the probe's own partition function over the
  unretrieved keys, and ``s (q - p_f).c_f`` its first-order (tangent) extrapolation to ``q``;
  ``T~_R[f] / u~_R[f]`` is the probe's attention output over the unretrieved keys;
- ``b_h``: minus (mean + ``margin`` x std) of the log-mass error
  ``log Z_R estimate - log Z_R`` of head ``h`` on calibration decode queries retrieving
  1-10% of their context (:func:`log_mass_errors`): a lower confidence bound, because an
  overestimated mass costs more output error than an underestimated one.

Everything is in the folded form the kernels read (``lin_w``, ``lin_b``; MLP off,
``sq_norm`` 0), so calibration may train on from it.

>>> maps = probe_feature_maps(captured[0], d_phi=16, sinks=4, tail=16)   # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from macopt.kernels import topk_phi_reference as ref
from macopt.kernels.feature_maps import FeatureMaps, log_features, set_linear_map

Tensor = torch.Tensor
RETRIEVED_FRACTIONS = (0.01, 0.02, 0.05, 0.1)  # retrieval sizes the bias b_h is measured at
_MAX_SAMPLES = 16384  # queries per KV group that k-means sees
_KMEANS_ITERATIONS = 20
_PREFIXES = 4  # prefix lengths per sequence over which the probes' mean keys are averaged
_DECODE_QUERIES = 8  # decode-like query positions per sequence for the bias


@dataclass
class CapturedLayer:
    """One layer's post-RoPE attention inputs: ``q[S, Hq, L, D]``, ``k[S, Hkv, L, D]``, and
    ``v[S, Hkv, L, D]`` when captured with ``values=True`` (fidelity measurements need it,
    training does not)."""

    q: Tensor
    k: Tensor
    scale: float
    v: Tensor | None = None


def kmeans(x: Tensor, n_centres: int, generator: torch.Generator,
           iterations: int = _KMEANS_ITERATIONS) -> Tensor:
    """Lloyd's k-means of the rows of ``x[N, D]`` -> ``[n_centres, D]`` (fp32, deterministic
    given ``generator``). Starts from distinct random rows; an emptied cluster keeps its centre.
    """
    if not 1 <= n_centres <= x.shape[0]:
        raise ValueError(f"k-means needs 1 <= centres <= points, got {n_centres} centres for "
                         f"{x.shape[0]} points")
    x = x.float()
    centres = x[torch.randperm(x.shape[0], generator=generator)[:n_centres]].clone()
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(dim=1)
        counts = torch.bincount(assign, minlength=n_centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


def query_probes(q: Tensor, n_kv_heads: int, d_phi: int, first: int,
                 generator: torch.Generator) -> Tensor:
    """Probes ``[Hkv, d_phi, D]``: k-means centres of each KV group's queries at positions
    ``>= first`` of ``q[S, Hq, L, D]``."""
    n_seq, n_q_heads, length, head_dim = q.shape
    group = n_q_heads // n_kv_heads
    probes = []
    for h in range(n_kv_heads):
        x = q[:, h * group:(h + 1) * group, first:].reshape(-1, head_dim).float()
        if x.shape[0] > _MAX_SAMPLES:
            x = x[torch.randperm(x.shape[0], generator=generator)[:_MAX_SAMPLES]]
        if x.shape[0] < d_phi:
            raise ValueError(f"probe init: d_phi {d_phi} probes need at least as many "
                             f"calibration queries per KV group, got {x.shape[0]}; capture "
                             "more or longer sequences")
        probes.append(kmeans(x, d_phi, generator))
    return torch.stack(probes)


def probe_mean_keys(k: Tensor, probes: Tensor, scale: float, sinks: int, tail: int) -> Tensor:
    """``c_f``: each probe's attention-weighted mean key over the middle region ``[sinks,
    t - tail)`` of ``k[S, Hkv, L, D]``, averaged over sequences and ``_PREFIXES`` evenly spaced
    prefix lengths ``t``: ``[Hkv, F, D]``."""
    n_seq, n_kv_heads, length, _ = k.shape
    ends = sorted({round(length * (i + 1) / _PREFIXES) for i in range(_PREFIXES)})
    ends = [t for t in ends if t - tail > sinks]
    if not ends:
        raise ValueError(f"probe init: calibration sequences of {length} tokens have no middle "
                         f"region (sinks {sinks} + tail {tail}); use longer sequences")
    total = torch.zeros_like(probes)
    for seq in range(n_seq):
        keys = k[seq].float()  # [Hkv, L, D]
        scores = torch.einsum("hfd,hnd->hfn", probes, keys) * scale
        for t in ends:
            weights = torch.softmax(scores[:, :, sinks:t - tail], dim=-1)
            total += torch.einsum("hfn,hnd->hfd", weights, keys[:, sinks:t - tail])
    return total / (n_seq * len(ends))


def centred_maps(probes: Tensor, mean_keys: Tensor, scale: float, group: int,
                 bias: Tensor | None = None, generator: torch.Generator | None = None
                 ) -> FeatureMaps:
    """The probe maps of ``probes``/``mean_keys`` ``[Hkv, F, D]`` (``bias[Hq]``: ``b_h``,
    default 0): ``log phi_q[f] + log phi_k[f] - b_h = s q.k - s (q - p_f).(k - c_f)``."""
    n_kv_heads, d_phi, head_dim = probes.shape
    n_q_heads = n_kv_heads * group
    bias = torch.zeros(n_q_heads, dtype=probes.dtype) if bias is None else bias
    maps = FeatureMaps(n_q_heads, n_kv_heads, head_dim, d_phi).to(probes.dtype)
    q_weight = (scale * mean_keys).repeat_interleave(group, 0)
    q_bias = (-scale * (probes * mean_keys).sum(-1)).repeat_interleave(group, 0) + bias[:, None]
    zeros = probes.new_zeros
    set_linear_map(maps.phi_q, q_weight, q_bias, zeros(n_q_heads), generator)
    set_linear_map(maps.phi_k, scale * probes, zeros(n_kv_heads, d_phi), zeros(n_kv_heads),
                   generator)
    return maps


def decode_positions(length: int, sinks: int, tail: int, count: int = _DECODE_QUERIES
                     ) -> Tensor:
    """``count`` evenly spaced positions in ``[length // 2, length)`` whose middle region is
    not empty (none when the sequences are too short)."""
    lowest = max(length // 2, sinks + tail + 1)
    if lowest >= length:
        return torch.zeros(0, dtype=torch.long)
    return torch.linspace(lowest, length - 1, count).round().long().unique()


@torch.no_grad()
def log_mass_errors(maps: FeatureMaps, layer: CapturedLayer, sinks: int, tail: int,
                    fractions: tuple[float, ...] = RETRIEVED_FRACTIONS) -> Tensor:
    """``log Z_R estimate - log Z_R`` of the completion of every query head: ``[n, Hq]`` over
    each sequence's decode-like queries (:func:`decode_positions`) and retrieval sizes
    ``ceil(fraction * sequence length)`` (exact selection per KV head, as the decode ops;
    the fraction is of the cache capacity, as ``TopKPhiConfig.budget``); entries whose
    unretrieved middle is empty are NaN."""
    q, k, scale = layer.q, layer.k, layer.scale
    n_q_heads, n_kv_heads, n_keys = q.shape[1], k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    positions = decode_positions(n_keys, sinks, tail)
    if positions.numel() == 0:
        raise ValueError(f"probe init: calibration sequences of {n_keys} tokens are too short "
                         f"for decode queries past sinks {sinks} + tail {tail}")
    folded_q, folded_k = maps.phi_q.folded(), maps.phi_k.folded()
    rows = positions.numel()
    zeros = torch.zeros(rows, dtype=torch.long)
    mid_start, mid_end = ref.mid_range(zeros, positions + 1, sinks, tail)
    mid = ref.positions_in(mid_start, mid_end, n_keys)[:, None, :]
    errors = []
    for seq in range(q.shape[0]):
        queries = q[seq][:, positions].transpose(0, 1).float()  # [R, Hq, D]
        keys = k[seq].float()
        log_phi_q = log_features(queries, folded_q)  # [R, Hq, F]
        log_phi_k = log_features(keys[None], folded_k)[0]  # [Hkv, N, F]
        scores = torch.einsum("rhgd,hnd->rhgn", queries.view(rows, n_kv_heads, group, -1),
                              keys).reshape(rows, n_q_heads, n_keys) * scale
        for fraction in fractions:
            top_k = max(1, math.ceil(fraction * n_keys))
            selected = ref.exact_topk(queries, keys[None].expand(rows, -1, -1, -1), scale,
                                      mid_start, mid_end, top_k)
            rest = mid & ~ref.selection_mask(selected, n_q_heads, mid_start, mid_end, n_keys)
            true = torch.logsumexp(scores.masked_fill(~rest, -math.inf), dim=-1)
            rest_kv = rest[:, ::group]  # the group shares its selection
            log_u = torch.logsumexp(log_phi_k[None].masked_fill(~rest_kv[..., None], -math.inf),
                                    dim=2).repeat_interleave(group, dim=1)
            estimate = torch.logsumexp(log_phi_q + log_u, dim=-1)
            error = estimate - true
            errors.append(torch.where(torch.isfinite(true), error, math.nan))
    return torch.cat(errors)


def probe_feature_maps(layer: CapturedLayer, d_phi: int, sinks: int, tail: int,
                       margin: float = 1.0, generator: torch.Generator | None = None
                       ) -> FeatureMaps:
    """One layer's probe maps from its captured calibration queries and keys (module doc).

    ``margin``: how many standard deviations of the calibration log-mass error the bias
    ``b_h`` keeps the mass under its mean (0: unbiased on calibration data).
    """
    if d_phi < 1:
        raise ValueError(f"probe init: d_phi must be >= 1, got {d_phi}")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"probe init: margin must be a finite number >= 0, got {margin}")
    length = layer.q.shape[2]
    if decode_positions(length, sinks, tail).numel() == 0:
        raise ValueError(f"probe init: calibration sequences of {length} tokens are too short "
                         f"for decode queries past sinks {sinks} + tail {tail}")
    generator = generator or torch.Generator().manual_seed(0)
    device = layer.q.device
    layer = type(layer)(layer.q.float().cpu(), layer.k.float().cpu(), layer.scale)  # stats on CPU
    n_q_heads, n_kv_heads = layer.q.shape[1], layer.k.shape[1]
    probes = query_probes(layer.q, n_kv_heads, d_phi, sinks + tail, generator)
    mean_keys = probe_mean_keys(layer.k, probes, layer.scale, sinks, tail)
    group = n_q_heads // n_kv_heads
    unbiased = centred_maps(probes, mean_keys, layer.scale, group)
    errors = log_mass_errors(unbiased, layer, sinks, tail)
    bias = -(_nanmean(errors) + margin * _nanstd(errors))
    return centred_maps(probes, mean_keys, layer.scale, group, bias.nan_to_num(0.0),
                        generator).to(device)


def _nanmean(x: Tensor) -> Tensor:
    return x.nanmean(dim=0)


def _nanstd(x: Tensor) -> Tensor:
    valid = torch.isfinite(x)
    count = valid.sum(dim=0)
    centred = torch.where(valid, x - _nanmean(x), 0.0)
    return (centred.square().sum(dim=0) / (count - 1).clamp(min=1)).sqrt()
