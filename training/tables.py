"""Markdown tables for the study report and the benchmarks, through `DataFrame.to_markdown`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

__all__ = ["markdown_table", "table_rows"]


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A pipe table of already formatted cells. `disable_numparse` keeps each cell as written
    (tabulate would otherwise re-print "0.7000" as "0.7" and "+0.0123" as "0.0123"); `align` is
    one letter per column, "l" or "r" (default: all left)."""
    colalign = None
    if align is not None:
        if len(align) != len(columns):
            raise ValueError(f"align {align!r} names {len(align)} columns, the table has {len(columns)}")
        colalign = tuple({"l": "left", "r": "right"}[a] for a in align)
    frame = pd.DataFrame([[str(c) for c in row] for row in rows], columns=list(columns))
    return frame.to_markdown(index=False, disable_numparse=True, colalign=colalign)


def table_rows(markdown: str) -> list[list[str]]:
    """Every row of every pipe table in `markdown` (header rows included, rule rows not), each cell
    stripped of its padding: what a reader, or a test, compares."""
    rows = []
    for line in markdown.splitlines():
        line = line.strip()
        if line.startswith("|") and line.endswith("|") and not set(line) <= set("|-: "):
            rows.append([cell.strip() for cell in line[1:-1].split("|")])
    return rows
