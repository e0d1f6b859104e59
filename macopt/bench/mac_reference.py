"""``macopt bench mac-reference DIR``: macopt's MAC step against the MAC reference kernel, on
the same GPU, in one process (issue 20).

The reference is ``mac_persistent_decode_bf16`` of github.com/YJHMITWEB/MAC-Attention
(Apache-2.0): one fused persistent cooperative CUDA kernel, bf16, head dim 128, GQA group <= 8,
context <= its workspace bound (131072). Its source is NOT part of macopt: ``DIR`` holds a
snapshot of ``mac_decode_persistent.cu`` (see ``DIR/SOURCE.txt``), built here on the GPU
machine through ``torch.utils.cpp_extension.load`` with its own loader's flags (fast math on,
as its published hit-curve benchmark builds it), cached under ``--build-dir``.

Same data in two layouts. One random layer (bf16 ``q``, pre-RoPE ``q_pre``, K/V) per (layout,
batch, context), as :func:`macopt.bench.mac.make_layer` draws it, with ``context`` past tokens
and the current one (``N = context + 1`` keys, the decoded position ``t = context``, its key in
the cache): the published points count context so (127K = 126976). macopt gets
``k, v[B, Hkv, N, D]`` and a :class:`~macopt.kernels.mac_reference.MACRing`; the reference gets
what SGLang hands it: a token-major pool ``k_buffer, v_buffer[B * N, Hkv, D]`` with an identity
page table ``req_to_token[B, N]``, and its ring ``query_cache, attn_cache[B, M, Hq, D]`` (bf16)
and ``lse_cache[B, M, Hq]`` (fp32, natural log), slot ``p mod M`` for position ``p`` in both.
Where both layouts do not fit in memory, macopt reads a view of the reference's pool (said so
in the record).

Hits forced the same way in both. The reference's published curves use its synthetic per-head
mode (``bench_mode = 1``): the kernel still scans its ring, then overrides each head's
decision by an exact quota (``round((1 - h) * B * Hq)`` missing (row, head) units, one
contiguous block rotated by a hash of the seed and ``t``) and matches a hit at ``j = t - 64``.
:func:`synthetic_hits` computes that pattern on the host; macopt's ring gets, for exactly those
heads, an entry at ``j = t - lag`` holding the current ``q_pre`` (every other entry is far, so
macopt's own match decides the same), and both rings get the exact fp32 prefix state of
``[0, E(j))`` in that slot, so a correct MAC output equals full attention. The first reference
call reports its decisions (``head_hit``); if they differ from the prediction, macopt's ring is
planted again with the reference's.

Checked before timed: every output is compared with an fp32 attention of the same data
(relative L2 error and max abs error; a kernel above the bf16 tolerance is not timed), the
reference's output buffer poisoned with NaN first. Timed: CUDA-graph replays through
:func:`macopt.bench.mac._time` (``do_bench`` medians, L2 flushed between replays; the published
curves replay back to back with a warm L2). Order: macopt's rows (exact, SDPA, MAC) for every
point while the reference compiles in a subprocess, then the reference at every point with
macopt's MAC step timed again right next to it (the ratio uses that pair; the first macopt time
is kept as a repeat).

>>> report = run(RefBenchConfig(source_dir=Path(".scratch/mac-ref")))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from macopt.bench import decode, mac, timing
from macopt.kernels import reference
from macopt.kernels.mac_reference import MACRing

Tensor = torch.Tensor

SOURCE_FILE = "mac_decode_persistent.cu"
OP_NAME = "mac_persistent_decode_bf16"
DEFAULT_LAYOUTS = ((32, 8), (32, 4))  # (q heads, KV heads): gqa4, gqa8
DEFAULT_BATCHES = (1, 16, 64)
DEFAULT_CONTEXTS = (32768, 126976)  # past tokens; the published "32K" and "127K"
DEFAULT_HIT_RATES = (1.0, 0.95, 0.9, 0.0)
DEFAULT_BUILD_DIR = Path("/tmp/macopt-mac-reference-build")
SDPA_BACKENDS = ("flash", "cudnn")
TOLERANCE = decode.TOLERANCE[torch.bfloat16]
PHASE1_SHARE = 0.55  # of --budget-s for macopt's rows when the reference runs after them
# The kernel-side settings of the reference's portable environment
# (portable_plugin_repro/env_mac_portable.sh, sourced by its published hit-curve run), set only
# where the caller did not set them; the kernel reads them at every call.
REFERENCE_ENV = {
    "MAC_PERSISTENT_STAGE_TOKENS": "64",
    "MAC_PERSISTENT_PARALLEL_Z2_SCHEDULE": "1",
    "MAC_PERSISTENT_MIXED_MISSPACK_Z2": "1",
    "MAC_FUSE_HIT_TAIL_IN_MERGE": "0",
    "MAC_PERSISTENT_MIXED_GROUP_FALLBACK": "1",
    "MAC_PERSISTENT_MIXED_EARLY_MISS_DIRECT": "1",
    "MAC_PERSISTENT_HIT_TAIL_GROUP": "1",
    "MAC_PERSISTENT_ALL_HIT_DIRECT": "0",
}
_U32 = 0xFFFFFFFF


@dataclasses.dataclass
class RefBenchConfig:
    source_dir: Path | None = None  # folder holding mac_decode_persistent.cu; None: macopt only
    layouts: tuple[tuple[int, int], ...] = DEFAULT_LAYOUTS
    batches: tuple[int, ...] = DEFAULT_BATCHES
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    hit_rates: tuple[float, ...] = DEFAULT_HIT_RATES
    head_dim: int = 128
    ring_size: int = 2048  # the reference's published capacity (M)
    offset: int = 256  # S: semantic_pos_ahead
    lag: int = 64  # a hit matches j = t - lag (the reference's bench_match_lag_mean)
    tau: float = 0.45
    max_depth: int = 16
    tile_tokens: int = 32  # reference launch arguments, as its published run
    match_tile_slots: int = 32
    max_context: int = 131072
    partial_fp32: bool = True
    fast_math: bool = True
    bench_seed: int = 1
    arch: str | None = None  # e.g. "90a"; None: from the device
    build_dir: Path = DEFAULT_BUILD_DIR
    build_log: Path | None = None  # default: build_dir / "build.log"
    build_timeout_s: float = 420.0
    budget_s: float = 300.0  # stop starting new points after this (the build wait included)
    emulate_reference: bool = False  # tests: a pure-torch model stands in for the CUDA op
    time_failed: bool = False  # time the reference even where its output fails the check
    device: str = "cuda"
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    seed: int = 0

    def mac_config(self, q_heads: int, kv_heads: int) -> mac.MACBenchConfig:
        """The :mod:`macopt.bench.mac` config whose helpers (layer, MAC step, timing) we reuse."""
        return mac.MACBenchConfig(
            q_heads=q_heads, kv_heads=kv_heads, head_dim=self.head_dim, dtype=torch.bfloat16,
            ring_size=self.ring_size, offset=self.offset, tau=self.tau,
            max_depth=self.max_depth, device=self.device, warmup_ms=self.warmup_ms,
            rep_ms=self.rep_ms, seed=self.seed)

    def points(self) -> list[tuple[int, int, int, int]]:
        return [(hq, hkv, b, n) for hq, hkv in self.layouts for b in self.batches
                for n in self.contexts]


# ---------------------------------------------------------------------------------------------
# The reference's conventions, written from its source (facts only; no code of it is used).


def prefix_end(pos: int, offset: int) -> int:
    """``E(p) = max(p + 1 - S, 0)``: the reference's ``cache_end_for_pos`` (macopt's with s0=0)."""
    return max(pos + 1 - offset, 0)


def ring_slot(past_len: int, ring_size: int, pos: int) -> int:
    """The reference's slot of position ``pos`` while decoding ``past_len``: its ring keeps
    ``[past_len - M, past_len)`` in order starting at slot ``past_len mod M``, which is
    ``pos mod M``, macopt's slot (the tests check this)."""
    if past_len < ring_size:
        return pos
    return (pos - (past_len - ring_size) + past_len % ring_size) % ring_size


