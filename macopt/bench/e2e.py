"""``macopt bench e2e``: greedy decoding of a whole Llama-3.1-8B-shaped transformers model at
long contexts, unmodified and with each macopt method.

A ``LlamaForCausalLM`` with random weights (Llama-3.1-8B shapes by default; flags shrink it),
or a trained local model with ``--model DIR`` (:mod:`macopt.bench.e2e_model`), decodes at
each context C of ``--contexts`` and batch of ``--batches``: the sequence is placed at C by
filling the cache's first ``C - P`` keys and running the last ``P`` tokens as a real prefill
chunk, then ``--warmup-steps`` untimed and ``--steps`` timed greedy steps of a step compiled
once per (method, batch) (CUDA graphs on CUDA). Each record holds the latencies, a bytes
roofline, the measured MAC hit rates and keys read, macopt's state bytes and the compile
health; ``--prefill-contexts`` adds batch-1 prefill points (eager route and, with
``--prefill-compiled``, the user's own compile). Methods are named as in
:func:`parse_method` (``unmodified``, ``exact``, ``mac:all``, ``mac:TAU``,
``topk_phi:BUDGET``, ``mac:calibrated``, ``mac:FILE.json``).

How each part is measured, and what changed when: BENCHMARKS.md, section 5 and the appendix
"``macopt bench e2e``: what it measures".

    macopt bench e2e --json e2e.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from macopt import method_spec
from macopt._hf_compat import cache_kwargs
from macopt.bench import timing
from macopt.bench.decode import DTYPES, first_line, parse_sizes
from macopt.bench.e2e_model import CACHE_ROUNDING
from macopt.config import MACConfig, TopKPhiConfig
from macopt.method_spec import Method

Tensor = torch.Tensor

DEFAULT_CONTEXTS = (8192, 32768, 65536, 131072)
DEFAULT_BATCHES = (1, 2)
DEFAULT_METHODS = ("unmodified", "exact", "mac:all", "mac:1", "topk_phi:0.02")
DEFAULT_PREFILL_CONTEXTS = (8192, 32768)
DEFAULT_PREFILL_METHODS = ("unmodified", "exact", "mac:all")
TRACED_CONTROL = "unmodified-traced"
# Per route, the prefill points a record is compared with: (route, method) -> record key.
PREFILL_REFERENCES = {
    "eager": {("eager", "unmodified"): "slowdown_vs_unmodified_pct",
              ("eager", TRACED_CONTROL): "slowdown_vs_control_pct"},
    "compiled": {("compiled", "unmodified"): "slowdown_vs_compiled_unmodified_pct",
                 ("eager", "unmodified"): "slowdown_vs_unmodified_pct"},
}


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Llama configuration (Llama-3.1-8B by default)."""

    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 128256
    rope_theta: float = 500000.0

    def parameters(self) -> int:
        """Weights of the model (tied embeddings not assumed: embedding and head)."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return 2 * self.vocab * self.hidden + self.layers * (attention + mlp + 2 * self.hidden)

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """K and V bytes of one token over all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * itemsize


def shape_of(config: Any) -> ModelShape:
    """The model's sizes (what the bytes roofline counts)."""
    heads = config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    return ModelShape(
        layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate=config.intermediate_size, vocab=config.vocab_size,
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 0.0))))


def parse_method(spec: str, ring_size: int = 512, offset: int = 256,
                 model_dir: str | Path | None = None) -> Method:
    """A method spec (:mod:`macopt.method_spec`) whose MAC configs take the benchmark's ring
    size and offset and ``t_min`` 0 (``mac:calibrated`` and files: their config as written).

    >>> parse_method("mac:1").config.tau, parse_method("mac:1").config.t_min
    (1.0, 0)
    """
    return method_spec.parse_method(spec, model_dir,
                                    mac={"ring_size": ring_size, "offset": offset, "t_min": 0})


@dataclasses.dataclass
class E2EConfig:
    shape: ModelShape = ModelShape()
    methods: tuple[str, ...] = DEFAULT_METHODS
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    batches: tuple[int, ...] = DEFAULT_BATCHES
    steps: int = 32
    warmup_steps: int = 3
    chunk: int = 512  # MACConfig().ring_size: a full ring of prompt entries
    prefill_contexts: tuple[int, ...] = DEFAULT_PREFILL_CONTEXTS
    prefill_methods: tuple[str, ...] = DEFAULT_PREFILL_METHODS
    prefill_repeats: int = 3
    prefill_control: bool = True
    prefill_compiled: tuple[str, ...] = ()  # also through torch.compile (Inductor)
    per_context_cache: tuple[str, ...] = ()
    mac_ring_size: int = 512
    mac_offset: int = 256
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    backend: str = "inductor"
    seed: int = 0
    budget_s: float | None = None
    max_batch_tokens: int | None = None
    model: str | None = None  # a local model directory (e2e_model); None: random weights

    def __post_init__(self) -> None:
        if self.model is None and self.contexts and (self.chunk < 2
                                                     or self.chunk >= min(self.contexts)):
            raise ValueError(f"--chunk: expected 2 <= chunk < the smallest context "
                             f"{min(self.contexts)}, got {self.chunk}")
        if self.steps < 1 or self.warmup_steps < 0:
            raise ValueError("--steps must be >= 1 and --warmup-steps >= 0")
        if not self.contexts and not self.prefill_contexts:
            raise ValueError("--contexts none needs --prefill-contexts (nothing to measure)")
        unknown = set(self.per_context_cache) - set(self.methods)
        if unknown:
            raise ValueError(f"--per-context-cache: {sorted(unknown)} not in --methods")
        if not set(self.prefill_compiled) <= set(self.methods) & set(self.prefill_methods):
            raise ValueError(f"--prefill-compiled: {sorted(self.prefill_compiled)} must be "
                             f"among --methods and --prefill-methods")

    def parsed_methods(self) -> list[Method]:
        """The methods, ``unmodified`` first (it must run before any optimize)."""
        methods = [parse_method(m, self.mac_ring_size, self.mac_offset, self.model)
                   for m in self.methods]
        return sorted(methods, key=lambda m: m.config is not None)

    def contexts_for(self, batch: int) -> tuple[int, ...]:
        """The contexts decoded at ``batch``: those within ``--max-batch-tokens``."""
        cap = self.max_batch_tokens
        return tuple(c for c in self.contexts if cap is None or batch * c <= cap)

    def cache_len(self, context: int) -> int:
        """Keys a cache holds for decoding at ``context``: warm-up and timed steps included."""
        return _round_up(context + self.warmup_steps + self.steps, CACHE_ROUNDING)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "dtype": str(self.dtype).removeprefix("torch.")}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------------------------
