"""`macopt bench generate`'s CPU-checkable parts (the bench itself needs a CUDA GPU)."""

import pytest
import torch

from macopt.bench.generate import first_divergence, summary


@pytest.fixture
def no_cuda_events(monkeypatch):
    """The bench's CUDA events and syncs, as no-ops: its generate calls run on the CPU."""

    class Event:
        def __init__(self, **_):
            pass

        def record(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def _logits(steps: int, batch: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(steps, batch, vocab, generator=torch.Generator().manual_seed(seed))


def test_equal_tokens_have_no_divergence():
    tokens = torch.tensor([[3, 1, 4], [1, 5, 9]])
    logits = _logits(3, 2, 10, 0)
    assert first_divergence(tokens, logits, tokens.clone(), logits + 0.01) is None


def test_divergence_names_the_first_step_and_row_with_its_margin_and_logit_difference():
    ref_tokens = torch.tensor([[3, 1, 4, 1], [1, 5, 9, 2]])
    tokens = torch.tensor([[3, 1, 4, 7], [1, 5, 8, 2]])  # row 1 differs first, at step 2
    ref_logits = torch.zeros(4, 2, 10)
    ref_logits[2, 1, 9], ref_logits[2, 1, 8] = 5.0, 4.75  # a margin of 0.25
    logits = ref_logits.clone()
    logits[2, 1, 8] = 5.5  # moved by 0.75
    d = first_divergence(ref_tokens, ref_logits, tokens, logits)
    assert d == {"step": 2, "row": 1, "margin": 0.25, "logit_diff": 0.75}


def test_summary_gives_each_method_its_ratio_to_exact_and_unmodified():
    records = [dict(batch=1, context=8192, method=m, median_ms=ms, hit_rate=h)
               for m, ms, h in [("unmodified", 4.0, None), ("exact", 2.0, None),
                                ("mac:all", 1.0, 1.0)]]
    rows = summary(records)
    assert "| 1 | 8192 | mac:all | 1.000 | 2.00x | 4.00x | 1.00 |" in rows
    assert "| 1 | 8192 | exact | 2.000 | 1.00x | 2.00x | - |" in rows


def test_prefill_chunk_reaches_generate_as_transformers_prefill_chunk_size(no_cuda_events):
    # The bench's generate call, minus the GPU: the option must reach transformers unchanged
    # (and stay out of the call when 0, the one-shot prefill).
    import argparse

    from macopt.bench import generate as bench

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    args = parser.parse_args(["generate", "--prefill-chunk", "16384"])
    assert args.prefill_chunk == 16384

    seen = []

    class Model:
        def generate(self, ids, **kwargs):
            seen.append(kwargs)
            for processor in kwargs["logits_processor"]:
                for _ in range(3):
                    processor(ids, torch.zeros(1))
            return ids

    ids = torch.zeros(1, 4, dtype=torch.long)
    bench.timed_generate(Model(), ids, 3, prefill_chunk=16384)
    bench.timed_generate(Model(), ids, 3)
    assert seen[0]["prefill_chunk_size"] == 16384
    assert "prefill_chunk_size" not in seen[1]


def test_a_short_warmup_prompt_gets_the_timed_calls_static_cache_and_token_count(
        no_cuda_events):
    # --warmup-chunks: the untimed call's prompt is the first chunks only, but its static cache
    # must be the timed call's (same compiled graphs, same CUDA graphs) and it must decode the
    # same number of tokens. Real transformers generate() on a tiny model, minus CUDA events.
    from model_zoo import VOCAB, ZOO
    from transformers.cache_utils import Cache

    from macopt.bench import generate as bench

    model = ZOO["llama"].build()
    sizes = []

    def cache_size(module, args, kwargs):
        caches = [v for v in kwargs.values() if isinstance(v, Cache)]
        size = getattr(caches[0], "get_max_length", None) or caches[0].get_max_cache_shape
        sizes.append(size())  # the name differs across transformers versions

    model.register_forward_pre_hook(cache_size, with_kwargs=True)
    ids = torch.randint(2, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    new_tokens = 5
    warm = bench.timed_generate(model, ids[:, :16], new_tokens, prefill_chunk=8,
                                cache_tokens=40 + new_tokens)
    warm_sizes, sizes[:] = set(sizes), []
    timed = bench.timed_generate(model, ids, new_tokens, prefill_chunk=8)
    assert warm["tokens"].shape == timed["tokens"].shape == (2, new_tokens)
    assert warm_sizes == set(sizes) and len(warm_sizes) == 1
