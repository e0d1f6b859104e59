"""Tensor-parallel models (transformers' ``tp_plan``): which heads each rank's attention holds.

Under ``from_pretrained(..., tp_plan="auto")`` transformers shards ``q_proj``, ``k_proj`` and
``v_proj`` by output rows ("colwise") and ``o_proj`` by input rows ("rowwise", all-reduced).
Each rank's attention then sees only its own heads: the local q of a decode step is
``[B, Hq / tp, 1, D]``, so the graph passes find the same sites on every rank and the per-site
state (MAC rings, Top-K + phi summaries, counters), sized from the local tensors, holds only that
rank's heads. What this module adds:

- :func:`check_heads`: at ``optimize``, refuse a plan whose ranks do not hold whole heads and
  whole GQA groups (a query head whose KV head lives on another rank cannot be attended).
- :func:`gather_head_counters`: ``macopt.stats`` on a sharded model puts every rank's per-head
  counters at their global head positions (one ``all_gather_object`` over the TP group).
- :func:`describe`: the rank's heads, for ``macopt.explain``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from macopt.passes import scope

Tensor = torch.Tensor

# Column-parallel styles whose output is gathered again: every rank's attention sees all heads.
_GATHERED_STYLES = {"colwise_gather_output", "colwise_rep", "replicate"}
_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Heads:
    """The heads of one projection that this rank's attention sees: ``count`` heads from
    global head ``first`` on, of ``total``."""

    first: int
    count: int
    total: int

    def text(self) -> str:
        return f"{self.first}-{self.first + self.count - 1} of {self.total}"


@dataclass(frozen=True)
class SiteShard:
    """One attention module's heads on this rank."""

    query: Heads
    key: Heads
    value: Heads


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the tensor-parallel group and the heads of each attention module
    (by qualified name)."""

    rank: int
    size: int
    group: object  # a torch.distributed ProcessGroup
    sites: dict[str, SiteShard]

    def label(self) -> str:
        shards = set(self.sites.values())
        heads = ""
        if len(shards) == 1:
            (shard,) = shards
            heads = f": query heads {shard.query.text()}, KV heads {shard.key.text()}"
        return f"rank {self.rank} of {self.size} (tensor parallel){heads}"


def tensor_parallel(model: torch.nn.Module,
                    modules: dict[str, torch.nn.Module] | None = None) -> TensorParallel | None:
    """The tensor-parallel layout of ``model``'s attention ``modules`` (default: those that
    ``optimize`` put in scope), or None if none is sharded or torch.distributed is not running.
    Raises ValueError for a projection whose rows on this rank are not whole heads."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if modules is None:
        modules = {name: m for name, m in model.named_modules()
                   if scope.scope_of_module(m) is not None}
    sharded = {name: m for name, m in modules.items() if _sharded(m)}
    if not sharded:
        return None
    group = _tp_group(model, sharded)
    plan = dict(getattr(model, "tp_plan", None) or {})
    sites = {name: _site_shard(name, module, plan) for name, module in sharded.items()}
    return TensorParallel(dist.get_rank(group), dist.get_world_size(group), group, sites)