# Model, caches, placing a sequence


def build_model(shape: ModelShape, device: str, dtype: torch.dtype, seed: int,
                max_positions: int) -> Any:
    """A random-weight ``LlamaForCausalLM`` created on ``device`` in ``dtype`` (no host copy),
    seeded without touching the caller's RNG."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )
    devices = [torch.device(device)] if timing.is_cuda(device) else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Parameter bytes a decode step reads: all but the input embedding (one row per sequence),
    unless it is tied to the output projection (then the step reads all of it there)."""
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    params = {id(p): p for p in model.parameters() if tied or p is not embedding}
    return sum(p.numel() * p.element_size() for p in params.values())


class CacheSlot:
    """At most one static cache alive at a time (the largest take most of the GPU)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device: str):
        self.model, self.dtype, self.device = model, dtype, device
        self.key: tuple[int, int] | None = None
        self.cache: Any = None

    def get(self, batch: int, length: int) -> Any:
        from macopt._hf_compat import static_cache

        if self.key != (batch, length):
            self.release()
            self.cache = static_cache(self.model, batch, length, self.dtype, self.device)
            self.key = (batch, length)
        return self.cache

    def release(self) -> None:
        self.cache, self.key = None, None
        _free_memory(self.device)


def cache_bytes(cache: Any) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def fill_prefix(cache: Any, length: int, seed: int) -> None:
    """Seeded normal keys and values at positions ``[0, length)`` of every layer, and each
    layer's write counter at ``length``: the sequence continues from there."""
    generator = torch.Generator(cache.layers[0].keys.device).manual_seed(seed)
    for layer in cache.layers:
        layer.keys[:, :, :length].normal_(generator=generator)
        layer.values[:, :, :length].normal_(generator=generator)
        layer.cumulative_length.fill_(length)


def random_ids(batch: int, length: int, vocab: int, seed: int, device: str) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=generator).to(device)


