"""Curves as inline SVG: matplotlib's SVG canvas on a bare `Figure` (no pyplot, so no global figure state and no GUI
backend), text kept as text so the page stays small and searchable."""

from __future__ import annotations

import io
import math

from polyformer.report.summary import Series

# One colour per stage on every plot, so train and validation read the same way throughout the page.
_STAGE_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e", "validate": "#ff7f0e", "test": "#2ca02c"}
_OTHER_COLOURS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#d62728"]
MAX_POINTS = 2000  # per series drawn; longer series are thinned evenly (the summary table counts them all)


def thin(series: Series, limit: int = MAX_POINTS) -> Series:
    if len(series) <= limit:
        return series
    stride = math.ceil(len(series) / limit)
    return series[::stride] + ([series[-1]] if (len(series) - 1) % stride else [])


def curves_svg(title: str, series: dict[str, Series], ylabel: str = "") -> str:
    """One plot of several series against the step, as an `<svg>` element."""
    from matplotlib import rc_context
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "polyformer-report", "font.size": 9}):
        fig = Figure(figsize=(5.2, 3.1))
        ax = fig.subplots()
        others = iter(_OTHER_COLOURS * (len(series) // len(_OTHER_COLOURS) + 1))
        for key, points in series.items():
            points = thin(points)
            stage = key.split("/", 1)[0]
            colour = _STAGE_COLOURS.get(stage) if "/" in key else None
            colour = colour or next(others)
            few = len(points) <= 40  # markers where a line would hide that there are only a few values
            ax.plot([s for s, _ in points], [v for _, v in points], label=key, color=colour,
                    marker="o" if few else None, markersize=3, linewidth=1.4)  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("step")
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        buffer = io.StringIO()
        FigureCanvasSVG(fig).print_svg(buffer)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML declaration and DOCTYPE: the element goes inline
