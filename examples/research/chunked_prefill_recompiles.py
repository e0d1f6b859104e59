"""Why a timed generate() with a chunked prefill recompiles after a shorter warm-up call
(BENCHMARKS.md 23): transformers slices each chunk's ``position_ids`` from the whole prompt's,
so their stride is the prompt length and dynamo guards on it. The second prompt length
recompiles the chunk graphs (then dynamo makes that stride dynamic: a third length compiles
nothing), for the unmodified model as for macopt's. CPU, tiny Llama, generate()'s own compile
forced on with ``compile_config._compile_all_devices`` (it compiles on CUDA only).

    TORCH_LOGS=recompiles python examples/research/chunked_prefill_recompiles.py [exact]
"""

import copy
import sys

import torch
from transformers import CompileConfig, MaxLengthCriteria, StoppingCriteriaList

sys.path.insert(0, "tests")
from model_zoo import VOCAB, ZOO  # noqa: E402

import macopt  # noqa: E402
from macopt.bench.e2e import _compile_counts  # noqa: E402

CHUNK, NEW, LONG = 32, 4, 320


def main() -> None:
    model = ZOO["llama"].build()
    model.set_attn_implementation("sdpa")
    if sys.argv[1:] == ["exact"]:
        model = macopt.optimize(copy.deepcopy(model), macopt.ExactConfig())
    model.generation_config.compile_config = CompileConfig(mode="default")
    model.generation_config.compile_config._compile_all_devices = True
    ids = torch.randint(2, VOCAB, (2, LONG), generator=torch.Generator().manual_seed(0))
    # the bench's --warmup-chunks 4: a short prompt into the long call's cache, then the long
    for label, length, size in (("warm-up", 4 * CHUNK, LONG + NEW), ("timed", LONG, 0),
                                ("timed again", LONG, 0), ("third length", 7 * CHUNK, 0)):
        before = _compile_counts()["graphs"]
        kwargs = {"max_new_tokens": NEW} if not size else {
            "max_length": size,
            "stopping_criteria": StoppingCriteriaList([MaxLengthCriteria(length + NEW)])}
        with torch.no_grad():
            model.generate(ids[:, :length], attention_mask=torch.ones_like(ids[:, :length]),
                           do_sample=False, min_new_tokens=NEW, cache_implementation="static",
                           prefill_chunk_size=CHUNK, **kwargs)
        print(f"{label}: prompt {length}, graphs compiled {_compile_counts()['graphs'] - before}")


if __name__ == "__main__":
    main()