def forward_last_token(forward: Callable, ids: Tensor, cache: Any) -> Tensor:
    """Run ``ids`` through ``forward`` into ``cache``; the greedy next ids ``[B, 1]``."""
    out = forward(input_ids=ids, **cache_kwargs(forward, cache), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def fresh_compiles() -> None:
    """Forget all compiled code and CUDA graphs (``dynamo.reset``): each compile starts cold
    and static, as in a fresh process (no dynamic-shape retrace from an earlier shape)."""
    from macopt.passes._compat import dynamo

    dynamo.reset()


def _free_memory(device: str) -> None:
    gc.collect()
    if timing.is_cuda(device):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The decode loop and its timer


def compile_decode_step(model: torch.nn.Module, config: E2EConfig) -> Callable:
    """``step(ids[B, 1], cache) -> next ids[B, 1]``: one forward and the greedy argmax, compiled
    whole (CUDA graphs on CUDA unless ``--backend eager``)."""

    def greedy_step(ids: Tensor, cache: Any) -> Tensor:
        return forward_last_token(model, ids, cache)

    if config.backend == "eager":
        import macopt

        return torch.compile(greedy_step, backend=macopt.backend(inductor=False), fullgraph=True)
    mode = "reduce-overhead" if timing.is_cuda(config.device) else "default"
    return torch.compile(greedy_step, mode=mode, fullgraph=True)


def compile_prefill(model: torch.nn.Module, config: E2EConfig) -> Callable:
    """The user's compile of the whole forward: ``torch.compile(model.forward, fullgraph=True)``
    with Inductor in its default mode, or macopt's passes without Inductor with ``--backend
    eager`` (fast compiles for CPU tests; that backend's prefill attention is the eager
    route's, not Inductor's)."""
    if config.backend == "eager":
        import macopt

        return torch.compile(model.forward, backend=macopt.backend(inductor=False),
                             fullgraph=True)
    return torch.compile(model.forward, fullgraph=True)


class StepTimer:
    """A mark before every step and after the last: CUDA events (no sync) or the host clock."""

    def __init__(self, cuda: bool, steps: int):
        self.cuda = cuda
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if cuda \
            else []
        self.marks: list[float] = []

    def mark(self) -> None:
        if self.cuda:
            self.events[len(self.marks)].record()
            self.marks.append(0.0)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            done = self.events[: len(self.marks)]
            return [a.elapsed_time(b) for a, b in zip(done, done[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]


def greedy(step: Callable, cache: Any, ids: Tensor, n: int,
           timer: StepTimer | None = None) -> tuple[Tensor, Tensor]:
    """``n`` greedy steps from ``ids[B, 1]``: the generated ids ``[B, n]`` and the last
    ``[B, 1]`` (the next input, laid out as every step's input). Each output is cloned at once:
    a CUDA-graph output is overwritten by the next replay."""
    generated = []
    for _ in range(n):
        if timer is not None:
            timer.mark()
        torch.compiler.cudagraph_mark_step_begin()
        ids = step(ids, cache).clone()
        generated.append(ids)
    if timer is not None:
        timer.mark()
    return (torch.cat(generated, dim=1) if generated else ids[:, :0]), ids


# ---------------------------------------------------------------------------------------------
# What macopt reports: hit rates, keys read, state bytes, rewritten sites


@dataclasses.dataclass(frozen=True)
class MacTotals:
    """``macopt.stats`` summed over layers: steps, hit-rate x steps, keys read and full; and
    per layer, its steps and hit-rate x steps."""

    steps: int
    hit_steps: float
    keys_read: int
    keys_full: int
    layers: tuple[tuple[int, float], ...] = ()

    @classmethod
    def read(cls, model: torch.nn.Module) -> MacTotals:
        import macopt

        layers = [s for s in macopt.stats(model) if s.method == "mac"]
        return cls(steps=sum(s.decode_steps for s in layers),
                   hit_steps=sum(s.hit_rate * s.decode_steps for s in layers),
                   keys_read=sum(s.keys_read for s in layers),
                   keys_full=sum(s.keys_full for s in layers),
                   layers=tuple((s.decode_steps, s.hit_rate * s.decode_steps) for s in layers))

    def since(self, before: MacTotals) -> MacTotals:
        """The totals of the steps in between (the batch is constant within a group, so the
        step-weighted hit rates subtract exactly)."""
        layers = tuple((n - m, h - g) for (n, h), (m, g)
                       in zip(self.layers, before.layers, strict=True))
        return MacTotals(self.steps - before.steps, self.hit_steps - before.hit_steps,
                         self.keys_read - before.keys_read, self.keys_full - before.keys_full,
                         layers)

    def layer_hit_rates(self) -> list[float | None]:
        return [h / n if n else None for n, h in self.layers]


def _tagged_site_ids(model: torch.nn.Module) -> list[int]:
    from macopt.passes import scope

    return [s for s in (scope.site_id_of(m) for m in model.modules()) if s is not None]


def state_bytes(model: torch.nn.Module, method: str) -> int:
    """Bytes of ``method``'s per-site state (rings, summaries, counters) held for ``model``."""
    from macopt import state

    sites = [state.get(s) for s in _tagged_site_ids(model)]
    return sum(tensor_bytes(site.buffers) + site.counters.nbytes for site in sites
               if site is not None and site.method == method)


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value``: a tensor, a dataclass or a list/tuple of them."""
    if isinstance(value, Tensor):
        return value.nbytes
    if dataclasses.is_dataclass(value):
        return sum(tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(item) for item in value)
    return 0


def release_states(model: torch.nn.Module) -> None:
    """Free the per-site state of every tagged site (the next method allocates its own)."""
    from macopt import state

    for site_id in _tagged_site_ids(model):
        state.release(site_id)


def _state_prefills(model: torch.nn.Module) -> int | None:
    """Calls of the MAC state op so far, summed over layers (0 before any allocated its
    state); None when no module of ``model`` is tagged for MAC."""
    import macopt
    from macopt.passes import scope

    tags = (scope.scope_of_module(m) for m in model.modules())
    if not any(t is not None and getattr(t.config, "method", None) == "mac" for t in tags):
        return None
    return sum(s.prefills or 0 for s in macopt.stats(model) if s.method == "mac")


def _reports(model: torch.nn.Module) -> list:
    """``macopt.explain(model)``, empty when no pass ran on this model (unmodified)."""
    import macopt

    try:
        return list(macopt.explain(model))
    except ValueError:
        return []


def decode_sites_rewritten(model: torch.nn.Module) -> int:
    """Attention sites whose decode graph macopt's passes rewrote (0 when none ran)."""
    return sum(1 for r in _reports(model) if r.phase == "decode" and r.rewritten)


def prefill_sites_causal(model: torch.nn.Module) -> int:
    """Prefill sites (one per layer and compiled prefill graph) given the causal prefill ops
    (:mod:`macopt.passes.causal_prefill`; 0 when none ran)."""
    from macopt.passes.causal_prefill import REWRITTEN

    return sum(1 for r in _reports(model)
               if r.phase == "prefill" and r.prefill_attention == REWRITTEN)


# ---------------------------------------------------------------------------------------------
# Compile health of one (method, batch) group


def _compile_counts() -> dict[str, int]:
    from macopt.passes._compat import dynamo_counters as counters

    return {"graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


class GroupHealth:
    """Counter deltas since the group began, split at the end of its first warm-up. Graphs
    compiled for the prefills that place the sequences (MAC and Top-K + phi: the routed
    ``macopt_eager`` forward, a new one per prompt length until dynamo makes the length
    dynamic) are counted apart, in ``prefill_graphs_compiled``."""

    def __init__(self, recordings: list[str], cuda_graphs: bool):
        self.recordings, self.cuda_graphs = recordings, cuda_graphs
        self.start = _compile_counts()
        self.warm: dict[str, int] | None = None
        self.warm_recordings = 0
        self.prefill_graphs = self.prefill_graphs_at_warm = 0

    @contextlib.contextmanager
    def prefilling(self) -> Iterator[None]:
        before = _compile_counts()["graphs"]
        try:
            yield
        finally:
            self.prefill_graphs += _compile_counts()["graphs"] - before

    def end_warmup(self) -> None:
        if self.warm is None:
            self.warm, self.warm_recordings = _compile_counts(), len(self.recordings)
            self.prefill_graphs_at_warm = self.prefill_graphs

    def fields(self) -> dict[str, Any]:
        now, warm = _compile_counts(), self.warm or _compile_counts()
        later_prefill = self.prefill_graphs - self.prefill_graphs_at_warm
        fields = {"graphs_compiled_warmup": warm["graphs"] - self.start["graphs"]
                  - self.prefill_graphs_at_warm,
                  "recompiles_after_warmup": now["graphs"] - warm["graphs"] - later_prefill,
                  "prefill_graphs_compiled": self.prefill_graphs,
                  "graph_breaks": now["graph_breaks"] - self.start["graph_breaks"],
                  "cudagraph_recordings_warmup": None, "cudagraph_recordings_after_warmup": None,
                  "cudagraph_skips": None}
        if self.cuda_graphs:
            fields.update(cudagraph_recordings_warmup=self.warm_recordings,
                          cudagraph_recordings_after_warmup=len(self.recordings)
                          - self.warm_recordings,
                          cudagraph_skips=now["cudagraph_skips"] - self.start["cudagraph_skips"])
        return fields


# ---------------------------------------------------------------------------------------------
# Bytes per step (the roofline's numerator)


def kv_bytes_per_step(config: E2EConfig, method: Method, batch: int, context: int,
                      cache_len: int, mac: MacTotals | None) -> tuple[float, str]:
    """KV and state bytes one timed step reads (mean over the timed steps) and the basis."""
    shape, itemsize = config.shape, config.dtype.itemsize
    per_token = shape.kv_bytes_per_token(itemsize)
    mean_keys = context + config.warmup_steps + (config.steps + 1) / 2
    cfg = method.config
    if cfg is None:
        return batch * cache_len * per_token, "whole allocated cache"
    if isinstance(cfg, MACConfig) and mac is not None and mac.steps:
        keys = mac.keys_read / (mac.steps * batch * shape.heads)  # per layer, row, query head
        ring = shape.layers * shape.heads * cfg.ring_size * shape.head_dim * itemsize
        return batch * (keys * per_token + ring), "keys read (macopt.stats) + ring queries"
    if isinstance(cfg, TopKPhiConfig):
        return batch * _topk_bytes_per_row(config, cfg, context, cache_len), "config estimate"
    return batch * mean_keys * per_token, "attended keys"


def _topk_bytes_per_row(config: E2EConfig, cfg: TopKPhiConfig, context: int,
                        cache_len: int) -> float:
    """Exact keys (sinks, tail, generated, the budget in whole pages), the middle's page
    bounds (kmin, kmax) and the fp32 summary ``(m, u, T)``, per row, all layers."""
    shape, itemsize = config.shape, config.dtype.itemsize
    page = cfg.page_size
    retrieved = math.ceil(cfg.budget_tokens(cache_len) / page) * page
    generated = config.warmup_steps + (config.steps + 1) / 2
    exact_keys = cfg.sinks + cfg.tail + generated + retrieved
    middle = max(context - cfg.sinks - cfg.tail, 0)
    bounds = 2 * math.ceil(middle / page) * shape.head_dim * itemsize
    d_phi = cfg.d_phi or shape.head_dim
    summary = d_phi * (shape.head_dim + 2) * 4
    per_head = exact_keys * 2 * shape.head_dim * itemsize + bounds + summary
    return shape.layers * shape.kv_heads * per_head


# ---------------------------------------------------------------------------------------------
# The run


class Budget:
    """Wall-clock guard: a point may start when the time used plus its estimate fits."""

    def __init__(self, limit_s: float | None):
        self.limit_s, self.started = limit_s, time.perf_counter()
        self.longest_first = 0.0  # a group's first point (it compiles)
        self.longest_later = 0.0
        self.longest_prefill = 0.0
        self.longest_compiled_prefill = 0.0  # an Inductor compile per point

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def refusal(self, estimate_s: float) -> str | None:
        """Why a point estimated at ``estimate_s`` may not start, or None."""
        if self.limit_s is None or self.elapsed + estimate_s <= self.limit_s:
            return None
        return (f"budget: {self.elapsed:.0f} s used of {self.limit_s:g} s, the point is "
                f"estimated at {estimate_s:.0f} s")


class ReportFile:
    """The report, rewritten (atomically) after every record when a path is given."""

    def __init__(self, path: Path | None, header: dict):
        self.path, self.report = path, {**header, "records": []}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def records(self) -> list[dict]:
        return self.report["records"]

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        scratch = self.path.with_name(self.path.name + ".partial")
        scratch.write_text(json.dumps(self.report, indent=1, default=str) + "\n")
        os.replace(scratch, self.path)


class E2ERun:
    """One benchmark run: the model, its caches, the budget, the report."""

    def __init__(self, config: E2EConfig, json_path: Path | None, echo: Callable[[str], None]):
        self.config, self.echo = config, echo
        self.cuda = timing.is_cuda(config.device)
        self.cuda_graphs = self.cuda and config.backend == "inductor"
        self.budget = Budget(config.budget_s)
        self.text: Any = None  # held-out text of a local model (e2e_model.HeldOutText)
        if config.model is None:
            longest = max(config.contexts + config.prefill_contexts)
            self.model = build_model(config.shape, config.device, config.dtype, config.seed,
                                     config.cache_len(longest))
        else:
            from macopt.bench import e2e_model

            self.model = e2e_model.load_model(config.model, config.device, config.dtype)
            self.text = e2e_model.HeldOutText(config.model)
        self.caches = CacheSlot(self.model, config.dtype, config.device)
        self.copy_gbps = timing.copy_bandwidth_gbps(config.device)
        self.weight_bytes = weight_bytes_per_step(self.model)
        self.tokens: dict[tuple[str, int, int], list[list[int]]] = {}
        self.prefill_ms: dict[tuple[str, int], float] = {}
        header = {"environment": timing.environment(config.device), "config": config.to_dict(),
                  "copy_gbps": self.copy_gbps, "weight_bytes_per_step": self.weight_bytes,
                  "timer": "cuda events per step" if self.cuda else "host clock per step",
                  "prompt": "random ids after a seeded K/V prefix" if self.text is None
                  else f"held-out text: {self.text.source}"}
        self.report = ReportFile(json_path, header)

    def add(self, record: dict) -> None:
        self.report.add(record)
        self.echo(progress_line(record, self.budget.elapsed))

    # -- decode -----------------------------------------------------------------------------

    def decode_group(self, method: Method, batch: int) -> None:
        """Every context of one (method, batch): one compile, then the points."""
        contexts = self.config.contexts_for(batch)
        for context in sorted(set(self.config.contexts) - set(contexts)):
            self.add(_skipped("decode", method.label, batch, context,
                              f"batch x context over --max-batch-tokens "
                              f"{self.config.max_batch_tokens}"))
        refusal = self.budget.refusal(self.budget.longest_first)
        if refusal is not None or not contexts:
            for context in contexts:
                self.add(_skipped("decode", method.label, batch, context, refusal))
            return
        from macopt.passes._compat import count_cudagraph_recordings

        fresh_compiles()
        apply_method(self.model, method, batch)
        step = compile_decode_step(self.model, self.config)
        with count_cudagraph_recordings() as recordings:
            health = GroupHealth(recordings, self.cuda_graphs)
            for index, context in enumerate(contexts):
                self._decode_point_guarded(method, batch, context, step, health, index == 0)
        self._end_group()

    def _decode_point_guarded(self, method: Method, batch: int, context: int, step: Callable,
                              health: GroupHealth, first: bool) -> None:
        estimate = self.budget.longest_first if first else self.budget.longest_later
        refusal = None if first else self.budget.refusal(estimate)
        if refusal is not None:
            self.add(_skipped("decode", method.label, batch, context, refusal))
            return
        started = time.perf_counter()
        with _failures_recorded("decode", method.label, batch, context, self) as slot:
            slot.append(self.decode_point(method, batch, context, step, health))
        spent = time.perf_counter() - started
        if first:
            self.budget.longest_first = max(self.budget.longest_first, spent)
        else:
            self.budget.longest_later = max(self.budget.longest_later, spent)

    def decode_point(self, method: Method, batch: int, context: int, step: Callable,
                     health: GroupHealth) -> dict:
        config, started = self.config, time.perf_counter()
        per_context = method.label in config.per_context_cache
        cache_len = config.cache_len(context if per_context else max(config.contexts_for(batch)))
        cache = self.caches.get(batch, cache_len)
        _reset_peak_memory(config.device)
        with health.prefilling():
            ids = self._place(cache, batch, context)
        warm, ids = greedy(step, cache, ids, config.warmup_steps)
        health.end_warmup()
        warmup_s = time.perf_counter() - started
        is_mac = isinstance(method.config, MACConfig)
        before = MacTotals.read(self.model) if is_mac else None  # reads counters: a sync
        if self.cuda:  # every method's block starts from an idle GPU (not only MAC's)
            torch.cuda.synchronize()
        timer = StepTimer(self.cuda, config.steps)
        timed, _ = greedy(step, cache, ids, config.steps, timer)
        step_ms = timer.intervals_ms()
        mac = MacTotals.read(self.model).since(before) if is_mac else None
        tokens = torch.cat([warm, timed], dim=1).tolist()
        self.tokens[(method.label, batch, context)] = tokens
        record = {"kind": "decode", "method": method.label, "batch": batch, "context": context,
                  "status": "ok", "cache_len": cache_len,
                  "median_ms": statistics.median(step_ms), "mean_ms": statistics.fmean(step_ms),
                  "warmup_s": warmup_s, "tokens": tokens,
                  **self._mac_fields(mac, batch),
                  **self._bytes_fields(method, batch, context, cache_len, mac),
                  **self._memory_fields(method, batch, context, cache),
                  **self._agreement(method.label, batch, context),
                  **health.fields(), "decode_sites_rewritten": decode_sites_rewritten(self.model)}
        record["tokens_per_s"] = batch * 1e3 / record["median_ms"]
        record["point_s"] = time.perf_counter() - started
        return record

    def _place(self, cache: Any, batch: int, context: int) -> Tensor:
        """The sequence at ``context - chunk`` (seeded cache prefix), then the real prefill of
        its last ``chunk`` tokens; with a local model, a real prefill of the whole prompt of
        held-out text. The greedy first ids ``[B, 1]``."""
        config = self.config
        if self.text is not None:
            for layer in cache.layers:
                layer.cumulative_length.zero_()
            prompt = self.text.prompt(batch, context, config.device)
            return forward_last_token(self.model, prompt, cache)
        seed = config.seed * 1_000_003 + context * 8 + batch
        fill_prefix(cache, context - config.chunk, seed)
        chunk = random_ids(batch, config.chunk, config.shape.vocab, seed, config.device)
        return forward_last_token(self.model, chunk, cache)

    def _mac_fields(self, mac: MacTotals | None, batch: int) -> dict:
        if mac is None or not mac.steps:
            return {}
        return {"hit_rate": mac.hit_steps / mac.steps, "layer_hit_rates": mac.layer_hit_rates(),
                "keys_read_per_head_step": mac.keys_read / (mac.steps * batch
                                                            * self.config.shape.heads),
                "read_fraction": mac.keys_read / mac.keys_full if mac.keys_full else None}

    def _bytes_fields(self, method: Method, batch: int, context: int, cache_len: int,
                      mac: MacTotals | None) -> dict:
        kv, basis = kv_bytes_per_step(self.config, method, batch, context, cache_len, mac)
        total = self.weight_bytes + kv
        fields = {"kv_bytes_per_step": kv, "kv_basis": basis, "bytes_per_step": total,
                  "bound_ms": total / (self.copy_gbps * 1e9) * 1e3}
        if isinstance(method.config, TopKPhiConfig):
            budget = method.config.budget_tokens(cache_len)
            fields.update(topk_budget_tokens=budget, topk_budget_share=budget / context)
        return fields

    def _memory_fields(self, method: Method, batch: int, context: int, cache: Any) -> dict:
        name = method.config.method if method.config is not None else ""
        held = state_bytes(self.model, name) if name else 0
        shape, itemsize = self.config.shape, self.config.dtype.itemsize
        kv_context = batch * context * shape.kv_bytes_per_token(itemsize)
        peak = torch.cuda.max_memory_allocated() if self.cuda else None
        return {"state_bytes": held, "kv_bytes_context": kv_context,
                "state_pct_of_kv": 100 * held / kv_context, "kv_cache_bytes": cache_bytes(cache),
                "peak_memory_bytes": peak}

    def _agreement(self, label: str, batch: int, context: int) -> dict:
        mine = self.tokens[(label, batch, context)]
        fields = {}
        for reference in ("unmodified", "exact"):
            theirs = self.tokens.get((reference, batch, context))
            if theirs is not None and reference != label:
                fields[f"first_mismatch_vs_{reference}"] = first_mismatch(mine, theirs)
                fields[f"tokens_equal_{reference}"] = mine == theirs
        return fields

    def _end_group(self) -> None:
        """Drop compiled code, CUDA graphs and the method's state."""
        fresh_compiles()
        release_states(self.model)
        _free_memory(self.config.device)

    # -- prefill ----------------------------------------------------------------------------

    def prefill_section(self, label: str, forward: Callable, route: str = "eager") -> None:
        """Real prefills from position 0 at each prefill context (batch 1), through ``route``
        (``"eager"``: what the model's forward runs uncompiled; ``"compiled"``: Inductor)."""
        longest = "longest_compiled_prefill" if route == "compiled" else "longest_prefill"
        for context in self.config.prefill_contexts:
            refusal = self.budget.refusal(getattr(self.budget, longest))
            if refusal is not None:
                self.add({**_skipped("prefill", label, 1, context, refusal), "route": route})
                continue
            started = time.perf_counter()
            with _failures_recorded("prefill", label, 1, context, self, route) as slot:
                slot.append(self.prefill_point(label, forward, context, route))
            setattr(self.budget, longest, max(getattr(self.budget, longest),
                                              time.perf_counter() - started))

    def prefill_point(self, label: str, forward: Callable, context: int,
                      route: str = "eager") -> dict:
        config, started = self.config, time.perf_counter()
        fresh_compiles()  # a static trace (or compile) per length, not a dynamic retrace
        cache = self.caches.get(1, config.cache_len(context))
        ids = random_ids(1, context, config.shape.vocab, config.seed + context, config.device) \
            if self.text is None else self.text.prompt(1, context, config.device)
        prefills_before = _state_prefills(self.model)
        _reset_peak_memory(config.device)

        def prefill() -> float:
            for layer in cache.layers:
                layer.cumulative_length.zero_()
            begun = time.perf_counter()
            forward_last_token(forward, ids, cache)
            _synchronize(config.device)
            return (time.perf_counter() - begun) * 1e3

        first_call_s = prefill() / 1e3
        runs = [prefill() for _ in range(config.prefill_repeats)]
        median = statistics.median(runs)
        self.prefill_ms[(route, label, context)] = median
        record = {"kind": "prefill", "method": label, "route": route, "batch": 1,
                  "context": context, "status": "ok", "cache_len": config.cache_len(context),
                  "median_ms": median, "runs_ms": runs, "first_call_s": first_call_s,
                  "peak_memory_bytes": torch.cuda.max_memory_allocated() if self.cuda else None}
        after = _state_prefills(self.model)
        if prefills_before is not None and after is not None:
            record["state_prefills"] = after - prefills_before
        for (ref_route, reference), key in PREFILL_REFERENCES[route].items():
            base = self.prefill_ms.get((ref_route, reference, context))
            if base and (ref_route, reference) != (route, label):
                record[key] = 100 * (median / base - 1)
        record["point_s"] = time.perf_counter() - started
        return record

    def traced_control(self) -> None:
        """The unmodified model through the ``macopt_eager`` backend with no site tagged."""
        import macopt

        compiled = torch.compile(self.model.forward, backend=macopt.backend(inductor=False))
        self.prefill_section(TRACED_CONTROL, compiled)

    def prefill(self, method: Method) -> None:
        """The prefill points of ``method`` when asked for: the eager route, the control
        (with unmodified), then the compiled route when ``--prefill-compiled`` names it."""
        config = self.config
        if method.label not in config.prefill_methods or not config.prefill_contexts:
            return
        apply_method(self.model, method, 1)
        self.prefill_section(method.label, self.model)
        if method.config is None and config.prefill_control:
            self.traced_control()
        if method.label in config.prefill_compiled:
            self.prefill_section(method.label, compile_prefill(self.model, config),
                                 route="compiled")

    # -- everything -------------------------------------------------------------------------

    def run(self) -> dict:
        """``unmodified`` at every batch first (before any method is applied), then batch by
        batch every other method (a budget cut then drops the last batch's last methods); each
        method's prefill comes before its first decode group."""
        methods = self.config.parsed_methods()
        with _no_fx_graph_cache(), torch.no_grad():
            for method in (m for m in methods if m.config is None):
                self.prefill(method)
                for batch in self.config.batches:
                    self.decode_group(method, batch)
            for index, batch in enumerate(self.config.batches):
                for method in (m for m in methods if m.config is not None):
                    if index == 0:
                        self.prefill(method)
                    self.decode_group(method, batch)
        self.caches.release()
        self.report.report["elapsed_s"] = self.budget.elapsed
        self.report.write()
        return self.report.report


def apply_method(model: torch.nn.Module, method: Method, batch: int) -> None:
    """Optimize ``model`` in place for ``method`` at ``batch`` rows (nothing for unmodified,
    which runs before any method is applied)."""
    import macopt

    config = method.config_for(batch)
    if config is not None:
        macopt.optimize(model, config, overrides=method.overrides_for(batch))


def first_mismatch(a: list[list[int]], b: list[list[int]]) -> int | None:
    """The first step at which any row's tokens differ, or None."""
    steps = [i for row_a, row_b in zip(a, b, strict=True)
             for i, (x, y) in enumerate(zip(row_a, row_b, strict=True)) if x != y]
    return min(steps) if steps else None


def _skipped(kind: str, label: str, batch: int, context: int, detail: str) -> dict:
    return {"kind": kind, "method": label, "batch": batch, "context": context,
            "status": "skipped", "detail": detail}


@contextlib.contextmanager
def _failures_recorded(kind: str, label: str, batch: int, context: int, run: E2ERun,
                       route: str | None = None) -> Iterator[list[dict]]:
    """Yields a list for the point's record; adds it, or an "oom"/"error" record instead."""
    slot: list[dict] = []
    failed = {**_skipped(kind, label, batch, context, ""), **({"route": route} if route else {})}
    try:
        yield slot
    except torch.cuda.OutOfMemoryError as err:
        slot[:] = [{**failed, "status": "oom", "detail": first_line(err)}]
        _free_memory(run.config.device)
    except Exception as err:  # noqa: BLE001  (a failing method is a result, not a crash)
        slot[:] = [{**failed, "status": "error", "detail": first_line(err)}]
    run.add(slot[0])


@contextlib.contextmanager
def _no_fx_graph_cache() -> Iterator[None]:
    """Cold compiles that run macopt's passes (a cached graph reruns none)."""
    from macopt.passes._compat import inductor_config

    with inductor_config.patch(fx_graph_cache=False):
        yield


def _reset_peak_memory(device: str) -> None:
    if timing.is_cuda(device):
        torch.cuda.reset_peak_memory_stats()


def _synchronize(device: str) -> None:
    if timing.is_cuda(device):
        torch.cuda.synchronize()


def run(config: E2EConfig, json_path: Path | None = None,
        echo: Callable[[str], None] = print) -> dict:
    """Measure everything the config asks for; the report (also written to ``json_path``)."""
    return E2ERun(config, json_path, echo).run()


# ---------------------------------------------------------------------------------------------
# Output


def progress_line(record: dict, elapsed_s: float) -> str:
    route = f" ({record['route']})" if record.get("route") == "compiled" else ""
    head = (f"[{elapsed_s:6.0f} s] {record['kind']} {record['method']}{route} batch "
            f"{record['batch']} context {context_label(record['context'])}:")
    if record["status"] != "ok":
        return f"{head} {record['status']} ({record.get('detail', '')})"
    peak = record.get("peak_memory_bytes")
    peak_text = "" if peak is None else f", peak {peak / 2**30:.1f} GiB"
    if record["kind"] == "prefill":
        versus = "".join(f", {value:+.1f}% vs {name}" for key, name in _SLOWDOWN_COLUMNS
                         if (value := record.get(key)) is not None)
        return (f"{head} {record['median_ms']:.1f} ms (first call {record['first_call_s']:.1f} "
                f"s){versus}{peak_text}")
    hit = f", hit rate {record['hit_rate']:.3f}" if "hit_rate" in record else ""
    return (f"{head} {record['median_ms']:.3f} ms/token (bound {record['bound_ms']:.3f}){hit}, "
            f"recompiles {record['recompiles_after_warmup']}{peak_text}, "
            f"point {record['point_s']:.0f} s")


def context_label(context: int) -> str:
    return f"{context // 1024}K" if context % 1024 == 0 else str(context)


def decode_table(report: dict):
    """One row per (batch, context); per method: median ms/token (bytes bound), MAC hit rate."""
    from rich.table import Table

    decode = [r for r in report["records"] if r["kind"] == "decode"]
    methods = list(dict.fromkeys(r["method"] for r in decode))
    table = Table(title="e2e decode: median ms/token (bytes-roofline bound ms)")
    for column in ("batch", "context", *methods):
        table.add_column(column, justify="right")
    rows: dict[tuple[int, int], dict[str, dict]] = {}
    for r in decode:
        rows.setdefault((r["batch"], r["context"]), {})[r["method"]] = r
    for (batch, context), cells in rows.items():
        table.add_row(str(batch), context_label(context),
                      *(_decode_cell(cells.get(m)) for m in methods))
    return table


def _decode_cell(record: dict | None) -> str:
    if record is None or record["status"] != "ok":
        return "-" if record is None else record["status"]
    text = f"{record['median_ms']:.2f} ({record['bound_ms']:.2f})"
    if "hit_rate" in record:
        text += f" h={record['hit_rate']:.2f}"
    return text


def health_table(report: dict):
    """Per (method, batch): compile health, rewritten sites and memory at its last point."""
    from rich.table import Table

    table = Table(title="e2e compile health and memory (last point of each method x batch)")
    for column in ("method", "batch", "compile + warm-up s", "graphs (warm-up / after)",
                   "graph breaks", "CUDA graphs (recorded warm-up / after, skips)",
                   "sites rewritten", "state MB (% of context KV)", "peak GiB"):
        table.add_column(column, justify="right")
    first: dict[tuple[str, int], dict] = {}
    last: dict[tuple[str, int], dict] = {}
    for r in report["records"]:
        if r["kind"] == "decode" and r["status"] == "ok":
            first.setdefault((r["method"], r["batch"]), r)
            last[(r["method"], r["batch"])] = r
    for key, r in last.items():
        graphs = "n/a" if r["cudagraph_skips"] is None else (
            f"{r['cudagraph_recordings_warmup']} / {r['cudagraph_recordings_after_warmup']}, "
            f"{r['cudagraph_skips']}")
        peak = r["peak_memory_bytes"]
        table.add_row(
            key[0], str(key[1]), f"{first[key]['warmup_s']:.0f}",
            f"{r['graphs_compiled_warmup']} / {r['recompiles_after_warmup']}"
            + (f" (+{r['prefill_graphs_compiled']} prefill)" if r.get("prefill_graphs_compiled")
               else ""),
            str(r["graph_breaks"]), graphs, str(r["decode_sites_rewritten"]),
            f"{r['state_bytes'] / 2**20:.1f} ({r['state_pct_of_kv']:.2f}%)",
            "n/a" if peak is None else f"{peak / 2**30:.1f}")
    return table


_SLOWDOWN_COLUMNS = (("slowdown_vs_unmodified_pct", "eager unmodified"),
                     ("slowdown_vs_control_pct", "traced control"),
                     ("slowdown_vs_compiled_unmodified_pct", "compiled unmodified"))


def prefill_table(report: dict):
    from rich.table import Table

    table = Table(title="e2e prefill, batch 1: median ms and slowdowns (route eager: what the "
                        "uncompiled forward runs; compiled: torch.compile with Inductor)")
    for column in ("method", "route", "context", "median ms", "first call s",
                   *(f"vs {name}" for _, name in _SLOWDOWN_COLUMNS)):
        table.add_column(column, justify="right")
    for r in report["records"]:
        if r["kind"] != "prefill":
            continue
        head = (r["method"], r.get("route", "eager"), context_label(r["context"]))
        if r["status"] != "ok":
            table.add_row(*head, r["status"], "", *("" for _ in _SLOWDOWN_COLUMNS))
            continue
        table.add_row(*head, f"{r['median_ms']:.1f}", f"{r['first_call_s']:.1f}",
                      *(_percent(r.get(key)) for key, _ in _SLOWDOWN_COLUMNS))
    return table


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:+.1f}%"


# ---------------------------------------------------------------------------------------------
# Command line


def _parse_methods(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in (n for n in names if n != "mac:calibrated"):  # that one needs --model
        try:
            parse_method(name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return names


def _parse_sizes_or_none(text: str) -> tuple[int, ...]:
    return () if text.strip().lower() == "none" else parse_sizes(text)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from macopt.bench import e2e_model

    parser = subparsers.add_parser(
        "e2e", help="end-to-end greedy decoding of a Llama-3.1-8B-shaped model, per method",
        description=__doc__.split("\n\n")[0],
        epilog="Methods: unmodified, exact, mac:all (forced hits), mac:TAU (mac:1: no hit), "
               "mac:calibrated (with --model), mac:FILE.json, topk_phi:BUDGET.")
    shape = ModelShape()
    defaults = E2EConfig()
    parser.add_argument("--model", default=None,
                        help="a local model directory (weights, tokenizer): decode real "
                             "held-out text with real prefills instead of the random-weight "
                             "Llama-8B shape (see macopt.bench.e2e_model)")
    parser.add_argument("--methods", type=_parse_methods, default=None,
                        help=f"default {','.join(DEFAULT_METHODS)}; with --model "
                             f"{','.join(e2e_model.DEFAULT_METHODS)}")
    parser.add_argument("--contexts", type=_parse_sizes_or_none, default=None,
                        help="default 8K,32K,64K,128K; with --model the longest that fits its "
                             "positions and the two powers of two below it; none: no decoding "
                             "(prefill points only)")
    parser.add_argument("--batches", type=parse_sizes, default=DEFAULT_BATCHES)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed decode steps")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--chunk", type=int, default=defaults.chunk,
                        help="tokens of the real prefill chunk ending at each context "
                             "(with --model the whole prompt is prefilled)")
    parser.add_argument("--prefill-contexts", type=_parse_sizes_or_none, default=None,
                        help="default 8K,32K (with --model: its longest context); none: skip")
    parser.add_argument("--prefill-methods", type=_parse_methods, default=None,
                        help=f"of --methods, default {','.join(DEFAULT_PREFILL_METHODS)} (with "
                             f"--model: {','.join(e2e_model.DEFAULT_PREFILL_METHODS)})")
    parser.add_argument("--prefill-repeats", type=int, default=defaults.prefill_repeats)
    parser.add_argument("--prefill-control", action=argparse.BooleanOptionalAction,
                        default=True, help="also prefill the unmodified model through the "
                                           "macopt_eager backend (the state ops' baseline)")
    parser.add_argument("--prefill-compiled", type=_parse_methods, default=(),
                        help="of --prefill-methods, those whose prefill is "
                             "also timed through torch.compile with Inductor, one cold compile "
                             "per point (e.g. unmodified,mac:all)")
    parser.add_argument("--per-context-cache", type=_parse_methods, default=(),
                        help="methods whose cache is sized per context (recompiles)")
    for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"default {getattr(shape, name)} (not with --model)")
    parser.add_argument("--rope-theta", type=float, default=None)
    parser.add_argument("--mac-ring-size", type=int, default=defaults.mac_ring_size)
    parser.add_argument("--mac-offset", type=int, default=defaults.mac_offset)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--backend", choices=("inductor", "eager"), default="inductor",
                        help="eager: macopt's passes without Inductor (fast compiles; tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip points that would end past this many seconds")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="decode only points with batch x context <= this (each batch's "
                             "shared cache is sized for its largest such context)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write an SVG of token latency vs context (one chart per batch)")
    parser.add_argument("--plot-from", type=Path, default=None,
                        help="only draw --plot from this saved report (no run)")
    parser.set_defaults(func=_main)
    return parser


def latency_plot(report: dict) -> str:
    """SVG: median ms per token vs context, a line per method and its bytes-roofline bound
    (dashed names ``... bound``), one chart per batch side by side."""
    from macopt.plot import line_chart, side_by_side

    charts = []
    decode = [r for r in report["records"] if r["kind"] == "decode" and r["status"] == "ok"]
    for batch in sorted({r["batch"] for r in decode}):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in decode:
            if r["batch"] == batch:
                series.setdefault(r["method"], []).append((r["context"] / 1024, r["median_ms"]))
                series.setdefault(f"{r['method']} bound", []).append(
                    (r["context"] / 1024, r["bound_ms"]))
        charts.append(line_chart(series, x_label="context (K tokens)", y_label="ms per token",
                                 title=f"batch {batch}", log_x=True))
    return side_by_side(charts)


_SHAPE_FLAGS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab",
                "rope_theta")


