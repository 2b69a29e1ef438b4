"""A line chart with axes for run curves (loss, eval loss, learning rate, device use)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.text import Text
from textual.app import RenderResult
from textual_plotext import PlotextPlot

# 256-colour palette indices, distinct in 256-colour terminals; overlaid runs cycle through
# them. plotext takes the index, Rich the style from series_style().
SERIES_COLORS = (14, 208, 10, 13, 11, 12, 9, 15)
MAX_POINTS = 1200  # per series


def series_style(index: int) -> str:
    """The Rich style of the ``index``-th series colour (for legends outside the chart)."""
    return f"color({SERIES_COLORS[index % len(SERIES_COLORS)]})"


@dataclass
class Series:
    """One line: ``label`` shown in the legend, points as parallel x and y lists."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: int | None = None  # a 256-colour index; None: by position
    marker: str = "braille"


class RunChart(PlotextPlot):
    """A plotext chart fed whole series with :meth:`set_series`; says so when it has no data."""

    DEFAULT_CSS = """
    RunChart {
        min-height: 6;
    }
    """

    def __init__(self, title: str = "", xlabel: str = "step", ylabel: str = "",
                 empty: str = "no points yet", **kwargs):
        super().__init__(**kwargs)
        self.chart_title = title
        self.xlabel = xlabel
        self.ylabel = ylabel
        self.empty = empty
        self.series: list[Series] = []

    def set_series(self, series: Sequence[Series], title: str | None = None) -> None:
        """Replace the plotted lines (points whose value is None or not finite are skipped)."""
        if title is not None:
            self.chart_title = title
        clean = []
        for i, s in enumerate(series):
            pts = [(x, y) for x, y in zip(s.xs, s.ys, strict=False)
                   if x is not None and y is not None and y == y and abs(y) != float("inf")]
            if len(pts) > MAX_POINTS:
                # A terminal chart has a few hundred columns: plotting every step of a long
                # run only costs time. Keep an even spread and the newest point.
                stride = len(pts) / (MAX_POINTS - 1)
                pts = [pts[int(i * stride)] for i in range(MAX_POINTS - 1)] + [pts[-1]]
            if pts:
                clean.append(Series(s.label, [p[0] for p in pts], [p[1] for p in pts],
                                    s.color or SERIES_COLORS[i % len(SERIES_COLORS)], s.marker))
        self.series = clean
        plt = self.plt
        plt.clear_figure()
        plt.title(self.chart_title)
        plt.xlabel(self.xlabel)
        if self.ylabel:
            plt.ylabel(self.ylabel)
        for s in clean:
            # A single point draws no line: show it as a dot so it is seen at all.
            marker = "dot" if len(s.xs) == 1 else s.marker
            plt.plot(list(s.xs), list(s.ys), label=s.label, color=s.color, marker=marker)
        self.refresh()

    def render(self) -> RenderResult:
        if not self.series:
            title = f"{self.chart_title}\n" if self.chart_title else ""
            return Text(f"{title}{self.empty}", style="dim", justify="center")
        return super().render()
