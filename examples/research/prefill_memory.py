"""Peak host memory of one ``generate()`` on the CPU after ``macopt.optimize``: does a method's
prefill route hold memory that grows with the prompt length squared?

    python -m examples.research.prefill_memory N METHOD      # METHOD: unmodified | exact | mac

One process per point (``ru_maxrss`` is a process-wide peak). A one-layer Llama (head dim 64,
random weights), static cache, two new tokens. Measured 2026-12-06 (BENCHMARKS.md 13a): MAC's
traced prefill route grows ~N^2 (+0.45 GiB at 4K, +1.6 GiB at 8K over exact), unmodified and
exact do not; on the H100 at 128K the MAC rows peak ~13 GiB above exact. Two causes, both
fixed (2026-12-06, later): transformers' mask over the whole cache under tracing
(macopt/prompt_mask.py) and the CPU reference's ring builder computing every prompt query's
state rather than the last ring-size ones. After: MAC +107 / +178 / +319 MiB at 4K / 8K / 16K
(exact +58 MiB at 8K): linear.
"""

import resource
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import macopt


def main() -> None:
    n, method = int(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=256,
                         max_position_embeddings=n + 64)
    model = LlamaForCausalLM(config).eval()
    configs = {"exact": macopt.ExactConfig(), "mac": macopt.MACConfig()}
    if method != "unmodified":
        macopt.optimize(model, configs[method])
    ids = torch.randint(0, 256, (1, n))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                       do_sample=False, cache_implementation="static")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{method} n={n}: peak RSS {after / 1024:.0f} MiB "
          f"(+{(after - before) / 1024:.0f} MiB during generate)")


if __name__ == "__main__":
    main()