def match_lag(lag: float, past_len: int, ring_size: int) -> int:
    """The reference's synthetic match lag: rounded, at least 1, at most ``min(M, t)``."""
    return max(1, min(int(round(lag)), min(ring_size, past_len)))


def synthetic_hits(batch: int, q_heads: int, past_len: int, hit_rate: float, seed: int = 1,
                   layer_id: int = 0) -> Tensor:
    """bool ``[B, Hq]``: the (row, head) pairs the reference's ``bench_mode = 1`` makes hit
    (exact quota, no spread: its defaults). Misses: ``round((1 - h) * B * Hq)`` units in fp32,
    the units ``u`` with ``(u + key mod B*Hq) mod B*Hq`` below that count, ``key`` a 32-bit
    hash of the seed, the layer and ``t`` (the same for every row of a step).

    >>> synthetic_hits(1, 32, 32768, 0.95).sum().item()
    30
    """
    units = batch * q_heads
    miss_rate = min(max(np.float32(1.0) - np.float32(hit_rate), np.float32(0.0)),
                    np.float32(1.0))
    misses = int(np.floor(np.float32(miss_rate * np.float32(units)) + np.float32(0.5)))
    misses = min(max(misses, 0), units)
    key = (seed & _U32) ^ ((layer_id * 0x9E3779B9) & _U32) ^ ((past_len * 0x85EBCA6B) & _U32)
    rotated = (torch.arange(units) + key % units) % units
    hit = rotated >= misses
    if past_len <= 0:
        hit[:] = False
    return hit.view(batch, q_heads)


# ---------------------------------------------------------------------------------------------
# One point: the data in both layouts.


@dataclasses.dataclass
class Point:
    """The data of one (layout, batch, context), in macopt's layout (``layer``, ``ring``) and,
    once :meth:`add_reference_layout` ran, the reference's (``ref``)."""

    config: RefBenchConfig
    mac_config: mac.MACBenchConfig
    layer: mac.Layer
    ring: MACRing
    slot: int  # the planted slot (t - lag) mod M: every row decodes the same t
    far: Tensor  # [B, Hq, D] far queries for the planted slot of missing heads
    exact_o: Tensor  # [B, Hq, D] fp32: full attention of every head
    ref: dict[str, Tensor] | None = None
    kv_layout: str = "head-major (native)"

    @property
    def past_len(self) -> int:
        return self.layer.k.shape[2] - 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.layer.q.shape[:2]) + (self.layer.k.shape[1], self.past_len)


def exact_states(layer: mac.Layer, split: int) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 ``(o, lse)`` of every head over keys ``[0, split)`` and the full attention output
    over all keys (that state merged with ``[split, N)``), one row at a time."""
    prefix_o, prefix_lse, full_o = [], [], []
    for b in range(layer.q.shape[0]):
        q, k, v = layer.q[b : b + 1], layer.k[b : b + 1], layer.v[b : b + 1]
        po, pl = reference.attention_state(q, k[:, :, :split], v[:, :, :split], layer.scale)
        so, sl = reference.attention_state(q, k[:, :, split:], v[:, :, split:], layer.scale)
        prefix_o.append(po)
        prefix_lse.append(pl)
        full_o.append(reference.merge_state(po, pl, so, sl)[0])
    return torch.cat(prefix_o), torch.cat(prefix_lse), torch.cat(full_o)


def make_point(config: RefBenchConfig, q_heads: int, kv_heads: int, batch: int,
               context: int) -> Point:
    """Layer, exact states and macopt's ring (no hit planted yet) of one point."""
    mcfg = config.mac_config(q_heads, kv_heads)
    layer = mac.make_layer(mcfg, batch, context + 1)
    t, m = context, config.ring_size
    lag = match_lag(config.lag, t, m)
    slot = ring_slot(t, m, t - lag)
    prefix_o, prefix_lse, exact_o = exact_states(layer, prefix_end(t - lag, config.offset))

    device = layer.q.device
    gen = torch.Generator(device).manual_seed(config.seed + 1)
    ring = MACRing.empty(batch, q_heads, m, config.head_dim, torch.bfloat16, device)
    positions = torch.arange(max(t - m, 0), t, device=device)
    ring.pos[:, :, positions % m] = positions.to(torch.int32)
    ring.q.normal_(generator=gen).add_(10.0)  # far from every query (distance ~128 * 100)
    ring.o.normal_(generator=gen)
    ring.lse.fill_(1.0)  # finite: every entry may be reused
    ring.o[:, :, slot] = prefix_o
    ring.lse[:, :, slot] = prefix_lse
    far = ring.q[:, :, slot].clone()
    return Point(config, mcfg, layer, ring, slot, far, exact_o)


def plant_hits(point: Point, hits: Tensor) -> None:
    """The planted slot holds the current ``q_pre`` for the heads of ``hits`` ([B, Hq] bool)
    and a far query for the others, in macopt's ring and (when built) the reference's."""
    hits = hits.to(point.layer.q.device)
    planted = torch.where(hits[..., None], point.layer.q_pre, point.far)
    point.ring.q[:, :, point.slot] = planted
    if point.ref is not None:
        point.ref["query_cache"][:, point.slot] = planted


