"""The per-site report as a list with a rich table (``macopt.explain``, ``macopt inspect``)."""

from __future__ import annotations

from rich.table import Table

from macopt.passes.report import SiteReport

_COLUMNS = ("layer", "phase", "found", "RoPE form", "pre-RoPE lifted", "GQA", "head dim",
            "decision", "reason")


class Explanation(list[SiteReport]):
    """A list of :class:`SiteReport`, printable as a table (``rich.print(explanation)``)."""

    def table(self, title: str = "macopt attention sites") -> Table:
        table = Table(title=title)
        for column in _COLUMNS:
            table.add_column(column, overflow="fold")
        for r in self:
            group = f"{r.gqa_form} g={r.group}" if r.group and r.group > 1 else str(r.group)
            table.add_row(r.layer, f"{r.phase} (q={r.query_len})", r.op, r.rope_form or "none",
                          "yes" if r.pre_rope_lifted else "no", group, str(r.head_dim),
                          r.decision, _reason(r))
        return table

    def __rich__(self) -> Table:
        return self.table()

    @property
    def rewritten(self) -> list[SiteReport]:
        return [r for r in self if r.rewritten]


def _reason(report: SiteReport) -> str:
    if not report.prefill_attention:
        return report.reason
    return f"{report.reason}\nattention: {report.prefill_attention}"
