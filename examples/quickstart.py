"""The README's Quick start, run as written, with checks (``python examples/quickstart.py``).

    python examples/quickstart.py [MODEL_DIR] --method exact|mac|topk_phi

Without MODEL_DIR a random-weight Llama (Llama-3.1-8B widths, 4 layers) stands in for
``from_pretrained``. Checks: decode sites were rewritten (``macopt.explain``), stateful methods
ran decode steps (``macopt.stats``), and with ``exact`` the tokens equal the unmodified model's.
"""

import argparse
import copy

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import macopt

CONFIGS = {"exact": macopt.ExactConfig, "mac": macopt.MACConfig,
           "topk_phi": macopt.TopKPhiConfig}


def load(path: str | None, device: str) -> torch.nn.Module:
    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, max_position_embeddings=16384,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--method", choices=sorted(CONFIGS), default="mac")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(args.model, device)
    reference = copy.deepcopy(model)
    ids = torch.randint(2, 32000, (1, args.prompt_tokens), device=device,
                        generator=torch.Generator(device).manual_seed(0))

    # --- the README's Quick start ---
    macopt.optimize(model, CONFIGS[args.method]())  # in place
    out = model.generate(ids, max_new_tokens=64, cache_implementation="static")
    print(macopt.stats(model))                       # hit rate, keys read, per layer
    print(macopt.explain(model))                     # which attention sites were rewritten, why
    # --- end ---

    decode = [r for r in macopt.explain(model) if r.phase == "decode"]
    assert decode and all(r.rewritten for r in decode), [(r.layer, r.reason) for r in decode]
    if args.method == "mac":  # Top-K + phi sites keep no step counters (macopt.stats)
        assert all(s.decode_steps for s in macopt.stats(model)), "no decode step ran"
    want = reference.generate(ids, max_new_tokens=64, cache_implementation="static")
    same = torch.equal(out, want)
    print(f"{args.method}: {len(decode)} decode sites rewritten; tokens equal to the "
          f"unmodified model's: {same}")
    if args.method == "exact":
        assert same, "exact must give the unmodified model's tokens"


if __name__ == "__main__":
    main()
