"""Method configurations: frozen dataclasses, one per attention method (torchao style).

A config names its method (``method``) and what the passes must find for it
(``needs_pre_rope_query``). The graph passes find a site's method by its config's type in
their registry (``passes/methods.py``), so a new method plugs in by adding a config class here
and one line there (docs/LAYOUT.md); nothing branches on names.

>>> ExactConfig().method
'exact'
>>> MACConfig().method
'mac'
>>> MethodConfig.from_dict({"method": "exact"})
ExactConfig()
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

_CONFIG_CLASSES: dict[str, type[MethodConfig]] = {}


def method_names() -> list[str]:
    """The registered method names (what ``--method`` and ``{"method": ...}`` accept)."""
    return sorted(_CONFIG_CLASSES)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses set ``method`` and stay frozen and hashable."""

    method: ClassVar[str] = ""
    needs_pre_rope_query: ClassVar[bool] = False
    # Methods whose ops keep per-site state between calls (rings, summaries): optimize()
    # routes eager forwards through the rewritten graph (the plain module would skip it).
    keeps_state: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Only the first class to claim a name is registered (test subclasses may reuse it).
        if cls.method:
            _CONFIG_CLASSES.setdefault(cls.method, cls)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-able data, with its method name.

        >>> ExactConfig().to_dict()
        {'method': 'exact'}
        """
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> MethodConfig:
        """Rebuild a config written by :meth:`to_dict`."""
        fields = dict(data)
        name = fields.pop("method", None)
        if name not in _CONFIG_CLASSES:
            raise ValueError(f"unknown method {name!r}; known: {sorted(_CONFIG_CLASSES)}")
        return _CONFIG_CLASSES[name](**fields)

    def cache_key(self) -> str:
        """A stable string for compile-cache keys (class, method and every field)."""
        name = type(self).__qualname__
        return f"{name}:{self.method}:{self.needs_pre_rope_query}:{self.to_dict()}"


@dataclass(frozen=True)
class ExactConfig(MethodConfig):
    """Exact decode attention through macopt's split-KV kernel: the same keys, the same math.

    >>> import macopt
    >>> macopt.ExactConfig()
    ExactConfig()
    """

    method: ClassVar[str] = "exact"
    needs_pre_rope_query: ClassVar[bool] = False


SELECTORS = ("channel", "page", "exact", "sketch")


@dataclass(frozen=True)
class TopKPhiConfig(MethodConfig):
    """Top-K retrieval with feature-map completion (docs/ALGORITHMS.md, section 2). Approximate by
    design: the unretrieved middle of the prompt is summarised by positive feature maps phi.

    Every decode step attends exactly to ``sinks`` first and ``tail`` last prompt keys, every
    generated key, and ``budget`` retrieved middle keys; the rest of the middle comes from the
    per-(layer, KV head) summary built at prefill. ``budget``: an int >= 1 is K tokens; a float
    in (0, 1] is a fraction of the key capacity the site sees (the cache length of the decode
    step, a shape: choosing K never syncs the host; resolved when the step runs, so it also
    holds when dynamo makes the cache length symbolic, e.g. a second prompt of another
    length under ``cache_implementation="static"``). A fraction never retrieves fewer than
    ``budget_floor`` keys (default 512; 0: none): at short contexts a fixed fraction leaves
    too few keys to carry what full attention finds (SmolLM2 in bf16 on an H100 lost a 4K
    multi-key task at 2%, 82 keys, that exact selection lost too: BENCHMARKS.md 18c), and
    there reading more keys costs little; from ``budget_floor / budget`` keys on (25,600 at
    2%) the fraction alone decides. ``selector`` "sketch" (default) ranks
    every middle key by an approximate score from a 4-bit channel-major copy of the prompt's
    keys written at prefill (the ``channels`` query channels of largest magnitude in the KV
    group, None: head dim / 4; it reads ``channels / (4 D)`` of the key bytes, contiguously),
    then re-ranks the best ``rerank * budget`` by their exact score and keeps ``budget``;
    the copy costs an eighth of the KV cache's memory. On SmolLM2 on an H100 in bf16 it
    answers the retrieval tasks exactly as "exact" does (BENCHMARKS.md 15). "exact" ranks every
    middle key by its exact score (the paper's oracle; reads every key, needs no extra
    state). "page" ranks
    pages of ``page_size`` keys by Quest-style bounds (reads no key it does not retrieve; the
    budget is rounded up to whole pages); "channel" does what "sketch" does from the row-major
    cache (SparQ-style). On SmolLM2 the page bounds keep 18% of the attention mass exact Top-K
    keeps at 2% of a 4K prompt, "sketch" 98.8%, "channel" 99.7% (median over heads;
    docs/SAFE_DEFAULTS.md), so "page" loses needles full attention finds. On the H100 at 128K,
    2% (BENCHMARKS.md 16c): "sketch" 3.25x faster than exact decode at batch 16 and 1.21x at
    batch 1, "exact" 1.21x and 0.85x, "page" 7.0x and 2.2x. Approximate by design.
    ``d_phi`` features per map (None: the head dim, as in the paper).
    ``feature_maps``: a safetensors file of calibrated maps (``macopt calibrate``); None uses
    the parameter-free positive-random-feature initialisation (seeded by ``seed``).

    ``completion``: True turns the completion on for every head, False off (Top-K alone:
    sinks, tail and the budget's keys, exactly). None (default): on where ``feature_maps``
    names a calibrated maps file, off without one. The data-free random features estimate a
    real model's unselected mass far too small (e^6-e^13 times on SmolLM2 from layer 1 on,
    docs/REAL_MODEL.md), so without calibration the completion changes no answer and only
    costs its summary, query features and share launch; ``completion=True`` uses them anyway.
    ``completion_overrides`` maps a layer index to a bool (every head of it) or to
    ``{query head: bool}``: heads whose attention Top-K alone already captures can be
    switched off. A layer with every head off computes no query features and no feature
    share at decode on the GPU (a Top-K-only step).

    ``summary_in_budget``: when True, ``budget`` also pays for the summary's bytes. A KV group
    that reads the summary (any of its query heads has completion on) retrieves
    ``budget - ceil(summary)`` keys (:func:`macopt.topk_phi_select.summary_budget_tokens`, in
    cached tokens of the KV dtype; at least 0: a summary that fills the budget leaves no
    retrieval), and a group whose heads are all off reads no summary and retrieves the full
    ``budget``: exactly Top-K. The page selector rounds each group's count up to whole pages.
    False (default): every group retrieves ``budget``, the summary comes on top.

    >>> config = TopKPhiConfig(budget=0.02, completion=True,
    ...                        completion_overrides={0: False, 3: {5: False}})
    >>> config.budget_tokens(131072), config.completion_for(3, 8)
    (2622, (True, True, True, True, True, False, True, True))
    >>> config.budget_tokens(4096), TopKPhiConfig(budget_floor=0).budget_tokens(4096)
    (512, 82)
    >>> TopKPhiConfig().completes, TopKPhiConfig(feature_maps="phi.safetensors").completes
    (False, True)
    >>> TopKPhiConfig(feature_maps="phi.safetensors").completion_source()
    'on: calibrated maps phi.safetensors'
    >>> TopKPhiConfig(selector="quest")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: TopKPhiConfig.selector: expected one of (...), got 'quest'
    >>> TopKPhiConfig().selector_spec(), TopKPhiConfig(selector="page").selector_spec()
    ('sketch:0:2', 'page')
    """

    method: ClassVar[str] = "topk_phi"
    needs_pre_rope_query: ClassVar[bool] = False
    keeps_state: ClassVar[bool] = True  # per-site summaries, built at every prefill

    sinks: int = 4
    tail: int = 16
    budget: int | float = 0.02
    budget_floor: int = 512
    page_size: int = 32
    selector: str = "sketch"
    channels: int | None = None
    rerank: int = 2
    d_phi: int | None = None
    completion: bool | None = None
    completion_overrides: Any = ()
    feature_maps: str | None = None
    seed: int = 0
    summary_in_budget: bool = False

    def __post_init__(self) -> None:
        for name in ("sinks", "tail"):
            _check_int(self, name, getattr(self, name), least=0)
        _check_int(self, "page_size", self.page_size, least=1)
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"TopKPhiConfig.page_size: expected a power of two (a kernel tile),"
                             f" got {self.page_size}")
        _check_budget(self.budget)
        _check_int(self, "budget_floor", self.budget_floor, least=0)
        if self.selector not in SELECTORS:
            raise ValueError(f"TopKPhiConfig.selector: expected one of {SELECTORS}, "
                             f"got {self.selector!r}")
        if self.channels is not None:
            _check_int(self, "channels", self.channels, least=1)
        _check_int(self, "rerank", self.rerank, least=1)
        if self.d_phi is not None:
            _check_int(self, "d_phi", self.d_phi, least=2)
            if self.d_phi % 2:
                raise ValueError(f"TopKPhiConfig.d_phi: expected an even number (random "
                                 f"features come in antithetic pairs), got {self.d_phi}")
        _check_int(self, "seed", self.seed, least=0)
        if isinstance(self.feature_maps, os.PathLike):
            object.__setattr__(self, "feature_maps", os.fspath(self.feature_maps))
        if self.feature_maps is not None and not isinstance(self.feature_maps, str):
            raise ValueError(f"TopKPhiConfig.feature_maps: expected None or the path of a "
                             f"`macopt calibrate` phi file, got {self.feature_maps!r}")
        if self.completion is not None and not isinstance(self.completion, bool):
            raise ValueError(f"TopKPhiConfig.completion: expected a bool or None (on with a "
                             f"calibrated maps file), got {self.completion!r}")
        if not isinstance(self.summary_in_budget, bool):
            raise ValueError(f"TopKPhiConfig.summary_in_budget: expected a bool, got "
                             f"{self.summary_in_budget!r}")
        # Stored as nested sorted tuples: the config stays frozen, hashable and JSON-able.
        object.__setattr__(self, "completion_overrides",
                           _normalise_overrides(self.completion_overrides))

    def selector_spec(self) -> str:
        """The selector as the decode ops take it: its name, and for "channel" / "sketch" its
        channel count (0: head dim / 4) and re-rank factor, ``"channel:C:R"``."""
        if self.selector not in ("channel", "sketch"):
            return self.selector
        return f"{self.selector}:{self.channels or 0}:{self.rerank}"

    def budget_tokens(self, n_keys: int) -> int:
        """K for a site whose cache holds ``n_keys`` keys (fractions round up, at least 1 and
        at least ``budget_floor``)."""
        return resolve_budget(*self.budget_args(), n_keys)

    def budget_args(self) -> tuple[int, float]:
        """``budget`` as the decode ops take it, ``(K, fraction)``: ``(K, 0.0)`` for K tokens,
        ``(budget_floor, fraction)`` for a fraction, which the op resolves against the cache
        length of the step it runs (:func:`resolve_budget`): a compiled graph never bakes K
        in, so a cache length dynamo made symbolic (a second prompt of another length) needs
        nothing static."""
        if isinstance(self.budget, int):
            return self.budget, 0.0
        return self.budget_floor, float(self.budget)

    def _recorded_switch(self) -> dict[int, tuple[bool, ...]] | None:
        if self.completion is not None or not self.feature_maps:
            return None
        from macopt.phi_files import recorded_switch

        return recorded_switch(self.feature_maps)

    def completion_source(self) -> str:
        """Whether this config's sites complete the middle, and why (``macopt.stats``)."""
        if self.completion is None:
            state = (f"on: calibrated maps {self.feature_maps}" if self.feature_maps else
                     "off: no calibrated maps file (Top-K alone; `macopt calibrate --method "
                     "topk_phi` writes one, completion=True uses random features)")
            if self._recorded_switch() is not None:
                state += ", on the heads where calibration measured it helps"
        elif self.completion:
            maps = f"maps {self.feature_maps}" if self.feature_maps else "random features"
            state = f"on: completion=True, {maps}"
        else:
            state = "off: completion=False (Top-K alone)"
        return state + (", per-layer overrides" if self.completion_overrides else "")

    @property
    def completes(self) -> bool:
        """Whether the completion is on before ``completion_overrides``: ``completion``, or
        when it is None, whether a calibrated maps file is given."""
        return self.feature_maps is not None if self.completion is None else self.completion

    def completion_for(self, layer: int, n_heads: int) -> tuple[bool, ...]:
        """Completion on/off for each of ``n_heads`` query heads of layer ``layer``: with
        ``completion`` None, the switch the maps file records for that layer
        (:mod:`macopt.phi_switch`), if any."""
        heads = [self.completes] * n_heads
        recorded = self._recorded_switch()
        if recorded is not None and layer in recorded:
            if len(recorded[layer]) != n_heads:
                raise ValueError(f"TopKPhiConfig.feature_maps: {self.feature_maps} records a "
                                 f"completion switch for {len(recorded[layer])} query heads at "
                                 f"layer {layer}, the site has {n_heads}")
            heads = list(recorded[layer])
        for index, setting in self.completion_overrides:
            if index != layer:
                continue
            if isinstance(setting, bool):
                heads = [setting] * n_heads
                continue
            for head, on in setting:
                if head >= n_heads:
                    raise ValueError(f"TopKPhiConfig.completion_overrides: layer {layer} has "
                                     f"{n_heads} query heads, got head {head}")
                heads[head] = on
        return tuple(heads)


