"""Distil the Top-K + phi feature maps from a frozen model's own attention (docs/ALGORITHMS.md, 2).

1. :func:`capture_attention` runs the model on calibration tokens and records, per layer, the
   post-RoPE queries and keys its attention receives. It registers a Hugging Face attention
   function (``AttentionInterface``) that records its inputs and then runs SDPA, so every
   family whose attention goes through that interface is covered without knowing where its
   RoPE lives.
2. :func:`calibrate_feature_maps` starts from :func:`initial_maps` (by default the probe init
   of :mod:`macopt.phi_init`, measured on the captured data) and trains phi_q / phi_k of every
   layer for ``steps`` steps (backbone frozen; default 0) on random query positions: teacher
   = the exact scores over the query's middle region ``[sinks, position + 1 - tail)``,
   student = ``log <phi_q(q), phi_k(k)>``, with the paper's loss (:func:`phi_loss`). It is
   resumable from a checkpoint file.
3. The maps are saved with :func:`macopt.kernels.feature_maps.save_feature_maps`, one site per
   layer named :func:`site_name`, by default next to the model
   (:data:`macopt.phi_files.PHI_FILENAME`).

>>> captured = capture_attention(model, token_ids)                      # doctest: +SKIP
>>> maps, history = calibrate_feature_maps(captured, CalibrationConfig(steps=50))  # doctest: +SKIP
>>> save_feature_maps(maps, Path(model_dir) / PHI_FILENAME)             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from macopt.kernels.feature_maps import FeatureMaps, positive_random_features
from macopt.phi_files import site_name
from macopt.phi_init import CapturedLayer, probe_feature_maps

Tensor = torch.Tensor
INITS = ("probe", "prf")
_CAPTURE_NAME = "macopt_capture"
_MIN_MID = 8  # a training query needs at least this many middle keys


@dataclass(frozen=True)
class CalibrationConfig:
    """What to train and for how long; small by default (minutes on a GPU for an 8B model).

    ``temperature`` is the KL's tau (docs/ALGORITHMS.md does not fix it; 2 softens the teacher as
    in common distillation practice). ``d_phi`` None uses the head dim, as the paper does.
    ``init``: where training starts, ``"probe"`` (:mod:`macopt.phi_init`: centred probe
    features measured on the captured data, with ``margin`` standard deviations of safety on
    the log-mass) or ``"prf"`` (positive random features, data-free; ``d_phi`` even).
    ``steps`` 0 (default) keeps the probe init as it is: on examples/tiny-lm, 30 steps of this
    loss from it widened the log-mass error and raised the output error
    (examples/topk_phi_fidelity.md); the PRF init needs training.
    """

    d_phi: int | None = None
    sinks: int = 4
    tail: int = 16
    steps: int = 0
    queries_per_step: int = 16
    lr: float = 1e-3
    temperature: float = 2.0
    checkpoint_every: int = 25
    seed: int = 0
    init: str = "probe"
    margin: float = 1.0

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"CalibrationConfig.init: expected one of {INITS}, got "
                             f"{self.init!r}")
        if not (isinstance(self.margin, int | float) and math.isfinite(self.margin)
                and self.margin >= 0):
            raise ValueError(f"CalibrationConfig.margin: expected a finite number >= 0 "
                             f"(standard deviations), got {self.margin!r}")
        if self.d_phi is not None and self.d_phi < 1:
            raise ValueError(f"CalibrationConfig.d_phi: expected None or >= 1, got {self.d_phi}")
        if self.init == "prf" and self.d_phi is not None and self.d_phi % 2:
            raise ValueError(f"CalibrationConfig.d_phi: the prf init needs an even d_phi "
                             f"(antithetic pairs), got {self.d_phi}")


# --- capture ---------------------------------------------------------------------------------


@torch.no_grad()
def capture_attention(model: torch.nn.Module, token_ids: Tensor, values: bool = False
                      ) -> dict[int, CapturedLayer]:
    """Run ``model`` on ``token_ids[S, L]`` (one forward per row) and return each layer's
    post-RoPE queries and keys (and values, with ``values``), by layer index (the attention
    module's ``layer_idx``)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"{type(model).__name__} is not a Hugging Face model with a settable "
                         "attention implementation; calibration captures attention inputs "
                         "through transformers' AttentionInterface")
    seen: dict[int, list[tuple[Tensor, Tensor, float, Tensor | None]]] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        head_dim = query.shape[-1]
        scale = kwargs.get("scaling") or head_dim**-0.5
        kept = value.detach() if values else None
        seen.setdefault(module.layer_idx, []).append((query.detach(), key.detach(), scale, kept))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_CAPTURE_NAME, record)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE_NAME)
    try:
        device = next(model.parameters()).device
        for row in token_ids:
            model(row[None].to(device), use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    if not seen:
        raise ValueError(f"{type(model).__name__}: no attention call went through transformers'"
                         " AttentionInterface, so there is nothing to calibrate on")
    return {layer: CapturedLayer(torch.cat([c[0] for c in calls]),
                                 torch.cat([c[1] for c in calls]), calls[0][2],
                                 torch.cat([c[3] for c in calls]) if values else None)
            for layer, calls in sorted(seen.items())}


# --- loss ------------------------------------------------------------------------------------


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def _huber(x: Tensor) -> Tensor:
    return F.huber_loss(x, torch.zeros_like(x), delta=1.0, reduction="none")


def phi_loss(scores: Tensor, log_kernel: Tensor, mid: Tensor, temperature: float = 2.0
             ) -> Tensor:
    """The paper's distillation loss, averaged over queries and heads.

    ``scores`` (teacher ``s q.k``), ``log_kernel`` (student ``log <phi_q, phi_k>``) and the
    boolean ``mid`` (keys the completion covers) share the shape ``[..., N]``. With
    ``r = s - max s`` and ``r^ = log_kernel - max s``::

        0.99 tau^2 KL(softmax(r / tau) || softmax(r^ / tau)) + 0.01 (L_top + 2 L_fp + 4 L_Z)

    L_top: Huber(r^ - r) where r >= -8; L_fp: Huber(relu(r^ + 8)) where r < -8 (one-sided:
    only overestimates of far keys cost); L_Z: Huber(relu(logsumexp r^ - logsumexp r)).

    >>> s = torch.randn(2, 3, 10); mid = torch.ones(2, 3, 10, dtype=torch.bool)
    >>> float(phi_loss(s, s, mid)) == 0.0
    True
    """
    neg_inf = torch.tensor(float("-inf"), device=scores.device)
    teacher = torch.where(mid, scores, neg_inf)
    top = teacher.amax(dim=-1, keepdim=True).detach()
    r = teacher - top
    r_hat = torch.where(mid, log_kernel - top, neg_inf)
    log_p = torch.log_softmax(r / temperature, dim=-1)
    log_q = torch.log_softmax(r_hat / temperature, dim=-1)
    kl = torch.where(mid, log_p.exp() * (log_p - log_q), 0.0).sum(dim=-1).mean()
    near = mid & (r >= -8)
    far = mid & (r < -8)
    l_top = _masked_mean(_huber(torch.where(near, r_hat - r, 0.0)), near)
    l_fp = _masked_mean(_huber(torch.relu(torch.where(far, r_hat + 8, 0.0))), far)
    l_z = _huber(torch.relu(torch.logsumexp(r_hat, -1) - torch.logsumexp(r, -1))).mean()
    return 0.99 * temperature**2 * kl + 0.01 * (l_top + 2 * l_fp + 4 * l_z)


def layer_loss(maps: FeatureMaps, layer: CapturedLayer, sequence: int, positions: Tensor,
               config: CalibrationConfig) -> Tensor:
    """:func:`phi_loss` of one layer's maps at query ``positions`` of one captured sequence."""
    q = layer.q[sequence, :, positions].float()  # [Hq, Q, D]
    k = layer.k[sequence].float()  # [Hkv, L, D]
    group = q.shape[0] // k.shape[0]
    k_per_head = k.repeat_interleave(group, dim=0)
    with torch.no_grad():
        scores = torch.einsum("hqd,hnd->hqn", q, k_per_head) * layer.scale
        keys = torch.arange(k.shape[1], device=k.device)
        mid = (keys[None, :] >= config.sinks) & (keys[None, :] < positions[:, None] + 1
                                                 - config.tail)
    log_phi_q = maps.phi_q(q[None])[0]  # [Hq, Q, F]
    log_phi_k = maps.phi_k(k[None])[0].repeat_interleave(group, dim=0)  # [Hq, L, F]
    log_kernel = torch.logsumexp(log_phi_q[:, :, None, :] + log_phi_k[:, None, :, :], dim=-1)
    return phi_loss(scores, log_kernel, mid[None].expand_as(scores), config.temperature)


# --- training --------------------------------------------------------------------------------


def initial_maps(captured: dict[int, CapturedLayer], config: CalibrationConfig
                 ) -> dict[str, FeatureMaps]:
    """Where training starts, per layer (``config.init``): probe features measured on the
    captured queries and keys, or data-free positive random features."""
    generator = torch.Generator().manual_seed(config.seed)
    maps = {}
    for layer, data in captured.items():
        n_q, head_dim = data.q.shape[1], data.q.shape[3]
        d_phi = config.d_phi or head_dim
        if config.init == "probe":
            maps[site_name(layer)] = probe_feature_maps(data, d_phi, config.sinks, config.tail,
                                                        config.margin, generator)
        else:
            maps[site_name(layer)] = positive_random_features(
                n_q, data.k.shape[1], head_dim, d_phi, data.scale, generator).to(data.q.device)
    return maps


def query_positions(step: int, length: int, config: CalibrationConfig, device) -> Tensor:
    """Training query positions of ``step`` (a function of the step: resuming repeats them)."""
    lowest = config.sinks + config.tail + _MIN_MID
    if length <= lowest:
        raise ValueError(f"calibration sequences of {length} tokens are too short: a query "
                         f"needs sinks {config.sinks} + tail {config.tail} + {_MIN_MID} keys "
                         "before it; use longer sequences")
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    return torch.randint(lowest, length, (config.queries_per_step,), generator=generator
                         ).to(device)


def evaluate(maps: dict[str, FeatureMaps], captured: dict[int, CapturedLayer],
             config: CalibrationConfig, step: int = -1) -> float:
    """Loss summed over layers at the query positions of ``step`` (no training)."""
    with torch.no_grad():
        return _step_losses(maps, captured, config, step, backward=False)


def _step_losses(maps, captured, config, step, backward: bool) -> float:
    total = 0.0
    for layer, data in captured.items():
        positions = query_positions(step, data.q.shape[2], config, data.q.device)
        loss = layer_loss(maps[site_name(layer)], data, step % data.q.shape[0], positions,
                          config)
        if backward:
            loss.backward()  # layer by layer: only one layer's graph is alive at a time
        total += float(loss.detach())
    return total


def calibrate_feature_maps(
    captured: dict[int, CapturedLayer], config: CalibrationConfig,
    checkpoint: Path | None = None, on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, FeatureMaps], list[float]]:
    """Train every layer's maps for ``config.steps`` steps; return them and the loss history.

    With ``checkpoint``, state is saved there every ``config.checkpoint_every`` steps and at
    the end, and a run finding a checkpoint of the same configuration resumes from it.
    ``on_step(step, loss)`` reports progress.
    """
    maps = initial_maps(captured, config)
    parameters = [p for m in maps.values() for p in m.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    history: list[float] = []
    if checkpoint is not None and checkpoint.exists():
        history = _load_checkpoint(checkpoint, maps, optimizer, config)
    for step in range(len(history), config.steps):
        optimizer.zero_grad(set_to_none=True)
        history.append(_step_losses(maps, captured, config, step, backward=True))
        optimizer.step()
        if on_step is not None:
            on_step(step, history[-1])
        done = step + 1 == config.steps
        if checkpoint is not None and ((step + 1) % config.checkpoint_every == 0 or done):
            _save_checkpoint(checkpoint, maps, optimizer, config, history)
    return maps, history


def _save_checkpoint(path: Path, maps, optimizer, config, history) -> None:
    state = {"config": dataclasses.asdict(config), "history": history,
             "maps": {name: m.state_dict() for name, m in maps.items()},
             "optimizer": optimizer.state_dict()}
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)  # an interrupted save leaves the previous checkpoint intact


def _load_checkpoint(path: Path, maps, optimizer, config) -> list[float]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = {k: v for k, v in state["config"].items() if k != "steps"}
    wanted = {k: v for k, v in dataclasses.asdict(config).items() if k != "steps"}
    if saved != wanted or set(state["maps"]) != set(maps):
        raise ValueError(f"checkpoint {path} was written for another calibration ({saved}); "
                         "delete it or pass the same settings")
    for name, module in maps.items():
        module.load_state_dict(state["maps"][name])
    optimizer.load_state_dict(state["optimizer"])
    return list(state["history"])[: config.steps]
