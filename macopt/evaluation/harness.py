"""Methods side by side on one causal LM: perplexity, retrieval accuracy, greedy agreement
with the unmodified model, and per-layer stats.

Each method runs on a fresh deep copy of the model (``macopt.optimize`` tags modules in place),
eagerly: stateless methods (``exact``) take the unmodified attention path, stateful ones (MAC,
Top-K+phi) run the rewritten graph through macopt's eager backend, prefill and decode steps
alike. Every measurement runs a prefill into a static cache followed by single-token decode
steps (teacher-forced), because the methods change the decode steps only:

- ``perplexity``: held-out text in chunks of ``context`` tokens; in each chunk the first
  ``context - ppl_decode`` tokens are a prefill and the last ``ppl_decode`` are decode steps;
  every token of the chunk (after the first) is scored.
- ``tasks``: greedy decoding of a few tokens after each task prompt; correct when the decoded
  text starts with the answer (after stripping leading whitespace).
- ``agreement``: the unmodified model greedily generates ``agreement_steps`` tokens after a
  prompt of ``context`` tokens of the text; each method is teacher-forced on those tokens.
  ``top1``: share of steps whose argmax is the unmodified model's token; ``first_divergence``:
  the first such step that differs (None: none); ``max_logit_error``: the largest absolute
  logit difference over all steps.
- ``stats``: ``macopt.stats`` per layer, accumulated over all of the method's runs above.

>>> result = evaluate(model, None, [None, macopt.ExactConfig()], text=text)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from macopt.config import ExactConfig, MACConfig, MethodConfig, TopKPhiConfig
from macopt.evaluation.tasks import Task, make_tasks

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Method:
    """A named method config (None: the unmodified model)."""

    name: str
    config: MethodConfig | None


def parse_methods(spec: str) -> list[Method]:
    """``"exact,mac:0.45,mac:0.3,topk_phi:0.02"`` -> methods, the unmodified model first.

    ``mac:TAU`` sets ``MACConfig.tau``; ``topk_phi:BUDGET`` sets ``TopKPhiConfig.budget``
    (an int: tokens; a float in (0, 1]: a fraction); ``none`` is the unmodified model.
    """
    methods = [Method("unmodified", None)]
    for item in (s.strip() for s in spec.split(",")):
        if not item or item in ("none", "unmodified"):
            continue
        name, _, arg = item.partition(":")
        try:
            if name == "exact" and not arg:
                config: MethodConfig = ExactConfig()
            elif name == "mac":
                config = MACConfig(tau=float(arg)) if arg else MACConfig()
            elif name == "topk_phi":
                budget = (int(arg) if arg.isdigit() else float(arg)) if arg else None
                config = TopKPhiConfig(budget=budget) if arg else TopKPhiConfig()
            else:
                config = MethodConfig.from_dict({"method": name}) if not arg else None
                if config is None:
                    raise ValueError(f"method {name!r} takes no argument")
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"--methods: cannot read {item!r}: {err}") from None
        methods.append(Method(item, config))
    return methods


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
    tasks = make_tasks(ids, encode, kinds=kinds, lengths=lengths, depths=depths, seed=seed,
                       samples=samples)
    answer_tokens = max((len(t.answer_ids) for t in tasks), default=0) + 2
    prompt = ids[:context]
    max_len = max([context + agreement_steps] + [t.length + answer_tokens for t in tasks])
    tick = progress or (lambda _: None)

    results: dict[str, Any] = {}
    reference: dict[str, Any] = {}
    for method in methods:
        candidate = _prepare(model, method.config)
        cache = _Cache(candidate, max_len, device)
        with torch.no_grad(), _recompile_room():
            entry: dict[str, Any] = {"config": None if method.config is None
                                     else method.config.to_dict()}
            entry["perplexity"] = _perplexity(candidate, chunks, ppl_decode, device, cache,
                                              tick, method.name)
            entry["tasks"] = _run_tasks(candidate, tasks, answer_tokens, decode, device, cache,
                                        tick, method.name)
            if method.config is None:
                reference = _greedy(candidate, prompt, agreement_steps, device, cache)
                entry["agreement"] = {"steps": agreement_steps, "top1": 1.0,
                                      "first_divergence": None, "max_logit_error": 0.0}
            else:
                entry["agreement"] = _agreement(candidate, prompt, reference, device, cache)
            tick(f"{method.name}: agreement")
        entry["stats"] = _stats(candidate)
        results[method.name] = entry
        del candidate, cache
    return {
        "settings": {"context": context, "ppl_chunks": len(chunks), "ppl_decode": ppl_decode,
                     "lengths": list(lengths), "depths": list(depths), "kinds": list(kinds),
                     "samples": samples, "agreement_steps": agreement_steps, "seed": seed,
                     "text_tokens": len(ids), "tokenizer": "bytes" if tokenizer is None
                     else type(tokenizer).__name__},
        "methods": results,
    }


def work_units(methods: int, *, ppl_chunks: int, n_tasks: int) -> int:
    """How many times ``evaluate`` calls ``progress`` (for a progress bar's total)."""
    return methods * (ppl_chunks + n_tasks + 1)


def _name(config: MethodConfig | None) -> str:
    if config is None:
        return "unmodified"
    if isinstance(config, MACConfig):
        return f"mac:{config.tau:g}"
    if isinstance(config, TopKPhiConfig):
        return f"topk_phi:{config.budget:g}"
    return config.method


def _prepare(model: torch.nn.Module, config: MethodConfig | None) -> torch.nn.Module:
    """A fresh copy of ``model``, optimized with ``config`` (None: the copy as is, sdpa)."""
    import macopt
    from macopt.api import _use_sdpa

    fresh = copy.deepcopy(model).eval()
    if config is None:
        _use_sdpa(fresh)  # the same attention implementation the methods start from
        return fresh
    return macopt.optimize(fresh, config)


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


def _forward(model: torch.nn.Module, ids: list[int], prefill: int, device: torch.device,
             cache: _Cache) -> torch.Tensor:
    """Logits ``[len(ids), vocab]`` (fp32): a prefill of ``ids[:prefill]`` into the static
    cache then one decode step per remaining id (teacher forcing)."""
    cache = cache.fresh(len(ids))
    tokens = torch.tensor([ids], device=device)
    logits = [_step(model, tokens[:, :prefill], cache, 0)]
    for t in range(prefill, len(ids)):
        logits.append(_step(model, tokens[:, t:t + 1], cache, t))
    return torch.cat(logits, dim=0)


def _step(model: torch.nn.Module, ids: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
    # Batch 1, no padding: no attention mask (one input fewer whose shape changes per step).
    position = torch.arange(start, start + ids.shape[1], device=ids.device)
    out = model(input_ids=ids, past_key_values=cache, cache_position=position, use_cache=True)
    return out.logits[0].float()


def _perplexity(model, chunks, ppl_decode, device, cache, tick, name) -> dict:
    nll, count = 0.0, 0
    for chunk in chunks:
        logits = _forward(model, chunk, len(chunk) - ppl_decode, device, cache)
        target = torch.tensor(chunk[1:], device=device)
        nll += torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum").item()
        count += len(chunk) - 1
        tick(f"{name}: perplexity")
    mean = nll / count if count else float("nan")
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count}


def _generate(model, prompt: list[int], steps: int, device,
              cache: _Cache) -> tuple[list[int], torch.Tensor]:
    """Greedy: ``steps`` new tokens after ``prompt`` and the logits that chose them."""
    cache = cache.fresh(len(prompt) + steps)
    logits = [_step(model, torch.tensor([prompt], device=device), cache, 0)[-1]]
    tokens = [int(logits[-1].argmax())]
    for t in range(len(prompt), len(prompt) + steps - 1):
        logits.append(_step(model, torch.tensor([[tokens[-1]]], device=device), cache, t)[-1])
        tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits)