def resolve_budget(budget: int, fraction: float, n_keys: int) -> int:
    """K in tokens: ``budget`` when ``fraction`` is 0, else ``max(1, budget, ceil(fraction *
    n_keys))`` for a cache of ``n_keys`` keys (``budget`` is then the floor; a shape: resolving
    it never syncs the host).

    >>> resolve_budget(64, 0.0, 4096), resolve_budget(0, 0.02, 4096), resolve_budget(0, 0.02, 4097)
    (64, 82, 82)
    >>> resolve_budget(512, 0.02, 4096), resolve_budget(512, 0.02, 131072)
    (512, 2622)
    """
    if not fraction:
        return budget
    return max(1, budget, math.ceil(fraction * n_keys))


def check_budget_args(budget: int, fraction: float) -> None:
    """The decode ops' ``(budget, budget_fraction)``: K >= 1 tokens, or a fraction in (0, 1]
    with a floor of ``budget`` >= 0 tokens."""
    if fraction:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"budget_fraction: expected a fraction in (0, 1] (0: the budget is "
                             f"a number of tokens), got {fraction}")
        if budget < 0:
            raise ValueError(f"budget: expected a floor of >= 0 tokens beside a fraction, got "
                             f"{budget}")
    elif budget < 1:
        raise ValueError(f"budget: expected a number of tokens >= 1, got {budget}")


