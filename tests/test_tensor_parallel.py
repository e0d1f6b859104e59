"""macopt on a tensor-parallel model: transformers' own ``tp_plan="auto"`` over 2 CPU ranks
(gloo), against the same model whole, in the same run (tests/tp_worker.py).

Each rank's attention holds 4 of the 8 query heads and 2 of the 4 KV heads: the rings hold only
those, decode is token-identical to the whole model, MAC hits on the same heads as often, and
``macopt.stats`` gathers the ranks' counters into the whole model's. The whole model runs in
the same processes (every rank), so every comparison is made on each rank's own results.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers' tp_plan loading needs accelerate")

ROOT = Path(__file__).resolve().parents[1]
RANKS = 2
HEADS, KV_HEADS = 8, 4


def torchrun(script: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 script args`` on CPU (gloo); fails the test on error."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={RANKS}",
               "--standalone", str(script), *args]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
    return run


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("tp")
    torchrun(ROOT / "tests" / "tp_worker.py", str(out))
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(RANKS)]
    shutil.rmtree(out, ignore_errors=True)
    return results


def test_unmodified_sharded_model_matches_whole(ranks):
    # The premise: transformers' sharding alone decodes the same tokens on CPU.
    for result in ranks:
        sharded, whole = result["unmodified"]["sharded"], result["unmodified"]["whole"]
        assert torch.equal(sharded[0], whole[0])


@pytest.mark.parametrize("case", ["exact", "mac_exact", "topk_phi"])
def test_exact_methods_are_token_identical_to_the_whole_model(ranks, case):
    # topk_phi: approximate, but the same on each head as the whole model's (the rank's
    # heads of the same feature maps), so the same tokens.
    for result in ranks:
        sharded, whole = result[case]["sharded"], result[case]["whole"]
        assert torch.equal(sharded["tokens"], whole["tokens"])
        torch.testing.assert_close(sharded["logits"], whole["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["exact", "mac_exact", "mac_hits", "mac_hits_static",
                                  "topk_phi"])
def test_each_rank_rewrites_its_decode_sites(ranks, case):
    for result in ranks:
        assert result[case]["sharded"]["rewritten"] == result[case]["whole"]["rewritten"] > 0


def test_rings_hold_only_the_ranks_query_heads(ranks):
    for result in ranks:
        assert result["mac_hits"]["sharded"]["state_heads"] == [HEADS // RANKS] * 2
        assert result["mac_hits"]["whole"]["state_heads"] == [HEADS] * 2


def test_topk_phi_summaries_hold_only_the_ranks_kv_heads(ranks):
    for result in ranks:
        assert result["topk_phi"]["sharded"]["state_heads"] == [KV_HEADS // RANKS] * 2
        assert result["topk_phi"]["whole"]["state_heads"] == [KV_HEADS] * 2


@pytest.mark.parametrize("case", ["mac_hits", "mac_hits_static"])
def test_mac_hits_on_the_same_heads_as_the_whole_model(ranks, case):
    # mac_hits_static: generate()'s static cache, allocated by macopt with the rank's KV heads.
    for result in ranks:
        sharded, whole = result[case]["sharded"], result[case]["whole"]
        hit_rates = [layer[0] for layer in whole["stats"]]
        assert any(0 < h < 1 for layer in hit_rates for h in layer), "the case must hit"
        assert len(set(hit_rates[1])) > 1, "heads must differ, or per-head says little"
        assert sharded["stats"] == whole["stats"]  # per head, keys read, steps, bytes
        assert torch.equal(sharded["tokens"], whole["tokens"])
        torch.testing.assert_close(sharded["logits"], whole["logits"], rtol=1e-4, atol=1e-4)


def test_stats_without_gather_are_the_ranks_heads(ranks):
    for rank, result in enumerate(ranks):
        whole = result["mac_hits"]["whole"]["stats"]
        heads = slice(rank * HEADS // RANKS, (rank + 1) * HEADS // RANKS)
        local = result["mac_hits"]["sharded"]["local_stats"]
        assert [rates for rates, _ in local] == [layer[0][heads] for layer in whole]
        assert [nbytes * RANKS for _, nbytes in local] == [layer[4] for layer in whole]


def test_explain_names_the_rank_and_its_heads(ranks):
    for rank, result in enumerate(ranks):
        q, kv = HEADS // RANKS, KV_HEADS // RANKS
        title = result["mac_hits"]["sharded"]["title"]
        assert f"rank {rank} of {RANKS} (tensor parallel)" in title
        assert f"query heads {rank * q}-{rank * q + q - 1} of {HEADS}" in title
        assert f"KV heads {rank * kv}-{rank * kv + kv - 1} of {KV_HEADS}" in title
        assert "rank" not in result["mac_hits"]["whole"]["title"]


def test_heads_not_divisible_by_the_ranks_are_refused(ranks):
    for result in ranks:  # every rank raises, naming the projection and the split head
        message = result["refused_uneven"]
        assert "tensor-parallel plan not supported" in message
        assert "k_proj (3 heads of 64) is split" in message


def test_a_plan_splitting_a_kv_heads_query_group_is_refused(ranks):
    for result in ranks:
        message = result["refused_split_group"]
        assert "query head 1 needs KV head 0" in message
        assert "splits that KV head's query group" in message


def test_the_readme_example_runs_on_two_cpu_ranks(tmp_path):
    from tp_worker import LLAMA
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    whole = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    whole.save_pretrained(tmp_path)
    ids = [5, 17, 42, 99, 7, 63, 5, 17, 42]
    run = torchrun(ROOT / "examples" / "tensor_parallel.py", str(tmp_path), "--method", "mac",
                   "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "8")
    for rank in range(RANKS):
        assert f"[rank {rank}] rank {rank} of {RANKS} (tensor parallel)" in run.stdout
    printed = next(line for line in run.stdout.splitlines() if line.startswith("tokens:"))
    with torch.no_grad():  # MACConfig() matches nothing before t_min keys: exact attention
        want = whole.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert printed == f"tokens: {want[0, len(ids):].tolist()}"
