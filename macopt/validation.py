"""Input checks shared by the public ops: each error names the argument and what was expected."""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

# Re-exported: callers checking inputs read the limits from the module that checks them.
from macopt.kernels.limits import MAX_GQA_GROUP, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

__all__ = ["MAX_GQA_GROUP", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "check_decode_inputs",
           "check_key_range", "check_scale", "check_states"]


def check_decode_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float | None = None,
) -> None:
    """Validate a decode problem: ``q[B,Hq,D]``, ``k/v[B,Hkv,N,D]``, ``starts/ends[B]``, and
    ``scale`` when given."""
    if scale is not None:
        check_scale(scale)
    if q.dim() != 3:
        raise ValueError(f"q: expected shape [batch, q_heads, head_dim], got {tuple(q.shape)}")
    batch, n_q_heads, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name}: expected shape [batch, kv_heads, n_keys, head_dim], got {tuple(t.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k: expected batch {batch} and head_dim {head_dim} (from q), got {tuple(k.shape)}"
        )
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"q: head_dim {head_dim} is not supported; expected one of {SUPPORTED_HEAD_DIMS}"
        )
    n_kv_heads = k.shape[1]
    if n_kv_heads == 0 or n_q_heads % n_kv_heads != 0:
        raise ValueError(
            f"k: kv_heads {n_kv_heads} must divide q_heads {n_q_heads} (grouped-query attention)"
        )
    if n_q_heads // n_kv_heads > MAX_GQA_GROUP:
        raise ValueError(
            f"q: GQA group {n_q_heads // n_kv_heads} exceeds the supported {MAX_GQA_GROUP}"
        )
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q: dtype {q.dtype} is not supported; expected one of {SUPPORTED_DTYPES}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
    for name, t in (("starts", starts), ("ends", ends)):
        if t.shape != (batch,):
            raise ValueError(f"{name}: expected shape ({batch},), got {tuple(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected an int32 or int64 tensor, got {t.dtype}")
    if key_mask is not None:
        if key_mask.shape != (batch, k.shape[2]):
            raise ValueError(
                f"key_mask: expected shape ({batch}, {k.shape[2]}), got {tuple(key_mask.shape)}"
            )
        if key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask: expected a bool tensor, got {key_mask.dtype}")
    tensors = {"k": k, "v": v, "starts": starts, "ends": ends}
    if key_mask is not None:
        tensors["key_mask"] = key_mask
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(
                f"{name}: expected device {q.device} (the device of q), got {t.device}"
            )
    check_key_range(starts, ends, k.shape[2])


def check_scale(scale: float) -> None:
    """The softmax scale must be a finite number (NaN or infinity would make outputs NaN; 0
    is uniform attention, as in SDPA)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")


def check_key_range(starts: torch.Tensor, ends: torch.Tensor, n_keys: int) -> None:
    """``starts >= 0`` and ``ends <= n_keys`` (the kernels would clamp them silently).

    Checked on CPU tensors only: reading CUDA values would sync the device every decode step
    (and break CUDA-graph capture); fake tensors have no values.
    """
    if starts.device.type != "cpu" or is_fake(starts) or is_fake(ends):
        return
    if starts.numel() and int(starts.min()) < 0:
        raise ValueError(f"starts: expected values >= 0, got {starts.tolist()}")
    if ends.numel() and int(ends.max()) > n_keys:
        raise ValueError(f"ends: expected values <= n_keys {n_keys} (k.shape[2]), got "
                         f"{ends.tolist()}")


def check_states(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor):
    """Validate two states to merge: ``o[..., D]`` fp32 and ``lse[...]`` fp32, same shapes."""
    for name, o, lse in (("a", o_a, lse_a), ("b", o_b, lse_b)):
        if o.shape[:-1] != lse.shape:
            raise ValueError(
                f"o_{name}: expected shape lse_{name}.shape + (head_dim,) = {tuple(lse.shape)}"
                f" + (D,), got {tuple(o.shape)}"
            )
        for arg, t in ((f"o_{name}", o), (f"lse_{name}", lse)):
            if t.dtype != torch.float32:
                raise ValueError(f"{arg}: states are float32, got {t.dtype}")
    if o_a.shape != o_b.shape:
        raise ValueError(
            f"o_b: expected the shape of o_a {tuple(o_a.shape)}, got {tuple(o_b.shape)}"
        )
    for name, t in (("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b)):
        if t.device != o_a.device:
            raise ValueError(f"{name}: expected device {o_a.device}, got {t.device}")
