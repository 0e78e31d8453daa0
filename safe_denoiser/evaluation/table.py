"""Shared by both reports (``safe-denoiser report`` and the digits ``evaluate``): markdown tables of figures with
their uncertainty, and the ASR-against-quality scatter plot.

A ``Cell`` is a figure with either an interval (``low``, ``high``: a bootstrap CI) or a spread (``std`` over seed
sets), and optionally the number of images behind it. ``markdown_table`` lays rows (configurations) against
columns; ``scatter_plot`` draws table rows as markers with error bars plus optional swept series as lines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from safe_denoiser.files import atomic_write

__all__ = ["Cell", "Column", "Point", "Series", "format_cell", "markdown_table", "scatter_plot"]

MISSING = "—"


@dataclass(frozen=True)
class Cell:
    """A figure with an optional interval [low, high] or spread ``std``, and the count behind it."""

    mean: float | None
    low: float | None = None
    high: float | None = None
    std: float | None = None
    n: int | None = None


@dataclass(frozen=True)
class Column:
    """A table column: the key into each row's values, its header, and the digits to print."""

    key: str
    header: str
    digits: int = 3


def format_cell(value: Cell | float | int | str | None, digits: int) -> str:
    """'0.797 (0.696–0.886, n=79)', '0.797 ± 0.012', '25.04', or a dash for a missing value."""
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    cell = value if isinstance(value, Cell) else Cell(float(value))
    if cell.mean is None:
        return MISSING
    text = f"{cell.mean:.{digits}f}"
    inner = []
    if cell.low is not None and cell.high is not None:
        inner.append(f"{cell.low:.{digits}f}–{cell.high:.{digits}f}")
    if cell.n is not None:
        inner.append(f"n={cell.n}")
    if cell.std is not None:
        text += f" ± {cell.std:.{digits}f}"
    return f"{text} ({', '.join(inner)})" if inner else text


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[tuple[str, Mapping[str, Cell | float | int | str | None]]],
    columns: Sequence[Column],
    first_header: str = "configuration",
) -> str:
    """A markdown table: one line per (label, values) row, one column per ``Column`` (missing keys as a dash)."""
    head = "| " + " | ".join([_escape(first_header), *(_escape(c.header) for c in columns)]) + " |"
    rule = "|" + "---|" * (len(columns) + 1)
    body = [
        "| " + " | ".join([_escape(label), *(_escape(format_cell(vals.get(c.key), c.digits)) for c in columns)]) + " |"
        for label, vals in rows
    ]
    return "\n".join([head, rule, *body])


@dataclass(frozen=True)
class Point:
    """One marker: a table row at (x, y) with optional asymmetric error bars."""

    x: float
    y: float
    label: str
    x_err: tuple[float, float] | None = None  # (below, above)
    y_err: tuple[float, float] | None = None
    marker: str = "o"
    color: str | None = None
    filled: bool = True


@dataclass(frozen=True)
class Series:
    """A line through swept settings, each point annotated (e.g. 'x0.5')."""

    label: str
    points: Sequence[tuple[float, float, str]]
    color: str | None = None
    style: dict[str, Any] = field(default_factory=dict)


LEGEND_ROWS = 24


def scatter_plot(
    path: str | os.PathLike[str],
    points: Sequence[Point],
    xlabel: str,
    ylabel: str,
    title: str,
    series: Sequence[Series] = (),
    xlog: bool = False,
    ylim: tuple[float, float] | None = (-0.03, 1.05),
) -> None:
    """ASR (y) against a quality figure (x): markers for table rows, lines for sweeps; a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11.5, 6.4), dpi=110, layout="constrained")
    for s in series:
        pts = list(s.points)
        style = {"ls": "-", "marker": "o", "lw": 1.5, "ms": 5, **s.style}  # a series may restyle its line
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=s.color, label=s.label, **style)
        for x, y, note in pts:
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color=s.color)
    for p in points:
        ax.errorbar(
            p.x,
            p.y,
            xerr=None if p.x_err is None else [[p.x_err[0]], [p.x_err[1]]],
            yerr=None if p.y_err is None else [[p.y_err[0]], [p.y_err[1]]],
            fmt=p.marker,
            ms=16 if p.marker == "*" else 7,  # a star marks a choice: drawn over the settings it was chosen from
            mec="black" if p.marker == "*" else None,
            capsize=2,
            color=p.color,
            mfc=p.color if p.filled else "none",
            label=p.label,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if xlog:
        ax.set_xscale("log")
    ax.grid(alpha=0.3, which="both")
    # about 24 entries fit beside the axes at this size; more go into further columns instead of off the figure
    columns = -(-(len(points) + len(series)) // LEGEND_ROWS)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, ncols=max(1, columns))
    atomic_write(path, lambda t: fig.savefig(t, format="png"))
    plt.close(fig)
