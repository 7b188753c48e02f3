"""A benchmark's result as numbers: a `Table` of `Row`s that keeps every measurement a number, with
how to print each column, and draws its plots from those numbers (never from printed text)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...render import markdown_table, pyplot

Cell = int | float | str | None

FORMATS = {"ratio": "{:.2f}x", "share": "{:.1%}", "ms": "{:.2f} ms"}
"""How the numbers of a derived row print, by its kind; a `measured` row uses its table's column formats."""


@dataclass
class Row:
    """One row: `cells` as numbers (None: blank; a string where there is no number, such as "out of
    memory" or a check's verdict), and its `kind`: "measured" rows are plotted; "ratio", "share",
    "ms" and "check" rows are derived from them and only printed."""

    cells: list[Cell]
    kind: str = "measured"


@dataclass
class Table:
    """A titled table; `formats` print the cells of measured rows, column by column (None: as is).
    A sweep over lengths (column 0) names in `plot` the columns to draw against it (column -> y
    label), one line per method (column 1)."""

    title: str
    header: list[str]
    formats: list[str | None]
    rows: list[Row] = field(default_factory=list)
    note: str | None = None
    plot: dict[int, str] = field(default_factory=dict)
    xlabel: str = ""

    def add(self, *cells: Cell, kind: str = "measured") -> None:
        self.rows.append(Row(list(cells), kind))

    def markdown(self) -> str:
        cells = [[_format(c, self._format(row, i)) for i, c in enumerate(row.cells)] for row in self.rows]
        text = markdown_table(self.header, cells)
        return text + (f"\n\n{self.note}" if self.note else "")

    def _format(self, row: Row, column: int) -> str | None:
        if row.kind == "measured":
            return self.formats[column] if column < len(self.formats) else None
        return FORMATS.get(row.kind) if column >= 2 or len(row.cells) == 2 else None

    def series(self, column: int) -> dict[str, list[tuple[float, float]]]:
        """{method: [(length, value), ...]} of the measured rows that hold a number in `column`."""
        out: dict[str, list[tuple[float, float]]] = {}
        for row in self.rows:
            value = row.cells[column]
            if row.kind == "measured" and isinstance(value, (int, float)) and isinstance(row.cells[0], int):
                out.setdefault(str(row.cells[1]), []).append((float(row.cells[0]), float(value)))
        return out

    def to_dict(self) -> dict:
        return {"title": self.title, "header": self.header, "rows": [asdict(r) for r in self.rows]}

    def draw(self, path: Path, title: str) -> Path:
        """One panel per plotted column: its value against the length (log2 axis), a line per
        method. Returns the path."""
        plt = pyplot()
        fig, axes = plt.subplots(1, len(self.plot), figsize=(5.2 * len(self.plot), 3.8), squeeze=False)
        for ax, (column, ylabel) in zip(axes[0], self.plot.items(), strict=True):
            series = self.series(column)
            for method, points in series.items():
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", label=method)
            ax.set_xscale("log", base=2)
            lengths = sorted({int(x) for points in series.values() for x, _ in points})
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.minorticks_off()
            ax.set_xlabel(self.xlabel)
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _format(cell: Cell, fmt: str | None) -> str:
    if cell is None:
        return ""
    if isinstance(cell, str) or fmt is None:
        return str(cell)
    return fmt.format(cell)
