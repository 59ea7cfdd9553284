"""Benchmark charts as PNG files, drawn by matplotlib (Agg, no display).

Three shapes cover every bench's `--plot`: `line_chart` (one series, points labelled),
`curves_chart` (panels of several x/y series: throughput against latency percentiles, time
series) and `bar_chart` (panels of grouped bars, optional error bars: per-mode or per-policy
figures). Each bench turns its own results document into these calls (`plot(path, doc)` in the
bench's module).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["LINE_COLOR", "COLORS", "Series", "Curves", "Bars", "line_chart", "curves_chart", "bar_chart",
           "ensure_parent"]

LINE_COLOR = "#1f5bb4"  # the series' line and markers (RGB 31, 91, 180)
# Further series, after LINE_COLOR: distinguishable, also in greyscale print.
COLORS = (LINE_COLOR, "#d9641e", "#2e9a48", "#b2303b", "#7a4fb5", "#8a6d3b", "#3a9aa8", "#555555")
_DPI = 100


def _figure(width: int, height: int) -> Figure:
    # A Figure on its own Agg canvas, not pyplot: no display needed, and no global figure state
    # shared with whatever else runs in the process.
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def ensure_parent(path: str) -> None:
    """Create the folder `path` goes into (a bench's `--plot results/x.png` on a fresh clone)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


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
    fig = _figure(width, height)
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


@dataclass
class Series:
    """One line: points (xs[i], ys[i]); None in ys is a gap; labels annotate points."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    labels: Sequence[str] | None = None
    markers: bool = True


@dataclass
class Curves:
    """One panel of `curves_chart`."""

    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)


@dataclass
class Bars:
    """One panel of `bar_chart`: for each group (a legend entry), one value per category (None:
    no bar), and optionally an error (+/-) per value."""

    title: str
    y_label: str
    categories: list[str]
    groups: dict[str, Sequence[float | None]]
    errors: dict[str, Sequence[float | None]] | None = None
    value_format: str = "{:.3g}"


def _finite(v: float | None) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _panels(count: int, width: int, height: int) -> tuple[Figure, list[Axes]]:
    if count < 1:
        raise ValueError("a chart needs at least one panel")
    cols = 1 if count == 1 else 2
    rows = math.ceil(count / cols)
    fig = _figure(width * cols, height * rows)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for extra in axes[count:]:
        extra.set_visible(False)
    return fig, axes[:count]


def curves_chart(path: str, panels: list[Curves], *, title: str = "", width: int = 560,
                 height: int = 420) -> None:
    """Panels (two per row) of line series, saved to `path` as PNG; each panel `width` x `height`.
    A panel with no finite point says so instead of drawing empty axes."""
    for panel in panels:
        for s in panel.series:
            if len(s.xs) != len(s.ys) or (s.labels is not None and len(s.labels) != len(s.xs)):
                raise ValueError(f"series {s.name!r}: xs, ys (and labels) must have the same length")
    fig, axes = _panels(len(panels), width, height)
    for ax, panel in zip(axes, panels):
        drawn: list[tuple[float, float]] = []
        for k, s in enumerate(panel.series):
            color = COLORS[k % len(COLORS)]
            pts = [(x, y) for x, y in zip(s.xs, s.ys) if _finite(x) and _finite(y)]
            if not pts:
                continue
            # None stays a gap (NaN), not a line drawn across the missing point.
            ys = [y if _finite(y) else math.nan for y in s.ys]
            ax.plot(list(s.xs), ys, color=color, marker="o" if s.markers else None, markersize=5, linewidth=1.5,
                    label=s.name, clip_on=False, zorder=3)
            for x, y, text in zip(s.xs, s.ys, s.labels or []):
                if _finite(x) and _finite(y):
                    ax.annotate(text, (x, y), xytext=(5, 5), textcoords="offset points", fontsize="x-small",
                                color=color)
            drawn += pts
        if drawn:
            # From zero (or below), with room above the highest point for its label.
            for axis, values in ((ax.set_xlim, [x for x, _ in drawn]), (ax.set_ylim, [y for _, y in drawn])):
                low, high = min(0.0, min(values)), max(values)
                span = (high - low) or 1.0
                axis(low, high + 0.12 * span)
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#777777")
        ax.grid(True, color="#d7d7d7", linewidth=0.8)
        ax.set_title(panel.title, fontsize="medium")
        ax.set_xlabel(panel.x_label)
        ax.set_ylabel(panel.y_label)
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png")


def bar_chart(path: str, panels: list[Bars], *, title: str = "", width: int = 560, height: int = 420) -> None:
    """Panels (two per row) of grouped bars, each bar labelled with its value, saved to `path` as PNG."""
    for panel in panels:
        for name, values in {**panel.groups, **(panel.errors or {})}.items():
            if len(values) != len(panel.categories):
                raise ValueError(f"bars {name!r}: one value per category ({len(panel.categories)}) expected")
    fig, axes = _panels(len(panels), width, height)
    for ax, panel in zip(axes, panels):
        n = max(1, len(panel.groups))
        bar_w = 0.8 / n
        positions = range(len(panel.categories))
        for k, (name, values) in enumerate(panel.groups.items()):
            xs = [i - 0.4 + bar_w * (k + 0.5) for i in positions]
            heights = [v if _finite(v) else 0.0 for v in values]
            errs = (panel.errors or {}).get(name)
            yerr = [e if _finite(e) else 0.0 for e in errs] if errs is not None else None
            bars = ax.bar(xs, heights, bar_w, yerr=yerr, capsize=3 if yerr else 0, label=name,
                          color=COLORS[k % len(COLORS)])
            ax.bar_label(bars, labels=[panel.value_format.format(v) if _finite(v) else "n/a" for v in values],
                         fontsize="x-small", padding=2)
        ax.set_xticks(list(positions), panel.categories, fontsize="small",
                      rotation=20 if max((len(c) for c in panel.categories), default=0) > 12 else 0)
        ax.set_ylim(bottom=0)
        ax.margins(y=0.15)
        ax.grid(True, axis="y", color="#d7d7d7", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.set_title(panel.title, fontsize="medium")
        ax.set_ylabel(panel.y_label)
        if len(panel.groups) > 1:
            ax.legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png")
