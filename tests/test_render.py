"""The markdown tables every command prints: padded columns, one separator row."""

from __future__ import annotations

from thoughtfold.render import markdown_table


def test_markdown_table_pads_every_column_to_its_widest_cell():
    assert markdown_table(["n", "method"], [[256, "bounded"], [4096, "HF"]]).splitlines() == [
        "| n    | method  |",
        "|------|---------|",
        "| 256  | bounded |",
        "| 4096 | HF      |",
    ]