def _check_int(config: object, name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{type(config).__name__}.{name}: expected an int >= {least}, "
                         f"got {value!r}")


def _check_budget(budget: object) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise ValueError(f"TopKPhiConfig.budget: expected K (an int >= 1) or a fraction of the "
                         f"context (a float in (0, 1]), got {budget!r}")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"TopKPhiConfig.budget: K must be >= 1, got {budget}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"TopKPhiConfig.budget: a fraction must lie in (0, 1], got {budget} "
                         "(pass an int for a number of tokens)")


def _normalise_overrides(overrides: Any) -> tuple:
    """``{layer: bool | {head: bool}}`` (or its tuple / JSON-list form) -> sorted tuples."""
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    normal = []
    for entry in items:
        layer, setting = _pair(entry, "completion_overrides entry")
        layer = _index(layer, "layer")
        if isinstance(setting, bool):
            normal.append((layer, setting))
            continue
        heads = setting.items() if isinstance(setting, Mapping) else setting
        per_head = []
        for head_entry in heads:
            head, on = _pair(head_entry, f"layer {layer} head entry")
            if not isinstance(on, bool):
                raise ValueError(f"TopKPhiConfig.completion_overrides: layer {layer} head "
                                 f"{head}: expected a bool, got {on!r}")
            per_head.append((_index(head, "head"), on))
        normal.append((layer, tuple(sorted(per_head))))
    layers = [layer for layer, _ in normal]
    if len(set(layers)) != len(layers):
        raise ValueError(f"TopKPhiConfig.completion_overrides: a layer is listed twice: {layers}")
    return tuple(sorted(normal, key=lambda item: item[0]))


