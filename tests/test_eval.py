"""``macopt eval``: task generators, the harness end to end on a tiny random Llama, the CLI."""

from __future__ import annotations

import gzip
import json
import xml.etree.ElementTree as ET
from argparse import Namespace
from pathlib import Path

import pytest
from model_zoo import ZOO

import macopt
from macopt.cli import main
from macopt.commands.eval import default_text_files
from macopt.evaluation.harness import evaluate, parse_methods
from macopt.evaluation.report import bar, quality_chart, table
from macopt.evaluation.tasks import make_tasks, multikey, passkey


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


def test_parse_methods(tmp_path: Path):
    methods = parse_methods("exact,mac:0.3,mac,topk_phi:0.05,topk:64")
    assert [m.name for m in methods] == ["unmodified", "exact", "mac:0.3", "mac",
                                         "topk_phi:0.05", "topk:64"]
    assert methods[2].config.tau == 0.3 and methods[4].config.budget == 0.05
    assert methods[4].config.completion and not methods[5].config.completion
    assert methods[5].config.budget == 64
    with pytest.raises(ValueError, match="mac:x"):
        parse_methods("mac:x")


def test_parse_methods_reads_calibrated_files(tmp_path: Path):
    layer = macopt.MACConfig(tau=0.2).to_dict()
    (tmp_path / "mac_calibrated.json").write_text(json.dumps(
        {"config": macopt.MACConfig(tau=0.6).to_dict(), "overrides": {"model.layers.1": layer},
         "calibration": {"chosen": None}}))
    method = parse_methods("mac:calibrated", tmp_path)[1]
    assert method.config.tau == 0.6 and method.overrides["model.layers.1"].tau == 0.2
    other = parse_methods(f"mac:{tmp_path / 'mac_calibrated.json'}")[1]
    assert other.config == method.config
    with pytest.raises(ValueError, match="mac_calibrated.json"):
        parse_methods("mac:calibrated", tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="'mac' config"):
        parse_methods(f"topk:{tmp_path / 'mac_calibrated.json'}")


def test_parse_methods_composes_mac_with_topk_phi(tmp_path: Path):
    methods = parse_methods("mac_topk_phi,mac_topk_phi:0.05,mac_topk_phi:64:0.3")
    default, budget, both = (m.config for m in methods[1:])
    assert default == macopt.MACTopKPhiConfig()
    assert budget.topk_phi.budget == 0.05 and budget.mac == macopt.MACConfig()
    assert both.topk_phi.budget == 64 and both.mac.tau == 0.3
    layer = macopt.MACConfig(tau=0.2, offset=512).to_dict()
    (tmp_path / "mac_calibrated.json").write_text(json.dumps(
        {"config": macopt.MACConfig(tau=0.6).to_dict(), "overrides": {"model.layers.1": layer}}))
    method = parse_methods("mac_topk_phi:0.02:calibrated", tmp_path)[1]
    assert method.name == "mac_topk_phi:0.02:calibrated"
    assert method.config == macopt.MACTopKPhiConfig(macopt.MACConfig(tau=0.6),
                                                    macopt.TopKPhiConfig(budget=0.02))
    composed = method.overrides["model.layers.1"]
    assert composed.mac.offset == 512 and composed.topk_phi.budget == 0.02
    with pytest.raises(ValueError, match="mac_topk_phi:x"):
        parse_methods("mac_topk_phi:x")


