"""evaluation.table.scatter_plot's layout: the legend of a long table stays inside the figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from safe_denoiser.evaluation import table


def _legend_of(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, n_points: int) -> Any:
    import matplotlib.axes

    made: list[Any] = []
    original = matplotlib.axes.Axes.legend

    def keep(self: Any, *args: Any, **kwargs: Any) -> Any:
        made.append(original(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", keep)
    points = [table.Point(0.01 * i, 0.02 * i, f"row number {i} + ours (odds)") for i in range(n_points)]
    series = [table.Series("a sweep", [(0.0, 0.5, "x1"), (0.1, 0.4, "x2")])]
    table.scatter_plot(tmp_path / "p.png", points, "x", "y", "title", series)
    assert (tmp_path / "p.png").stat().st_size > 0
    return made[0]


@pytest.mark.parametrize("n_points", [5, 23, 42, 60])
def test_a_long_legend_stays_inside_the_figure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, n_points: int) -> None:
    """The full mini-SD table has 42 rows: its legend must fit the figure's height, in as many columns as needed."""
    legend = _legend_of(monkeypatch, tmp_path, n_points)
    fig = legend.figure
    fig.canvas.draw()
    box, frame = legend.get_window_extent(), fig.bbox
    assert box.y0 >= frame.y0 - 1 and box.y1 <= frame.y1 + 1, (box, frame)
    assert box.x1 <= frame.x1 + 1, (box, frame)
