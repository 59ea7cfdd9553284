"""Benchmark charts as PNG files, drawn by matplotlib."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["LINE_COLOR", "line_chart"]

LINE_COLOR = "#1f5bb4"  # the series' line and markers (RGB 31, 91, 180)
_DPI = 100


def line_chart(path: str, xs: list[float], ys: list[float], labels: list[str] | None = None, *,
               title: str = "", x_label: str = "", y_label: str = "", series: str = "",
               width: int = 640, height: int = 440) -> None:
    """Points (xs[i], ys[i]) joined in order, point i annotated with labels[i], saved to `path` as a
    `width` x `height` pixel PNG with both axes, their labels, `title` and a legend naming the
    series (`series`, else `y_label`, else "data").

    Both axes start at zero or below, so a chart's slopes and gaps are not exaggerated.
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError("line_chart needs as many x as y values, at least one")
    if labels is not None and len(labels) != len(xs):
        raise ValueError("line_chart needs one label per point")
    # A Figure on its own Agg canvas, not pyplot: no display needed, and no global figure state
    # shared with whatever else runs in the process.
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # Unclipped, above the spines: a point at zero sits on an axis and stays whole.
    ax.plot(xs, ys, color=LINE_COLOR, marker="o", linewidth=1.5, markersize=6, label=series or y_label or "data",
            clip_on=False, zorder=3)
    for x, y, text in zip(xs, ys, labels or []):
        ax.annotate(text, (x, y), xytext=(6, 6), textcoords="offset points", fontsize="small", color=LINE_COLOR)
    ax.margins(0.12)
    ax.set_xlim(left=min(0.0, min(xs)))
    ax.set_ylim(bottom=min(0.0, min(ys)))
    ax.grid(True, color="#d7d7d7", linewidth=0.8)
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.legend(loc="best", fontsize="small")
    fig.savefig(path, format="png")