def _pair(entry: Any, what: str) -> tuple[Any, Any]:
    if not isinstance(entry, tuple | list) or len(entry) != 2:
        raise ValueError(f"TopKPhiConfig.completion_overrides: {what}: expected (index, "
                         f"setting), got {entry!r}. Example: {{0: False, 3: {{5: False}}}}")
    return entry[0], entry[1]


def _index(value: Any, what: str) -> int:
    # JSON turns int keys into strings; accept those back.
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"TopKPhiConfig.completion_overrides: expected a {what} index >= 0, "
                         f"got {value!r}")
    return value


MAX_RING_SIZE = 1 << 16
RADII = ("relative", "absolute")


@dataclass(frozen=True)
class MACConfig(MethodConfig):
    """MAC-Attention (Match, Amend, Complete; docs/ALGORITHMS.md, section 1). Approximate by design:
    a decode query close to a recent one reuses that query's attention over the old keys.

    Per attention site and batch row, a ring keeps the last ``ring_size`` (M) pre-RoPE queries
    with their attention state over all but the ``offset`` (S) most recent keys. A decode query
    whose squared L2 distance to its nearest ring entry is below ``2 D (1 - tau)^2`` (a hit)
    reuses that entry and recomputes only the band of keys since it; otherwise (a miss) it
    attends the whole prefix exactly. Matching starts once a row holds ``t_min`` keys;
    ``sinks`` first keys are attended exactly every step.

    ``tau`` is a similarity threshold: *larger is stricter*. ``tau = 1.0`` gives radius 0, so
    nothing ever matches and ``mac`` computes exactly full attention (a test setting); a tiny or
    negative ``tau`` matches almost everything.

    ``radius``: "relative" (default) matches query *directions*: every pre-RoPE query is scaled
    to norm ``sqrt(D)`` before the ring and the match see it, so a hit needs
    ``1 - cos(q, q_j) < (1 - tau)^2`` whatever the model's query norms, head dim or query
    normalisation (``tau`` means the same on every model). "absolute": the raw pre-RoPE
    queries (the radius depends on the model's query scale; for taus calibrated that way).
    The default ``tau = 0.85`` (cosine > 0.9775) is stricter than 0.45 was on SmolLM2, whose
    query norms (12-18) made the absolute radius loose (docs/SAFE_DEFAULTS.md).

    ``max_chain_depth``: an entry built on a hit is itself approximate; an entry that is the
    ``max_chain_depth``-th link of a chain of hits is not reused again, so that step attends its
    prefix exactly and writes an exact entry. 16 bounds the chained error at 16 reuse errors
    while costing at most one full-prefix read per 17 steps of a head that always hits
    (amortised reads >= 1/17 of full attention: still ~15x fewer at long contexts); 8 would
    halve that saving for an error bound only twice tighter.

    ``batch_capacity``: rows each site's ring is allocated for, once, at its first use (None:
    the batch of that first call). Rings never move afterwards (CUDA graphs keep their
    addresses), so a later, larger batch is an error. Memory per site and row:
    ``Hq * M * (D * (2 + 4) + 12)`` bytes at bf16 (Llama-3.1-8B, M = 512: 12.6 MB per layer and
    row, 403 MB per row for 32 layers); ``macopt.stats(model)`` reports it.

    >>> MACConfig().ring_size, MACConfig().tau, MACConfig().radius
    (512, 0.85, 'relative')
    >>> MACConfig().tau_source()
    'tau 0.85 on query directions (radius relative to each query norm: model-independent)'
    >>> MACConfig(tau=1.0, t_min=0).tau  # radius 0: nothing matches, exactly full attention
    1.0
    >>> MACConfig(ring_size=0)
    Traceback (most recent call last):
    ...
    ValueError: MACConfig.ring_size: expected an int >= 1, got 0
    """

    method: ClassVar[str] = "mac"
    needs_pre_rope_query: ClassVar[bool] = True
    keeps_state: ClassVar[bool] = True

    ring_size: int = 512
    offset: int = 256
    tau: float = 0.85
    t_min: int = 2048
    sinks: int = 0
    max_chain_depth: int = 16
    batch_capacity: int | None = None
    radius: str = "relative"

    def tau_source(self) -> str:
        """Which tau this config gives its sites, and what its radius is relative to."""
        if self.radius == "relative":
            return (f"tau {self.tau:g} on query directions (radius relative to each query "
                    f"norm: model-independent)")
        return f"tau {self.tau:g} on raw pre-RoPE queries (absolute radius sqrt(2 D) (1 - tau))"

    def __post_init__(self) -> None:
        if self.radius not in RADII:
            raise ValueError(f"MACConfig.radius: expected one of {RADII}, got {self.radius!r}")
        least = {"ring_size": 1, "offset": 0, "t_min": 0, "sinks": 0, "max_chain_depth": 1}
        for name, low in least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"MACConfig.{name}: expected an int >= {low}, got {value!r}")
        if self.ring_size > MAX_RING_SIZE:
            # Each entry is a past decode query: a longer ring never fills, and it is
            # allocated up front (Hq * M * ~6 D bytes per site and row).
            raise ValueError(f"MACConfig.ring_size: expected at most {MAX_RING_SIZE} (entries "
                             f"are past decode steps, allocated up front), got {self.ring_size}")
        capacity = self.batch_capacity
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                     or capacity < 1):
            raise ValueError(f"MACConfig.batch_capacity: expected None or an int >= 1, "
                             f"got {capacity!r}")
        tau = self.tau
        number = not isinstance(tau, bool) and isinstance(tau, int | float)
        if not number or not float("-inf") < tau <= 1.0:  # NaN fails the comparison too
            raise ValueError(f"MACConfig.tau: expected a number <= 1.0 (1.0: nothing matches; "
                             f"smaller matches more), got {tau!r}")
        object.__setattr__(self, "tau", float(tau))