def test_composed_method_at_tau_one_with_every_key_retrieved_equals_the_unmodified_model(text):
    composed = macopt.MACTopKPhiConfig(macopt.MACConfig(tau=1.0, t_min=0, offset=16),
                                       macopt.TopKPhiConfig(budget=1.0, page_size=8, sinks=2))
    result = evaluate(ZOO["llama"].build(), None, [None, composed], text=text, context=128,
                      ppl_chunks=1, ppl_decode=8, lengths=(), depths=(), agreement_steps=8)
    entry, base = result["methods"]["mac_topk_phi:1:1"], result["methods"]["unmodified"]
    ratio = entry["perplexity"]["decode_perplexity"] / base["perplexity"]["decode_perplexity"]
    assert abs(ratio - 1) < 1e-4 and entry["agreement"]["top1"] == 1.0
    assert entry["sites"] == {"rewritten": 2, "modules": 2, "skipped": []}
    keys = entry["keys"]  # every key, plus each miss's page bounds and summary
    assert keys["hit_rate"] == 0.0 and keys["read_fraction"] > 1.0
    assert set(bar(result)) == {"mac_topk_phi:1:1"}


@pytest.fixture(scope="module")
def result(text) -> dict:
    methods = [None, macopt.ExactConfig(), macopt.MACConfig(tau=1.0, t_min=0),
               macopt.TopKPhiConfig(budget=16, page_size=8, tail=4, completion=True)]
    return evaluate(ZOO["llama"].build(), None, methods, text=text, context=128, ppl_chunks=1,
                    ppl_decode=8, lengths=(400,), depths=(0.5,), agreement_steps=8,
                    topk_queries=4)


def test_exact_and_mac_at_tau_one_equal_the_unmodified_model(result):
    methods = result["methods"]
    assert list(methods) == ["unmodified", "exact", "mac:1", "topk_phi:16"]
    base = methods["unmodified"]["perplexity"]
    for name in ("exact", "mac:1"):
        entry = methods[name]
        for measure in ("perplexity", "decode_perplexity"):
            assert abs(entry["perplexity"][measure] / base[measure] - 1) < 1e-4
        assert abs(entry["perplexity"]["decode_kl"]) < 1e-6
        assert entry["agreement"]["top1"] == 1.0
        assert entry["agreement"]["first_divergence"] is None
        assert entry["agreement"]["max_logit_error"] < 1e-3
        assert entry["tasks"]["accuracy"] == methods["unmodified"]["tasks"]["accuracy"]
        outputs = [i["output"] for i in entry["tasks"]["items"]]
        assert outputs == [i["output"] for i in methods["unmodified"]["tasks"]["items"]]


def test_decode_perplexity_scores_the_decode_steps_only(result):
    ppl = result["methods"]["unmodified"]["perplexity"]
    assert ppl["tokens"] == 127 and ppl["decode_tokens"] == 7 and ppl["decode_kl"] == 0.0
    assert result["methods"]["topk_phi:16"]["perplexity"]["decode_kl"] > 1e-6


def test_stats_of_the_stateful_method_only(result):
    methods = result["methods"]
    assert methods["unmodified"]["stats"] == [] and methods["exact"]["stats"] == []
    stats = methods["mac:1"]["stats"]
    assert [s["layer"] for s in stats] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for layer in stats:  # radius 0: nothing hits, every key is read
        assert layer["decode_steps"] > 0 and layer["hit_rate"] == 0.0
        assert layer["keys_read"] == layer["keys_full"] > 0


def test_decode_sites_rewritten_are_recorded_and_a_method_that_rewrote_none_fails_the_bar(
        result):
    from macopt.evaluation import report

    methods = result["methods"]
    assert methods["unmodified"]["sites"] is None
    assert methods["mac:1"]["sites"] == {"rewritten": 2, "modules": 2, "skipped": []}
    patched = {**result, "methods": {**methods, "mac:1": {
        **methods["mac:1"], "sites": {"rewritten": 0, "modules": 0, "skipped": ["a reason"]}}}}
    assert report.bar(result)["mac:1"]["decode_sites_rewritten"] == 2
    assert report.bar(patched)["mac:1"]["met"] is False


