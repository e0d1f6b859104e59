"""macopt on a model that transformers shards over several processes (tensor parallelism).

    torchrun --nproc-per-node 2 examples/tensor_parallel.py MODEL_DIR --method mac

transformers starts torch.distributed itself (NCCL with one GPU per process, gloo on CPU),
splits each layer's attention heads and KV heads over the ranks (``tp_plan="auto"``), and
all-reduces after ``o_proj``. macopt runs inside that: every rank optimizes its own shard, its
per-layer state holds only its heads, ``macopt.stats`` gathers the counters of every rank (a
collective: every rank calls it) and ``macopt.explain`` says which heads this rank holds.

``--prompt-ids 5,17,42`` gives the prompt as token ids (a model folder without a tokenizer);
otherwise ``--prompt`` is encoded with the folder's tokenizer.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, DistributedConfig

import macopt
import macopt.distributed

CONFIGS = {"exact": macopt.ExactConfig, "mac": macopt.MACConfig,
           "topk_phi": macopt.TopKPhiConfig, "mac_topk_phi": macopt.MACTopKPhiConfig}


def prompt_ids(args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    if args.prompt_ids:
        ids = [int(i) for i in args.prompt_ids.split(",")]
    else:
        ids = AutoTokenizer.from_pretrained(args.model)(args.prompt).input_ids
    return torch.tensor([ids], device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a local model folder (or a Hub id already cached)")
    parser.add_argument("--method", choices=sorted(CONFIGS), default="mac")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, distributed_config=DistributedConfig(tp_plan="auto"))
    macopt.optimize(model, CONFIGS[args.method]())  # every rank: its own heads
    ids = prompt_ids(args, model.device)
    # With a static cache on CUDA, generate() compiles the decode step and macopt's pass
    # rewrites it (exact included); on CPU, exact runs the unmodified attention.
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                         cache_implementation="static")
    stats = macopt.stats(model)  # gathered over the ranks: call it on every rank
    rank = dist.get_rank()
    print(f"[rank {rank}] {macopt.distributed.describe(model)}", flush=True)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"[rank {rank}] peak GPU memory {peak:.2f} GiB", flush=True)
    dist.barrier()
    if rank == 0:
        print("tokens:", out[0, ids.shape[1]:].tolist())
        print(stats)
        try:
            print(macopt.explain(model))  # rank 0's sites (the others' are the same)
        except ValueError as why:  # exact on CPU: nothing compiled, nothing rewritten
            print(why)
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
