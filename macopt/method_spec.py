"""Method specs: the one grammar ``macopt eval --methods`` and ``macopt bench`` name methods in.

=============================  ==========================================================
spec                           method
=============================  ==========================================================
``unmodified`` (or ``none``)   the model as it is (config None)
``exact``                      ``ExactConfig()``
``mac``, ``mac:TAU``           ``MACConfig`` (its ``tau``)
``mac:all``                    MAC forced to hit: tau -1000 (the match radius exceeds any
                               query distance), ``t_min`` 0, an unbounded chain depth
``NAME:calibrated``            ``DIR/mac_calibrated.json`` of the model directory: its
                               config and per-layer overrides, as written
``NAME:FILE.json``             a config file's config and overrides (its method: NAME)
``topk_phi``, ``topk_phi:B``   ``TopKPhiConfig`` with the completion on (budget B: an int is
                               tokens, a float in (0, 1] a fraction; random features unless
                               given maps); ``topk[:B]``: the same, no completion
``NAME:default``               the config with no arguments, as a user writes it
                               (``TopKPhiConfig()``: completion only with calibrated maps)
``mac_topk_phi[:B[:MAC]]``     ``MACTopKPhiConfig``: Top-K + phi budget B, the MAC part
                               anything ``mac:`` takes (``mac_topk_phi:0.02:calibrated``)
any other method name          its config's defaults
=============================  ==========================================================

A caller may give MAC settings every MAC spec starts from (``mac``): the benchmarks set the
ring size, offset and ``t_min`` 0 from their flags.

>>> parse_method("mac:1").config.tau, parse_method("topk_phi:0.02").config.budget
(1.0, 0.02)
>>> parse_method("topk_phi").config.completes, parse_method("topk_phi:default").config.completes
(True, False)
>>> parse_method("mac_topk_phi:64:0.3").config.mac.tau
0.3
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from macopt.config import ExactConfig, MACConfig, MACTopKPhiConfig, MethodConfig, TopKPhiConfig

FORCED_HIT_TAU = -1000.0  # radius 2 D (1 - tau)^2 ~ 2.6e8 at D = 128: every entry is near
UNBOUNDED_CHAIN = 2**30
UNMODIFIED = ("unmodified", "none")


@dataclasses.dataclass(frozen=True)
class Method:
    """A named method config (None: the unmodified model) and per-module overrides
    (``macopt.optimize``'s, e.g. a calibrated per-layer MAC threshold)."""

    name: str
    config: MethodConfig | None
    overrides: dict[str, MethodConfig | None] | None = dataclasses.field(default=None,
                                                                         compare=False)

    @property
    def label(self) -> str:
        """The spec as given (what reports call the method)."""
        return self.name

    def config_for(self, batch: int) -> MethodConfig | None:
        """The config for a run at ``batch`` rows (MAC rings are allocated for exactly that)."""
        return _for_batch(self.config, batch)

    def overrides_for(self, batch: int) -> dict[str, MethodConfig | None]:
        return {name: _for_batch(c, batch) for name, c in (self.overrides or {}).items()}


def _for_batch(config: MethodConfig | None, batch: int) -> MethodConfig | None:
    if isinstance(config, MACConfig):
        return dataclasses.replace(config, batch_capacity=batch)
    return config


def parse_method(spec: str, model_dir: str | Path | None = None,
                 mac: dict[str, Any] | None = None) -> Method:
    """One spec (see the module docstring); ``model_dir`` for ``NAME:calibrated``; ``mac``:
    MACConfig fields every MAC spec starts from."""
    if spec in UNMODIFIED:
        return Method(spec, None)
    name, _, arg = spec.partition(":")
    if name == "mac_topk_phi" and arg and _is_number(arg.partition(":")[0]):
        return _composed(spec, arg, model_dir, mac)
    if arg == "calibrated" or arg.endswith(".json"):
        return _from_file(spec, name, arg, model_dir)
    if arg == "default":
        return Method(spec, MethodConfig.from_dict({"method": name}))
    if name == "exact" and not arg:
        return Method(spec, ExactConfig())
    if name == "mac":
        return Method(spec, _mac(arg, mac or {}))
    if name in ("topk", "topk_phi"):
        completion = name == "topk_phi"
        if not arg:
            return Method(spec, TopKPhiConfig(completion=completion))
        return Method(spec, TopKPhiConfig(budget=_budget(arg), completion=completion))
    if arg:
        raise ValueError(f"method {name!r} takes no argument")
    return Method(spec, MethodConfig.from_dict({"method": name}))


def _mac(arg: str, fields: dict[str, Any]) -> MACConfig:
    if arg == "all":
        return MACConfig(**{**fields, "tau": FORCED_HIT_TAU, "t_min": 0,
                            "max_chain_depth": UNBOUNDED_CHAIN})
    return MACConfig(**{**fields, "tau": float(arg)}) if arg else MACConfig(**fields)


def _budget(text: str) -> int | float:
    return int(text) if text.isdigit() else float(text)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _from_file(spec: str, name: str, arg: str, model_dir: str | Path | None) -> Method:
    from macopt.calibrate_mac import CALIBRATED_FILENAME
    from macopt.pretrained import parse_config_file

    if arg == "calibrated" and model_dir is None:
        raise ValueError(f"{name}:calibrated needs --model DIR or a model directory (it reads "
                         f"DIR/{CALIBRATED_FILENAME})")
    path = Path(model_dir) / CALIBRATED_FILENAME if arg == "calibrated" else Path(arg)
    if not path.is_file():
        raise ValueError(f"no config file {path} (write one with `macopt calibrate "
                         f"--method {name}`)")
    config, overrides = parse_config_file(path)
    if config.method != name:
        raise ValueError(f"{path} holds a {config.method!r} config")
    return Method(spec, config, overrides or None)


def _composed(spec: str, arg: str, model_dir: str | Path | None,
              mac: dict[str, Any] | None) -> Method:
    """``mac_topk_phi:BUDGET[:MAC]``: the Top-K + phi budget, then a ``mac:`` argument."""
    budget_text, _, mac_arg = arg.partition(":")
    topk = TopKPhiConfig(budget=_budget(budget_text))
    mac_part = parse_method(f"mac:{mac_arg}" if mac_arg else "mac", model_dir, mac)
    overrides = None
    if mac_part.overrides:
        overrides = {name: None if c is None else MACTopKPhiConfig(c, topk)
                     for name, c in mac_part.overrides.items()}
    return Method(spec, MACTopKPhiConfig(mac_part.config, topk), overrides)