def check_heads(model: torch.nn.Module, modules: dict[str, torch.nn.Module],
                configs: list[object] = ()) -> None:
    """Refuse (ValueError, on every rank) a tensor-parallel plan under which some rank's
    attention does not hold whole heads and whole GQA groups, or method ``configs`` that name
    heads by index (per-head completion overrides: the passes see local head indices). A
    collective when the model is sharded: every rank calls ``optimize``, so every rank raises,
    not only the one that sees the problem (the others would hang at their next collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    sharded = {name: m for name, m in modules.items() if _sharded(m)}
    if not sharded:
        return
    group = _tp_group(model, sharded)
    try:
        layout = tensor_parallel(model, sharded)
        problem = next(filter(None, (_group_problem(n, s) for n, s in layout.sites.items())), "")
        problem = problem or _per_head_overrides(configs)
    except ValueError as error:
        problem = str(error)
    problems = [""] * dist.get_world_size(group)
    dist.all_gather_object(problems, problem, group=group)
    found = [(rank, p) for rank, p in enumerate(problems) if p]
    if found:
        rank, problem = found[0]
        raise ValueError(f"macopt.optimize: tensor-parallel plan not supported (rank {rank}): "
                         f"{problem} Each rank must hold whole query heads together with the "
                         "KV head of each: shard num_attention_heads and num_key_value_heads "
                         "evenly over the TP size (colwise q/k/v, rowwise o_proj), or use "
                         "fewer ranks.")


_SITE_HEADS: dict[int, SiteShard] = {}  # site id -> its heads on this rank (sharded sites)


def note_site_heads(model: torch.nn.Module) -> None:
    """Remember the heads of each sharded site of ``model`` by site id, for the ops that
    allocate its state (:func:`rank_feature_maps`). Called by ``optimize`` after tagging."""
    layout = tensor_parallel(model)
    for name, module in model.named_modules():
        site_id = scope.site_id_of(module)
        if site_id is not None:
            _SITE_HEADS.pop(site_id, None)
            if layout is not None and name in layout.sites:
                _SITE_HEADS[site_id] = layout.sites[name]


def site_heads(site_id: int) -> SiteShard | None:
    """The heads of a sharded site on this rank (None: the site holds every head)."""
    return _SITE_HEADS.get(site_id)


def rank_feature_maps(shard: SiteShard, key_heads: int, head_dim: int, d_phi: int,
                      maps: object | None, seed: int) -> object:
    """Top-K + phi feature maps of this rank's heads: the whole site's maps (``maps``, a
    calibrated ``FeatureMaps``, or the random features of ``seed`` that an unsharded site
    draws), sliced to the rank's query heads and to its ``key_heads`` key heads (KV heads, or
    query heads where the site repeats its keys). Drawing per rank would give every rank the
    first heads' maps."""
    from macopt.kernels.feature_maps import FeatureMaps, positive_random_features
    from macopt.phi_files import maps_for_kv_heads

    keys = shard.key if key_heads == shard.key.count else shard.query
    if maps is None:
        generator = torch.Generator().manual_seed(seed)
        maps = positive_random_features(shard.query.total, keys.total, head_dim,
                                        d_phi or head_dim, generator=generator)
    maps = maps_for_kv_heads(maps, keys.total)
    phi_q, phi_k = maps.phi_q, maps.phi_k
    mine = FeatureMaps(shard.query.count, keys.count, phi_k.head_dim, phi_k.d_phi,
                       phi_k.w_s.shape[1], phi_k.w_1.shape[1])
    for part, whole, heads in ((mine.phi_q, phi_q, shard.query), (mine.phi_k, phi_k, keys)):
        part.load_state_dict({name: p[heads.first:heads.first + heads.count]
                              for name, p in whole.state_dict().items()})
    return mine.to(phi_k.w_s.device)


def describe(model: torch.nn.Module) -> str | None:
    """This rank's heads under tensor parallelism (for ``explain``), or None."""
    layout = tensor_parallel(model)
    return layout.label() if layout is not None else None


def local_kv_heads(model: torch.nn.Module) -> int | list[int] | None:
    """KV heads per layer that this rank's cache holds under tensor parallelism (one int when
    every layer holds as many), or None when the model is not sharded."""
    layout = tensor_parallel(model)
    if layout is None:
        return None
    heads = [site.key.count for site in layout.sites.values()]
    return heads[0] if len(set(heads)) == 1 else heads


def gather_head_counters(layout: TensorParallel, sites: list[tuple[str, Tensor | None, int]]
                         ) -> list[tuple[Tensor | None, int]]:
    """Every rank's per-head counters at their global head positions, and the state bytes
    summed over ranks. ``sites``: ``(module name, counters [rows, local heads] or None,
    nbytes)``, the same sites in the same order on every rank (a collective over the TP
    group). A site no plan shards holds every head on every rank: its counters stay."""
    local = [(name, _first_head(layout, name), None if c is None else c.cpu(), n)
             for name, c, n in sites]
    ranks: list = [None] * layout.size
    dist.all_gather_object(ranks, local, group=layout.group)
    out = []
    for i, (name, counters, _) in enumerate(sites):
        theirs = [rank[i] for rank in ranks]
        if any(other != name for other, *_ in theirs):
            raise RuntimeError("macopt.stats: the ranks hold different attention sites; call "
                               "stats on every rank of the tensor-parallel group")
        nbytes = sum(n for *_, n in theirs)
        if counters is None or name not in layout.sites:
            out.append((None, nbytes))
            continue
        full = torch.zeros(counters.shape[0], layout.sites[name].query.total,
                           dtype=counters.dtype)
        for _, first, counts, _ in theirs:
            full[:, first:first + counts.shape[1]] = counts  # replicated heads: equal counts
        out.append((full, nbytes))
    return out