@dataclass(frozen=True)
class MACTopKPhiConfig(MethodConfig):
    """MAC-Attention whose misses use Top-K + phi for the prefix instead of exact attention.
    Approximate by design (both halves are), beyond both papers.

    MAC decides hit or miss per query head as ``mac`` does. A hit is unchanged: the reused ring
    entry, the exact band since it and the exact tail of the ``mac.offset`` (S) most recent
    keys. A miss does not attend its prefix ``[s0, E(t))`` (``E(t) = max(t + 1 - S, s0)``)
    exactly: that state comes from Top-K + phi restricted to those keys (the ``topk_phi``
    sinks, the retrieved middle keys and every key in ``[mid_end, E(t))`` exact, the rest of the
    prompt's middle from the feature summary) and is written to the ring as the entry (depth
    0), as ``mac`` writes its exact entries. MAC's weak spot is the full-prefix read of a miss,
    Top-K + phi's the diffuse heads; a miss here reads what Top-K + phi reads. So no decode
    step refreshes an entry exactly: ``mac.max_chain_depth`` still ends chains of hits, but
    the step that ends one takes its prefix from Top-K + phi; only the prefill's entries are
    exact.

    The summary must end before every decode step's ``E(t)``, so it is built at prefill with
    the tail ``max(topk_phi.tail, mac.offset)`` (:attr:`summary_tail`), and MAC's own sinks
    must be 0 (the ``topk_phi`` sinks are attended exactly on every miss, and a hit's reused
    entry covers them). ``mac.tau = 1.0`` never hits: then every step is Top-K + phi over
    ``[s0, E(t))`` merged with the exact tail.

    >>> config = MACTopKPhiConfig(MACConfig(offset=256), TopKPhiConfig(budget=0.02))
    >>> config.summary_tail, config.method
    (256, 'mac_topk_phi')
    >>> MethodConfig.from_dict(config.to_dict()) == config
    True
    >>> MACTopKPhiConfig(mac=MACConfig(sinks=4))
    Traceback (most recent call last):
    ...
    ValueError: MACTopKPhiConfig.mac.sinks: expected 0 (topk_phi's sinks cover them), got 4
    """

    method: ClassVar[str] = "mac_topk_phi"
    needs_pre_rope_query: ClassVar[bool] = True
    keeps_state: ClassVar[bool] = True  # MAC rings and Top-K + phi summaries

    mac: MACConfig = dataclasses.field(default_factory=MACConfig)
    topk_phi: TopKPhiConfig = dataclasses.field(default_factory=TopKPhiConfig)

    def __post_init__(self) -> None:
        for name, cls in (("mac", MACConfig), ("topk_phi", TopKPhiConfig)):
            object.__setattr__(self, name, _part(name, getattr(self, name), cls))
        if self.mac.sinks != 0:
            # A miss attends the topk_phi sinks exactly, a hit's entry covers them.
            raise ValueError(f"MACTopKPhiConfig.mac.sinks: expected 0 (topk_phi's sinks cover "
                             f"them), got {self.mac.sinks}")

    @property
    def summary_tail(self) -> int:
        """Prompt keys the prefill summary leaves out at the end: at least S, so that the
        summary ends before ``E(t)`` at every decode step."""
        return max(self.topk_phi.tail, self.mac.offset)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-able data: its method and both parts' own dicts.

        >>> MACTopKPhiConfig().to_dict()["mac"]["method"]
        'mac'
        """
        return {"method": self.method, "mac": self.mac.to_dict(),
                "topk_phi": self.topk_phi.to_dict()}


def _part(name: str, value: Any, cls: type[MethodConfig]) -> MethodConfig:
    """A part of a composed config: an instance of ``cls``, or its dict (with or without its
    method name, as ``to_dict`` writes it)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        fields = dict(value)
        method = fields.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"MACTopKPhiConfig.{name}: expected a {cls.method!r} config, got "
                             f"method {method!r}")
        return cls(**fields)
    raise ValueError(f"MACTopKPhiConfig.{name}: expected a {cls.__name__} (or its dict), got "
                     f"{type(value).__name__}")
