"""Compile the selectors' Triton kernels for an H100 (sm_90a) without a GPU and report, per
kernel, its global load instructions (vector ``v4`` or single bytes ``b8``), registers,
spills and SASS instructions per warp (static count, Triton's bundled ``nvdisasm``) with the
most frequent: what a kernel became, checked before device time is spent timing it.

    python -m examples.research.offline_ptx [REPO_ROOT]

REPO_ROOT (default: this checkout) may be another checkout, to compare a kernel before and
after a change: the kernel's own file is read from there, but what that file imports from
``macopt.kernels`` (the Top-K attention's shared tile helpers) is the installed package's.
Pointers and integer arguments (strides too) are marked 16-divisible, as Triton specialises
them at launch for the shapes that matter (128K keys, D 128, contiguous caches); a unit stride
is given as a constexpr 1.
Needs Triton's bundled ``ptxas-blackwell`` (its plain ``ptxas`` may not read the PTX version).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas-blackwell"
NVDISASM = PTXAS.with_name("nvdisasm")


def _module(root: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, root / "kernels" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_report(fn, signature: dict, constexprs: dict, num_warps: int) -> str:
    """One line: the kernel's global loads by instruction, registers, spill bytes."""
    aligned = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
               if kind != "constexpr" and kind != "fp32" and name not in ("group", "width")}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, aligned), target=TARGET,
                            options={"num_warps": num_warps})
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        log = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", ptx_path, "-o", cubin],
                             capture_output=True, text=True).stderr
        sass = subprocess.run([str(NVDISASM), cubin], capture_output=True, text=True).stdout
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    loads = dict(Counter(re.findall(r"ld\.global[\w.]*", ptx)))
    ops = Counter(op.split(".")[0] for op in re.findall(
        r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))
    return (f"loads {loads} registers {regs or log.strip()[:200]} spill bytes {spills} "
            f"shared {kernel.metadata.shared} B; SASS {sum(ops.values())} a warp, "
            f"most {dict(ops.most_common(6))}")


def main(argv: list[str] | None = None) -> int:
    root = Path((argv or sys.argv[1:] or [Path(__file__).resolve().parents[2]])[0])
    _sketch_reports(root, _module(root, "sketch_select"))
    radix = _module(root, "radix_select")
    signature = {"keys_ptr": "*i32", "state_ptr": "*i64", "hist_ptr": "*i32",
                 "greater_ptr": "*i32", "n_keys": "i32", "n_chunks": "i32"}
    signature.update({name: "constexpr" for name in ("SHIFT", "FIRST", "CHUNK", "BLOCK", "BINS")})
    print(root, "radix_select _digit_histogram_kernel (4096-key chunks, 4 warps):",
          compile_report(radix._digit_histogram_kernel, signature,
                         dict(SHIFT=16, FIRST=False, CHUNK=4096, BLOCK=1024, BINS=256), 4))
    topk = _module(root, "topk_phi")
    # the fused launch, then the attention and the feature share as launches of their own
    for warps, block_n, attend, share in ((4, 64, True, True), (8, 64, True, True),
                                          (4, 32, True, True), (4, 64, True, False),
                                          (4, 64, False, True), (8, 64, False, True)):
        print(root, f"topk_phi _decode_split_kernel (bf16, d_phi 128, {block_n} keys, {warps} "
              f"warps, attend {attend}, share {share}):",
              compile_report(topk._decode_split_kernel,
                             *_topk_attention(topk, block_n, ATTEND=attend, SHARE=share), warps))
    return 0


def _sketch_reports(label, sketch) -> None:
    """The sketch's scoring and candidate-scoring launches of ``sketch`` (a module)."""
    signature = {"codes_ptr": "*u8", "dims_ptr": "*i32", "q_ptr": "*fp32",
                 "mid_start_ptr": "*i32", "mid_end_ptr": "*i32", "out_ptr": "*fp16",
                 "block_max_ptr": "*fp32", "n_kv_heads": "i32", "n_keys": "i32",
                 "head_dim": "i32", "n_packed": "i32", "group": "i32", "n_channels": "i32",
                 "n_blocks": "i32", "BLOCK_G": "constexpr", "BLOCK_C": "constexpr",
                 "BLOCK_N": "constexpr"}
    # the levels unpacked in PTX since the thirteenth session; an older checkout has no switch
    ptx = "PTX" in sketch._sketch_scores_kernel.arg_names
    if ptx:
        signature["PTX"] = "constexpr"
    for block_n, warps in ((256, 2), (256, 4), (512, 2), (512, 4), (1024, 4)):
        print(label, f"_sketch_scores_kernel (C 32, {block_n} tokens, {warps} warps):",
              compile_report(sketch._sketch_scores_kernel, signature,
                             {"BLOCK_G": 16, "BLOCK_C": 32, "BLOCK_N": block_n,
                              **({"PTX": True} if ptx else {})}, warps))
    signature = {"q_ptr": "*bf16", "k_ptr": "*bf16", "cand_ptr": "*i32", "mid_start_ptr": "*i32",
                 "mid_end_ptr": "*i32", "out_ptr": "*fp32", "n_kv_heads": "i32",
                 "n_cand": "i32", "head_dim": "i32", "group": "i32", "scale": "fp32",
                 "stride_kb": "i32", "stride_kh": "i32", "stride_kn": "i32",
                 "stride_kd": "constexpr"}
    constants = {"stride_kd": 1, "BLOCK_D": 128}
    if ptx:
        constants.update(BLOCK_G=16, PRECISION="tf32", UPCAST=False)
    signature.update({name: "constexpr" for name in constants} | {"BLOCK_R": "constexpr"})
    for rows, warps in ((64, 4), (128, 4), (128, 8)):
        print(label, f"_candidate_scores_kernel ({rows} candidates, {warps} warps):",
              compile_report(sketch._candidate_scores_kernel, signature,
                             dict(constants, BLOCK_R=rows), warps))


def _topk_attention(topk, block_n: int, **launch) -> tuple[dict, dict]:
    """Signature and constants of the Top-K + phi attention launch at Llama-3.1-8B heads in bf16
    with the default random features (d_phi 128, no MLP), as ``topk_phi._decode`` launches it."""
    pointers = ("q k v starts ends mid_start mid_end sel log_phi_q m lin_w lin_b in_w in_b "
                "out_w sq_norm o lse sub_u sub_n").split()
    kinds = ["*bf16"] * 3 + ["*i32"] * 5 + ["*fp32"] * 12
    given = {f"{name}_ptr": kind for name, kind in zip(pointers, kinds, strict=True)}
    given["qk_scale_log2"] = "fp32"
    constants = dict(stride_qd=1, stride_kd=1, stride_vd=1, stride_sk=1, HAS_MLP=False,
                     UPCAST=False, DOT_PRECISION="tf32", HALF=topk.HALF_FEATURES, BLOCK_G=16,
                     BLOCK_N=block_n, BLOCK_D=128, BLOCK_F=128, BLOCK_E=16,
                     SHARE_PRECISION=topk.SHARE_PRECISION, skip_ptr=None, HAS_SKIP=False,
                     **launch)
    signature = {name: "constexpr" if name in constants else given.get(name, "i32")
                 for name in topk._decode_split_kernel.arg_names}
    return signature, constants


if __name__ == "__main__":
    raise SystemExit(main())