def reference_workspace(config: RefBenchConfig, batch: int, q_heads: int, kv_heads: int,
                        device: torch.device) -> list[Tensor]:
    """The 30 workspace tensors of the op, in its argument order (``match_dist`` ..
    ``phase_cycles``), sized as its launcher checks them."""
    group, d = q_heads // kv_heads, config.head_dim
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    match_tiles = cdiv(config.ring_size, config.match_tile_slots)
    tiles_context = cdiv(config.max_context, config.tile_tokens)  # no front sinks
    tiles_reduce = cdiv(tiles_context, 32)  # kRectReduceChunk
    tiles_tail = max(1, cdiv(max(config.offset, 1), config.tile_tokens))
    partial = torch.float32 if config.partial_fp32 else torch.bfloat16

    def i32(*shape: int) -> Tensor:
        return torch.empty(*shape, dtype=torch.int32, device=device)

    def f32(*shape: int) -> Tensor:
        return torch.empty(*shape, dtype=torch.float32, device=device)

    return [
        f32(batch, q_heads, match_tiles), i32(batch, q_heads, match_tiles),
        i32(batch, q_heads, match_tiles),
        *(i32(batch, q_heads) for _ in range(6)),  # head_hit .. head_new_end
        *(i32(batch, kv_heads) for _ in range(7)),  # group_rect_begin .. group_mode
        i32(batch * q_heads * tiles_context), i32(batch * q_heads * tiles_context),
        i32(batch * kv_heads * tiles_tail), i32(batch * kv_heads * tiles_tail),
        i32(batch * q_heads * tiles_tail), i32(batch * q_heads * tiles_tail),
        i32(9),  # task_counts
        torch.empty(batch, kv_heads, tiles_context, group, d, dtype=partial, device=device),
        f32(batch, kv_heads, tiles_context, group),
        torch.empty(batch, kv_heads, tiles_reduce, group, d, dtype=partial, device=device),
        f32(batch, kv_heads, tiles_reduce, group),
        torch.empty(batch, kv_heads, tiles_tail, group, d, dtype=partial, device=device),
        f32(batch, kv_heads, tiles_tail, group),
        torch.empty(14, dtype=torch.int64, device=device),  # phase_cycles
    ]


HEAD_HIT = 3  # index of head_hit among the workspace tensors


def add_reference_layout(point: Point, share_kv: bool = False) -> None:
    """The same data in the reference's layout (token-major pool, its ring, its workspaces).
    ``share_kv``: free macopt's K/V and give it views of the pool instead (memory)."""
    layer, config = point.layer, point.config
    batch, q_heads, d = layer.q.shape
    kv_heads, n_keys = layer.k.shape[1], layer.k.shape[2]
    device = layer.q.device

    def pool(x: Tensor) -> Tensor:
        return x.permute(0, 2, 1, 3).contiguous().view(batch * n_keys, kv_heads, d)

    k_buffer = pool(layer.k)
    if share_kv:
        layer.k = k_buffer.view(batch, n_keys, kv_heads, d).permute(0, 2, 1, 3)
    v_buffer = pool(layer.v)
    if share_kv:
        layer.v = v_buffer.view(batch, n_keys, kv_heads, d).permute(0, 2, 1, 3)
        point.kv_layout = "token-major view of the reference's pool"
    tokens = torch.arange(batch * n_keys, dtype=torch.int32, device=device).view(batch, n_keys)
    ring = point.ring
    point.ref = {
        "q_post": layer.q, "q_pre": layer.q_pre, "k_buffer": k_buffer, "v_buffer": v_buffer,
        "req_to_token": tokens.contiguous(),
        "req_ids": torch.arange(batch, dtype=torch.int32, device=device),
        "past_lens": torch.full((batch,), n_keys - 1, dtype=torch.int32, device=device),
        "out_cache_loc": tokens[:, n_keys - 1].contiguous(),
        "query_cache": ring.q.transpose(1, 2).contiguous(),
        "attn_cache": ring.o.transpose(1, 2).to(torch.bfloat16).contiguous(),
        "lse_cache": ring.lse.transpose(1, 2).contiguous(),
        "out": torch.empty(batch, q_heads, d, dtype=torch.bfloat16, device=device),
        "out_lse": torch.empty(batch, q_heads, dtype=torch.float32, device=device),
    }
    point.ref["workspace"] = reference_workspace(config, batch, q_heads, kv_heads, device)


def reference_args(point: Point, hit_rate: float) -> tuple:
    """The op's positional arguments, in the order of its C++ signature."""
    r, c = point.ref, point.config
    empty = torch.empty(0)
    return (
        r["q_post"], r["q_pre"], r["k_buffer"], r["v_buffer"], r["req_to_token"], r["req_ids"],
        r["past_lens"], r["out_cache_loc"], r["query_cache"], r["attn_cache"], r["lse_cache"],
        r["out"], r["out_lse"], *r["workspace"],
        c.max_context, c.tile_tokens, c.match_tile_slots, c.offset,
        0,  # front_sink_tokens
        0,  # gen_min_limit
        0,  # lookback_right
        0,  # candidate_mode: the last M positions
        c.tau, point.layer.scale,
        0,  # debug
        1,  # bench_mode: synthetic per-head hits
        float(hit_rate),
        0.0,  # bench_hit_rate_std: exact quota
        -1.0, 0.0,  # bench_skip_ratio (off), its std
        float(c.lag), 0.0,  # bench_match_lag mean, std
        c.bench_seed,
        -1,  # bench_miss_mask: off
        0,  # bench_layer_id
        r["query_cache"],  # query_post_cache: accepted and ignored
        empty, empty, empty,  # readiness gate off
    )


# ---------------------------------------------------------------------------------------------
# Building the reference


def compile_flags(arch: str, fast_math: bool = True) -> tuple[list[str], list[str]]:
    """``(extra_cuda_cflags, extra_cflags)``: the reference loader's flags for one target.
    Naming a ``-gencode`` keeps PyTorch from adding its own arch list."""
    cuda = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-Xptxas", "-dlcm=cg"]
    if fast_math:
        cuda.append("--use_fast_math")
    return cuda, ["-O3", "-std=c++17"]


def device_arch(device: str | torch.device = "cuda") -> str:
    """``"90a"`` on Hopper (the reference builds sm_90 and sm_90a; its kernel uses no sm_90a
    instruction, so one target halves the build), else ``"<major><minor>"``."""
    major, minor = torch.cuda.get_device_capability(device)
    return "90a" if (major, minor) == (9, 0) else f"{major}{minor}"


