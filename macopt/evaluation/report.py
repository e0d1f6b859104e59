"""What ``macopt eval`` prints and draws from a result of :func:`~.harness.evaluate`: the
table of methods, the fidelity bar of the approximate methods, the Top-K (+ phi) output error
per head, and a chart of quality against keys read.

The bar (per MAC method, against the unmodified model in the same run): task accuracy per kind
equal, decode-step exp(KL) (the expected perplexity ratio) at most 1.01, and keys read by the
decode steps past ``t_min`` at least 5x below full attention's, with the measured hit rate (the
measured decode perplexity ratio is reported beside it).

The Top-K bar (per budget run both as ``topk:B`` and ``topk_phi:B``): on the heads whose
attention entropy is above the median, Top-K + phi's attention-output error is below Top-K's,
and its decode exp(KL) (whole model) is below Top-K's, with the keys read of both beside.

>>> print(quality_chart(result))  # doctest: +SKIP
<svg ...
"""

from __future__ import annotations

import math
from typing import Any

from macopt.plot import line_chart, side_by_side

PPL_TOLERANCE = 0.01
KEYS_REDUCTION = 5.0
MAC_METHODS = ("mac", "mac_topk_phi")  # the methods the bar applies to


def family(name: str, entry: dict) -> str:
    """The series a method belongs to in the chart: ``mac``, ``topk``, ``topk_phi``,
    ``mac_topk_phi``, or ``full attention`` (unmodified, exact); a calibrated MAC config (alone
    or as the MAC part of ``mac_topk_phi``) is its own series."""
    if entry["config"] is None or entry["config"]["method"] == "exact":
        return "full attention"
    kind = name.partition(":")[0]
    if kind in MAC_METHODS and (name.endswith(".json") or name.endswith(":calibrated")):
        return f"{kind} (calibrated)"
    return kind


def ppl_ratio(result: dict, name: str) -> float:
    """Decode-step perplexity of ``name`` over the unmodified model's."""
    base = result["methods"]["unmodified"]["perplexity"]["decode_perplexity"]
    return result["methods"][name]["perplexity"]["decode_perplexity"] / base


def bar(result: dict) -> dict[str, dict[str, Any]]:
    """Per MAC method (``mac`` and ``mac_topk_phi``): each part of the fidelity bar and
    whether it holds."""
    methods = result["methods"]
    base = methods["unmodified"]
    out = {}
    for name, entry in methods.items():
        if entry["config"] is None or entry["config"]["method"] not in MAC_METHODS:
            continue
        ratio = ppl_ratio(result, name)
        keys = entry["keys"]
        tasks_equal = entry["tasks"]["by_kind"] == base["tasks"]["by_kind"]
        out[name] = {
            "task_accuracy": entry["tasks"]["by_kind"],
            "task_accuracy_full": base["tasks"]["by_kind"],
            "tasks_equal": tasks_equal,
            "decode_ppl_ratio": ratio,
            "expected_ppl_ratio": math.exp(entry["perplexity"]["decode_kl"]),
            "ppl_within_1pct": abs(ratio - 1.0) <= PPL_TOLERANCE,
            "exp_kl_within_1pct": math.exp(entry["perplexity"]["decode_kl"])
            <= 1.0 + PPL_TOLERANCE,
            "hit_rate": keys["hit_rate"],
            "keys_reduction": keys["reduction"],
            "keys_5x": keys["reduction"] >= KEYS_REDUCTION,
            "decode_steps_past_t_min": keys["decode_steps"],
            "decode_sites_rewritten": (entry.get("sites") or {}).get("rewritten"),
            "met": tasks_equal
            and math.exp(entry["perplexity"]["decode_kl"]) <= 1.0 + PPL_TOLERANCE
            and keys["reduction"] >= KEYS_REDUCTION and bool((entry.get("sites") or {}).get(
                "rewritten", True)),
        }
    return out