def test_keys_read_past_t_min(result):
    methods = result["methods"]
    for name in ("unmodified", "exact", "mac:1"):  # t_min 0: every decode step counts
        keys = methods[name]["keys"]
        assert keys["read_fraction"] == 1.0 and keys["decode_steps"] > 7 + 7
    assert methods["mac:1"]["keys"]["hit_rate"] == 0.0
    assert [layer["read_fraction"] for layer in methods["mac:1"]["keys"]["layers"]] == [1.0, 1.0]
    topk = methods["topk_phi:16"]["keys"]  # 400-token prompts: anchors + 16 + pages + summary
    assert 0.1 < topk["read_fraction"] < 1.0 and topk["hit_rate"] is None


def test_topk_output_error_per_layer_and_head(result):
    error = result["methods"]["topk_phi:16"]["topk_error"]
    assert len(error["layers"]) == 2 and all(len(heads) == 4 for heads in error["layers"])
    assert 0.0 < error["mean"] < 1.0 and error["queries"] == 4
    assert "topk_error" not in result["methods"]["mac:1"]


def test_result_is_json_with_the_fields(result):
    data = json.loads(json.dumps(result))
    assert data["settings"]["context"] == 128 and data["settings"]["tokenizer"] == "bytes"
    for name, entry in data["methods"].items():
        extra = {"topk_error"} if name.startswith("topk") else set()
        fields = {"config", "perplexity", "tasks", "agreement", "keys", "stats", "sites"}
        assert set(entry) == fields | extra
        assert set(entry["agreement"]) == {"steps", "top1", "first_divergence",
                                           "max_logit_error"}
        assert {"accuracy", "by_kind", "items"} <= set(entry["tasks"])
        assert set(entry["tasks"]["by_kind"]) == {"passkey", "multikey"}
    assert table(result).row_count == 4
    assert set(bar(result)) == {"mac:1"} and bar(result)["mac:1"]["tasks_equal"]
    assert not bar(result)["mac:1"]["keys_5x"]  # tau 1 reads every key
    assert quality_chart(result).count("<svg") == 4  # three charts side by side


def test_cli_runs_at_a_tiny_size(tmp_path: Path, text):
    model = tmp_path / "llama"
    ZOO["llama"].build().save_pretrained(model)
    held_out = tmp_path / "held_out.py"
    held_out.write_text(text)
    out, plot = tmp_path / "eval.json", tmp_path / "eval.svg"
    code = main(["eval", str(model), "--methods", "exact", "--context", "96", "--ppl-chunks", "1",
                 "--ppl-decode", "4", "--lengths", "320", "--depths", "0.3", "--kinds",
                 "passkey", "--agreement-steps", "4", "--text", str(held_out), "--json",
                 str(out), "--plot", str(plot)])
    assert code == 0
    data = json.loads(out.read_text())
    ET.fromstring(plot.read_text())
    assert list(data["methods"]) == ["unmodified", "exact"]
    assert data["settings"]["text"] == [str(held_out)]
    assert data["methods"]["exact"]["agreement"]["top1"] == 1.0


