"""Per-head completion switches, decided when the feature maps are calibrated.

Calibrated maps do not help every head at every context: on SmolLM2 at 8K, Top-K + phi was
worse than Top-K alone in exp(KL) at 1, 2 and 5% (docs/REAL_MODEL.md), while at 2K it was
better. So ``macopt calibrate --method topk_phi`` measures, per (layer, query head), the
attention-output error of Top-K alone and of Top-K + phi with the new maps, over the same
selection, on decode queries of its own calibration sequences (the last quarter of each, up to
256 positions, is decoded against the rest as the prompt), and records the completion on where
the maps lower it. The decision is made on the calibration text, never on evaluation text.

``TopKPhiConfig(feature_maps=FILE)`` (``completion`` None, the default) follows the record
(read by :func:`macopt.phi_files.recorded_switch`);
``completion=True`` / ``False`` and ``completion_overrides`` override it. A file without a
record (written before it existed) completes every head.

>>> switch = decide_switch(captured, phi_file, TopKPhiConfig(budget=0.02))  # doctest: +SKIP
>>> write_switch(phi_file, switch)                                         # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from macopt.config import TopKPhiConfig
from macopt.phi_files import SWITCH_BUDGET_KEY, SWITCH_KEY, file_metadata
from macopt.phi_init import CapturedLayer

_DECODED = 256  # at most this many last positions of a sequence are decode queries


def decide_switch(captured: dict[int, CapturedLayer], phi_file: str | Path,
                  config: TopKPhiConfig, queries: int = 16) -> dict[int, list[bool]]:
    """Completion on for a head iff Top-K + phi with ``phi_file``'s maps has a lower mean
    relative-L1 output error than Top-K alone (same selection, ``config``'s budget and
    selector), over ``queries`` decode positions of each captured sequence (values needed)."""
    from macopt.evaluation.capture import AttentionCall
    from macopt.evaluation.topk_error import output_errors

    on = _replace(config, completion=True, feature_maps=str(phi_file))
    off = _replace(config, completion=False, feature_maps=None)
    switch = {}
    for layer, data in captured.items():
        if data.v is None:
            raise ValueError("decide_switch: capture the values too (capture_attention(..., "
                             "values=True))")
        length = data.q.shape[2]
        prefill = length - min(length // 4, _DECODED)
        calls = [AttentionCall(layer, "", data.q[s:s + 1], data.q[s:s + 1], data.k[s:s + 1],
                               data.v[s:s + 1], data.scale) for s in range(data.q.shape[0])]
        errors = {}
        for name, variant in (("phi", on), ("topk", off)):
            per_sequence = [output_errors([call], variant, prefill, length, queries)["layers"][0]
                            for call in calls]
            errors[name] = torch.tensor(per_sequence).mean(dim=0)
        switch[layer] = (errors["phi"] < errors["topk"]).tolist()
    return switch


def write_switch(phi_file: str | Path, switch: dict[int, list[bool]],
                 budget: int | float | None = None) -> None:
    """Add ``switch`` (decided at ``budget``) to ``phi_file``'s metadata (the tensors and other
    metadata unchanged)."""
    from safetensors.torch import load_file, save_file

    metadata, tensors = file_metadata(phi_file), load_file(str(phi_file))
    metadata[SWITCH_KEY] = json.dumps({str(layer): flags for layer, flags in switch.items()})
    if budget is not None:
        metadata[SWITCH_BUDGET_KEY] = f"{budget:g}"
    save_file(tensors, str(phi_file), metadata=metadata)


def _replace(config: TopKPhiConfig, **fields) -> TopKPhiConfig:
    return dataclasses.replace(config, completion_overrides=(), **fields)