def table(result: dict, title: str = "macopt eval") -> Any:
    """A rich table: one row per method."""
    from rich.table import Table

    out = Table(title=title)
    kinds = list(result["settings"]["kinds"])
    columns = ["method", "ppl", "decode ppl", "ratio", "exp(KL)", *kinds, "top-1 agree",
               "1st diverge", "max logit err", "hit rate", "keys read / full"]
    for column in columns:
        out.add_column(column, justify="left" if column == "method" else "right")
    for name, entry in result["methods"].items():
        ppl, agreement, keys = entry["perplexity"], entry["agreement"], entry["keys"]
        divergence = agreement["first_divergence"]
        by_kind = entry["tasks"]["by_kind"]
        sites = entry.get("sites")
        label = name if not sites or sites["rewritten"] else f"{name} (not applied)"
        out.add_row(label, f"{ppl['perplexity']:.4f}", f"{ppl['decode_perplexity']:.4f}",
                    f"{ppl_ratio(result, name):.4f}", f"{math.exp(ppl['decode_kl']):.4f}",
                    *[f"{by_kind[k]:.2f}" if k in by_kind else "-" for k in kinds],
                    f"{agreement['top1']:.3f}", "-" if divergence is None else str(divergence),
                    f"{agreement['max_logit_error']:.2e}",
                    "-" if keys["hit_rate"] is None else f"{keys['hit_rate']:.3f}",
                    f"{keys['read_fraction']:.3f} ({keys['reduction']:.1f}x)")
    return out


def bar_table(result: dict) -> Any:
    """A rich table of :func:`bar`."""
    from rich.table import Table

    out = Table(title=f"bar: tasks equal to full attention, decode exp(KL) <= "
                      f"{1 + PPL_TOLERANCE:g}, keys read >= {KEYS_REDUCTION:g}x fewer past t_min")
    for column in ("method", "tasks equal", "decode ppl ratio", "exp(KL)", "hit rate",
                   "keys fewer", "met"):
        out.add_column(column, justify="left" if column == "method" else "right")
    for name, row in bar(result).items():
        hit = row["hit_rate"]
        out.add_row(name, _mark(row["tasks_equal"]), f"{row['decode_ppl_ratio']:.4f}",
                    f"{row['expected_ppl_ratio']:.4f} {_mark(row['exp_kl_within_1pct'])}",
                    "-" if hit is None else f"{hit:.3f}",
                    f"{row['keys_reduction']:.2f}x {_mark(row['keys_5x'])}", _mark(row["met"]))
    return out


