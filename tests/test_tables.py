"""The report's and benchmarks' markdown tables keep every cell exactly as formatted."""

from __future__ import annotations

import pytest

from training.tables import markdown_table


def test_cells_are_kept_as_written_and_aligned() -> None:
    text = markdown_table(("model", "AUC diff"), [("rellax", "+0.0100"), ("din", "0.7000")], align="lr")
    lines = text.splitlines()
    assert lines[1].startswith("|:") and lines[1].endswith(":|")  # left, then right-aligned
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert cells == [["rellax", "+0.0100"], ["din", "0.7000"]]  # no "0.7", no dropped "+"


def test_an_alignment_that_does_not_fit_the_columns_is_refused() -> None:
    with pytest.raises(ValueError, match="names 3 columns, the table has 2"):
        markdown_table(("a", "b"), [("1", "2")], align="lrr")