def cuda_home() -> str | None:
    """The CUDA root for the build: ``$CUDA_HOME``/``$CUDA_PATH`` when it holds the headers, else
    the first of PyTorch's guess, ``/usr/local/cuda``, ``/usr/local/cuda-*`` that holds
    ``bin/nvcc`` and ``include/cuda_runtime.h``; set in the environment and in
    ``torch.utils.cpp_extension``. (PyTorch guesses from ``which nvcc``: a wrapper script in
    ``/usr/local/bin``, as on this workplace's CPU machines, would give ``/usr/local``.)"""
    import glob

    from torch.utils import cpp_extension

    def usable(root: str | None) -> bool:
        return bool(root) and (Path(root) / "include" / "cuda_runtime.h").is_file() and \
            (Path(root) / "bin" / "nvcc").is_file()

    given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = (given, cpp_extension.CUDA_HOME, "/usr/local/cuda",
                  *sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    home = next((root for root in candidates if usable(root)), given)
    if home:
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home
    return home


def build_extension(source_dir: Path, build_dir: Path, arch: str, fast_math: bool = True,
                    verbose: bool = False):
    """Build (or load the cached build of) the reference op; returns the module."""
    from torch.utils.cpp_extension import load

    home = cuda_home()
    if verbose:
        print(f"CUDA_HOME={home}", flush=True)
    source = Path(source_dir).resolve() / SOURCE_FILE
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found (see the module docstring)")
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    cuda_flags, c_flags = compile_flags(arch, fast_math)
    name = f"macopt_mac_reference_sm{arch}" + ("_fastmath" if fast_math else "")
    return load(name=name, sources=[str(source)], extra_cuda_cflags=cuda_flags,
                extra_cflags=c_flags, extra_include_paths=[str(write_shim(build_dir))],
                build_directory=str(build_dir), verbose=verbose)


SHIM_HEADER = """#pragma once
// Written by macopt's bench (macopt/bench/mac_reference.py), found before PyTorch's own header
// (-I precedes -isystem). The reference includes <ATen/cuda/CUDAContext.h> for
// at::cuda::getCurrentCUDAStream only; PyTorch's header also pulls in the cuSPARSE, cuBLAS and
// cuSOLVER headers, which a CUDA toolkit of nvcc and the runtime alone lacks. This one declares
// the stream functions (c10 maps at::cuda onto c10::cuda).
#include <c10/cuda/CUDAStream.h>
"""


def write_shim(build_dir: Path) -> Path:
    """The include folder of :data:`SHIM_HEADER` (rewritten only when it differs, so that a
    cached build stays valid)."""
    root = Path(build_dir) / "shim"
    header = root / "ATen" / "cuda" / "CUDAContext.h"
    if not header.is_file() or header.read_text() != SHIM_HEADER:
        header.parent.mkdir(parents=True, exist_ok=True)
        header.write_text(SHIM_HEADER)
    return root


def start_build(config: RefBenchConfig, log_path: Path) -> subprocess.Popen:
    """The build in a child process (it runs on the CPUs while macopt's rows run on the GPU)."""
    code = ("import sys; from pathlib import Path; from macopt.bench import mac_reference as m; "
            "m.build_extension(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], "
            "sys.argv[4] == '1', verbose=True); print('build ok', flush=True)")
    argv = [sys.executable, "-c", code, str(Path(config.source_dir).resolve()),
            str(Path(config.build_dir).resolve()),
            config.arch or device_arch(config.device), "1" if config.fast_math else "0"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(argv) + "\n")
        log.flush()
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd="/tmp")


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"(no build log: {err})"


# ---------------------------------------------------------------------------------------------
# A pure-torch model of the op (tests, CPU): same arguments, same outputs.


class EmulatedReference:
    """Stands in for the built extension on CPU: parses the op's positional arguments as its
    C++ signature lists them, checks the shapes its launcher checks, and computes in fp32 what
    the kernel computes for ``bench_mode = 1`` (synthetic per-head hits, no front sinks): per
    head, a hit reuses the cached prefix state at the match slot plus the keys
    ``[E(j), t]``; a miss attends ``[0, t]``; it writes ``out``, ``optional_lse``,
    ``head_hit`` and the ring entry of slot ``t mod M``."""

    N_TENSORS = 13  # q_post .. optional_lse
    N_WORKSPACE = 30
    N_SCALARS = 21  # max_context .. bench_layer_id; then 4 tensors (query_post_cache, gate)

    def mac_persistent_decode_bf16(self, *args) -> None:  # noqa: C901 (one flat model)
        if len(args) != self.N_TENSORS + self.N_WORKSPACE + self.N_SCALARS + 4:
            raise TypeError(f"{OP_NAME}: expected 68 arguments, got {len(args)}")
        (q_post, q_pre, k_buf, v_buf, req_to_token, req_ids, past_lens, out_cache_loc,
         query_cache, attn_cache, lse_cache, out, optional_lse) = args[: self.N_TENSORS]
        ws = args[self.N_TENSORS : self.N_TENSORS + self.N_WORKSPACE]
        (max_context, tile_tokens, match_tile_slots, offset, front_sink, gen_min_limit,
         lookback_right, candidate_mode, threshold, sm_scale, debug, bench_mode, hit_rate,
         hit_rate_std, skip_ratio, skip_ratio_std, lag_mean, lag_std, seed, miss_mask,
         layer_id) = args[self.N_TENSORS + self.N_WORKSPACE : -4]
        for name, x, dtype, dim in (
            ("q_post", q_post, torch.bfloat16, 3), ("q_pre", q_pre, torch.bfloat16, 3),
            ("k_buffer", k_buf, torch.bfloat16, 3), ("v_buffer", v_buf, torch.bfloat16, 3),
            ("req_to_token", req_to_token, torch.int32, 2), ("req_ids", req_ids, torch.int32, 1),
            ("past_lens", past_lens, torch.int32, 1),
            ("query_cache", query_cache, torch.bfloat16, 4),
            ("attn_cache", attn_cache, torch.bfloat16, 4),
            ("lse_cache", lse_cache, torch.float32, 3), ("out", out, torch.bfloat16, 3)):
            if x.dtype != dtype or x.dim() != dim or not x.is_contiguous():
                raise ValueError(f"{name}: expected contiguous {dtype} of rank {dim}, got "
                                 f"{x.dtype} {tuple(x.shape)}")
        n, hq, d = q_post.shape
        hkv = k_buf.shape[1]
        m = query_cache.shape[1]
        if d != 128 or hq % hkv or hq // hkv > 8:
            raise ValueError("reference: D = 128 and GQA group <= 8 only")
        if query_cache.shape != (query_cache.shape[0], m, hq, d) or \
                lse_cache.shape != query_cache.shape[:3]:
            raise ValueError("query_cache / lse_cache shapes")
        group = hq // hkv
        tiles_context = ws[24].shape[2]
        if tiles_context < -(-max_context // tile_tokens) or ws[0].shape[2] < -(-m //
                                                                         match_tile_slots):
            raise ValueError("workspace too small")
        if ws[23].shape[1:] != (hkv, tiles_context, group, d) or ws[29].dtype != torch.int64:
            raise ValueError("workspace layout")
        if (bench_mode, front_sink, miss_mask, candidate_mode) != (1, 0, -1, 0) or \
                hit_rate_std != 0.0 or lag_std != 0.0 or skip_ratio >= 0:
            raise NotImplementedError("the model covers the benchmark's settings only")
        head_hit = ws[HEAD_HIT]
        out.fill_(float("nan"))
        for row in range(n):
            t, req = int(past_lens[row]), int(req_ids[row])
            tokens = torch.cat([req_to_token[req, :t].long(), out_cache_loc[row : row + 1].long()])
            k = k_buf[tokens].permute(1, 0, 2)[None]  # [1, Hkv, t + 1, D]
            v = v_buf[tokens].permute(1, 0, 2)[None]
            hits = synthetic_hits(n, hq, t, hit_rate, seed, layer_id)[row]
            lag = match_lag(lag_mean, t, m)
            slot, e_j, e_t = ring_slot(t, m, t - lag), prefix_end(t - lag, offset), \
                prefix_end(t, offset)
            entry_lse = lse_cache[req, slot].clone()
            hits &= torch.isfinite(entry_lse) & (e_t - e_j <= m) & (t >= gen_min_limit)
            q = q_post[row : row + 1]
            band_o, band_lse = reference.attention_state(q, k[:, :, e_j:e_t], v[:, :, e_j:e_t],
                                                         sm_scale)
            full_o, full_lse = reference.attention_state(q, k[:, :, :e_t], v[:, :, :e_t],
                                                         sm_scale)
            tail_o, tail_lse = reference.attention_state(q, k[:, :, e_t:], v[:, :, e_t:],
                                                         sm_scale)
            reused = reference.merge_state(attn_cache[req, slot].float()[None], entry_lse[None],
                                           band_o, band_lse)
            h = hits[None, :, None]
            cache_o = torch.where(h, reused[0], full_o)
            cache_lse = torch.where(hits[None], reused[1], full_lse)
            o, lse = reference.merge_state(cache_o, cache_lse, tail_o, tail_lse)
            out[row] = o[0].to(out.dtype)
            if optional_lse.numel():
                optional_lse[row] = lse[0]
            head_hit[row] = hits.to(torch.int32)
            dest = t % m
            query_cache[req, dest] = q_pre[row]
            attn_cache[req, dest] = cache_o[0].to(attn_cache.dtype)
            lse_cache[req, dest] = cache_lse[0]


