"""orchard.core.tables: the terminal tables of `orchard stack status` and `orchard search`."""

from __future__ import annotations

from orchard.core.tables import format_table


def test_columns_are_as_wide_as_their_widest_cell_without_trailing_blanks():
    table = format_table(("SERVICE", "PID"), [("minio1", "12345"), ("total", "")])
    assert table.splitlines() == ["SERVICE  PID", "minio1   12345", "total"]


def test_a_table_without_rows_is_its_header():
    assert format_table(["score", "key"], []) == "score  key"
