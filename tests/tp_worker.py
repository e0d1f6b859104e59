"""One rank of tests/test_tensor_parallel.py, run under ``torchrun --nproc-per-node 2``.

Loads a tiny random Llama (8 query heads, 4 KV heads) twice: sharded by transformers' own
``tp_plan="auto"`` (gloo on CPU) and whole; runs each case's greedy generation on both, and
saves tokens, logits, stats and ring shapes to ``OUT/rank<r>.pt`` for the test to compare. The
whole model runs on every rank (tiny), so every rank compares against it in its own file.

    torchrun --nproc-per-node 2 tests/tp_worker.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import DistributedConfig, LlamaConfig, LlamaForCausalLM

import macopt
from macopt import _hf_compat, state
from macopt.passes import scope

LLAMA = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4, head_dim=64,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=None, pad_token_id=0)
NEW_TOKENS = 24
# Repetitive prompt: MAC's decode queries come back close to ring entries, so HITS hits.
PROMPT = torch.tensor([[5, 17, 42, 99, 7, 63] * 4])
HITS = macopt.MACConfig(ring_size=16, offset=4, tau=0.95, t_min=0)
# name: (config, static cache: the cache is allocated by macopt with this rank's KV heads)
CASES = {
    "exact": (macopt.ExactConfig(), True),
    "mac_exact": (macopt.MACConfig(tau=1.0), False),
    "mac_hits": (HITS, False),
    "mac_hits_static": (HITS, True),
    "topk_phi": (macopt.TopKPhiConfig(), False),  # random phi maps: the rank's heads of them
}


def save_model(folder: Path, **overrides: int) -> Path:
    """Rank 0 writes the random model once; the others wait for it."""
    if dist.get_rank() == 0 and not folder.exists():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).save_pretrained(folder)
    dist.barrier()
    return folder


def load(folder: Path, tp_plan: str | dict | None = None) -> torch.nn.Module:
    """The model, sharded over the ranks by transformers when ``tp_plan`` is given."""
    sharding = {} if tp_plan is None else {"distributed_config": DistributedConfig(tp_plan=tp_plan)}
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, **sharding).eval()


@torch.no_grad()
def generate(model: torch.nn.Module, compiled: bool, static: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and logits; ``compiled``: generate() compiles its static-cache decode
    step with the macopt_eager backend (the passes rewrite it, no Inductor: fast on CPU)."""
    extra = dict(cache_implementation="static") if static or compiled else {}
    if compiled:
        extra |= dict(disable_compile=False,
                      compile_config=_hf_compat.compile_config(backend="macopt_eager"))
    out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, output_logits=True, return_dict_in_generate=True,
                         **extra)
    return out.sequences[:, PROMPT.shape[1]:], torch.stack(out.logits, 1)


def state_heads(model: torch.nn.Module) -> list[int]:
    """Heads each site's state holds on this rank: query heads of a MAC ring, KV heads of a
    Top-K + phi summary."""
    sites = [state.get(scope.site_id_of(m)) for m in model.modules()
             if scope.site_id_of(m) is not None]
    held = {"mac": lambda b: b.q.shape[1], "topk_phi": lambda b: b.m.shape[1]}
    return [held[s.method](s.buffers) for s in sites if s is not None]


def run_case(folder: Path, config: macopt.MethodConfig, static: bool) -> dict:
    compiled = not config.keeps_state  # exact rewrites compiled graphs only
    result = {}
    for name, plan in (("sharded", "auto"), ("whole", None)):
        model = macopt.optimize(load(folder, plan), config)
        tokens, logits = generate(model, compiled, static)
        explanation = macopt.explain(model)
        result[name] = dict(tokens=tokens, logits=logits, title=explanation.title,
                            rewritten=len(explanation.rewritten), state_heads=state_heads(model))
        if config.keeps_state:
            result[name]["stats"] = [(s.head_hit_rates, s.decode_steps, s.keys_read,
                                      s.keys_full, s.nbytes) for s in macopt.stats(model)]
            if name == "sharded":
                result[name]["local_stats"] = [
                    (s.head_hit_rates, s.nbytes) for s in macopt.stats(model, gather=False)]
    return result


def refusal(folder: Path, tp_plan: str | dict) -> str:
    """The message optimize() raises for a sharding it cannot run ('' if it did not raise)."""
    model = load(folder, tp_plan)
    try:
        macopt.optimize(model, macopt.MACConfig(tau=1.0))
    except ValueError as error:
        return str(error)
    return ""


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    folder = save_model(out / "llama")
    results = {case: run_case(folder, *args) for case, args in CASES.items()}
    results["unmodified"] = {name: generate(load(folder, plan), False) for name, plan in
                             (("sharded", "auto"), ("whole", None))}
    # 3 KV heads over 2 ranks: k_proj's 192 rows split at row 96, inside head 1.
    uneven = save_model(out / "llama_kv3", num_attention_heads=6, num_key_value_heads=3,
                        hidden_size=192)
    results["refused_uneven"] = refusal(uneven, "auto")
    # Query heads sharded, keys and values gathered: rank 0's query heads 0-3 against KV
    # heads 0-3, where local GQA would pair query head 1 with KV head 1 (it needs KV head 0).
    # The whole attention plan: transformers 5.17 takes a dict as the plan, 5.2x merges it.
    styles = dict(q_proj="colwise", k_proj="colwise_gather_output",
                  v_proj="colwise_gather_output", o_proj="rowwise")
    gathered = {f"model.layers.*.self_attn.{p}": style for p, style in styles.items()}
    results["refused_split_group"] = refusal(folder, gathered)
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