def _first_head(layout: TensorParallel, name: str) -> int:
    site = layout.sites.get(name)
    return site.query.first if site is not None else 0


def _sharded(module: torch.nn.Module) -> bool:
    """Whether an attention module's own projections hold DTensor (sharded) weights."""
    return any(_is_dtensor(getattr(child, "weight", None)) for child in module.children())


def _is_dtensor(value: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _tp_group(model: torch.nn.Module, sharded: dict[str, torch.nn.Module]) -> object:
    """The TP process group: transformers' mesh ("tp" dimension from 5.2x, 1-D before), else
    a 1-D mesh of the projection weights, else the whole world."""
    mesh = getattr(model, "_device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if mesh is not None and "tp" in names:
        mesh = mesh["tp"]
    if mesh is None or mesh.ndim != 1:
        weights = [c.weight for m in sharded.values() for c in m.children()
                   if _is_dtensor(getattr(c, "weight", None))]
        mesh = weights[0].device_mesh if weights else None
    return mesh.get_group() if mesh is not None and mesh.ndim == 1 else dist.group.WORLD


def _site_shard(name: str, module: torch.nn.Module, plan: dict[str, str]) -> SiteShard:
    projections = [getattr(module, p, None) for p in _PROJECTIONS]
    if not all(isinstance(p, torch.nn.Linear) for p in projections):
        raise ValueError(f"{name} ({type(module).__name__}) is sharded, and macopt checks the "
                         "head layout of separate q_proj / k_proj / v_proj linears only (a "
                         "fused qkv projection is not supported under tensor parallelism).")
    head_dim = getattr(module, "head_dim", None)
    if not head_dim:
        raise ValueError(f"{name} ({type(module).__name__}) has no head_dim attribute.")
    heads = [_heads(f"{name}.{p}", proj, _style(plan, f"{name}.{p}"), head_dim)
             for p, proj in zip(_PROJECTIONS, projections, strict=True)]
    return SiteShard(*heads)


def _style(plan: dict[str, str], name: str) -> str | None:
    """The plan's style for module ``name`` (plans name layers with ``*`` for the number)."""
    return plan.get(name, plan.get(re.sub(r"\.\d+(\.|$)", r".*\1", name)))


def _heads(name: str, proj: torch.nn.Linear, style: str | None, head_dim: int) -> Heads:
    """The heads of ``proj``'s output that this rank's attention sees."""
    total, partial = divmod(proj.out_features, head_dim)
    weight = proj.weight
    if partial or not _is_dtensor(weight) or style in _GATHERED_STYLES:
        return Heads(0, total, total)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        weight.shape, weight.device_mesh, weight.placements)
    if shape[0] % head_dim or offset[0] % head_dim:
        raise ValueError(f"{name} ({total} heads of {head_dim}) is split at rows "
                         f"{offset[0]}-{offset[0] + shape[0] - 1} on this rank: a head's "
                         "columns on two ranks (heads not divisible by the TP size).")
    return Heads(offset[0] // head_dim, shape[0] // head_dim, total)


def _per_head_overrides(configs: list[object]) -> str:
    for config in configs:
        topk = getattr(config, "topk", config)
        if any(not isinstance(setting, bool)
               for _, setting in getattr(topk, "completion_overrides", ())):
            return ("completion_overrides name query heads by index, and under tensor "
                    "parallelism each rank's attention numbers its own heads from 0.")
    return ""


def _group_problem(name: str, shard: SiteShard) -> str:
    """Why ``shard`` cannot run attention on its own (empty: it can). Local GQA pairs local
    query head i with local KV head i // (local q / local kv); each must be its global KV head."""
    q, k, v = shard.query, shard.key, shard.value
    if (k.first, k.count) != (v.first, v.count):
        return f"{name}: this rank holds keys of heads {k.text()} but values of {v.text()}."
    if not k.count or q.count % k.count or q.total % k.total:
        return (f"{name}: this rank holds query heads {q.text()} and KV heads {k.text()}: "
                "not whole GQA groups.")
    group, local_group = q.total // k.total, q.count // k.count
    for i in range(q.count):
        wanted = (q.first + i) // group
        if k.first + i // local_group != wanted:
            return (f"{name}: query head {q.first + i} needs KV head {wanted}, and this rank "
                    f"holds KV heads {k.text()} for its query heads {q.text()}: the plan "
                    "splits that KV head's query group from it.")
    return ""