def high_entropy_heads(result: dict) -> list[tuple[int, int]]:
    """(layer, head) pairs whose mean attention entropy is above the median of all heads."""
    entropy = result.get("attention_entropy") or []
    flat = sorted(e for layer in entropy for e in layer)
    if not flat:
        return []
    median = (flat[(len(flat) - 1) // 2] + flat[len(flat) // 2]) / 2
    return [(i, h) for i, layer in enumerate(entropy) for h, e in enumerate(layer) if e > median]


def topk_bar(result: dict) -> dict[str, dict[str, Any]]:
    """Per budget with both ``topk:B`` and ``topk_phi:B`` in the run: the output error on the
    high-entropy heads (:func:`high_entropy_heads`) and the decode exp(KL) of each, their keys
    read, and whether Top-K + phi is below Top-K on both."""
    methods, heads = result["methods"], high_entropy_heads(result)
    out = {}
    for name, entry in methods.items():
        kind, _, budget = name.partition(":")
        phi = methods.get(f"topk_phi:{budget}")
        if kind != "topk" or phi is None or "topk_error" not in entry or not heads:
            continue
        rows = {}
        for label, e in (("topk", entry), ("topk_phi", phi)):
            errors = e["topk_error"]["layers"]
            rows[label] = {"error_high_entropy": sum(errors[i][h] for i, h in heads) / len(heads),
                           "error_all": e["topk_error"]["mean"],
                           "exp_kl": math.exp(e["perplexity"]["decode_kl"]),
                           "read_fraction": e["keys"]["read_fraction"]}
        lower_error = rows["topk_phi"]["error_high_entropy"] < rows["topk"]["error_high_entropy"]
        lower_kl = rows["topk_phi"]["exp_kl"] < rows["topk"]["exp_kl"]
        out[budget] = {**rows, "heads": len(heads), "lower_error": lower_error,
                       "lower_exp_kl": lower_kl, "met": lower_error and lower_kl}
    return out


def topk_bar_table(result: dict) -> Any | None:
    """A rich table of :func:`topk_bar` (None when the run has no Top-K pair)."""
    from rich.table import Table

    rows = topk_bar(result)
    if not rows:
        return None
    heads = next(iter(rows.values()))["heads"]
    out = Table(title=f"Top-K bar: Top-K + phi below Top-K in output error on the {heads} "
                "heads of above-median attention entropy, and in decode exp(KL)")
    for column in ("budget", "err Top-K", "err +phi", "exp(KL) Top-K", "exp(KL) +phi",
                   "keys Top-K", "keys +phi", "met"):
        out.add_column(column, justify="right")
    for budget, row in rows.items():
        a, b = row["topk"], row["topk_phi"]
        out.add_row(budget, f"{a['error_high_entropy']:.4f}",
                    f"{b['error_high_entropy']:.4f} {_mark(row['lower_error'])}",
                    f"{a['exp_kl']:.4f}", f"{b['exp_kl']:.4f} {_mark(row['lower_exp_kl'])}",
                    f"{a['read_fraction']:.4f}", f"{b['read_fraction']:.4f}", _mark(row["met"]))
    return out


def topk_error_table(result: dict) -> Any | None:
    """A rich table of the Top-K (+ phi) output error: a row per layer, a column per method
    (mean over heads / worst head). Layers go down the rows: a model has tens of them, and a
    column each would not fit a terminal."""
    from rich.table import Table

    rows = [(n, e["topk_error"]) for n, e in result["methods"].items() if "topk_error" in e]
    if not rows:
        return None
    out = Table(title="Top-K (+ phi) attention-output relative L1 vs exact, per layer "
                "(mean over heads / worst head)")
    out.add_column("layer", justify="right")
    for name, _ in rows:
        out.add_column(name, justify="right")
    out.add_row("all (mean)", *[f"{error['mean']:.4f}" for _, error in rows])
    for layer in range(len(rows[0][1]["layers"])):
        out.add_row(str(layer), *[f"{sum(h) / len(h):.3f} / {max(h):.3f}"
                                  for h in (error["layers"][layer] for _, error in rows)])
    return out


def quality_chart(result: dict) -> str:
    """SVG: decode perplexity ratio, task accuracy and (Top-K methods) output error against
    the keys read per decode step as a fraction of full attention's (log scale)."""
    ratio: dict[str, list] = {}
    accuracy: dict[str, list] = {}
    error: dict[str, list] = {}
    for name, entry in result["methods"].items():
        series = family(name, entry)
        x = entry["keys"]["read_fraction"]
        ratio.setdefault(series, []).append((x, ppl_ratio(result, name)))
        accuracy.setdefault(series, []).append((x, entry["tasks"]["accuracy"]))
        if "topk_error" in entry:
            error.setdefault(series, []).append((x, entry["topk_error"]["mean"]))
    x_label = "keys read / full attention (decode steps past t_min)"
    charts = [line_chart(ratio, x_label, "decode perplexity / full attention's",
                         "perplexity vs keys read", log_x=True),
              line_chart(accuracy, x_label, "task accuracy (passkey, multi-key)",
                         "retrieval vs keys read", log_x=True)]
    if error:
        charts.append(line_chart(error, x_label, "attention output rel. L1 (mean over heads)",
                                 "Top-K output error vs keys read", log_x=True))
    return side_by_side(charts)


def _mark(ok: bool) -> str:
    return "yes" if ok else "NO"
