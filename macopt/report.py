"""The per-site report as a list with a rich table (``macopt.explain``, ``macopt inspect``)."""

from __future__ import annotations

import io
import shutil

from rich import box
from rich.console import Console
from rich.table import Table

from macopt.passes.report import SiteReport

_COLUMNS = ("layer", "phase", "found", "RoPE form", "pre-RoPE lifted", "GQA", "head dim",
            "decision", "reason")
# Identifiers are never folded letter by letter; the free-text reason takes what is left.
_NO_WRAP = {"layer", "found", "decision"}
WIDE_COLUMNS = 140  # narrower terminals get the compact table


def render(table: Table, width: int | None = None) -> str:
    """``table`` as plain text ``width`` columns wide (default: the terminal's, or 80)."""
    width = width or shutil.get_terminal_size((80, 24)).columns
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(table)
    return buffer.getvalue()


def short_op(op: str) -> str:
    """``aten._scaled_dot_product_flash_attention.default`` -> ``sdpa_flash``: the op's
    identity in a narrow column."""
    name = op.removeprefix("aten.").removesuffix(".default").lstrip("_")
    return name.replace("scaled_dot_product_", "sdpa_").replace("_attention", "")


class Explanation(list[SiteReport]):
    """A list of :class:`SiteReport`, printable as a table (``print(explanation)``,
    ``rich.print(explanation)``)."""

    title = "macopt attention sites"  # explain() names the rank of a tensor-parallel model

    def table(self, title: str | None = None, compact: bool | None = False) -> Table:
        """One row per site, every field a column. ``compact`` keeps the identifying columns
        and lists each row's details and reason under the table, so that nothing is folded
        letter by letter at 80 columns; None: compact in a terminal narrower than
        :data:`WIDE_COLUMNS` (what printing does)."""
        title = title or self.title
        if compact is None:
            compact = shutil.get_terminal_size((80, 24)).columns < WIDE_COLUMNS
        return self._compact_table(title) if compact else self._wide_table(title)

    def _wide_table(self, title: str) -> Table:
        table = Table(title=title)
        for column in _COLUMNS:
            table.add_column(column, overflow="fold", no_wrap=column in _NO_WRAP)
        for r in self:
            table.add_row(r.layer, _phase(r), short_op(r.op), r.rope_form or "none",
                          "yes" if r.pre_rope_lifted else "no", _group(r), str(r.head_dim),
                          r.decision, _reason(r))
        return table

    def _compact_table(self, title: str) -> Table:
        notes = [f"{i}. {_details(r)}: {_reason(r)}" for i, r in enumerate(self, 1)]
        table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0),
                      show_edge=False, caption="\n".join(notes), caption_justify="left")
        for column in ("#", "layer", "phase", "found", "decision"):
            table.add_column(column, no_wrap=True, overflow="fold")
        for i, r in enumerate(self, 1):
            table.add_row(str(i), r.layer, _phase(r), short_op(r.op), r.decision)
        return table

    def __rich__(self) -> Table:
        return self.table(compact=None)

    def __str__(self) -> str:
        return render(self.table(compact=None))

    @property
    def rewritten(self) -> list[SiteReport]:
        return [r for r in self if r.rewritten]


def _phase(report: SiteReport) -> str:
    return f"{report.phase} (q={report.query_len})"


def _group(report: SiteReport) -> str:
    if report.group and report.group > 1:
        return f"{report.gqa_form} g={report.group}"
    return str(report.group)


def _details(report: SiteReport) -> str:
    lifted = ", pre-RoPE lifted" if report.pre_rope_lifted else ""
    return (f"RoPE {report.rope_form or 'none'}{lifted}, GQA {_group(report)}, head dim "
            f"{report.head_dim}")


def _reason(report: SiteReport) -> str:
    if not report.prefill_attention:
        return report.reason
    return f"{report.reason}\nattention: {report.prefill_attention}"