def test_cli_empty_lengths_runs_no_retrieval_task(tmp_path: Path, text):
    """``--lengths ""`` means no task (it used to fall back to the context length)."""
    held_out = tmp_path / "held_out.py"
    held_out.write_text(text)
    out = tmp_path / "eval.json"
    code = main(["eval", "llama", "--methods", "exact", "--context", "96", "--ppl-chunks", "1",
                 "--ppl-decode", "4", "--lengths", "", "--agreement-steps", "4", "--text",
                 str(held_out), "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["settings"]["lengths"] == []
    assert all(m["tasks"]["items"] == [] for m in data["methods"].values())


def test_cli_reports_bad_methods(tmp_path: Path, capsys):
    assert main(["eval", "llama", "--methods", "mac:oops"]) == 2
    assert "mac:oops" in capsys.readouterr().out


def test_without_model_eval_uses_the_tiny_model_and_its_held_out_text():
    from macopt.commands.eval import resolve
    from macopt.evaluation.text import tiny_model_dir

    args = Namespace(model=None, text=None, methods=None, needles=None)
    model, files, methods, needles = resolve(args)
    assert Path(model) == tiny_model_dir() and files == [tiny_model_dir() / "heldout.txt.gz"]
    assert needles == "code" and "mac:calibrated" in methods and "topk_phi:0.1" in methods
    other = resolve(Namespace(model="llama", text=None, methods=None, needles=None))
    assert other[1] == default_text_files() and other[3] == "prose"
    assert "mac:calibrated" not in other[2]


def test_a_missing_tiny_model_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    import macopt.evaluation.text as text

    monkeypatch.setattr(text, "tiny_model_dir", lambda: tmp_path / "tiny-lm")
    assert main(["eval"]) == 2
    message = capsys.readouterr().out
    assert "tiny-lm" in message and "train_tiny_lm.py" in message


def test_gz_text_and_directories_are_read(tmp_path: Path):
    from macopt.evaluation.text import read_text

    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write("zipped")
    (tmp_path / "b.py").write_text("plain")
    assert read_text([tmp_path]) == "zipped\nplain"
    assert read_text([tmp_path / "b.py"]) == "plain"


def test_keys_read_charge_the_summary_only_to_groups_that_read_it():
    from macopt.evaluation.harness import summary_groups, topk_keys_read
    from macopt.topk_phi_select import summary_token_equivalent

    # 1000-key prompt, decode at position 1000: sinks 4 + tail 16 + 1 generated key exact;
    # exact selector: every middle key's K row (980 / 2); d_phi 2, bf16: summary 2.03 (3 whole).
    base = dict(budget=100, selector="exact", d_phi=2, completion=True)
    summary = summary_token_equivalent(128, 2, 2)
    read = lambda config, on: topk_keys_read(config, 1000, 1000, 2048, 128, 2,  # noqa: E731
                                             reads_summary=on)
    plain, charged = macopt.TopKPhiConfig(**base), macopt.TopKPhiConfig(**base,
                                                                         summary_in_budget=True)
    assert read(plain, True) == pytest.approx(21 + 100 + 490 + summary)
    assert read(plain, False) == pytest.approx(21 + 100 + 490)
    assert read(charged, True) == pytest.approx(21 + 97 + 490 + summary)
    assert read(charged, False) == pytest.approx(21 + 100 + 490)  # no summary: full budget
    paged = macopt.TopKPhiConfig(**{**base, "selector": "page"}, summary_in_budget=True)
    assert read(paged, True) == pytest.approx(21 + 128 + 31 + summary)  # ceil(97 / 32) pages
    # sketch: 4-bit codes of D / 4 = 32 channels per middle key (16 of a K+V row's 512 bytes),
    # plus the K rows of rerank (2) x 100 candidates (half a key row each)
    sketched = macopt.TopKPhiConfig(**{**base, "selector": "sketch"})
    assert read(sketched, False) == pytest.approx(21 + 100 + 980 * 16 / 512 + 200 / 2)
    off_group = macopt.TopKPhiConfig(completion=True,
                                     completion_overrides={0: {0: False, 1: False}})
    assert summary_groups(off_group, 0, 4, 2) == [False, True]
    assert summary_groups(off_group, 1, 4, 2) == [True, True]


def test_topk_error_table_puts_layers_down_the_rows_and_fits_80_columns():
    """A 30-layer model's per-layer errors read in an 80-column terminal: one row per layer,
    one column per method, no cell cut short."""
    from rich.console import Console

    from macopt.evaluation.report import topk_error_table

    heads = [[0.1, 0.2, 0.3]] * 30
    result = {"methods": {"topk_phi:0.02": {"topk_error": {"mean": 0.2, "layers": heads}},
                          "topk:0.02": {"topk_error": {"mean": 0.3, "layers": heads}},
                          "mac": {}}}
    console = Console(width=80, record=True)
    console.print(topk_error_table(result))
    text = console.export_text()
    assert text.count("0.200 / 0.300") == 60  # 30 layers x 2 methods, whole
    assert "29" in text and "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
