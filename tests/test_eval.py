"""``macopt eval``: task generators, the harness end to end on a tiny random Llama, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import macopt
from macopt.cli import main
from macopt.commands.eval import default_text_files
from macopt.evaluation.harness import evaluate, parse_methods, table
from macopt.evaluation.tasks import make_tasks, multikey, passkey
from tests.model_zoo import ZOO


def _encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def text() -> str:
    return "\n".join(p.read_text() for p in default_text_files()[:4])


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("generator", [passkey, multikey])
def test_tasks_are_deterministic_and_the_answer_sits_at_the_depth(text, generator, depth):
    filler = _encode(text)
    task = generator(filler, _encode, length=1000, depth=depth, seed=3)
    assert task == generator(filler, _encode, length=1000, depth=depth, seed=3)
    assert len(task.prompt_ids) == task.length == 1000
    prompt = bytes(task.prompt_ids).decode()
    needle = prompt[task.needle_start:]
    assert task.answer in needle[:120] and task.answer.isdigit()
    assert bytes(task.answer_ids).decode() == " " + task.answer
    filler_tokens = 1000 - len(_encode(prompt[prompt.rindex("\nWhat is"):]))
    if generator is passkey:
        assert task.needle_start == round(depth * (filler_tokens - len(_encode(needle[
            :needle.index("pass key.") + 10]))))
        assert prompt.count(task.answer) == 2  # stated twice in the needle, once nowhere else
    else:
        assert prompt.endswith(f"for {next(iter(task.extra['keys']))} is:")
        assert all(v in prompt for v in task.extra["keys"].values())
    assert abs(task.needle_start / filler_tokens - depth) < 0.35  # other needles shift it
    other = generator(filler, _encode, length=1000, depth=depth, seed=4)
    assert other.prompt_ids != task.prompt_ids


def test_make_tasks_covers_the_grid_and_rejects_what_cannot_fit(text):
    tasks = make_tasks(_encode(text), _encode, kinds=["passkey", "multikey"], lengths=[400, 600],
                       depths=[0.2, 0.8], seed=0, samples=2)
    assert len(tasks) == 16 and {t.length for t in tasks} == {400, 600}
    with pytest.raises(ValueError, match="too short"):
        passkey(_encode(text), _encode, length=20, depth=0.5, seed=0)
    with pytest.raises(ValueError, match="unknown kinds"):
        make_tasks([1], _encode, kinds=["nope"], lengths=[10], depths=[0.5], seed=0)


def test_parse_methods():
    methods = parse_methods("exact,mac:0.3,mac,topk_phi:0.05")
    assert [m.name for m in methods] == ["unmodified", "exact", "mac:0.3", "mac",
                                         "topk_phi:0.05"]
    assert methods[2].config.tau == 0.3 and methods[4].config.budget == 0.05
    with pytest.raises(ValueError, match="mac:x"):
        parse_methods("mac:x")


@pytest.fixture(scope="module")
def result(text) -> dict:
    methods = [None, macopt.ExactConfig(), macopt.MACConfig(tau=1.0, t_min=0)]
    return evaluate(ZOO["llama"].build(), None, methods, text=text, context=128, ppl_chunks=1,
                    ppl_decode=8, lengths=(400,), depths=(0.5,), agreement_steps=8)


def test_exact_and_mac_at_tau_one_equal_the_unmodified_model(result):
    methods = result["methods"]
    assert list(methods) == ["unmodified", "exact", "mac:1"]
    base = methods["unmodified"]["perplexity"]["perplexity"]
    for name in ("exact", "mac:1"):
        entry = methods[name]
        assert abs(entry["perplexity"]["perplexity"] / base - 1) < 1e-4
        assert entry["agreement"]["top1"] == 1.0
        assert entry["agreement"]["first_divergence"] is None
        assert entry["agreement"]["max_logit_error"] < 1e-3
        assert entry["tasks"]["accuracy"] == methods["unmodified"]["tasks"]["accuracy"]
        outputs = [i["output"] for i in entry["tasks"]["items"]]
        assert outputs == [i["output"] for i in methods["unmodified"]["tasks"]["items"]]


def test_stats_of_the_stateful_method_only(result):
    methods = result["methods"]
    assert methods["unmodified"]["stats"] == [] and methods["exact"]["stats"] == []
    stats = methods["mac:1"]["stats"]
    assert [s["layer"] for s in stats] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for layer in stats:  # radius 0: nothing hits, every key is read
        assert layer["decode_steps"] > 0 and layer["hit_rate"] == 0.0
        assert layer["keys_read"] == layer["keys_full"] > 0


def test_result_is_json_with_the_fields(result):
    data = json.loads(json.dumps(result))
    assert data["settings"]["context"] == 128 and data["settings"]["tokenizer"] == "bytes"
    for entry in data["methods"].values():
        assert set(entry) == {"config", "perplexity", "tasks", "agreement", "stats"}
        assert set(entry["agreement"]) == {"steps", "top1", "first_divergence",
                                           "max_logit_error"}
        assert {"accuracy", "by_kind", "items"} <= set(entry["tasks"])
        assert set(entry["tasks"]["by_kind"]) == {"passkey", "multikey"}
    assert table(result).row_count == 3


def test_cli_runs_at_a_tiny_size(tmp_path: Path, text):
    model = tmp_path / "llama"
    ZOO["llama"].build().save_pretrained(model)
    held_out = tmp_path / "held_out.py"
    held_out.write_text(text)
    out = tmp_path / "eval.json"
    code = main(["eval", str(model), "--methods", "exact", "--context", "96", "--ppl-chunks", "1",
                 "--ppl-decode", "4", "--lengths", "320", "--depths", "0.3", "--kinds",
                 "passkey", "--agreement-steps", "4", "--text", str(held_out), "--json",
                 str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert list(data["methods"]) == ["unmodified", "exact"]
    assert data["settings"]["text"] == [str(held_out)]
    assert data["methods"]["exact"]["agreement"]["top1"] == 1.0


def test_cli_reports_bad_methods(tmp_path: Path, capsys):
    assert main(["eval", "llama", "--methods", "mac:oops"]) == 2
    assert "mac:oops" in capsys.readouterr().out
