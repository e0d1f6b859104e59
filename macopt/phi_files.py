"""Reading phi files (``macopt calibrate --method topk_phi``): what the Top-K + phi ops need
at run time, without the calibration code (:mod:`macopt.calibrate_phi` writes the files).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from macopt.kernels.feature_maps import FeatureMaps

PHI_FILENAME = "macopt_phi.safetensors"  # the default file, next to the model
# Metadata key: tokens per calibration sequence (``macopt calibrate --seq-len``). Maps fitted on
# shorter sequences than a cache holds can fail badly there: on SmolLM2, maps from 2K sequences
# gave exp(KL) 76-91 at 8K, maps from 8K sequences 1.04-1.10 (docs/REAL_MODEL.md).
CALIBRATED_TOKENS = "macopt.calibrated_tokens"
# Metadata keys written by macopt.phi_switch: per layer, the completion on/off per query head,
# and the budget that was decided at.
SWITCH_KEY = "macopt.completion"
SWITCH_BUDGET_KEY = "macopt.completion_budget"


def site_name(layer: int) -> str:
    """The key of layer ``layer``'s maps in a phi file: ``layer.3``."""
    return f"layer.{layer}"


def read_feature_maps(path: str | Path) -> dict[str, FeatureMaps]:
    """:func:`~macopt.kernels.feature_maps.load_feature_maps` with errors that name the file
    (a missing or corrupt phi file otherwise fails deep inside safetensors)."""
    from macopt.kernels.feature_maps import load_feature_maps

    if not Path(path).is_file():
        raise ValueError(f"feature_maps: {path} does not exist (write it with `macopt "
                         "calibrate MODEL --method topk_phi`)")
    try:
        return load_feature_maps(path)
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"feature_maps: {path} is not a readable phi maps file "
                         f"({type(err).__name__}: {err})") from None


def file_metadata(path: str | Path) -> dict[str, str]:
    """A phi file's string metadata (how it was made, besides the maps' shapes)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def calibrated_tokens(path: str | Path) -> int | None:
    """The calibration sequence length a phi file records (None: not recorded)."""
    value = file_metadata(path).get(CALIBRATED_TOKENS)
    return int(value) if value is not None and value.isdigit() else None


def recorded_switch(path: str | Path) -> dict[int, tuple[bool, ...]] | None:
    """The per-head completion switch a phi file records, by layer (None: no record, or no
    readable file: the maps' own reader names that)."""
    path = Path(path)
    if not path.is_file():
        return None
    found = path.stat()  # a rewritten file is read again (write_switch changes its size)
    return _read_switch(str(path), found.st_mtime_ns, found.st_size)


@lru_cache(maxsize=32)
def _read_switch(path: str, mtime_ns: int, size: int) -> dict[int, tuple[bool, ...]] | None:
    try:
        text = file_metadata(path).get(SWITCH_KEY)
    except Exception:  # safetensors raises its own error types
        return None
    if text is None:
        return None
    return {int(layer): tuple(bool(f) for f in flags) for layer, flags in json.loads(text).items()}


def maps_for_kv_heads(maps: FeatureMaps, n_kv_heads: int) -> FeatureMaps:
    """``maps`` for a site whose keys have ``n_kv_heads`` heads.

    Calibration captures keys before grouped-query attention repeats them (one phi_k per KV
    head), but a site may see them repeated (``repeat_kv``: one per query head). Repeating
    phi_k's heads the same way gives each repeated key its own KV head's map.
    """
    have = maps.phi_k.n_heads
    if have == n_kv_heads:
        return maps
    if n_kv_heads % have:
        raise ValueError(f"feature_maps: phi_k has {have} KV heads, the attention site has "
                         f"{n_kv_heads} (not a multiple): maps calibrated on another model?")
    phi_k = maps.phi_k
    repeated = FeatureMaps(maps.phi_q.n_heads, n_kv_heads, phi_k.head_dim, phi_k.d_phi,
                           phi_k.w_s.shape[1], phi_k.w_1.shape[1])
    repeated.phi_q.load_state_dict(maps.phi_q.state_dict())
    group = n_kv_heads // have
    repeated.phi_k.load_state_dict({name: p.repeat_interleave(group, 0)
                                    for name, p in phi_k.state_dict().items()})
    return repeated.to(phi_k.w_s.device)