# ---------------------------------------------------------------------------------------------
# Checking and timing


def output_error(out: Tensor, want: Tensor) -> dict:
    """``rel_err`` (relative L2), ``max_abs_err`` and whether it passes the bf16 tolerance
    (NaN, e.g. from a poisoned element never written, fails)."""
    diff = out.float() - want
    rel = float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(want))
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    ok = math.isfinite(rel) and math.isfinite(max_abs) and rel <= TOLERANCE
    return {"rel_err": rel, "max_abs_err": max_abs, "correct": ok}


def _time(fn: Callable[[], object], point: Point) -> tuple[float, str]:
    return mac._time(fn, point.mac_config)


def warm_replay_ms(fn: Callable[[], object], approx_ms: float, budget_ms: float = 100.0) -> float:
    """Mean of back-to-back CUDA-graph replays with no L2 flush between them: how the
    reference's published curves time (warm-up 12, 60 replays); here up to 60 replays within
    ``budget_ms``. Only to compare with its published numbers: ratios use :func:`_time`."""
    replay = timing.capture_graph(fn)
    for _ in range(3):
        replay()
    n = max(5, min(60, int(budget_ms / max(approx_ms, 1e-3))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def _sync(device: str) -> None:
    if timing.is_cuda(device):
        torch.cuda.synchronize()


def measure_macopt(point: Point, hit_rates: tuple[float, ...], patterns: dict) -> list[dict]:
    """Exact decode, SDPA backends and the MAC step at each hit rate: checked, then timed."""
    layer = point.layer
    batch, q_heads, kv_heads, past_len = point.shape
    records = []
    for name in ("exact", *SDPA_BACKENDS):
        record = {"variant": name, "status": "ok"}
        try:
            fn = mac._baseline(name, point.mac_config, layer, batch, past_len + 1)
            record.update(output_error(fn(), point.exact_o))
            if record["correct"]:
                record["median_ms"], record["timer"] = _time(fn, point)
            else:
                record["status"] = "wrong"
        except decode.Unavailable as err:
            record.update(status="unavailable", detail=decode.first_line(err))
        except Exception as err:  # noqa: BLE001  (a refused backend is a result)
            record.update(status="refused", detail=decode.first_line(err))
        records.append(record)
    for rate in hit_rates:
        records.append(measure_mac_step(point, rate, patterns[rate]))
    return records


def measure_mac_step(point: Point, rate: float, hits: Tensor, time_it: bool = True) -> dict:
    plant_hits(point, hits)
    step = mac._mac_step(point.mac_config, point.layer, point.ring)
    out, hit, keys_read = step()
    record = {"variant": "mac", "hit_rate": rate, "status": "ok",
              "achieved_hit_rate": float(hit.float().mean()),
              "decisions_match": bool(torch.equal(hit.cpu(), hits.cpu())),
              "mean_keys_read": float(keys_read.float().mean()), "kv_layout": point.kv_layout,
              **output_error(out, point.exact_o)}
    if not (record["correct"] and record["decisions_match"]):
        record["status"] = "wrong"
    elif time_it:
        record["median_ms"], record["timer"] = _time(step, point)
        if timing.is_cuda(point.config.device):
            record["warm_replay_ms"] = warm_replay_ms(step, record["median_ms"])
    return record


def measure_reference(ext, point: Point, rate: float, predicted: Tensor) -> tuple[dict, Tensor]:
    """The reference at one hit rate: one checked call (poisoned output), then timed.
    Returns the record and the decisions it made ([B, Hq] bool, on the CPU)."""
    plant_hits(point, predicted)
    args = reference_args(point, rate)
    out = point.ref["out"]
    out.fill_(float("nan"))
    op = getattr(ext, OP_NAME)
    op(*args)
    _sync(point.config.device)
    decided = point.ref["workspace"][HEAD_HIT].cpu().bool()
    record = {"variant": "reference", "hit_rate": rate, "status": "ok",
              "achieved_hit_rate": float(decided.float().mean()),
              "decisions_match": bool(torch.equal(decided, predicted.cpu())),
              "task_counts": point.ref["workspace"][22].cpu().tolist(),
              **output_error(out, point.exact_o)}
    if not record["correct"]:
        record["status"] = "wrong"
        # Where it goes wrong: heads that hit against heads that missed, unwritten elements.
        for name, heads in (("hit_heads", decided), ("miss_heads", ~decided)):
            if heads.any():
                mask = heads.to(out.device)
                record[f"rel_err_{name}"] = output_error(out[mask], point.exact_o[mask])["rel_err"]
        record["nan_elements"] = int(out.isnan().sum())
        if not point.config.time_failed:
            return record, decided
    if not record["decisions_match"]:
        plant_hits(point, decided)  # macopt then gets exactly the reference's heads
    record["median_ms"], record["timer"] = _time(lambda: op(*args), point)
    if timing.is_cuda(point.config.device):
        record["warm_replay_ms"] = warm_replay_ms(lambda: op(*args), record["median_ms"])
    if record["status"] == "wrong":
        record["status"] = "wrong (timed: --time-failed)"
    return record, decided


# ---------------------------------------------------------------------------------------------
# Memory planning


def bytes_needed(config: RefBenchConfig, q_heads: int, kv_heads: int, batch: int,
                 context: int) -> dict[str, int]:
    """Rough device bytes: macopt's layout, the reference's extra, fp32 check temporaries."""
    n, d, m = context + 1, config.head_dim, config.ring_size
    kv = 2 * batch * kv_heads * n * d * 2
    mac_ring = batch * q_heads * m * (d * 2 + d * 4 + 12)
    ref_ring = batch * m * q_heads * (d * 2 + d * 2 + 4)
    tiles = -(-config.max_context // config.tile_tokens)
    partial = 4 if config.partial_fp32 else 2
    ref_ws = batch * q_heads * (tiles * (d * partial + 4 + 8) + (tiles // 32 + 8) * (d * partial
                                                                                     + 4))
    temporaries = 2 * kv_heads * n * d * 4 + 2 * q_heads * n * 4 + (256 << 20)
    return {"macopt": kv + mac_ring + temporaries, "reference_extra": kv + ref_ring + ref_ws,
            "kv": kv}


def free_bytes(device: str) -> float:
    return decode.free_bytes(torch.device(device))


# ---------------------------------------------------------------------------------------------
# The run


def environment(config: RefBenchConfig) -> dict:
    env = timing.environment(config.device)
    env["nvcc"] = _nvcc_version()
    env["reference_commit"] = _source_commit(config.source_dir)
    env["reference_env"] = {k: os.environ.get(k) for k in REFERENCE_ENV}
    if timing.is_cuda(config.device):
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["nvidia_smi"] = _nvidia_smi()
    return env


def _nvcc_version() -> str | None:
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.stdout.splitlines() if "release" in line]
    return lines[0] if lines else None


def _nvidia_smi() -> str | None:
    query = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _source_commit(source_dir: Path | None) -> str | None:
    if source_dir is None:
        return None
    try:
        for line in (Path(source_dir) / "SOURCE.txt").read_text().splitlines():
            if line.startswith("commit:"):
                return line.split()[1]
    except OSError:
        pass
    return None


def published_points(source_dir: Path | None) -> dict[tuple, dict]:
    """The reference's published H100 rows, ``(kv_heads, batch, context, hit) -> row``, from
    ``gqa4.csv`` / ``gqa8.csv`` copied next to the source (absent: empty)."""
    rows: dict[tuple, dict] = {}
    if source_dir is None:
        return rows
    for name, kv_heads in (("gqa4", 8), ("gqa8", 4)):
        path = Path(source_dir) / f"{name}.csv"
        if not path.is_file():
            continue
        with path.open() as f:
            for row in csv.DictReader(f):
                key = (kv_heads, int(row["batch"]), int(row["context_len"]),
                       round(float(row["hit_rate"]), 6))
                rows[key] = {"mac_ms": float(row["mac_ms"]),
                             "flashinfer_ms": float(row["flashinfer_ms"]),
                             "speedup_vs_flashinfer": float(row["mac_speedup_vs_flashinfer"])}
    return rows


def validate(config: RefBenchConfig) -> None:
    if config.lag < 1 or config.lag >= config.ring_size:
        raise ValueError(f"lag must be in [1, ring size): {config.lag}")
    for hq, hkv, _, context in config.points():
        if hq % hkv:
            raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
        if context <= config.offset + config.lag:
            raise ValueError(f"context {context} must exceed offset + lag "
                             f"({config.offset + config.lag}): the hit needs a non-empty prefix")


class Run:
    """Holds the report while it grows, and writes it after every point (a run cut short by
    its time limit still leaves every finished point on disk)."""

    def __init__(self, config: RefBenchConfig, json_path: Path | None, echo: Callable):
        self.config, self.json_path, self.echo = config, json_path, echo
        self.started = time.perf_counter()
        self.report = {"environment": environment(config),
                       "config": {**dataclasses.asdict(config), "source_dir": str(
                           config.source_dir), "build_dir": str(config.build_dir)},
                       "build": {"status": "not started"}, "records": [], "skipped": []}
        self.published = published_points(config.source_dir)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self) -> bool:
        return self.elapsed() > self.config.budget_s

    def add(self, point_key: tuple, records: list[dict], phase: str) -> None:
        hq, hkv, batch, context = point_key
        for record in records:
            record.update(q_heads=hq, kv_heads=hkv, batch=batch, context=context, phase=phase)
            published = self.published.get((hkv, batch, context,
                                             round(record.get("hit_rate") or 0.0, 6)))
            if record["variant"] == "reference" and published:
                record["published"] = published
        self.report["records"] += records
        self.save()

    def skip(self, point_key: tuple, phase: str, reason: str) -> None:
        hq, hkv, batch, context = point_key
        self.report["skipped"].append({"q_heads": hq, "kv_heads": hkv, "batch": batch,
                                       "context": context, "phase": phase, "reason": reason})
        self.echo(f"  skipped gqa{hq // hkv} b{batch} {context}: {reason}")
        self.save()

    def save(self) -> None:
        self.report["elapsed_s"] = self.elapsed()
        if self.json_path is not None:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            self.json_path.write_text(json.dumps(self.report, indent=1, default=str))


def run(config: RefBenchConfig, json_path: Path | None = None, echo=print) -> dict:
    """Phase 1: macopt's rows at every point while the reference builds. Phase 2: the
    reference at every point, macopt's MAC step timed again beside it."""
    validate(config)
    for key, value in REFERENCE_ENV.items():
        os.environ.setdefault(key, value)
    state = Run(config, json_path, echo)
    cuda = timing.is_cuda(config.device)
    build, log_path = None, config.build_log or config.build_dir / "build.log"
    want_reference = config.source_dir is not None or config.emulate_reference
    if config.emulate_reference:
        state.report["build"] = {"status": "emulated (pure-torch model, not the CUDA kernel)"}
    elif config.source_dir is not None and not cuda:
        state.report["build"] = {"status": "unavailable: the reference is a CUDA kernel"}
        want_reference = False
    elif config.source_dir is not None:
        build = start_build(config, log_path)
        state.report["build"] = {"status": "building", "log": str(log_path), "started_s":
                                 state.elapsed()}
        echo(f"reference build started in the background (log: {log_path})")

    patterns_of = {}  # (batch, q_heads, context) -> {rate: hits}
    for key in config.points():
        hq, hkv, batch, context = key
        patterns_of[(batch, hq, context)] = {
            r: synthetic_hits(batch, hq, context, r, config.bench_seed) for r in config.hit_rates}

    # Phase 1: macopt (leaving the reference its share of the budget)
    phase1_budget = config.budget_s * (PHASE1_SHARE if want_reference else 1.0)
    for key in config.points():
        hq, hkv, batch, context = key
        if state.elapsed() > phase1_budget:
            state.skip(key, "macopt", f"phase 1 budget spent ({phase1_budget:.0f} s of "
                                      "--budget-s)")
            continue
        need = bytes_needed(config, *key)["macopt"]
        if need > decode.MEMORY_HEADROOM * free_bytes(config.device):
            state.skip(key, "macopt", f"does not fit: needs ~{need / 2**30:.1f} GiB")
            continue
        t0 = time.perf_counter()
        point = make_point(config, *key)
        records = measure_macopt(point, config.hit_rates, patterns_of[(batch, hq, context)])
        state.add(key, records, "macopt")
        echo(_progress_line(key, records, time.perf_counter() - t0, state.elapsed()))
        del point
        _release(config.device)

    # Phase 2: the reference
    ext = None
    if build is not None:
        ext = _finish_build(build, config, state, log_path, echo)
    elif config.emulate_reference:
        ext = EmulatedReference()
    if ext is None:
        if want_reference:
            echo("reference rows skipped: no built op (see the build status above)")
        return state.report
    for key in config.points():
        hq, hkv, batch, context = key
        if state.over_budget():
            state.skip(key, "reference", "time budget spent (--budget-s)")
            continue
        if hq // hkv > 8 or config.head_dim != 128 or context + 1 > config.max_context + 1:
            state.skip(key, "reference", "outside what the reference supports")
            continue
        sizes = bytes_needed(config, *key)
        free = decode.MEMORY_HEADROOM * free_bytes(config.device)
        share = sizes["macopt"] + sizes["reference_extra"] > free
        if share and sizes["macopt"] + sizes["reference_extra"] - sizes["kv"] > free:
            state.skip(key, "reference", f"does not fit: needs ~"
                       f"{(sizes['macopt'] + sizes['reference_extra'] - sizes['kv']) / 2**30:.1f}"
                       " GiB even with shared K/V")
            continue
        t0 = time.perf_counter()
        try:
            point = make_point(config, *key)
            add_reference_layout(point, share_kv=share)
        except torch.cuda.OutOfMemoryError as err:
            state.skip(key, "reference", f"out of memory building the inputs: "
                       f"{decode.first_line(err)}")
            _release(config.device)
            continue
        records = []
        try:
            for rate in config.hit_rates:
                records += measure_pair(ext, point, rate, patterns_of[(batch, hq, context)][rate])
        except Exception as err:  # noqa: BLE001  (e.g. a fault that ends the CUDA context)
            records.append({"variant": "reference", "hit_rate": None, "status": "error",
                            "detail": decode.first_line(err, 400)})
            state.add(key, records, "reference")
            echo(f"phase 2 stopped at gqa{hq // hkv} b{batch} {_ctx(context)}: {err}")
            return state.report
        state.add(key, records, "reference")
        echo(_progress_line(key, records, time.perf_counter() - t0, state.elapsed()))
        del point
        _release(config.device)
    return state.report


def measure_pair(ext, point: Point, rate: float, predicted: Tensor) -> list[dict]:
    """The reference at one hit rate, then macopt's MAC step on the heads it decided."""
    try:
        ref_record, decided = measure_reference(ext, point, rate, predicted)
    except RuntimeError as err:  # the op refused its arguments (TORCH_CHECK)
        if "CUDA error" in str(err) or "illegal" in str(err):
            raise
        ref_record = {"variant": "reference", "hit_rate": rate, "status": "error",
                      "detail": decode.first_line(err, 400)}
        decided = predicted
    if ref_record["status"] != "ok":
        decided = predicted
        plant_hits(point, predicted)
    mac_record = measure_mac_step(point, rate, decided)
    ref_ms, mac_ms = ref_record.get("median_ms"), mac_record.get("median_ms")
    if ref_ms and mac_ms:
        mac_record["ratio_vs_reference"] = mac_ms / ref_ms
        ref_record["ratio_macopt_over_reference"] = mac_ms / ref_ms
    return [ref_record, mac_record]


def _finish_build(build: subprocess.Popen, config: RefBenchConfig, state: Run, log_path: Path,
                  echo: Callable):
    started = state.report["build"]["started_s"]
    remaining = max(1.0, config.build_timeout_s - (state.elapsed() - started))
    if build.poll() is None:
        echo(f"waiting for the reference build (at most {remaining:.0f} s more)")
    try:
        rc = build.wait(timeout=remaining)
    except subprocess.TimeoutExpired:
        build.kill()
        build.wait()
        state.report["build"].update(status=f"timed out after {config.build_timeout_s:.0f} s",
                                     log_tail=log_tail(log_path))
        echo(f"reference build timed out; log tail:\n{log_tail(log_path)}")
        state.save()
        return None
    state.report["build"]["wall_s"] = state.elapsed() - started
    if rc != 0:
        state.report["build"].update(status=f"failed (exit {rc})", log_tail=log_tail(log_path))
        echo(f"reference build FAILED (exit {rc}); log tail:\n{log_tail(log_path)}")
        state.save()
        return None
    try:
        ext = build_extension(config.source_dir, config.build_dir,
                              config.arch or device_arch(config.device), config.fast_math)
    except Exception as err:  # noqa: BLE001
        state.report["build"].update(status=f"load failed: {decode.first_line(err, 400)}",
                                     log_tail=log_tail(log_path))
        echo(f"reference load FAILED: {err}\n{log_tail(log_path)}")
        state.save()
        return None
    state.report["build"].update(status="ok", log_tail=log_tail(log_path, 12),
                                 cuda_home=os.environ.get("CUDA_HOME"))
    echo(f"reference built in {state.report['build']['wall_s']:.0f} s")
    state.save()
    return ext


def _release(device: str) -> None:
    if timing.is_cuda(device):
        torch.cuda.empty_cache()


def _progress_line(key: tuple, records: list[dict], seconds: float, elapsed: float) -> str:
    """One line a point, with its times: the output's tail holds them even if the run is cut."""
    hq, hkv, batch, context = key
    cells = []
    for r in records:
        name = r["variant"] if r.get("hit_rate") is None else f"{r['variant']}@{r['hit_rate']:g}"
        if r.get("median_ms") is not None:
            cells.append(f"{name} {r['median_ms']:.3f}")
        else:
            cells.append(f"{name} {r['status']}")
        if r["variant"] == "mac" and r.get("ratio_vs_reference"):
            cells[-1] += f" ({r['ratio_vs_reference']:.2f}x ref)"
        if r.get("rel_err") is not None and r["status"] == "wrong":
            cells[-1] += f" err {r['rel_err']:.1e}"
    return (f"gqa{hq // hkv} b{batch} {_ctx(context)} [{seconds:.0f} s, total {elapsed:.0f} s]: "
            + "; ".join(cells))


# ---------------------------------------------------------------------------------------------
# The table


def table(report: dict):
    """One row per (layout, batch, context, hit): reference and macopt MAC ms, their ratio,
    macopt's exact decode and the best SDPA backend, and the published reference time."""
    from rich.table import Table

    out = Table(title="MAC step vs the MAC reference kernel: ms of one CUDA-graph replay, L2 "
                      "flushed (mac/ref < 1: macopt faster); 'warm': back-to-back replays, as "
                      "the reference's published curves ('ref pub.', its H100)")
    for column in ("layout", "batch", "context", "hit", "ref", "mac", "mac/ref", "mac 1st",
                   "exact", "exact/ref", "sdpa", "ref warm", "mac warm", "ref pub.", "checks"):
        out.add_column(column, justify="right")
    by_point: dict[tuple, list[dict]] = {}
    for r in report["records"]:
        by_point.setdefault((r["q_heads"], r["kv_heads"], r["batch"], r["context"]), []).append(r)
    for (hq, hkv, batch, context), records in by_point.items():
        base = {r["variant"]: r for r in records if r["phase"] == "macopt" and
                r["variant"] != "mac"}
        exact = base.get("exact", {}).get("median_ms")
        sdpa = [(r["median_ms"], name) for name, r in base.items()
                if name in SDPA_BACKENDS and r.get("median_ms")]
        rates = sorted({r["hit_rate"] for r in records if r.get("hit_rate") is not None},
                       reverse=True)
        for rate in rates:
            ref = _pick(records, "reference", rate)
            first = _pick(records, "mac", rate, phase="macopt")
            mac_rec = _pick(records, "mac", rate, phase="reference") or first
            ref_ms = ref.get("median_ms") if ref else None
            mac_ms = mac_rec.get("median_ms") if mac_rec else None
            checks = [f"{name}:{r['status']}" for name, r in
                      (("ref", ref), ("mac", mac_rec)) if r and r["status"] != "ok"]
            if mac_rec and "view" in mac_rec.get("kv_layout", ""):
                checks.append("mac-on-pool-view")
            if ref and not ref.get("decisions_match", True):
                checks.append("pattern!=predicted")
            out.add_row(
                f"gqa{hq // hkv}", str(batch), _ctx(context), f"{rate:g}", _ms(ref_ms),
                _ms(mac_ms), _ratio(mac_ms, ref_ms), _ms((first or {}).get("median_ms")),
                _ms(exact), _ratio(exact, ref_ms),
                f"{min(sdpa)[0]:.3f} {min(sdpa)[1]}" if sdpa else "-",
                _ms((ref or {}).get("warm_replay_ms")), _ms((mac_rec or {}).get("warm_replay_ms")),
                _ms((ref or {}).get("published", {}).get("mac_ms")),
                " ".join(checks) or "ok")
    return out


def _pick(records: list[dict], variant: str, rate: float, phase: str | None = None):
    for r in records:
        if r["variant"] == variant and r.get("hit_rate") == rate and \
                (phase is None or r["phase"] == phase):
            return r
    return None


def _ctx(context: int) -> str:
    return f"{round(context / 1024)}K" if context >= 1024 else str(context)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


# ---------------------------------------------------------------------------------------------
# Command line


def _parse_layouts(text: str) -> tuple[tuple[int, int], ...]:
    """``"32/8,32/4"`` -> ``((32, 8), (32, 4))`` (query heads / KV heads)."""
    layouts = []
    for item in text.split(","):
        try:
            hq, hkv = (int(x) for x in item.strip().split("/"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected layouts like 32/8,32/4; got {text!r}") from None
        layouts.append((hq, hkv))
    return tuple(layouts)


def _parse_rates(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "mac-reference", help="MAC step vs the MAC reference CUDA kernel (same GPU, one run)",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, nargs="?", default=None,
                        help=f"folder holding the reference's {SOURCE_FILE} (and SOURCE.txt); "
                             "omitted: macopt's rows only")
    parser.add_argument("--layouts", type=_parse_layouts, default=DEFAULT_LAYOUTS,
                        help="query/KV heads, comma-separated (default 32/8,32/4)")
    parser.add_argument("--batches", type=decode.parse_sizes, default=DEFAULT_BATCHES)
    parser.add_argument("--contexts", type=decode.parse_sizes, default=DEFAULT_CONTEXTS,
                        help="past tokens (keys = context + 1); default 32768,126976")
    parser.add_argument("--hit-rates", type=_parse_rates, default=DEFAULT_HIT_RATES)
    parser.add_argument("--ring-size", type=int, default=2048)
    parser.add_argument("--offset", type=int, default=256)
    parser.add_argument("--lag", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--arch", default=None, help="nvcc target, e.g. 90a (default: device)")
    parser.add_argument("--no-fast-math", dest="fast_math", action="store_false")
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    parser.add_argument("--build-timeout-s", type=float, default=420.0)
    parser.add_argument("--build-log", type=Path, default=None,
                        help="where the reference build's log goes (default: "
                             "BUILD_DIR/build.log)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="start no new point after this many seconds (default 300; "
                             f"macopt's rows get {PHASE1_SHARE * 100:.0f}%% of it when the "
                             "reference runs)")
    parser.add_argument("--time-failed", action="store_true",
                        help="time the reference even where its output fails the fp32 check "
                             "(flagged in the record); default: a wrong kernel is not timed")
    parser.add_argument("--emulate-reference", action="store_true",
                        help="tests: a pure-torch model of the op instead of the CUDA build")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None,
                        help="write the report here (default: $OUT/mac_reference.json if $OUT "
                             "is set)")
    parser.set_defaults(func=_main)
    return parser


def _main(args: argparse.Namespace) -> int:
    from rich.console import Console

    if not timing.is_cuda(args.device) and os.environ.get("TRITON_INTERPRET") != "1":
        print("macopt bench mac-reference: needs a CUDA GPU (on CPU only under "
              "TRITON_INTERPRET=1, with --emulate-reference: a check, not a timing)",
              file=sys.stderr)
        return 2
    json_path = args.json
    config = RefBenchConfig(
        source_dir=args.source, layouts=args.layouts, batches=args.batches,
        contexts=args.contexts, hit_rates=args.hit_rates, head_dim=args.head_dim,
        ring_size=args.ring_size, offset=args.offset, lag=args.lag, arch=args.arch,
        fast_math=args.fast_math, build_dir=args.build_dir,
        build_timeout_s=args.build_timeout_s, budget_s=args.budget_s,
        emulate_reference=args.emulate_reference, time_failed=args.time_failed,
        device=args.device,
        warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, seed=args.seed)
    config.build_log = args.build_log
    console = Console(width=160)
    report = run(config, json_path, echo=console.print)
    console.print(table(report))
    env = report["environment"]
    console.print(f"{env['device']} | torch {env['torch']} (CUDA {env['cuda']}) | triton "
                  f"{env['triton']} | nvcc {env.get('nvcc')} | reference "
                  f"{env.get('reference_commit')} | build: {report['build']['status']}")
    return 0
