"""Which MAC site states exist, with their specs, after the prefill, after a compiled decode step
and after an eager one, on CUDA (BENCHMARKS.md 16: under mode="reduce-overhead" the rings were
allocated again by the first compiled step's match, inside the CUDA-graph pool).

    cd /tmp && python3 REPO/examples/research/mac_state_trace.py
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from model_zoo import VOCAB, ZOO  # noqa: E402

import macopt  # noqa: E402
from macopt import state  # noqa: E402
from macopt._hf_compat import static_cache  # noqa: E402


def show(tag: str) -> None:
    print(tag, {k: (s.method, s.spec, s.buffers.q.data_ptr()) for k, s in state._STATES.items()},
          flush=True)


@torch.no_grad()
def main() -> None:
    reference = ZOO["llama"].build().cuda()
    reference.set_attn_implementation("sdpa")
    config = macopt.MACConfig(ring_size=16, offset=4, tau=1.0, t_min=0, max_chain_depth=2**30)
    model = macopt.optimize(copy.deepcopy(reference), config)
    prompt = torch.randint(2, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    cache = static_cache(model, 1, 64, torch.float32, "cuda")
    logits = model(input_ids=prompt.cuda(), past_key_values=cache, use_cache=True).logits
    show("after prefill")
    ids = logits[:, -1:].argmax(-1)

    def step(ids, cache):
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits

    compiled = torch.compile(step, fullgraph=True)
    for i in range(2):
        ids = compiled(ids, cache)[:, -1:].argmax(-1)
        show(f"after compiled step {i}")
    ids = step(ids, cache)[:, -1:].argmax(-1)
    show("after an eager step")
    print(macopt.explain(model))


if __name__ == "__main__":
    main()
