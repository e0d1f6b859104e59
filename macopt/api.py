"""``optimize``, ``explain`` and the ``macopt`` torch.compile backends.

Eager execution: for stateless methods (``exact``) ``optimize`` changes no module code. Eager
runs of such a model take the unmodified attention path (Hugging Face's ``sdpa``), which
computes exactly what the rewritten ``exact`` graph computes, so the numbers agree by
construction. Methods that keep per-site state (MAC) must run their ops at every step (the
prefill fills the rings that decode steps read), so ``optimize`` routes the model's eager
``forward`` through the ``macopt_eager`` backend: dynamo traces it, the same passes rewrite the
graph, and it runs without Inductor. Inside the user's own ``torch.compile`` the routing steps
aside (``torch.compiler.is_compiling()``), so the user's compile sees the plain forward.
"""

from __future__ import annotations

import functools
import re
import types
import warnings
from collections.abc import Callable

import torch

from macopt import distributed, prompt_mask
from macopt.config import MethodConfig
from macopt.passes import scope
from macopt.passes._compat import (
    aot_autograd,
    cache_entries,
    compile_fx,
    dynamo,
    inductor_config,
    make_boxed_func,
    reinplacing_input_writes,
    reset_code,
    select_decomp_table,
)
from macopt.passes.manager import MacoptPasses, run_passes
from macopt.passes.module_checks import (
    alibi_reason,
    latent_attention_reason,
    quantized_modules_reason,
)
from macopt.passes.report import SiteReport
from macopt.report import Explanation
from macopt.validation import SUPPORTED_HEAD_DIMS

FilterFn = Callable[[torch.nn.Module, str], bool]
_ATTENTION_CLASS = re.compile(r"attention", re.IGNORECASE)


def optimize(
    model: torch.nn.Module,
    config: MethodConfig,
    *,
    overrides: dict[str, MethodConfig | None] | None = None,
    filter_fn: FilterFn | None = None,
) -> torch.nn.Module:
    """Put ``model``'s attention modules in scope of macopt's passes, in place.

    The user's own ``torch.compile`` then rewrites their decode attention to ``config``'s
    method. ``overrides`` maps an attention module's qualified name to another config (None:
    leave it alone); ``filter_fn(module, name)`` returning False leaves a module alone.

    >>> import macopt, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=128, num_attention_heads=2,
    ...     num_key_value_heads=1, num_hidden_layers=1, intermediate_size=64, vocab_size=64))
    >>> _ = macopt.optimize(model, macopt.ExactConfig())
    >>> model.forward = torch.compile(model.forward, fullgraph=True)  # rewrites at compile

    With a stateful method (``MACConfig``) the model also works without the user's compile:
    its eager forward runs the rewritten graph through the ``macopt_eager`` backend (a dynamo
    trace on first call, no Inductor), so eager and compiled runs compute the same thing.

    >>> _ = macopt.optimize(model, macopt.MACConfig())
    >>> logits = model(torch.tensor([[1, 2, 3]])).logits  # eager: rings filled by the prefill
    """
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config: expected a macopt MethodConfig (e.g. macopt.ExactConfig()), "
                        f"got {type(config).__name__}")
    compiled = model
    model = getattr(model, "_orig_mod", model)  # torch.compile(model): tag the model inside
    _use_sdpa(model)
    _check_model_supports(model, config)
    _warn_if_alibi(model)
    plan = _plan_scope(model, config, overrides or {}, filter_fn)
    distributed.check_heads(model, {name: module for name, (module, _) in plan.items()},
                            [c for _, c in plan.values()])
    for _, module in model.named_modules():
        scope.untag(module)
    for name, (module, module_config) in plan.items():
        scope.tag(module, name, module_config)
    distributed.note_site_heads(model)
    install_passes()
    if hasattr(model, "config"):  # transformers: one decode graph per window state, not per token
        from macopt import _hf_compat

        _hf_compat.compile_window_lengths_dynamic()
    stateful = any(getattr(c, "keeps_state", False) for _, c in plan.values())
    for module, module_config in plan.values():
        _guard_site_identity(module, getattr(module_config, "keeps_state", False))
    _forget_compiled_code(model)
    _route_eager_forward(model, stateful)
    _count_calls(model)
    return compiled


