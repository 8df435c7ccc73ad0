"""Aligned plain-text tables for the terminal (`orchard stack status`, `orchard search`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

GAP = "  "  # between columns


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """The header and rows (cells already text) as lines of left-aligned columns, each as wide as its
    widest cell, separated by two spaces, without trailing blanks; no final newline."""
    lines = [list(header), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(GAP.join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)
