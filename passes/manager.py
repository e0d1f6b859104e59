"""The pass manager: one Inductor ``CustomGraphPass`` that runs macopt's passes.

Per attention site in scope: find it, lift the pre-RoPE query, decide, rewrite decode sites
to the method's op (and, for methods with per-site state, give prefill sites the method's
state builder), record a :class:`SiteReport`. While any module is tagged (or the ``macopt``
backend carries a config), ``uuid()`` is None: Inductor's FX graph cache is bypassed, so every
compile runs the passes and reports its sites. Otherwise it hashes the pass sources, torch's
version and any pass it wraps.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch.fx import Graph

from macopt.config import MethodConfig
from macopt.passes import scope
from macopt.passes._compat import CustomGraphPass, get_hash_for_files
from macopt.passes.causal_prefill import rewrite_causal_prefill, under_inductor
from macopt.passes.decode_rewrite import decode_skip_reason, is_decode, rewrite_decode_site
from macopt.passes.eager_sites import find_eager_attention_sites
from macopt.passes.mask_holes import NOTE as MASK_HOLES_NOTE
from macopt.passes.methods import rewrites_for
from macopt.passes.module_checks import unsupported_module_reason
from macopt.passes.prefill_rewrite import prefill_skip_reason, rewrite_prefill_site
from macopt.passes.report import SiteReport
from macopt.passes.rope import lift_pre_rope_query
from macopt.passes.sites import AttentionSite, find_attention_sites

_PASS_SOURCES = tuple(sorted(str(p) for p in Path(__file__).parent.glob("*.py")))


class MacoptPasses(CustomGraphPass):
    """Runs macopt's passes on post-grad graphs; composes with a pass installed before it.

    ``default_config`` applies to sites outside any tagged module (the ``macopt`` backend's
    config for plain models); None leaves them alone.
    """

    def __init__(self, default_config: MethodConfig | None = None,
                 previous: object | None = None):
        self.default_config = default_config
        self.previous = previous

    def __call__(self, graph: Graph) -> None:
        if self.previous is not None:
            self.previous(graph)
        run_passes(graph, self.default_config)

    def uuid(self) -> str | None:
        previous = self.previous.uuid() if hasattr(self.previous, "uuid") else None
        if self.previous is not None and previous is None:
            return None  # the wrapped pass is uncacheable, so are we
        if self.default_config is not None or scope.any_tag():
            # A graph served from Inductor's FX graph cache reruns no pass, so its sites would
            # have no report (``macopt.explain`` would see nothing), and a stateful graph bakes
            # in site ids that no key can tell apart between two models of one class. Graphs
            # that may hold macopt sites are therefore always compiled cold.
            return None
        extra = "\n".join((torch.__version__, str(previous)))
        return get_hash_for_files(_PASS_SOURCES, extra).hex()


def run_passes(graph: Graph, default_config: MethodConfig | None = None,
               eager_route: bool = False) -> list[SiteReport]:
    """Analyse and rewrite every in-scope attention site of ``graph``; return the reports.

    ``eager_route`` (the ``macopt_eager`` backend, no Inductor after it): prefill attention
    also takes SDPA's causal path where its mask is causal at run time
    (:mod:`.causal_prefill`), at every prefill site; in-scope sites' reports say what it did.
    Under Inductor the same, at in-scope sites only, unless turned off
    (:func:`.causal_prefill.under_inductor`).
    """
    reports, seen_ids, fresh_untagged, by_node = [], set(), set(), {}
    for site in find_attention_sites(graph) + find_eager_attention_sites(graph):
        found = scope.scope_of(site.node)
        module, config = found if found else (None, None)
        config = found[1].config if found else default_config
        if config is None:
            continue
        layer = found[1].qualname if found else _readable_path(site.module_path)
        module_id = id(module) if module is not None else site.module_id
        site_id = None
        if getattr(config, "keeps_state", False) and module_id is not None:
            site_id = scope.site_id_for(module_id)
            if site_id in seen_ids:  # one module attending twice in a graph: shared state
                site_id = None
            seen_ids.add(site_id)
        report = process_site(graph, site, module, config, layer, site_id)
        if module_id is not None and module is None and module_id not in fresh_untagged:
            # An untagged module (the backend path) is known only by id, which a new object
            # may reuse after it dies: its latest compile's reports replace older ones.
            scope.forget_reports(module_id)
            fresh_untagged.add(module_id)
        by_node[site.node] = len(reports)
        reports.append((module_id, report))
    if any(r.rewritten for _, r in reports):
        graph.eliminate_dead_code()
        graph.lint()
    if eager_route or under_inductor():  # Inductor: the optimized modules' sites only
        for outcome in rewrite_causal_prefill(graph, None if eager_route else set(by_node)):
            index = by_node.get(outcome.site.node)
            if index is not None:
                module_id, report = reports[index]
                reports[index] = (module_id, dataclasses.replace(
                    report, prefill_attention=outcome.description))
    for module_id, report in reports:
        if module_id is not None:
            scope.record(module_id, report)
    return [report for _, report in reports]


def process_site(
    graph: Graph, site: AttentionSite, module: object, config: MethodConfig, layer: str,
    site_id: int | None = None,
) -> SiteReport:
    """Decide one site and rewrite it when it is a supported decode site, or a prefill site of
    a method with a state builder. ``site_id`` keys the state of stateful methods."""
    rope, _ = lift_pre_rope_query(site.q)
    decode = is_decode(site)
    stateless = not getattr(config, "keeps_state", False)
    rewrites = rewrites_for(config)
    if not decode and (rewrites is None or rewrites.prefill is None):
        decision, reason = "kept", f"prefill graph (query length {site.query_len})"
    else:
        skip = unsupported_module_reason(module) or site.unsupported
        if rewrites is None:
            skip = skip or (f"no method registered for {type(config).__name__} "
                            f"(macopt.passes.methods.register_method)")
        if not stateless and site_id is None:
            skip = skip or ("the module has no identity to key its state by, or attends more "
                            "than once in this graph (its state would be shared)")
        check = decode_skip_reason if decode else prefill_skip_reason
        skip = skip or check(site, rope, config)
        decision, reason = ("skipped", skip) if skip else ("rewritten", "")
    report = SiteReport(
        layer=layer,
        op=site.op_name.removeprefix("aten::"),
        phase="decode" if decode else "prefill",
        query_len=str(site.query_len),
        rope_form=rope.form if rope else None,
        pre_rope_lifted=rope is not None,
        gqa_form=site.gqa_form,
        group=site.group,
        head_dim=site.head_dim,
        method=config.method,
        decision=decision,
        reason=reason or rewrites.description(decode),
    )
    holes_to_mind = decode and site.attn_mask is not None
    if decision == "rewritten" and holes_to_mind and not rewrites.honours_mask_holes:
        report = dataclasses.replace(report, reason=f"{report.reason} {MASK_HOLES_NOTE}")
    if decision == "rewritten" and decode:
        rewrite_decode_site(graph, site, rope, config, rewrites, site_id)
    elif decision == "rewritten":
        rewrite_prefill_site(graph, site, rope, config, rewrites, site_id)
    return report


def _readable_path(path: str) -> str:
    """``L['self'].model.layers.0.self_attn`` -> ``model.layers.0.self_attn``."""
    return re.sub(r"^L\[['\"]\w+['\"]\]\.?", "", path)