def _guard_site_identity(module: torch.nn.Module, stateful: bool) -> None:
    """Make compiled code of a stateful site specific to this module.

    A rewritten graph bakes its site ids in as constants, but dynamo does not guard on which
    module instance it traced: a second model of the same class would replay the first one's
    graph and read and write the first model's state. A forward pre-hook that branches on the
    module's site id makes dynamo guard on that id, so each model compiles its own graph.
    """
    handle = module.__dict__.pop("_macopt_identity_hook", None)
    if handle is not None:
        handle.remove()
    if not stateful:
        return
    module._macopt_site_id = scope.site_id_of(module)
    module._macopt_identity_hook = module.register_forward_pre_hook(_check_site_identity)


def _check_site_identity(module: torch.nn.Module, args: tuple) -> None:
    if module._macopt_site_id < 0:  # a branch on the id's value: dynamo guards on it
        raise RuntimeError("macopt: an optimized attention module has no site id")



def _route_eager_forward(model: torch.nn.Module, stateful: bool) -> None:
    """Stateful methods: run eager forwards through the rewritten graph (``macopt_eager``);
    stateless ones: restore the plain forward if an earlier optimize() routed it."""
    earlier = model.__dict__.pop("_macopt_plain_forward", None)
    if earlier is not None:
        model.__dict__.pop("forward", None)  # our routing wrapper
        if getattr(earlier, "__func__", None) is not getattr(type(model), "forward", None):
            model.forward = earlier  # the forward was an instance attribute already
    if not stateful:
        return
    plain = model.forward
    rewritten = torch.compile(plain, backend=backend(inductor=False))
    if hasattr(model, "config"):  # transformers: no [B, 1, C, N] mask for a fresh prompt
        prompt_mask.install()

    @functools.wraps(plain)
    def forward(*args, **kwargs):  # noqa: ANN202
        if torch.compiler.is_compiling():  # the user's own compile: let it see the plain code
            return plain(*args, **kwargs)
        _ready_static_cache(model, args, kwargs)
        with prompt_mask.causal_prompt(prompt_mask.fresh_causal_prompt(args, kwargs)):
            return rewritten(*args, **kwargs)

    model._macopt_plain_forward = plain
    model.forward = _with_own_code(forward, f"macopt_{id(model):x}")


def _with_own_code(fn: Callable, label: str) -> Callable:
    """``fn`` with a code object of its own.

    Dynamo keeps compiled graphs, and counts recompiles against ``recompile_limit`` (8), per
    code object. Every optimized model's routing wrapper would otherwise share one code
    object, each model's site-id guard adding entries to it, until dynamo stops compiling and
    runs the unmodified forward: the 5th model in a process silently lost its method.
    """
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{label}")
    own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return functools.update_wrapper(own, fn)


