"""Methods side by side on one causal LM: perplexity, retrieval accuracy, greedy agreement
with the unmodified model, and per-layer stats.

Each method runs on a fresh deep copy of the model (``macopt.optimize`` tags modules in place),
eagerly: stateless methods (``exact``) take the unmodified attention path, stateful ones (MAC,
Top-K+phi) run the rewritten graph through macopt's eager backend, prefill and decode steps
alike. Every measurement runs a prefill into a static cache followed by single-token decode
steps (teacher-forced), because the methods change the decode steps only:

- ``perplexity``: held-out text in chunks of ``context`` tokens; in each chunk the first
  ``context - ppl_decode`` tokens are a prefill and the last ``ppl_decode`` are decode steps.
  ``perplexity`` scores every token of the chunk (after the first); ``decode_perplexity``
  only the tokens predicted by decode steps, the only ones a method changes (the whole
  chunk's figure dilutes a method's effect by ``context / ppl_decode``). ``decode_kl``: the
  mean KL divergence from the unmodified model's next-token distribution to the method's over
  the same decode steps, the expected log-perplexity increase on text the model predicts
  well, and far less noisy than a perplexity over a few hundred tokens.
- ``tasks``: greedy decoding of a few tokens after each task prompt; correct when the decoded
  text starts with the answer (after stripping leading whitespace).
- ``agreement``: the unmodified model greedily generates ``agreement_steps`` tokens after a
  prompt of ``context`` tokens of the text; each method is teacher-forced on those tokens.
  ``top1``: share of steps whose argmax is the unmodified model's token; ``first_divergence``:
  the first such step that differs (None: none); ``max_logit_error``: the largest absolute
  logit difference over all steps.
- ``keys``: keys read by the decode steps at positions ``>= t_min`` (MAC's; 0 for the other
  methods) against full attention's, summed over layers and query heads, and MAC's hit rate
  over the same steps (per layer too). MAC's counts come from ``macopt.stats``, read after
  every decode step; Top-K (+ phi) reads are counted from the config (sinks, tail, the
  page-rounded budget, the generated keys) plus what its selector and summary read, in
  key-row equivalents (:func:`topk_keys_read`); exact attention reads every key.
- ``stats``: ``macopt.stats`` per layer, accumulated over all of the method's runs above.
- ``topk_error`` (Top-K and Top-K + phi methods): attention-output relative L1 per layer and
  query head on the first perplexity chunk's real queries (:mod:`.topk_error`).

>>> result = evaluate(model, None, [None, macopt.ExactConfig()], text=text)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from macopt._hf_compat import cache_kwargs
from macopt.config import MACConfig, MACTopKPhiConfig, MethodConfig, TopKPhiConfig
from macopt.evaluation.tasks import Task, make_tasks
from macopt.method_spec import UNMODIFIED, Method, parse_method

Progress = Callable[[str], None]


def parse_methods(spec: str, model_dir: str | Path | None = None,
                  phi: str | Path | None = None) -> list[Method]:
    """``"exact,mac:0.45,mac:calibrated,topk:0.02,topk_phi:0.02"`` -> methods, the
    unmodified model first (specs: :mod:`macopt.method_spec`). ``phi``: a feature-map file
    (``macopt calibrate --method topk_phi``) every Top-K + phi completion uses (None: the
    config's seeded random features).
    """
    methods = [Method("unmodified", None)]
    for item in (s.strip() for s in spec.split(",")):
        if not item or item in UNMODIFIED:
            continue
        try:
            methods.append(_with_maps(parse_method(item, model_dir), phi))
        except (ValueError, TypeError, KeyError, OSError) as err:
            raise ValueError(f"--methods: cannot read {item!r}: {err}") from None
    return methods


def _with_maps(method: Method, phi: str | Path | None) -> Method:
    """The method with its Top-K + phi completions reading the feature maps file ``phi``."""
    if phi is None:
        return method

    def swap(config: MethodConfig | None) -> MethodConfig | None:
        if isinstance(config, TopKPhiConfig) and config.completion is not False:
            return dataclasses.replace(config, feature_maps=str(phi))
        if isinstance(config, MACTopKPhiConfig):
            return MACTopKPhiConfig(config.mac, swap(config.topk_phi))
        return config

    overrides = None if method.overrides is None else {
        name: swap(c) for name, c in method.overrides.items()}
    return Method(method.name, swap(method.config), overrides)


def byte_encoder(vocab_size: int) -> Callable[[str], list[int]]:
    """UTF-8 bytes as token ids (models without a tokenizer), as ``macopt generate`` does."""
    if vocab_size < 256:
        raise ValueError(f"the model has no tokenizer and a vocabulary of {vocab_size} ids, "
                         "too small for byte-level tokens")
    return lambda text: list(text.encode("utf-8"))


def text_codec(tokenizer: Any | None, vocab_size: int) -> tuple[Callable, Callable]:
    """(encode, decode) through the tokenizer, or UTF-8 bytes without one."""
    if tokenizer is None:
        return byte_encoder(vocab_size), lambda ids: bytes(
            i for i in ids if i < 256).decode("utf-8", errors="replace")
    return (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True))


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any | None,
    methods: Sequence[Method | MethodConfig | None],
    *,
    text: str,
    context: int = 512,
    ppl_chunks: int = 2,
    ppl_decode: int = 32,
    lengths: Sequence[int] = (256,),
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    kinds: Sequence[str] = ("passkey", "multikey"),
    samples: int = 1,
    agreement_steps: int = 32,
    needles: str = "prose",
    topk_queries: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Run every method; a JSON-able dict (see the module docstring for the measures)."""
    methods = [m if isinstance(m, Method) else Method(_name(m), m) for m in methods]
    if [m.config for m in methods[:1]] != [None]:
        methods.insert(0, Method("unmodified", None))
    names = [m.name for m in methods]
    if len(set(names)) != len(names) or None in [m.config for m in methods[1:]]:
        raise ValueError(f"methods: each once, the unmodified model first; got {names}")
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    encode, decode = text_codec(tokenizer, vocab)
    ids = encode(text)
    if len(ids) < context + 1:
        raise ValueError(f"the evaluation text has {len(ids)} tokens; need more than the "
                         f"context ({context})")
    if not 0 <= ppl_decode < context:
        raise ValueError(f"ppl_decode must be in [0, context), got {ppl_decode}")
    chunks = [ids[i * context:(i + 1) * context] for i in range(min(ppl_chunks,
                                                                    len(ids) // context))]
    chat = None
    if needles == "chat":
        from macopt.evaluation.tasks import chat_wrap

        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat needles need a tokenizer with a chat template")
        chat = chat_wrap(tokenizer)
    tasks = make_tasks(ids, encode, kinds=kinds, lengths=lengths, depths=depths, seed=seed,
                       samples=samples, style=needles, chat=chat)
    answer_tokens = max((len(t.answer_ids) for t in tasks), default=0) + 2
    prompt = ids[:context]
    max_len = max([context + agreement_steps] + [t.length + answer_tokens for t in tasks])
    tick = progress or (lambda _: None)

    results: dict[str, Any] = {}
    reference: dict[str, Any] = {}
    captured = None
    for method in methods:
        candidate = _prepare(model, method)
        cache = _Cache(candidate, max_len, device)
        meter = _KeyMeter(candidate, method.config, max_len, method.overrides)
        run = _Runner(candidate, cache, meter, device)
        with torch.no_grad(), _recompile_room():
            entry: dict[str, Any] = {"config": None if method.config is None
                                     else method.config.to_dict()}
            if method.overrides:
                entry["overrides"] = {k: None if c is None else c.to_dict()
                                      for k, c in method.overrides.items()}
            entry["perplexity"] = _perplexity(run, chunks, ppl_decode, tick, method.name,
                                              reference)
            entry["tasks"] = _run_tasks(run, tasks, answer_tokens, decode, tick, method.name)
            if method.config is None:
                reference.update(_greedy(run, prompt, agreement_steps))
                entry["agreement"] = {"steps": agreement_steps, "top1": 1.0,
                                      "first_divergence": None, "max_logit_error": 0.0}
            else:
                entry["agreement"] = _agreement(run, prompt, reference)
            tick(f"{method.name}: agreement")
        entry["keys"] = meter.report()
        entry["stats"] = _stats(candidate)
        entry["sites"] = _decode_sites(candidate) if method.config is not None else None
        del candidate, cache, run
        if isinstance(method.config, TopKPhiConfig) and chunks and ppl_decode:
            from macopt.evaluation import topk_error

            if captured is None:
                captured = topk_error.capture(_prepare(model, Method("unmodified", None)),
                                              chunks[0])
            entry["topk_error"] = topk_error.output_errors(
                captured, method.config, len(chunks[0]) - ppl_decode, max_len, topk_queries)
            tick(f"{method.name}: output error")
        results[method.name] = entry
    extra = {}
    if captured is not None:  # where Top-K bars look: the heads of high attention entropy
        from macopt.evaluation import topk_error

        extra["attention_entropy"] = topk_error.head_entropy(
            captured, len(chunks[0]) - ppl_decode, topk_queries)
    return {
        "settings": {"context": context, "ppl_chunks": len(chunks), "ppl_decode": ppl_decode,
                     "lengths": list(lengths), "depths": list(depths), "kinds": list(kinds),
                     "samples": samples, "agreement_steps": agreement_steps,
                     "needles": needles, "seed": seed, "text_tokens": len(ids),
                     "cache_length": max_len, "tokenizer": "bytes" if tokenizer is None
                     else type(tokenizer).__name__},
        "methods": results,
        **extra,
    }


def work_units(methods: Sequence[Method], *, ppl_chunks: int, n_tasks: int) -> int:
    """How many times ``evaluate`` calls ``progress`` (for a progress bar's total)."""
    topk = sum(isinstance(m.config, TopKPhiConfig) for m in methods)
    return len(methods) * (ppl_chunks + n_tasks + 1) + topk


def _name(config: MethodConfig | None) -> str:
    if config is None:
        return "unmodified"
    if isinstance(config, MACConfig):
        return f"mac:{config.tau:g}"
    if isinstance(config, TopKPhiConfig):
        return f"{'topk_phi' if config.completes else 'topk'}:{config.budget:g}"
    if isinstance(config, MACTopKPhiConfig):
        return f"mac_topk_phi:{config.topk_phi.budget:g}:{config.mac.tau:g}"
    return config.method


def _prepare(model: torch.nn.Module, method: Method) -> torch.nn.Module:
    """A fresh copy of ``model``, optimized with the method (unmodified: the copy as is,
    with the SDPA attention the methods start from)."""
    import macopt
    from macopt.api import _use_sdpa

    fresh = copy.deepcopy(model).eval()
    if method.config is None:
        _use_sdpa(fresh)
        return fresh
    return macopt.optimize(fresh, method.config, overrides=method.overrides)


class _recompile_room:
    """Methods on fresh copies share the model class's forward code: let dynamo compile
    each copy's prefill and decode graphs without hitting its recompile limit."""

    def __enter__(self):
        import torch._dynamo.config as dynamo_config

        self._config, self._saved = dynamo_config, dynamo_config.recompile_limit
        dynamo_config.recompile_limit = max(self._saved, 64)

    def __exit__(self, *exc):
        self._config.recompile_limit = self._saved


class _Cache:
    """One static cache per method copy, reset before each run: a fresh cache per run would
    give the traced graphs new tensors (and shapes) to guard on, and recompile every run."""

    def __init__(self, model: torch.nn.Module, max_len: int, device: torch.device):
        from macopt._hf_compat import static_cache

        dtype = next(model.parameters()).dtype
        self.cache, self.max_len = static_cache(model, 1, max_len, dtype, device), max_len

    def fresh(self, needed: int) -> Any:
        if needed > self.max_len:
            raise ValueError(f"internal: a run of {needed} tokens exceeds the cache "
                             f"({self.max_len})")
        self.cache.reset()
        return self.cache


def topk_keys_read(config: TopKPhiConfig, prefill: int, position: int, n_keys: int,
                   head_dim: int, itemsize: int, reads_summary: bool | None = None) -> float:
    """Key rows (K and V) a Top-K (+ phi) decode step at ``position`` reads per KV head,
    counting what its selection and completion read as key-row equivalents: the exact keys
    (sinks, tail, the retrieved keys, the generated keys), the page bounds (two K-only rows per
    page of the middle: one key row per page) or, for the exact selector, every middle key's K
    row (half a key row each), and the summary
    (:func:`macopt.topk_phi_select.summary_token_equivalent`) when the KV group reads it
    (``reads_summary``: any of its heads has completion on; None: ``config.completes``).
    Retrieved: the budget (rounded up to whole pages for the page selector), less the
    summary's whole tokens for a summary-reading group under ``summary_in_budget``
    (:func:`macopt.topk_phi_select.retrieved_tokens`). At most ``position + 1`` exact keys."""
    from macopt.topk_phi_select import retrieved_tokens, summary_budget_tokens

    reads_summary = config.completes if reads_summary is None else reads_summary
    middle = max(prefill - config.sinks - config.tail, 0)
    given_up = 0
    if config.summary_in_budget and reads_summary:
        given_up = summary_budget_tokens(head_dim, config.d_phi or head_dim, itemsize)
    page = config.page_size if config.selector == "page" else None
    budget = retrieved_tokens(config.budget_tokens(n_keys), given_up, page)
    exact = min(position + 1, config.sinks + config.tail + min(budget, middle)
                + position + 1 - prefill)
    return exact + topk_lookup_rows(config, middle, head_dim, itemsize, reads_summary,
                                    min(budget, middle))


def topk_lookup_rows(config: TopKPhiConfig, middle: int, head_dim: int, itemsize: int,
                     reads_summary: bool | None = None, retrieved: int = 0) -> float:
    """Key-row equivalents (K and V) a Top-K (+ phi) step reads per KV head besides the keys it
    attends, over a prompt middle of ``middle`` keys: the page bounds (two K-only rows per page:
    one key row) or, for the exact selector, every middle key's K row (half a key row each),
    for the sketch selector its 4-bit codes of ``C`` channels per middle key plus the K rows of
    its ``rerank * retrieved`` candidates, and the summary
    (:func:`macopt.topk_phi_select.summary_token_equivalent`) when the group reads it
    (``reads_summary``; None: ``config.completes``)."""
    from macopt.topk_phi_select import summary_token_equivalent

    reads_summary = config.completes if reads_summary is None else reads_summary
    if config.selector == "page":
        selection = -(-middle // config.page_size)
    elif config.selector == "sketch":
        channels = min(config.channels or max(1, head_dim // 4), head_dim)
        selection = (middle * channels / 2 / (2 * head_dim * itemsize)
                     + min(config.rerank * retrieved, middle) / 2)
    else:
        selection = middle / 2
    d_phi = config.d_phi or head_dim
    summary = summary_token_equivalent(head_dim, d_phi, itemsize) if reads_summary else 0
    return selection + summary


def summary_groups(config: TopKPhiConfig, layer: int, n_q_heads: int, n_kv_heads: int
                   ) -> list[bool]:
    """Per KV head of ``layer``: whether its group reads the summary (any head completes).

    >>> summary_groups(TopKPhiConfig(completion_overrides={1: {0: False}}), 1, 4, 2)
    [True, True]
    >>> summary_groups(TopKPhiConfig(completion_overrides={1: {0: False, 1: False}}), 1, 4, 2)
    [False, True]
    """
    flags = config.completion_for(layer, n_q_heads)
    group = n_q_heads // n_kv_heads
    return [any(flags[g * group:(g + 1) * group]) for g in range(n_kv_heads)]


class _KeyMeter:
    """Keys read by a method's decode steps past ``t_min`` (see the module docstring).

    MAC and MAC + Top-K + phi are counted from ``macopt.stats`` (the keys each query head
    attended); for MAC + Top-K + phi, each miss also reads the page bounds and summary of its
    Top-K + phi state, added per missing query head as :func:`topk_lookup_rows` key rows."""

    def __init__(self, model: torch.nn.Module, config: MethodConfig | None, n_keys: int,
                 overrides: dict[str, MethodConfig | None] | None = None):
        text = model.config.get_text_config()
        self.model, self.config, self.n_keys = model, config, n_keys
        self.overrides = overrides or {}
        self.layers = text.num_hidden_layers
        self.q_heads = text.num_attention_heads
        self.kv_heads = getattr(text, "num_key_value_heads", None) or self.q_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // self.q_heads
        self.itemsize = next(model.parameters()).element_size()
        self.counted = isinstance(config, MACConfig | MACTopKPhiConfig)  # by the ops' counters
        mac = config.mac if isinstance(config, MACTopKPhiConfig) else config
        self.t_min = mac.t_min if isinstance(mac, MACConfig) else 0
        self.read = self.full = self.steps = 0.0
        self.layer_counts: dict[str, list[float]] = {}  # layer: [hits, queries, read, full]
        self._last: dict[str, tuple[float, float, float, int]] = {}
        self.prefill = 0

    def start(self, prefill: int) -> None:
        """A new sequence whose prompt is ``prefill`` tokens long."""
        self.prefill = prefill
        if self.counted:
            self._last = self._mac_counts()

    def step(self, position: int) -> None:
        """Count the decode step that just ran at ``position``."""
        if self.counted:
            now = self._mac_counts()
            if position >= self.t_min:
                for layer, (hits, read, full, steps) in now.items():
                    old = self._last.get(layer, (0.0, 0.0, 0.0, 0))
                    queries = (steps - old[3]) * self.q_heads
                    read = read - old[1] + (queries - hits + old[0]) * self._miss_lookup(layer)
                    counts = self.layer_counts.setdefault(layer, [0.0, 0.0, 0.0, 0.0])
                    counts[0] += hits - old[0]
                    counts[1] += queries
                    counts[2] += read
                    counts[3] += full - old[2]
                    self.read += read
                    self.full += full - old[2]
                self.steps += 1
            self._last = now
            return
        if position < self.t_min:
            return
        read = (position + 1) * self.kv_heads * self.layers
        if isinstance(self.config, TopKPhiConfig) and self.prefill:
            read = self._topk_read(self.config, position)
        self.read += read
        self.full += (position + 1) * self.kv_heads * self.layers
        self.steps += 1

    def _topk_read(self, config: TopKPhiConfig, position: int) -> float:
        """Key rows a Top-K (+ phi) step reads over every layer and KV head, each group
        counted with or without its summary."""
        read = {on: topk_keys_read(config, self.prefill, position, self.n_keys, self.head_dim,
                                   self.itemsize, reads_summary=on) for on in (False, True)}
        return sum(read[on] for layer in range(self.layers)
                   for on in summary_groups(config, layer, self.q_heads, self.kv_heads))

    def _miss_lookup(self, layer: str) -> float:
        """Key rows a MAC + Top-K + phi miss reads besides its keys (0 for MAC)."""
        config = self.overrides.get(layer, self.config)
        if not isinstance(config, MACTopKPhiConfig):
            return 0.0
        middle = max(self.prefill - config.topk_phi.sinks - config.summary_tail, 0)
        return topk_lookup_rows(config.topk_phi, middle, self.head_dim, self.itemsize)

    def _mac_counts(self) -> dict[str, tuple[float, float, float, int]]:
        """Per layer: (hits, keys read, keys full, decode steps), cumulative (batch 1); layers
        that count keys only (Top-K + phi sites count their steps but not their keys)."""
        import macopt

        return {s.layer: (sum(s.head_hit_rates) * s.decode_steps, s.keys_read, s.keys_full,
                          s.decode_steps)
                for s in macopt.stats(self.model) if s.keys_read is not None}

    def report(self) -> dict:
        layers = [{"layer": layer, "hit_rate": c[0] / c[1] if c[1] else 0.0,
                   "read_fraction": c[2] / c[3] if c[3] else 1.0}
                  for layer, c in self.layer_counts.items()]
        hits = sum(c[0] for c in self.layer_counts.values())
        queries = sum(c[1] for c in self.layer_counts.values())
        fraction = self.read / self.full if self.full else 1.0
        return {"t_min": self.t_min, "decode_steps": int(self.steps), "read": self.read,
                "full": self.full, "read_fraction": fraction,
                "reduction": 1.0 / fraction if fraction else float("inf"),
                "hit_rate": hits / queries if queries else None, "layers": layers}


class _Runner:
    """A method's copy, its static cache and key meter: runs prefills and decode steps."""

    def __init__(self, model, cache: _Cache, meter: _KeyMeter, device: torch.device):
        self.model, self.cache, self.meter, self.device = model, cache, meter, device

    def forward(self, ids: list[int], prefill: int) -> torch.Tensor:
        """Logits ``[len(ids), vocab]`` (fp32): a prefill of ``ids[:prefill]`` into the static
        cache then one decode step per remaining id (teacher forcing)."""
        cache = self.cache.fresh(len(ids))
        tokens = torch.tensor([ids], device=self.device)
        logits = [self._step(tokens[:, :prefill], cache, 0)]
        self.meter.start(prefill)
        for t in range(prefill, len(ids)):
            logits.append(self._step(tokens[:, t:t + 1], cache, t))
            self.meter.step(t)
        return torch.cat(logits, dim=0)

    def generate(self, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
        """Greedy: ``steps`` new tokens after ``prompt`` and the logits that chose them."""
        cache = self.cache.fresh(len(prompt) + steps)
        logits = [self._step(torch.tensor([prompt], device=self.device), cache, 0)[-1]]
        self.meter.start(len(prompt))
        tokens = [int(logits[-1].argmax())]
        for t in range(len(prompt), len(prompt) + steps - 1):
            ids = torch.tensor([[tokens[-1]]], device=self.device)
            logits.append(self._step(ids, cache, t)[-1])
            self.meter.step(t)
            tokens.append(int(logits[-1].argmax()))
        return tokens, torch.stack(logits)

    def _step(self, ids: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
        # Batch 1, no padding: no attention mask (one input fewer whose shape changes per step).
        position = torch.arange(start, start + ids.shape[1], device=ids.device)
        out = self.model(input_ids=ids, **cache_kwargs(self.model, cache), cache_position=position,
                         use_cache=True)
        return out.logits[0].float()


def _perplexity(run: _Runner, chunks, ppl_decode, tick, name, reference: dict) -> dict:
    """Perplexities of ``chunks``; the unmodified model's run (an empty ``reference``)
    leaves its decode steps' log-probabilities there for the others' KL."""
    nll = decode_nll = kl = 0.0
    count = decode_count = 0
    decode_logp = reference.setdefault("decode_logp", [])
    for i, chunk in enumerate(chunks):
        prefill = len(chunk) - ppl_decode
        logits = run.forward(chunk, prefill)
        target = torch.tensor(chunk[1:], device=logits.device)
        losses = torch.nn.functional.cross_entropy(logits[:-1], target, reduction="none")
        nll += losses.sum().item()
        count += len(chunk) - 1
        decode_nll += losses[prefill:].sum().item()  # logits[prefill:] come from decode steps
        decode_count += len(chunk) - 1 - prefill
        logp = torch.log_softmax(logits[prefill:-1], dim=-1)
        if len(decode_logp) <= i:
            decode_logp.append(logp)
        kl += (decode_logp[i].exp() * (decode_logp[i] - logp)).sum().item()
        tick(f"{name}: perplexity")
    mean = nll / count if count else float("nan")
    decode_mean = decode_nll / decode_count if decode_count else float("nan")
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count,
            "decode_perplexity": math.exp(decode_mean), "decode_nll": decode_mean,
            "decode_tokens": decode_count,
            "decode_kl": kl / decode_count if decode_count else float("nan")}


def _run_tasks(run: _Runner, tasks: list[Task], answer_tokens: int, decode, tick,
               name) -> dict:
    rows = []
    for task in tasks:
        tokens, _ = run.generate(task.prompt_ids, answer_tokens)
        output = decode(tokens)
        rows.append({**task.to_dict(), "output": output,
                     "correct": output.lstrip().startswith(task.answer)})
        tick(f"{name}: {task.kind} {task.length}@{task.depth:g}")
    by_kind: dict[str, list[bool]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row["correct"])
    accuracy = {k: sum(v) / len(v) for k, v in by_kind.items()}
    overall = sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")
    return {"accuracy": overall, "by_kind": accuracy, "items": rows}


def _greedy(run: _Runner, prompt: list[int], steps: int) -> dict:
    tokens, logits = run.generate(prompt, steps)
    return {"tokens": tokens, "logits": logits}


def _agreement(run: _Runner, prompt: list[int], reference: dict) -> dict:
    tokens = reference["tokens"]
    # The prompt is a prefill; the reference's tokens (but the last) are decode steps.
    logits = run.forward(prompt + tokens[:-1], len(prompt))[len(prompt) - 1:]
    chosen = logits.argmax(-1).tolist()
    same = [a == b for a, b in zip(chosen, tokens, strict=True)]
    return {"steps": len(tokens), "top1": sum(same) / len(same),
            "first_divergence": next((i for i, s in enumerate(same) if not s), None),
            "max_logit_error": (logits - reference["logits"]).abs().max().item()}


def _decode_sites(model: torch.nn.Module) -> dict:
    """How many decode attention sites the passes rewrote, and why others were skipped: a
    method that rewrote none measured the unmodified model (stateless methods run eagerly
    without the passes; a skipped site says why). ``modules``: how many modules those
    rewritten sites belong to (one per attention layer, unless a layer had two decode graphs
    with different reports)."""
    from macopt.passes import scope

    reports = [(m, r) for m in model.modules() for r in scope.reports_of(m)
               if r.phase == "decode"]
    rewritten = [m for m, r in reports if r.decision == "rewritten"]
    return {"rewritten": len(rewritten), "modules": len({id(m) for m in rewritten}),
            "skipped": sorted({r.reason for _, r in reports if r.decision != "rewritten"})}


def _stats(model: torch.nn.Module) -> list[dict]:
    import macopt

    return [{"layer": s.layer, "method": s.method, "decode_steps": s.decode_steps,
             "prefills": s.prefills, "hit_rate": s.hit_rate, "keys_read": s.keys_read,
             "keys_full": s.keys_full, "read_fraction": s.read_fraction}
            for s in macopt.stats(model)]
