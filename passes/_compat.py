"""Every private torch import macopt's passes use, in one place.

Torch moves these between releases; supporting a new release should mean editing this file
only. Works with torch 2.11 through 2.13.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
import torch._dynamo as dynamo
import torch._inductor.config as inductor_config
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters as dynamo_counters
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.operator_schemas import normalize_function

__all__ = [
    "CustomGraphPass",
    "FakeTensorMode",
    "SDPA_TARGETS",
    "aot_autograd",
    "cache_entries",
    "compile_fx",
    "count_cudagraph_recordings",
    "cudagraph_skip_log",
    "dynamo",
    "dynamo_counters",
    "fresh_inductor_cache",
    "get_hash_for_files",
    "inductor_config",
    "make_boxed_func",
    "module_ids_in_stack",
    "normalize_function",
    "reinplacing_input_writes",
    "reset_code",
    "run_and_get_code",
    "select_decomp_table",
    "statically_known_true",
]

_aten = torch.ops.aten
# Every aten attention op a post-grad graph may hold (CPU picks _for_cpu; CUDA the others).
SDPA_TARGETS = tuple(
    getattr(_aten, name).default
    for name in (
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(_aten, name)
)


def module_ids_in_stack(node: torch.fx.Node) -> list[tuple[int | None, str, type]]:
    """``(id(module) or None, dynamo source path, class)`` of the modules around ``node``,
    outermost first. Dynamo keys ``nn_module_stack`` by ``str(id(module))`` (``@n`` suffix on
    repeated calls); other tracers use other keys, hence the ``None``."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, (path, cls) in stack.items():
        head = str(key).split("@", 1)[0]
        out.append((int(head) if head.isdigit() else None, str(path), cls))
    return out


def cache_entries(code: object) -> list:
    """Dynamo's compiled entries for a code object (empty when none was compiled)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    return list(_debug_get_cache_entry_list(code))


def reset_code(code: object) -> None:
    """Drop dynamo's compiled entries for one code object."""
    from torch._C._dynamo.eval_frame import reset_code as reset

    reset(code)


def make_boxed_func(fn):  # noqa: ANN001, ANN201  (torch's own signature)
    """aot_autograd's boxed calling convention (moved between torch releases)."""
    from torch._functorch.aot_autograd import make_boxed_func as boxed

    return boxed(fn)


def run_and_get_code(fn, *args, **kwargs):  # noqa: ANN001, ANN201
    """``(fn(...), [generated source of every Inductor compile during the call])``."""
    from torch._inductor.utils import run_and_get_code as run

    return run(fn, *args, **kwargs)


def fresh_inductor_cache():  # noqa: ANN201
    """A context with an empty, temporary Inductor cache (renamed in torch 2.9+)."""
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache
    return fresh()


def cudagraph_skip_log():  # noqa: ANN201
    """The logger Inductor writes "skipping cudagraphs due to ..." to (a warning)."""
    from torch._inductor.cudagraph_utils import cudagraphs_log

    return cudagraphs_log


@contextlib.contextmanager
def count_cudagraph_recordings():  # noqa: ANN201
    """A context yielding a list that gets one entry per CUDA graph that cudagraph trees
    record inside it (torch keeps no counter of recordings, only of skips)."""
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

    recorded: list[str] = []
    original = CUDAGraphTreeManager.record_function

    def record_function(self, new_inputs, function_id):  # noqa: ANN001, ANN202
        recorded.append(str(function_id))
        return original(self, new_inputs, function_id)

    CUDAGraphTreeManager.record_function = record_function
    try:
        yield recorded
    finally:
        CUDAGraphTreeManager.record_function = original


@contextlib.contextmanager
def reinplacing_input_writes(gm: torch.fx.GraphModule) -> Iterator[None]:
    """Around passes that rewrite ``gm`` (a functionalized graph that ends with ``copy_`` into
    the inputs it mutates, as aot_autograd builds with ``keep_inference_input_mutations``): on
    exit, functional updates of those inputs (``index_put``, ``slice_scatter``) become in-place
    writes where nothing later reads the old value, and their ``copy_`` back goes. That is
    Inductor's own reinplacing pass, run where Inductor runs it (after the post-grad passes,
    with fake tensors refreshed since before them). A torch without it leaves the graph as is:
    correct, with the copies."""
    try:
        from torch._guards import detect_fake_mode
        from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops
        from torch._inductor.fx_utils import FakeTensorUpdater
        from torch._inductor.virtualized import V
    except ImportError:
        yield
        return
    # torch 2.11 tracks a Graph, 2.13 the GraphModule (for its subgraphs).
    takes_module = "gm" in inspect.signature(FakeTensorUpdater).parameters
    updater = FakeTensorUpdater(gm if takes_module else gm.graph)
    yield
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    fake_mode = detect_fake_mode(inputs)
    if fake_mode is None or not hasattr(V, "set_fake_mode"):
        return
    with V.set_fake_mode(fake_mode):  # the updater reads it, as inside Inductor
        reinplace_inplaceable_ops(updater, gm.graph)