def config_from_args(args: argparse.Namespace) -> E2EConfig:
    """The run's config: flags as given, the rest the defaults of the synthetic model or of
    ``--model``'s (its shape, contexts within its positions, its methods)."""
    dtype = args.dtype or ("bfloat16" if timing.is_cuda(args.device) else "float32")
    given = {name: getattr(args, name) for name in _SHAPE_FLAGS
             if getattr(args, name) is not None}
    defaults = {"methods": DEFAULT_METHODS, "contexts": DEFAULT_CONTEXTS,
                "prefill_contexts": DEFAULT_PREFILL_CONTEXTS,
                "prefill_methods": DEFAULT_PREFILL_METHODS}
    if args.model is None:
        shape = ModelShape(**given)
    else:
        defaults, shape = _model_defaults(args, given)
    chosen = {name: default if getattr(args, name) is None else getattr(args, name)
              for name, default in defaults.items()}
    config = E2EConfig(
        shape=shape, batches=args.batches, steps=args.steps, warmup_steps=args.warmup_steps,
        chunk=args.chunk, prefill_repeats=args.prefill_repeats,
        prefill_control=args.prefill_control, prefill_compiled=args.prefill_compiled,
        per_context_cache=args.per_context_cache,
        mac_ring_size=args.mac_ring_size, mac_offset=args.mac_offset, device=args.device,
        dtype=DTYPES[dtype], backend=args.backend, seed=args.seed, budget_s=args.budget_s,
        max_batch_tokens=args.max_batch_tokens, model=args.model, **chosen)
    config.parsed_methods()  # a missing calibration file fails here, before any work
    if args.model is None:
        check_fits_host(shape, DTYPES[dtype], args.device)
    return config


