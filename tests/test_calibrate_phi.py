"""phi calibration on a tiny random Llama (CPU): capture, loss, training, resume, CLI."""

from __future__ import annotations

import warnings

import pytest
import torch
from model_zoo import ZOO

from macopt import cli
from macopt.calibrate_phi import (
    CalibrationConfig,
    calibrate_feature_maps,
    capture_attention,
    evaluate,
    initial_maps,
    phi_loss,
    site_name,
)
from macopt.kernels.feature_maps import load_feature_maps, save_feature_maps
from macopt.phi_files import CALIBRATED_TOKENS, PHI_FILENAME, calibrated_tokens

SMALL = CalibrationConfig(d_phi=32, steps=30, lr=1e-2, queries_per_step=8, checkpoint_every=10)


@pytest.fixture(scope="module")
def captured():
    model = ZOO["llama"].build()
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(0))
    return capture_attention(model, ids)


def test_capture_records_post_rope_queries_and_unrepeated_keys_per_layer(captured):
    assert sorted(captured) == [0, 1]
    layer = captured[0]
    assert layer.q.shape == (2, 4, 96, 64) and layer.k.shape == (2, 2, 96, 64)
    assert layer.scale == 64**-0.5


def test_capture_restores_the_attention_implementation():
    model = ZOO["qwen3"].build()
    model.set_attn_implementation("sdpa")
    capture_attention(model, torch.randint(0, 256, (1, 40)))
    assert model.config._attn_implementation == "sdpa"


def test_loss_is_zero_when_the_student_equals_the_teacher():
    scores = torch.randn(3, 5, 40) * 4
    mid = torch.rand(3, 5, 40) > 0.3
    assert float(phi_loss(scores, scores, mid)) == pytest.approx(0.0, abs=1e-6)


def test_loss_charges_far_keys_only_when_overestimated():
    scores = torch.zeros(1, 1, 4)
    scores[..., 2:] = -20.0  # two far keys
    mid = torch.ones(1, 1, 4, dtype=torch.bool)
    under, over = scores.clone(), scores.clone()
    under[..., 2:] = -30.0  # far keys underestimated: free
    over[..., 2:] = -5.0  # far keys overestimated past -8: costs
    assert float(phi_loss(scores, under, mid)) < 1e-3 < float(phi_loss(scores, over, mid))


def test_training_lowers_the_loss_from_the_random_feature_start(captured):
    config = CalibrationConfig(**{**SMALL.__dict__, "init": "prf"})
    before = evaluate(initial_maps(captured, config), captured, config)
    maps, history = calibrate_feature_maps(captured, config)
    after = evaluate(maps, captured, config)
    assert len(history) == config.steps
    assert after < 0.5 * before


def test_an_interrupted_run_resumes_from_its_checkpoint(captured, tmp_path):
    checkpoint = tmp_path / "phi.ckpt"
    short = CalibrationConfig(**{**SMALL.__dict__, "steps": 10})
    calibrate_feature_maps(captured, short, checkpoint)
    resumed, history = calibrate_feature_maps(captured, SMALL, checkpoint)
    straight, expected = calibrate_feature_maps(captured, SMALL)
    assert history == pytest.approx(expected, rel=1e-4)
    for name in straight:
        for a, b in zip(resumed[name].parameters(), straight[name].parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_checkpoint_of_other_settings_is_refused(captured, tmp_path):
    checkpoint = tmp_path / "phi.ckpt"
    calibrate_feature_maps(captured, CalibrationConfig(**{**SMALL.__dict__, "steps": 2}),
                           checkpoint)
    other = CalibrationConfig(**{**SMALL.__dict__, "lr": 0.5})
    with pytest.raises(ValueError, match="another calibration"):
        calibrate_feature_maps(captured, other, checkpoint)


def test_trained_maps_round_trip_through_safetensors(captured, tmp_path):
    maps, _ = calibrate_feature_maps(captured, CalibrationConfig(**{**SMALL.__dict__,
                                                                    "steps": 3}))
    path = tmp_path / PHI_FILENAME
    save_feature_maps(maps, path)
    loaded = load_feature_maps(path)
    assert set(loaded) == {site_name(0), site_name(1)}
    x = torch.randn(1, 2, 7, 64)
    torch.testing.assert_close(loaded["layer.1"].phi_k(x), maps["layer.1"].phi_k(x))


def _save_tiny_model_with_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(200)]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(
        directory)
    ZOO["llama"].build().save_pretrained(directory)
    return words


