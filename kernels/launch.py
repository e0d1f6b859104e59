"""Launch helpers every Triton kernel module shares: whether Triton is interpreting on CPU,
the SM count, and the split-KV decode launch parameters (exact decode and MAC's step use the
same ones).

>>> launch_config = decode_launch_config(1, 8, 4096, 128, 4, torch.device("cpu"))
>>> launch_config.block_n, launch_config.num_splits
(64, 1)
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton

MAX_SPLITS = 64  # split-KV programs per (batch row, KV head), at most


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split-KV decode kernel (see :func:`decode_launch_config`)."""

    block_n: int  # keys per step of a program's loop
    num_warps: int
    num_stages: int  # software-pipelining depth of the K/V loads (GPU only)
    num_splits: int  # programs per (batch row, KV head)
    # With several splits, merge them in the split kernel (the last program of a group to
    # arrive merges) instead of a second launch. Measured on the H100 the second launch was
    # faster (BENCHMARKS.md: 0.019 vs 0.022 ms at 1 x 4K, 5.7 vs 6.4 ms at 32 x 128K), so it is
    # off by default; MAC's step, which must finalize ring entries anyway, uses the fused form.
    fuse_merge: bool = False


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device; 1 elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # CPU interpreter: every program runs in Python, so fewer is faster


def decode_launch_config(
    batch: int, kv_heads: int, n_keys: int, head_dim: int, group: int, device: torch.device,
    element_size: int = 2,
) -> DecodeConfig:
    """Pick block size, warps, pipelining depth and split count from static shapes only.

    Decode is bound by reading K and V once, so the goal is to keep every SM streaming:
    - splits: about one program per SM, so that batch 1 fills the chip (B * Hkv = 8 programs
      alone would use 8 of 132 SMs) and a large batch is not split at all. Measured on the
      H100 (examples/research/decode_sweep.py; BENCHMARKS.md), with 64-key blocks and 3
      stages: 16 splits beat 33 and 66 at batch 1 (4K: 0.0178 vs 0.0189 ms), 2 beat 5 at
      8 x 32K, 1 beat 2 at 32 x 128K (5.53 vs 6.08 ms): fewer partial states to write and
      merge; at least 2 blocks of the cache per split and at most 64 splits,
      so the partial states stay tiny next to K/V. Each split's chunk is recomputed on the
      device from the real lengths: a short sequence in a large static cache still spreads
      over all splits.
    - block_n: 64 keys make a 32 KB K + V stage for D = 128 in bf16; wider rows (D = 256, fp32)
      take 32 keys. Compiled for sm_90 with 3 stages this is ~70 KB of shared memory and
      < 150 registers a thread, so three programs fit an SM with loads in flight.
    The group size does not change the K/V bytes; it only sets the query tile (<= 16 rows).
    """
    del group  # the query tile is padded to 16 rows for every group the ops allow
    padded_dim = triton.next_power_of_2(head_dim)
    block_n = 64 if 2 * padded_dim * element_size <= 512 else 32
    target_programs = multiprocessor_count(device)
    splits = triton.cdiv(target_programs, max(batch * kv_heads, 1))
    splits = max(1, min(splits, triton.cdiv(n_keys, 2 * block_n), MAX_SPLITS))
    return DecodeConfig(block_n=block_n, num_warps=4, num_stages=3, num_splits=splits)