def _ready_static_cache(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Allocate and mark a lazily allocated static cache before the traced prefill
    (:func:`macopt._hf_compat.ready_static_cache`: CUDA graphs for generate()'s decode)."""
    if not hasattr(model, "config"):
        return
    from macopt import _hf_compat

    cache = _hf_compat.cache_argument(kwargs)
    ids = _hf_compat.input_tokens(args, kwargs)
    weight = next(model.parameters(), None)
    if cache is None or ids is None or weight is None:
        return
    dtype = weight.dtype if weight.is_floating_point() else torch.get_default_dtype()
    _hf_compat.ready_static_cache(model, cache, ids.shape[0], dtype, ids.device)


def _forget_compiled_code(model: torch.nn.Module) -> None:
    """Drop dynamo's compiled code for ``model``'s forwards, so the next call traces again.

    Code compiled before optimize() (a model already compiled and run, or optimize() on
    ``torch.compile(model)``) holds no macopt site, and dynamo would keep replaying it: the
    model would run unmodified with nothing said. Dynamo keeps compiled code per code object,
    shared by every module of a class, so other models of the same classes recompile too.
    """
    codes = {getattr(type(m).forward, "__code__", None) for m in model.modules()}
    codes.add(getattr(getattr(model.forward, "__func__", model.forward), "__code__", None))
    codes |= {torch.nn.Module._call_impl.__code__, torch.nn.Module._wrapped_call_impl.__code__}
    for code in codes - {None}:
        if cache_entries(code):
            reset_code(code)
    model.__dict__.pop("_compiled_call", None)  # transformers' compiled decode step


def _count_calls(model: torch.nn.Module) -> None:
    """Count the model's eager forward calls since optimize(), for ``explain``. Under a trace
    the hook does nothing: a counter there would be a guarded constant, recompiling per call."""
    handle = model.__dict__.pop("_macopt_call_counter", None)
    if handle is not None:
        handle.remove()
    model._macopt_eager_calls = [0]

    def count(module: torch.nn.Module, args: tuple) -> None:
        if not torch.compiler.is_compiling():
            module._macopt_eager_calls[0] += 1

    model._macopt_call_counter = model.register_forward_pre_hook(count)


def explain(model: torch.nn.Module) -> Explanation:
    """What the passes found and did at each attention site of an optimized, compiled model.

    Reports come from the graphs compiled so far (decode and prefill graphs separately). On
    a tensor-parallel model they are this rank's (its graphs, its heads: the title says which).

    >>> import macopt
    >>> print(macopt.explain(model).table())  # doctest: +SKIP
    """
    model = getattr(model, "_orig_mod", model)
    reports = [r for m in model.modules() for r in scope.reports_of(m)]
    if not reports:
        raise ValueError(f"explain: no attention site of this model has been through macopt's "
                         f"passes. {why_no_reports(model)}")
    explanation = Explanation(sorted(reports, key=_report_order))
    rank = distributed.describe(model)
    if rank is not None:
        explanation.title = f"{explanation.title}, {rank}"
    return explanation


def why_no_reports(model: torch.nn.Module) -> str:
    """Why no graph of ``model`` went through macopt's passes, from what was observed."""
    calls = getattr(model, "_macopt_eager_calls", None)
    configs = [s.config for s in map(scope.scope_of_module, model.modules()) if s is not None]
    if calls is None or not configs:
        return "The model is not optimized: call macopt.optimize(model, config) first."
    alibi = alibi_reason(model)
    if alibi:  # whatever the cache or compile: advice on either would send the user in circles
        return (f"{type(model).__name__} is out of scope ({alibi}): its attention runs "
                "unmodified.")
    stateful = any(getattr(c, "keeps_state", False) for c in configs)
    if calls[0] and not stateful:
        return ("It ran eagerly, and a stateless method (exact) rewrites compiled graphs only "
                "(eager runs compute the same with the unmodified attention). For the speed, "
                "decode with a static cache on CUDA, where generate() compiles the decode step "
                "itself: model.generate(ids, cache_implementation='static').")
    limit = dynamo.config.recompile_limit
    return ("Either it has not run since macopt.optimize() (run it, e.g. generate()), or it "
            "was compiled with a backend that runs no Inductor post-grad pass (backend="
            "'eager', 'aot_eager', 'cudagraphs'; use 'inductor' or 'macopt'), or dynamo "
            f"stopped compiling its code (recompile_limit {limit} reached; torch logs "
            "'recompile_limit reached') and runs it unmodified.")


def install_passes() -> MacoptPasses:
    """Install macopt's pass manager for every later Inductor compile (idempotent), keeping
    any post-grad pass already installed by wrapping it."""
    current = inductor_config.post_grad_custom_post_pass
    if isinstance(current, MacoptPasses):
        return current
    manager = MacoptPasses(previous=current)
    inductor_config.post_grad_custom_post_pass = manager
    return manager


def backend(config: MethodConfig | None = None, *, inductor: bool = True) -> Callable:
    """A torch.compile backend running macopt's passes for this compile only.

    ``config`` also applies to sites outside optimized modules (plain PyTorch models);
    ``inductor=False`` runs the rewritten graph without Inductor (the ``macopt_eager`` path).

    >>> backend = macopt.backend(macopt.ExactConfig())
    >>> compiled = torch.compile(model, backend=backend)  # doctest: +SKIP
    """
    if not inductor:
        return _eager_backend(config)

    def compile_with_passes(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        manager = MacoptPasses(default_config=config, previous=_user_pass())
        patches = {"post_grad_custom_post_pass": manager}
        return compile_fx(gm, example_inputs, config_patches=patches)

    return compile_with_passes


def _eager_backend(config: MethodConfig | None) -> Callable:
    """The passes on aot_autograd's functionalized graph, run as it is (no Inductor).

    Cache writes stay in place, as in eager: functionalization turns ``cache.index_copy_`` into
    an out-of-place ``index_put`` of the whole cache, which aot would copy back into the input
    after the graph (at 128K tokens on Llama-8B, +16 GiB of prefill peak memory). Keeping the
    input mutations in the graph and reinplacing them writes the cache where it lies. Prefill
    attention takes SDPA's causal path where its traced mask is causal at run time, as eager
    would (``eager_route``: :mod:`macopt.passes.causal_prefill`).
    """

    def rewrite(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        with reinplacing_input_writes(gm):
            run_passes(gm.graph, config, eager_route=True)
        gm.recompile()
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=rewrite, decompositions=eager_route_decompositions(),
                        keep_inference_input_mutations=True)


# Ops eager runs as one kernel that Inductor's table splits into several for it to fuse back
# (SiLU into neg/exp/add/div, layer norm into var_mean/sub/rsqrt/mul/add, softmax into five;
# for half inputs through fp32 copies). Run without Inductor, each piece is a pass over memory:
# at 8K tokens of Llama-8B, a decomposed SiLU reads and writes ~4x what eager's does per layer.
# No pass reads inside them; kept whole, they run eager's own kernel.
_WHOLE_IN_EAGER = ("silu", "silu_", "gelu", "gelu_", "native_layer_norm", "_fused_rms_norm",
                   "_softmax", "_log_softmax")


def eager_route_decompositions() -> dict:
    """Inductor's decomposition table without the ops of :data:`_WHOLE_IN_EAGER` (what the
    ``macopt_eager`` graph decomposes: the passes are written against post-grad graphs)."""
    whole = {getattr(torch.ops.aten, name) for name in _WHOLE_IN_EAGER
             if hasattr(torch.ops.aten, name)}
    return {op: fn for op, fn in select_decomp_table().items()
            if getattr(op, "overloadpacket", None) not in whole}


def _user_pass() -> object | None:
    current = inductor_config.post_grad_custom_post_pass
    return current.previous if isinstance(current, MacoptPasses) else current


def _use_sdpa(model: torch.nn.Module) -> None:
    """Hugging Face models: select the ``sdpa`` attention where the model has one (Inductor does
    not reliably fuse the eager softmax pattern, so SDPA keeps prefill fast). A model without an
    SDPA path (transformers keeps ``'eager'``, e.g. GPT-J) keeps its eager attention: the passes
    find the softmax pattern as well (``passes/eager_sites.py``)."""
    hf_config = getattr(model, "config", None)
    if not hasattr(hf_config, "_attn_implementation"):
        return
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("sdpa")
        except ValueError:  # no SDPA path (Gemma2): its eager attention stays, sites report why
            return
    else:
        hf_config._attn_implementation = "sdpa"


def _check_model_supports(model: torch.nn.Module, config: MethodConfig) -> None:
    """Fail early, before tagging anything, on what the modules or a Hugging Face config
    already rule out."""
    quantized = quantized_modules_reason(model)
    if quantized:
        raise ValueError(f"{type(model).__name__} has {quantized}. Leave this model "
                         "unoptimized, or optimize it unquantized.")
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "num_attention_heads"):
        return
    text = getattr(hf_config, "get_text_config", lambda: hf_config)()
    latent = latent_attention_reason(text)  # MLA: head_dim is only the RoPE part of q/k
    if latent:
        raise ValueError(f"{type(model).__name__}: {latent}. Leave this model unoptimized.")
    head_dim = (getattr(text, "qk_head_dim", None) or getattr(text, "head_dim", None)
                or text.hidden_size // text.num_attention_heads)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{type(model).__name__} has head dim {head_dim}; macopt's decode "
                         f"kernels support {SUPPORTED_HEAD_DIMS}. Leave this model unoptimized.")
    has_rope = any(hasattr(text, a) for a in ("rope_parameters", "rope_theta", "rotary_dim"))
    if config.needs_pre_rope_query and not has_rope:
        raise ValueError(f"{type(model).__name__} ({text.model_type}) has no RoPE, and method "
                         f"{config.method!r} needs the pre-RoPE query; use macopt.ExactConfig().")


def _warn_if_alibi(model: torch.nn.Module) -> None:
    """ALiBi models (Bloom, MPT) are optimized, with every site they reach left untouched and
    reported; say so now, not only in ``explain``."""
    reason = alibi_reason(model)
    if reason:
        warnings.warn(f"macopt.optimize: {type(model).__name__} is out of scope ({reason}): its "
                      "attention will run unmodified (macopt.explain(model) says so).",
                      stacklevel=3)


def _plan_scope(
    model: torch.nn.Module,
    config: MethodConfig,
    overrides: dict[str, MethodConfig | None],
    filter_fn: FilterFn | None,
) -> dict[str, tuple[torch.nn.Module, MethodConfig]]:
    """Attention modules to tag and their configs; raises before anything is tagged."""
    found = attention_modules(model)
    if not found:
        raise ValueError(f"no attention module found in {type(model).__name__}: optimize() "
                         "tags modules whose class name contains 'Attention' and that call "
                         "scaled_dot_product_attention. Rename the module class, or compile with "
                         "backend=macopt.backend(config) to rewrite every SDPA site.")
    unknown = set(overrides) - set(found)
    if unknown:
        raise ValueError(f"overrides: no attention module named {sorted(unknown)}; "
                         f"attention modules are {list(found)[:4]}...")
    plan = {}
    for name, module in found.items():
        chosen = overrides.get(name, config)
        if chosen is not None and (filter_fn is None or filter_fn(module, name)):
            plan[name] = (module, chosen)
    if not plan:
        raise ValueError("every attention module was excluded by overrides or filter_fn; "
                         "nothing to optimize")
    return plan


def attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Outermost modules whose class name says attention, by qualified name."""
    found: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if module is model or any(name.startswith(p + ".") for p in found):
            continue
        if _ATTENTION_CLASS.search(type(module).__name__):
            found[name] = module
    return found


def _report_order(report: SiteReport) -> tuple:
    numbers = tuple(int(x) for x in re.findall(r"\d+", report.layer))
    return (report.phase, numbers, report.layer)


def _register_backends() -> None:
    registered = set(dynamo.list_backends(exclude_tags=()))
    if "macopt" not in registered:
        dynamo.register_backend(backend(), name="macopt")
    if "macopt_eager" not in registered:
        dynamo.register_backend(backend(inductor=False), name="macopt_eager")


_register_backends()
