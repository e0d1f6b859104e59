"""The committed tiny model (``examples/tiny-lm``) retrieves a pass key with exact attention
and with its calibrated MAC config (``mac_calibrated.json``), through macopt's own path."""

from __future__ import annotations

import pytest
import torch

import macopt
from macopt.calibrate_mac import CALIBRATED_FILENAME, load_result
from macopt.evaluation.harness import Method, _Cache, _KeyMeter, _prepare, _Runner, text_codec
from macopt.evaluation.tasks import passkey
from macopt.evaluation.text import read_text, tiny_model_dir

LENGTH = 2100  # past MAC's t_min (2048): every answer step may reuse a ring entry
DEPTHS = (0.2,)  # seed 1: solved by full attention (as 8 of 12 seeds x depths are)
SEED = 1


@pytest.fixture(scope="module")
def tiny():
    from macopt.model_source import load_causal_lm, load_tokenizer

    path = tiny_model_dir()
    # The checkpoint is committed: a checkout without it is broken, not a reason to skip.
    assert (path / "model.safetensors").is_file(), f"no tiny model at {path}"
    model = load_causal_lm(path, dtype=torch.float32)
    tokenizer = load_tokenizer(path)
    encode, decode = text_codec(tokenizer, model.config.vocab_size)
    filler = encode(read_text([path / "heldout.txt.gz"])[:200_000])
    tasks = [passkey(filler, encode, length=LENGTH, depth=d, seed=SEED, style="code")
             for d in DEPTHS]
    return model, decode, tasks


def _methods() -> list[Method]:
    config, overrides = load_result(tiny_model_dir() / CALIBRATED_FILENAME)
    return [Method("exact", macopt.ExactConfig()), Method("mac", config, overrides)]


@pytest.mark.parametrize("method", _methods(), ids=lambda m: m.name)
def test_the_pass_key_is_retrieved(tiny, method):
    model, decode, tasks = tiny
    optimized = _prepare(model, method)
    meter = _KeyMeter(optimized, method.config, LENGTH + 4)
    run = _Runner(optimized, _Cache(optimized, LENGTH + 4, "cpu"), meter, "cpu")
    with torch.no_grad():
        outputs = [decode(run.generate(task.prompt_ids, 4)[0]) for task in tasks]
    assert [o.lstrip()[:5] for o in outputs] == [t.answer for t in tasks]
    if method.name == "mac":  # the answer's decode steps did reuse ring entries
        assert meter.report()["hit_rate"] > 0.2