def _model_and_text(tmp_path, n_words: int = 300):
    """A saved tiny model with a word-level tokenizer, and a calibration text of its words."""
    words = _save_tiny_model_with_tokenizer(tmp_path / "model")
    gen = torch.Generator().manual_seed(0)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(words[i] for i in torch.randint(0, 200, (n_words,), generator=gen)))
    return tmp_path / "model", text


def test_cli_writes_phi_next_to_the_model(tmp_path):
    model, text = _model_and_text(tmp_path)
    argv = ["calibrate", str(model), "--method", "topk_phi", "--text", str(text),
            "--seq-len", "128", "--sequences", "2", "--steps", "3", "--d-phi", "16",
            "--device", "cpu", "--dtype", "float32"]
    assert cli.main(argv) == 0
    maps = load_feature_maps(tmp_path / "model" / PHI_FILENAME)
    assert set(maps) == {"layer.0", "layer.1"} and maps["layer.0"].phi_q.d_phi == 16
    assert (tmp_path / "model" / (PHI_FILENAME + ".ckpt")).exists()


@pytest.mark.parametrize("init", ["probe", "prf"])
def test_cli_writes_maps_of_the_chosen_init_without_training(tmp_path, init):
    model, text = _model_and_text(tmp_path)
    out = tmp_path / "phi.safetensors"
    argv = ["calibrate", str(model), "--method", "topk_phi", "--text", str(text),
            "--seq-len", "128", "--sequences", "2", "--steps", "0", "--d-phi", "8",
            "--init", init, "--out", str(out), "--device", "cpu", "--dtype", "float32"]
    assert cli.main(argv) == 0
    assert calibrated_tokens(out) == 128  # the file says how long its sequences were
    phi_q = load_feature_maps(out)["layer.0"].phi_q
    expected_sq_norm = 0.0 if init == "probe" else 64**-0.5 / 2  # probe: linear, PRF: s / 2
    assert float(phi_q.sq_norm[0]) == pytest.approx(expected_sq_norm)
    assert cli.main(argv[:-6] + ["--margin", "-1", "--device", "cpu"]) == 2  # refused


def test_maps_used_past_their_calibration_length_warn_once(tmp_path):
    """A cache longer than the phi file's calibration sequences warns (maps from 2K sequences
    gave exp(KL) 76-91 at 8K on SmolLM2); within it, or with no length recorded, nothing."""
    from macopt import topk_phi_ops
    from macopt.kernels.feature_maps import FeatureMaps

    path = tmp_path / "phi.safetensors"
    maps = {"layer.0": FeatureMaps(4, 2, 16, 8)}
    save_feature_maps(maps, path, {CALIBRATED_TOKENS: "64"})
    assert calibrated_tokens(path) == 64 and set(load_feature_maps(path)) == {"layer.0"}

    def allocate(n_keys):
        k = torch.zeros(1, 2, n_keys, 16)
        topk_phi_ops.allocate_state(1, 0, 4, k, False, 16, 8, [True] * 4, str(path), 0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        allocate(64)
    with pytest.warns(UserWarning, match="calibrated on 64-token sequences and this cache "
                                         "holds 96"):
        allocate(96)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        allocate(96)  # once per file and length
        unrecorded = tmp_path / "old.safetensors"
        save_feature_maps(maps, unrecorded)
        assert calibrated_tokens(unrecorded) is None


def test_cli_sequences_default_to_the_models_context(tmp_path):
    # Maps used on caches longer than their calibration sequences can fail (SmolLM2: exp(KL)
    # 76-91 at 8K from 2K maps), so the default length is the model's (the zoo's: 256).
    model, text = _model_and_text(tmp_path, n_words=600)
    out = tmp_path / "phi.safetensors"
    argv = ["calibrate", str(model), "--method", "topk_phi", "--text", str(text),
            "--sequences", "2", "--d-phi", "8", "--switch-budget", "0", "--out", str(out),
            "--device", "cpu", "--dtype", "float32"]
    assert cli.main(argv) == 0
    assert calibrated_tokens(out) == 256
