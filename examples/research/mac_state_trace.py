"""Which MAC site states exist, with their specs, after the prefill, after a compiled decode step
and after an eager one, on CUDA (BENCHMARKS.md 16: under mode="reduce-overhead" the rings were
allocated again by the first compiled step's match, inside the CUDA-graph pool).

    cd /tmp && python3 REPO/examples/research/mac_state_trace.py [DEVICE]   (default cuda)
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

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"


def show(tag: str) -> None:
    """Each site's method, spec, ring address and filled slots (pos >= 0)."""
    print(tag, {k: (s.method, s.spec, s.buffers.q.data_ptr(), int((s.buffers.pos >= 0).sum()))
                for k, s in state._STATES.items()}, flush=True)


@torch.no_grad()
def trace(mode: str) -> None:
    reference = ZOO["llama"].build().to(DEVICE)
    reference.set_attn_implementation("sdpa")
    config = macopt.MACConfig(ring_size=16, offset=4, tau=1.0, t_min=0, max_chain_depth=2**30)
    model = macopt.optimize(copy.deepcopy(reference), config)
    prompt = torch.randint(2, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    cache = static_cache(model, 1, 64, torch.float32, DEVICE)
    logits = model(input_ids=prompt.to(DEVICE), past_key_values=cache, use_cache=True).logits
    show(f"[{mode}] after prefill")
    if mode == "default":
        print(macopt.explain(model), flush=True)
    ids = logits[:, -1:].argmax(-1)

    def step(ids, cache):
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits

    compiled = torch.compile(step, mode=mode, fullgraph=True)
    try:
        for i in range(3):
            ids = compiled(ids, cache).clone()[:, -1:].argmax(-1)
            show(f"[{mode}] after compiled step {i}")
    except RuntimeError as error:
        show(f"[{mode}] at the error ({str(error)[:90]})")
    ids = step(ids, cache)[:, -1:].argmax(-1)
    show(f"[{mode}] after an eager step")


def main() -> None:
    for mode in ("default", "reduce-overhead"):
        state._STATES.clear()
        trace(mode)
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