def _run_tasks(model, tasks: list[Task], answer_tokens: int, decode, device, cache, tick,
               name) -> dict:
    rows = []
    for task in tasks:
        tokens, _ = _generate(model, task.prompt_ids, answer_tokens, device, cache)
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


def _greedy(model, prompt: list[int], steps: int, device, cache: _Cache) -> dict:
    tokens, logits = _generate(model, prompt, steps, device, cache)
    return {"tokens": tokens, "logits": logits}


def _agreement(model, prompt: list[int], reference: dict, device, cache: _Cache) -> dict:
    tokens = reference["tokens"]
    # The prompt is a prefill; the reference's tokens (but the last) are decode steps.
    logits = _forward(model, prompt + tokens[:-1], len(prompt), device,
                      cache)[len(prompt) - 1:]
    chosen = logits.argmax(-1).tolist()
    same = [a == b for a, b in zip(chosen, tokens, strict=True)]
    return {"steps": len(tokens), "top1": sum(same) / len(same),
            "first_divergence": next((i for i, s in enumerate(same) if not s), None),
            "max_logit_error": (logits - reference["logits"]).abs().max().item()}


def _stats(model: torch.nn.Module) -> list[dict]:
    import macopt

    return [{"layer": s.layer, "method": s.method, "decode_steps": s.decode_steps,
             "prefills": s.prefills, "hit_rate": s.hit_rate, "keys_read": s.keys_read,
             "keys_full": s.keys_full, "read_fraction": s.read_fraction}
            for s in macopt.stats(model)]


def table(result: dict, title: str = "macopt eval") -> Any:
    """A rich table: one row per method."""
    from rich.table import Table

    out = Table(title=title)
    for column in ("method", "perplexity", "task accuracy", "top-1 agreement",
                   "first divergence", "max logit error", "hit rate", "keys read / full"):
        out.add_column(column, justify="left" if column == "method" else "right")
    for name, entry in result["methods"].items():
        stats = entry["stats"]
        read = sum(s["keys_read"] for s in stats)
        full = sum(s["keys_full"] for s in stats)
        steps = [s["hit_rate"] for s in stats if s["decode_steps"]]
        agreement = entry["agreement"]
        divergence = agreement["first_divergence"]
        out.add_row(name, f"{entry['perplexity']['perplexity']:.4f}",
                    f"{entry['tasks']['accuracy']:.3f}", f"{agreement['top1']:.3f}",
                    "-" if divergence is None else str(divergence),
                    f"{agreement['max_logit_error']:.2e}",
                    f"{sum(steps) / len(steps):.3f}" if steps else "-",
                    f"{read / full:.3f}" if full else "-")
    return out