def check_fits_host(shape: ModelShape, dtype: torch.dtype, device: str) -> None:
    """On CPU, refuse a synthetic model whose weights alone exceed the host's memory (the
    default is Llama-3.1-8B-shaped: 32 GB in fp32), saying what would run."""
    if timing.is_cuda(device):
        return
    needed = shape.parameters() * dtype.itemsize
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory:
        raise ValueError(
            f"the synthetic model's weights need {needed / 2**30:.0f} GiB "
            f"({str(dtype).removeprefix('torch.')}) and this host has {memory / 2**30:.0f} "
            "GiB. This benchmark is for a CUDA GPU (--device cuda); on CPU pass a small "
            "model (--model examples/tiny-lm) or a small shape (e.g. --layers 2 --hidden 512 "
            "--heads 8 --kv-heads 2 --intermediate 1024 --vocab 8192)")


def _model_defaults(args: argparse.Namespace, given: dict) -> tuple[dict, ModelShape]:
    from macopt.bench import e2e_model

    if given:
        raise ValueError(f"--model: the shape comes from the model's config; drop "
                         f"{', '.join('--' + n.replace('_', '-') for n in given)}")
    text = e2e_model.model_config(args.model)
    steps = args.warmup_steps + args.steps
    contexts = args.contexts if args.contexts is not None else \
        e2e_model.default_contexts(text.max_position_embeddings, steps)
    e2e_model.check_contexts(contexts + (args.prefill_contexts or ()),
                             text.max_position_embeddings, steps)
    defaults = {"methods": e2e_model.default_methods(args.model), "contexts": contexts,
                "prefill_contexts": (max(contexts),) if contexts else (),
                "prefill_methods": e2e_model.DEFAULT_PREFILL_METHODS}
    return defaults, shape_of(text)


def _main(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.plot_from is not None:
        if args.plot is None:
            print("macopt bench e2e: --plot-from needs --plot FILE.svg", file=sys.stderr)
            return 2
        args.plot.write_text(latency_plot(json.loads(args.plot_from.read_text())))
        print(f"wrote {args.plot}")
        return 0
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"macopt bench e2e: {err}", file=sys.stderr)
        return 2
    report = run(config, args.json, echo=lambda line: print(line, flush=True))
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs: tables without wrapped cells
    console.print(decode_table(report))
    console.print(health_table(report))
    if any(r["kind"] == "prefill" for r in report["records"]):
        console.print(prefill_table(report))
    if args.json is not None:
        console.print(f"wrote {args.json}")
    if args.plot is not None:
        args.plot.write_text(latency_plot(report))
        console.print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m macopt.bench.e2e ARGS`` is ``macopt bench e2e ARGS``."""
    from macopt import cli

    return cli.main(["bench", "e2e", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
