"""Plots: one figure style and helpers for the figures every chapter draws.

Figures have a white face colour so they stay readable in the book theme's dark mode, labelled
axes, and a one-line takeaway under the title. Helpers draw on an ``Axes`` you pass, so they
compose into multi-panel figures; nothing here changes matplotlib's global settings.

Before a figure is shown, a legend that covers plotted data is moved beside its panel
(``place_legends``), and ``figure_problems`` lists what a careful reader would object to: text
outside the figure, a legend over the data, overlapping labels, an axis without a label. With
``DEPTHLAB_FIGURE_CHECK=1`` (set by the tests and the book's build) showing a figure that has
such a problem raises, so no chapter can publish one.
"""

from __future__ import annotations

import contextlib
import io
import os
import textwrap
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Circle, FancyBboxPatch, Rectangle
from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter
from matplotlib.transforms import Bbox

STYLE = {
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 10,
    "axes.titlesize": 10,
    "legend.fontsize": 8,
    "legend.frameon": False,
}


class BookFigure(Figure):
    """A matplotlib Figure that displays itself as a PNG in any notebook front end.

    It does not rely on the inline backend being active (the book's build, nbval and Colab all
    configure matplotlib differently): IPython calls ``_repr_png_`` when the figure is the last
    expression of a cell or is passed to ``display``.
    """

    def _repr_png_(self) -> bytes:

        with _reusing_layout(self):
            place_legends(self)
            for _ in range(3):          # thinning labels changes the layout, and so can legends
                if not (tidy_log_ticks(self) | fit_axis_labels(self)):
                    break
                place_legends(self)
            if os.environ.get(CHECK_ENV):
                check_figure(self)
            buf = io.BytesIO()
            self.savefig(buf, format="png", dpi=100, facecolor="white")
        return buf.getvalue()


CHECK_ENV = "DEPTHLAB_FIGURE_CHECK"


class FigureProblem(AssertionError):
    """A figure a reader should not be shown (``figure_problems`` says why)."""


def _renderer(fig: Figure):
    """A renderer whose extents (text, legends, ticks, panels) are those of ``fig`` as it
    will be saved: the figure is laid out (constrained layout, ticks, legend places) first.

    The checks need the layout, not the pixels, so the pass runs with the renderer's drawing
    switched off (as ``Figure.draw_without_rendering`` does): the same layout without the
    rasterising. Inside ``_repr_png_`` (``_reusing_layout``) a pass is also skipped when it
    could change nothing: the figure was not changed since the last pass and that pass left
    every panel where it found it. A pass is a function of the panels' positions, so another
    one would give the same figure (and the same PNG). Before, legends, ticks, labels, the
    check and savefig each painted the whole figure: 5-11 full draws of 0.1-0.4 s each for a
    chapter's figure, now savefig's one (and 3-10 layout passes: every pass that follows a
    change is still made, so that the PNG stays byte for byte the same)."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    before = _layout_state(fig)
    settled = getattr(fig, "_depthlab_settled", None)
    if settled is not None and not fig.stale and _same_layout(settled, before):
        return renderer
    with renderer._draw_disabled():
        fig.draw(renderer)
    after = _layout_state(fig)
    reuse = getattr(fig, "_depthlab_reuse", False) and _same_layout(before, after)
    fig._depthlab_settled = after if reuse else None
    return renderer


def _changed(fig: Figure) -> None:
    """Say that the layout must be found again (not every change marks a figure stale: a
    label's new text does not)."""
    fig._depthlab_settled = None


@contextlib.contextmanager
def _reusing_layout(fig: Figure):
    """Let ``_renderer`` skip passes that cannot change the figure, while only this module's
    code (which calls ``_changed`` after each change it makes) changes it."""
    fig._depthlab_reuse, fig._depthlab_settled = True, None
    try:
        yield fig
    finally:
        fig._depthlab_reuse, fig._depthlab_settled = False, None


def _layout_state(fig: Figure) -> np.ndarray:
    """What a layout pass moves: every panel's position (as drawn, and as laid out), the
    figure's own titles, the figure's size and resolution. (Reads ``ax.bbox``:
    ``ax.get_position()`` applies the aspect, which marks the figure stale.)"""
    axes = [a for ax in fig.axes for a in (ax, *ax.child_axes)]
    texts = [t for t in (fig._suptitle, fig._supxlabel, fig._supylabel) if t is not None]
    w, h = fig.bbox.width, fig.bbox.height                   # figure fractions -> pixels
    return np.array([*fig.bbox.bounds, fig.dpi]
                    + [v for ax in axes for v in (*ax.bbox.bounds, *(
                        ax.get_position(original=True).bounds * np.array([w, h, w, h])))]
                    + [v for t in texts for v in t.get_position() * np.array([w, h])],
                    dtype=float)


def _same_layout(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float noise (1e-9 px): constrained layout converges towards its fixed point
    over passes (here 80, 0.02, 3e-6, 6e-10 px) and then jitters in the last place."""
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= 1e-9))


def _data_boxes(ax: Axes, renderer) -> list:
    """Display-space boxes of everything plotted in ``ax``: line segments (sampled), markers,
    bars, filled bands and images. A legend must not sit on any of them."""

    boxes = []
    clip = ax.get_window_extent(renderer)

    def add_points(xy):
        xy = np.asarray(xy, dtype=float)
        xy = xy[np.isfinite(xy).all(axis=1)] if len(xy) else xy
        for x, y in xy:
            if clip.contains(x, y):
                boxes.append(Bbox.from_bounds(x - 1.5, y - 1.5, 3, 3))

    for line in ax.get_lines():
        if not line.get_visible() or line.get_label() == "_nolegend_" and not len(
                line.get_xdata()):
            continue
        xy = line.get_transform().transform(np.column_stack([line.get_xdata(),
                                                             line.get_ydata()]))
        if len(xy) > 1:                           # sample each segment: lines pass between dots
            t = np.linspace(0, 1, 12)[:, None, None]
            seg = xy[:-1][None] * (1 - t) + xy[1:][None] * t
            xy = seg.reshape(-1, 2)
        add_points(xy)
    for coll in ax.collections:
        if isinstance(coll, PathCollection):
            add_points(coll.get_offset_transform().transform(coll.get_offsets()))
        elif isinstance(coll, PolyCollection):
            for path in coll.get_paths():
                add_points(coll.get_transform().transform(path.vertices))
    for patch in ax.patches:
        if isinstance(patch, Rectangle) and patch.get_visible() and patch.get_height() != 0:
            box = patch.get_window_extent(renderer)
            if box.width > 0 and box.height > 0:
                boxes.append(Bbox.intersection(box, clip) or box)
    for image in ax.images:
        if isinstance(image, AxesImage):
            boxes.append(image.get_window_extent(renderer))
    return boxes


def _overlaps(a, b, pad: float = 0.5) -> bool:
    return (a.x0 + pad < b.x1 and b.x0 + pad < a.x1 and a.y0 + pad < b.y1 and b.y0 + pad < a.y1)


def _legend_covers_data(ax: Axes, renderer) -> bool:
    legend = ax.get_legend()
    if legend is None or not legend.get_visible():
        return False
    box = legend.get_window_extent(renderer)
    return any(_overlaps(box, d) for d in _data_boxes(ax, renderer))


_INSIDE = ("upper right", "upper left", "lower left", "lower right", "center right",
           "center left", "upper center", "lower center")


def place_legends(fig: Figure) -> Figure:
    """Move every legend that covers plotted data to a corner where it covers none, or, if
    every corner of its panel is taken, below the panel.

    Matplotlib's ``loc="best"`` minimises the overlap but often cannot avoid it; below the
    panel a legend never hides a curve (the constrained layout makes room). Moving one legend
    can resize every panel, so the pass is repeated until nothing moves."""
    for _ in range(3):
        if not _place_legends_once(fig):
            break
    return fig


def _place_legends_once(fig: Figure) -> bool:
    """One pass of ``place_legends``; True if a legend was moved.

    One draw gives every panel's data boxes and every legend's size; the candidate corners
    are then placed by arithmetic (a legend inside a panel does not change the layout), so a
    pass costs one draw, not one per corner tried."""
    renderer = _renderer(fig)
    below, moved = [], False
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None or not legend.get_visible():
            continue
        if getattr(legend, "_depthlab_below", False):
            below.append(ax)
            continue
        data = _data_boxes(ax, renderer)
        box = legend.get_window_extent(renderer)
        if not any(_overlaps(box, d) for d in data):
            continue
        moved = True
        handles, labels = ax.get_legend_handles_labels()
        pad = legend.borderaxespad * legend.prop.get_size_in_points() * fig.dpi / 72
        for loc in _INSIDE:
            candidate = _corner_box(loc, box.width, box.height, ax.bbox, pad)
            if not any(_overlaps(candidate, d) for d in data):
                ax.legend(handles, labels, loc=loc)
                _changed(fig)
                break
        else:
            legend = ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.25),
                               ncol=min(len(labels), 2), borderaxespad=0.0, fontsize=7)
            legend._depthlab_below = True
            _changed(fig)
            below.append(ax)
    if below:
        _anchor_below(fig, below)
    return moved


def _corner_box(loc: str, width: float, height: float, parent, pad: float):
    """Where matplotlib puts a legend of this size at ``loc`` inside ``parent`` (display)."""

    vertical, _, horizontal = loc.partition(" ")
    x0 = {"left": parent.x0 + pad, "right": parent.x1 - pad - width,
          "center": (parent.x0 + parent.x1 - width) / 2}[horizontal]
    y0 = {"lower": parent.y0 + pad, "upper": parent.y1 - pad - height,
          "center": (parent.y0 + parent.y1 - height) / 2}[vertical]
    return Bbox.from_bounds(x0, y0, width, height)


def _anchor_below(fig: Figure, axes: list) -> None:
    """Put each of these legends just under its panel's x label. The anchor is in axes units
    while the label sits a fixed number of pixels below the axes, and every layout pass can
    resize every panel, so the anchors are found again until they stop moving."""
    for _ in range(6):
        renderer = _renderer(fig)
        moved = 0.0
        for ax in axes:
            legend = ax.get_legend()
            under = [ax.xaxis.label.get_window_extent(renderer).y0]
            under += [t.get_window_extent(renderer).y0 for t in _drawn_tick_labels(ax)]
            y = float(ax.transAxes.inverted().transform((0.0, min(under) - 4.0))[1])
            old = getattr(legend, "_depthlab_y", None)
            moved = max(moved, 1.0 if old is None else abs(old - y))
            legend._depthlab_y = y
            legend.set_bbox_to_anchor((0.5, y), transform=ax.transAxes)
            _changed(fig)
        if moved < 1e-3:
            break


def _is_colorbar(ax: Axes) -> bool:
    return getattr(ax, "_colorbar", None) is not None or ax.get_label() == "<colorbar>"


def figure_problems(fig: Figure) -> list[str]:
    """What is wrong with a figure, in words (empty if nothing): text outside the figure, a
    legend over plotted data, two labels on top of each other, an axis without a label."""
    renderer = _renderer(fig)
    frame = fig.bbox
    problems = []
    texts = []                                   # (description, box) of the texts that count
    if fig._suptitle is not None and fig._suptitle.get_text():
        texts.append(("takeaway", fig._suptitle))
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.axison:
            continue
        name = f"panel {i}" + (f" ({ax.get_title()!r})" if ax.get_title() else "")
        if _is_colorbar(ax):
            label = ax.yaxis.label if ax.get_ylabel() else ax.xaxis.label
            if not label.get_text():
                problems.append(f"{name}: a colour bar without a label")
            else:
                texts.append((f"{name} colour-bar label", label))
            continue
        has_data = bool(ax.get_lines() or ax.collections or ax.patches or ax.images)
        if has_data and not ax.get_xlabel():
            problems.append(f"{name}: the x axis has no label")
        if has_data and not ax.get_ylabel():
            problems.append(f"{name}: the y axis has no label")
        for what, t in (("title", ax.title), ("x label", ax.xaxis.label),
                        ("y label", ax.yaxis.label)):
            if t.get_text() and t.get_visible():
                texts.append((f"{name} {what}", t))
        for t in ax.texts:
            if t.get_text() and t.get_visible():
                texts.append((f"{name} annotation {t.get_text()!r}", t))
        ticks = _drawn_tick_labels(ax)
        for tick in ticks:
            if not _inside(tick.get_window_extent(renderer), frame):
                problems.append(f"{name}: tick label {tick.get_text()!r} is cut off at the "
                                "figure's edge")
        boxes_t = [(t.get_text(), t.get_window_extent(renderer)) for t in ticks]
        for i, (ta, ba) in enumerate(boxes_t):
            for tb, bb in boxes_t[i + 1:]:
                if _overlaps(ba, bb, pad=1.0):
                    problems.append(f"{name}: tick labels {ta!r} and {tb!r} overlap")
        if _legend_covers_data(ax, renderer):
            problems.append(f"{name}: the legend covers plotted data")
        legend = ax.get_legend()
        if legend is not None and legend.get_visible():
            texts.append((f"{name} legend", legend))
    boxes = []
    for what, t in texts:
        box = t.get_window_extent(renderer)
        if not _inside(box, frame):
            shown = t.get_text()[:40] if hasattr(t, "get_text") else ""
            problems.append(f"{what} {shown!r} reaches outside the figure")
        boxes.append((what, box))
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            if _overlaps(box_a, box_b, pad=1.0):
                problems.append(f"{a} and {b} overlap")
    return problems


def tidy_log_ticks(fig: Figure) -> bool:
    """Thin the labels of a log axis whose labels collide; True if any axis changed.

    On a log axis spanning a decade or two matplotlib labels the minor ticks too (2×10⁻²,
    3×10⁻², 4×10⁻², ...), and on a narrow panel they run into each other; which axes do depends
    on the data, so a figure fine at one seed is unreadable at another. Where labels collide,
    minor ticks are kept at 2 and 5 × 10^k only, and if those still collide, only the powers
    of ten are labelled.
    """

    renderer = _renderer(fig)
    changed = False
    for ax in fig.axes:
        if not ax.get_visible() or not ax.axison or _is_colorbar(ax):
            continue
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() != "log":
                continue
            for step in ("1-2-5", "powers of ten", "done"):
                boxes = [t.get_window_extent(renderer) for t in _drawn_tick_labels(ax, axis)]
                if not any(_overlaps(a, b, pad=1.0) for i, a in enumerate(boxes)
                           for b in boxes[i + 1:]) or step == "done":
                    break
                if step == "1-2-5":
                    axis.set_minor_locator(LogLocator(base=10.0, subs=(2.0, 5.0)))
                    axis.set_minor_formatter(LogFormatterSciNotation(
                        labelOnlyBase=False, minor_thresholds=(np.inf, np.inf)))
                else:
                    axis.set_minor_formatter(NullFormatter())
                changed = True
                _changed(fig)
                renderer = _renderer(fig)
    return changed


def fit_axis_labels(fig: Figure) -> bool:
    """Break a y label taller than its panel onto two lines; True if any label changed.

    How tall a panel ends up depends on its tick labels and legends, hence on the data: a label
    that fits at one seed can reach into the takeaway line at another.
    """
    renderer = _renderer(fig)
    changed = False
    for ax in fig.axes:
        label = ax.yaxis.label
        text = label.get_text()
        if (not ax.get_visible() or not text or "\n" in text
                or label.get_window_extent(renderer).height
                <= ax.get_window_extent(renderer).height):
            continue
        words = text.split(" ")
        if len(words) < 2:
            continue
        cut = min(range(1, len(words)),
                  key=lambda k: abs(len(" ".join(words[:k])) - len(" ".join(words[k:]))))
        label.set_text(" ".join(words[:cut]) + "\n" + " ".join(words[cut:]))
        changed = True
        _changed(fig)
    if changed:
        _renderer(fig)
    return changed


def _drawn_tick_labels(ax: Axes, only=None) -> list:
    """The tick labels matplotlib actually draws: those within the view limits (of ``only``,
    one of the two axes, if given)."""
    labels = []
    for axis in (ax.xaxis, ax.yaxis) if only is None else (only,):
        # compare in the axis's own scale: on a log axis a tick two decades below the view
        # is far outside it, however small its distance in data units
        scale = axis.get_transform()
        lo, hi = sorted(scale.transform(np.asarray(axis.get_view_interval(), dtype=float)))
        span = (hi - lo) or 1.0
        for tick in axis.get_major_ticks() + axis.get_minor_ticks():
            loc = tick.get_loc()
            if loc is None:
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                at = float(scale.transform(np.array([loc], dtype=float))[0])
            if not (np.isfinite(at) and lo - 1e-9 * span <= at <= hi + 1e-9 * span):
                continue
            for label in (tick.label1, tick.label2):
                if label.get_visible() and label.get_text():
                    labels.append(label)
    return labels


def _inside(box, frame, tol: float = 1.0) -> bool:
    return (box.x0 >= frame.x0 - tol and box.x1 <= frame.x1 + tol
            and box.y0 >= frame.y0 - tol and box.y1 <= frame.y1 + tol)


def check_figure(fig: Figure) -> Figure:
    """Raise ``FigureProblem`` listing ``figure_problems(fig)``, if there are any."""
    problems = figure_problems(fig)
    if problems:
        raise FigureProblem("this figure has defects:\n- " + "\n- ".join(problems))
    return fig


def _label(ax: Axes, xlabel: str, ylabel: str, title: str | None) -> Axes:
    """Axis labels, optional title and the legend: the last step of every line plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    return ax


def figure(ncols: int = 1, nrows: int = 1, *, width: float = 4.2, height: float = 3.2,
           takeaway: str | None = None, **kwargs) -> tuple[BookFigure, np.ndarray]:
    """A figure in the book's style with an array of axes (always 2-D: ``axes[row, col]``).

    ``takeaway`` is the one-line message printed above the panels. The figure is made without
    pyplot, so it is shown where you choose (end the cell with ``fig``) and never twice, and
    no figure piles up in pyplot's memory during a sweep.
    """
    with plt.rc_context(STYLE):
        fig = BookFigure(figsize=(width * ncols, height * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    fig.patch.set_facecolor("white")
    if takeaway:

        # 10-12 bold 11-pt characters per inch: wrap so the line never leaves the figure
        fig.suptitle(textwrap.fill(takeaway, width=max(30, int(width * ncols * 10.5))),
                     fontsize=11, fontweight="bold")
    return fig, axes


def layer_profile(ax: Axes, profiles: Mapping[str, Sequence[float]], *,
                  ylabel: str = "‖∂L/∂h_l‖ (gradient norm)", log: bool = True,
                  title: str | None = None, reference: float | None = None) -> Axes:
    """One line per configuration: a per-layer quantity against layer index (0 = input side)."""
    for label, values in profiles.items():
        v = np.asarray(values, dtype=float)
        ax.plot(np.arange(len(v)), v, marker="o", markersize=3, label=label)
    if log:
        ax.set_yscale("log")
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("layer l (0 = nearest the input)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    return ax


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Mean of each run of ``window`` consecutive values: (N,) -> (N - window + 1,)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) < window:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def curves(ax: Axes, runs: Mapping[str, Sequence[float]], *, ylabel: str = "training loss",
           xlabel: str = "optimiser step", log: bool = False, title: str | None = None,
           smooth: int = 1, reference: float | None = None,
           reference_label: str | None = None) -> Axes:
    """Training curves, one per label; ``smooth`` is a moving-average window in steps."""
    for label, values in runs.items():
        v = moving_average(values, smooth)
        ax.plot(np.arange(len(v)) + (len(values) - len(v)), v, label=label)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label=reference_label)
    if log:
        ax.set_yscale("log")
    return _label(ax, xlabel, ylabel, title)


def heatmap(ax: Axes, values: np.ndarray, row_labels: Sequence, col_labels: Sequence, *,
            xlabel: str, ylabel: str, cbar_label: str, title: str | None = None,
            fmt: str = "{:.2f}", vmin: float | None = None, vmax: float | None = None,
            cmap: str = "viridis", log: bool = False) -> Axes:
    """A sweep as a heatmap with every cell annotated. values: (rows, cols)."""

    v = np.asarray(values, dtype=float)
    norm = LogNorm(vmin=vmin, vmax=vmax) if log else None
    im = ax.imshow(v, cmap=cmap, aspect="auto", origin="lower", norm=norm,
                   vmin=None if log else vmin, vmax=None if log else vmax)
    cols = [str(c) for c in col_labels]
    if sum(len(c) for c in cols) > 20:                       # long labels: slant them
        ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right")
    else:
        ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(False)
    lo, hi = np.nanmin(v), np.nanmax(v)
    for i in range(v.shape[0]):
        for j in range(v.shape[1]):
            dark = (v[i, j] - lo) < 0.5 * (hi - lo) if hi > lo else True
            ax.text(j, i, fmt.format(v[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.figure.colorbar(im, ax=ax, label=cbar_label)
    if title:
        ax.set_title(title)
    return ax


def histograms(ax: Axes, samples: Mapping[str, np.ndarray], *, xlabel: str, bins: int = 50,
               log: bool = False, title: str | None = None) -> Axes:
    """Overlaid step histograms (e.g. activations of a few layers)."""
    for label, s in samples.items():
        ax.hist(np.asarray(s, dtype=float).ravel(), bins=bins, histtype="step", label=label,
                density=True)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    ax.legend()
    return ax


def versus(ax: Axes, x: Sequence[float], series: Mapping[str, Sequence[float]], *,
           xlabel: str, ylabel: str, logx: bool = False, logy: bool = False,
           title: str | None = None, reference: float | None = None,
           reference_label: str | None = None,
           colors: Mapping[str, str] | None = None) -> Axes:
    """One line per label of y against a shared x (e.g. gradient ratio against depth).

    A series may be 1-D (one value per x) or 2-D, (len(x), seeds): then the line is the median
    over seeds and a shaded band spans the lowest to the highest seed (say so in the title).
    ``colors`` (label -> colour) keeps a label's colour the same in panels that show different
    subsets of the labels; by default the colours follow matplotlib's cycle.
    """
    marker = "o" if len(list(x)) <= 30 else None           # dots for sweeps, not for curves
    for label, y in series.items():
        v = np.asarray(y, dtype=float)
        color = (colors or {}).get(label)
        if v.ndim == 2:
            line, = ax.plot(list(x), np.median(v, axis=1), marker=marker, markersize=4,
                            label=label, color=color)
            ax.fill_between(list(x), v.min(axis=1), v.max(axis=1), color=line.get_color(),
                            alpha=0.2, linewidth=0)
        else:
            ax.plot(list(x), v, marker=marker, markersize=4, label=label, color=color)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label=reference_label)
    if logx:

        ax.set_xscale("log")
        ax.set_xticks(list(x), [str(v) for v in x])          # label the measured x values only
        ax.xaxis.set_minor_formatter(NullFormatter())
    if logy:
        ax.set_yscale("log")
    return _label(ax, xlabel, ylabel, title)


def bars(ax: Axes, groups: Sequence[str], series: Mapping[str, Sequence[float]], *,
         ylabel: str, log: bool = False, floor: float = 1e-9, title: str | None = None,
         xlabel: str = "") -> Axes:
    """Grouped bars: one group per entry of ``groups``, one bar per label of ``series``.

    On a log axis a value of exactly 0 cannot be drawn: its bar is drawn down to ``floor``,
    hatched, and labelled "0", so that "no effect at all" stays visible. A NaN or infinite
    value (a run that overflowed) gets no bar and the label "not finite".
    """
    n = len(series)
    width = 0.8 / max(n, 1)
    xs = np.arange(len(groups))
    for i, (label, values) in enumerate(series.items()):
        v = np.asarray(values, dtype=float)
        zero = v == 0
        shown = np.where(zero & log, floor, v) if log else v
        pos = xs - 0.4 + width * (i + 0.5)
        rects = ax.bar(pos, shown, width, label=label)
        for rect, value in zip(rects, v):
            if not np.isfinite(value):
                ax.annotate("not\nfinite", (rect.get_x() + rect.get_width() / 2,
                                            floor if log else 0), ha="center", va="bottom",
                            fontsize=7)
        for rect, z in zip(rects, zero):
            if z and log:
                rect.set_hatch("//")
                rect.set_alpha(0.4)
                ax.annotate("0", (rect.get_x() + rect.get_width() / 2, floor),
                            ha="center", va="bottom", fontsize=8)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
    ax.set_xticks(xs, list(groups))
    ax.grid(axis="x", visible=False)
    return _label(ax, xlabel, ylabel, title)


def points(ax: Axes, sets: Mapping[str, np.ndarray], *, xlabel: str, ylabel: str,
           curve: tuple[Sequence[float], Sequence[float]] | None = None,
           curve_label: str | None = None, diagonal: bool = False, log: bool = False,
           title: str | None = None, size: float = 6) -> Axes:
    """Scatter plots of 2-D points, one colour per label. Each set: (N, 2) array of (x, y).

    ``curve`` (xs, ys) draws a reference line, e.g. a decision boundary; ``diagonal`` draws
    y = x, e.g. estimated against true values; ``log`` puts both axes on a log scale.
    """
    for label, pts in sets.items():
        a = np.asarray(pts, dtype=float)
        ax.scatter(a[:, 0], a[:, 1], s=size, alpha=0.5, label=label, linewidths=0)
    if curve is not None:
        ax.plot(curve[0], curve[1], color="black", linewidth=1.5, label=curve_label)
    if diagonal:
        both = np.concatenate([np.asarray(p, dtype=float).ravel() for p in sets.values()])
        both = both[np.isfinite(both) & ((both > 0) if log else True)]
        ax.plot([both.min(), both.max()], [both.min(), both.max()], color="grey",
                linestyle="--", linewidth=1, label="y = x")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    return _label(ax, xlabel, ylabel, title)


def predicted_vs_measured(ax: Axes, predicted: Mapping[str, float],
                          measured: Mapping[str, float], *, quantity: str,
                          log: bool = True, title: str | None = None) -> Axes:
    """Parity plot: each labelled point at (measured, predicted), with the line y = x."""
    labels = list(predicted)
    p = np.array([predicted[k] for k in labels], dtype=float)
    m = np.array([measured[k] for k in labels], dtype=float)
    ax.scatter(m, p, s=18, zorder=3)
    for label, xi, yi in zip(labels, m, p):
        ax.annotate(label, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    lo, hi = np.nanmin(np.r_[p, m]), np.nanmax(np.r_[p, m])
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1,
            label="prediction = measurement")
    if log:

        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):         # less than a decade: unlabelled minor ticks
            axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"measured {quantity}")
    ax.set_ylabel(f"predicted {quantity}")
    if title:
        ax.set_title(title)
    ax.legend()
    return ax


def norm_axes_diagram(ax: Axes, kind: str, *, batch: int = 3, tokens: int = 4,
                      features: int = 6) -> Axes:
    """Which entries of a (B, T, D) tensor share one mean and variance, for a norm ``kind``.

    Rows are the B·T tokens (grouped by sequence), columns the D features; the highlighted
    cells are pooled into one statistic: a column for BatchNorm (one feature over every token
    of every sequence), a row for LayerNorm and RMSNorm (one token's features). (Chapter 3.)
    """

    rows = batch * tokens
    for r in range(rows):
        for c in range(features):
            pooled = (c == 1) if kind == "batch" else (r == 1)
            ax.add_patch(Rectangle((c, rows - 1 - r), 1, 1, edgecolor="grey",
                                   facecolor="tab:orange" if pooled else "white"))
    for b in range(1, batch):                                 # separate the sequences
        ax.axhline(rows - b * tokens, color="black", linewidth=2)
    ax.set_xlim(0, features)
    ax.set_ylim(0, rows)
    ax.set_aspect("equal")
    ax.set_xticks([i + 0.5 for i in range(features)], [f"d{i}" for i in range(features)])
    ax.set_yticks([rows - 1 - r + 0.5 for r in range(rows)],
                  [f"b{r // tokens} t{r % tokens}" for r in range(rows)], fontsize=7)
    ax.set_xlabel("feature axis D")
    ax.set_ylabel("tokens: sequence b, position t")
    ax.grid(False)
    names = {"batch": "BatchNorm: one feature,\nall B·T tokens",
             "layer": "LayerNorm: one token, all D features\n(mean and variance)",
             "rms": "RMSNorm: one token, all D features\n(root mean square only)"}
    ax.set_title(names.get(kind, kind), fontsize=9)
    return ax


def diagnosis(axes: Sequence[Axes], diagnoses: Mapping[str, object]) -> Sequence[Axes]:
    """Three panels for ``diagnostics.diagnose`` results, one line per label: the gradient
    reaching each layer, the update-to-weight ratio of one step (dotted: the lr/RMS(W) an
    Adam step gives a gradient well above its eps, where known) and the token similarity
    (1 = rank collapse). ``axes``: three Axes, e.g. ``axes[0]`` of a ``figure(3)``."""
    grad = {k: d.profile.act_grad_norm for k, d in diagnoses.items()}
    layer_profile(axes[0], grad, title="gradient reaching each layer")
    update = {k: np.where(np.isneginf(d.update_log10), np.nan, d.update_log10)
              for k, d in diagnoses.items()}
    layer_profile(axes[1], update, log=False, ylabel="log10 ‖ΔW‖/‖W‖ after one step",
                  title="update ratio per layer")
    for line, d in zip(axes[1].get_lines(), diagnoses.values()):
        expected = getattr(d, "expected_update_log10", np.zeros(0))
        if len(expected) and np.isfinite(expected).any():
            axes[1].plot(np.arange(len(expected)), expected, linestyle=":", linewidth=1,
                         color=line.get_color())
    sim = {k: d.profile.token_similarity for k, d in diagnoses.items()}
    layer_profile(axes[2], sim, log=False, ylabel="cosine similarity of tokens",
                  title="rank collapse (1 = all tokens alike)")
    axes[2].set_ylim(-0.05, 1.05)
    for ax in axes[:2]:                 # one legend for the three panels: the same lines
        if ax.get_legend():
            ax.get_legend().remove()
    return axes


_NORM_NAMES = {"layer": "LayerNorm", "rms": "RMSNorm", "batch": "BatchNorm", "group": "GroupNorm"}
_ATTENTION_NAMES = {"softmax": "softmax(QKᵀ/√d)", "value_skipinit": "αI + βA",
                    "shaped": "αI + βA − βC"}


def block_diagram(ax: Axes, cfg, *, title: str | None = None) -> Axes:
    """One transformer block drawn from its configuration, input at the top (chapter 7).

    Boxes for the norms, the attention (its matrix, and whether it has value and output
    matrices) and the MLP (with its gain β_FF when it is not 1); a ⊕ where branches are added;
    a line down the left side for each skip connection (``gid="skip"``). Reads the fields of a
    ``TransformerConfig``: ``norm_placement``, ``norm_kind``, ``residual``, ``alpha_sa``,
    ``alpha_ff``, ``beta_ff``, ``attention``, ``identity_values``, ``value_gain`` and
    ``parallel``.
    """

    norm = _NORM_NAMES.get(cfg.norm_kind) if cfg.norm_placement != "none" else None
    values = ("\nV = W_O = I" if cfg.identity_values
              else f"\nV, W_O = I + {cfg.value_gain:g} W̃" if cfg.value_gain is not None
              else "\nwith W_V, W_O")
    attn = _ATTENTION_NAMES[cfg.attention] + values
    mlp = "MLP" + (f" × {cfg.beta_ff:g}" if cfg.beta_ff != 1.0 else "")
    skip_sa = cfg.residual and cfg.alpha_sa > 0
    skip_ff = cfg.residual and cfg.alpha_ff > 0 and not cfg.parallel
    colours = {"norm": "#cfe2f3", "attn": "#f9cb9c", "mlp": "#b6d7a8"}

    def box(x, y, text, kind, width=0.56):
        ax.add_patch(FancyBboxPatch((x - width / 2, y - 0.035), width, 0.07,
                                    boxstyle="round,pad=0.01", facecolor=colours[kind],
                                    edgecolor="black", linewidth=0.8))
        ax.text(x, y, text, ha="center", va="center", fontsize=7)

    def plus(x, y):
        ax.add_patch(Circle((x, y), 0.025, facecolor="white", edgecolor="black",
                            linewidth=0.8))
        ax.text(x, y, "+", ha="center", va="center", fontsize=8)

    def skip(y0, y1):
        ax.plot([0.55, 0.12, 0.12, 0.525], [y0, y0, y1, y1], color="black", linewidth=0.8,
                gid="skip")

    def arrow(y0, y1, x0=0.55, x1=None):
        ax.annotate("", xy=(x1 if x1 is not None else x0, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", linewidth=0.8))

    steps = []                                                # (kind, text) top to bottom
    if cfg.parallel:
        steps = ([("norm", norm)] if norm else []) + [("parallel", None), ("plus", "sum")]
    else:
        for sub, text, has_skip in (("attn", attn, skip_sa), ("mlp", mlp, skip_ff)):
            steps.append(("start", None))                     # where this sub-block's skip starts
            if norm and cfg.norm_placement == "pre":
                steps.append(("norm", norm))
            steps.append((sub, text))
            if has_skip:
                steps.append(("plus", "skip"))
            if norm and cfg.norm_placement == "post":
                steps.append(("norm", norm))
    drawn = [k for k, _ in steps if k != "start"]
    gap = 0.84 / (len(drawn) + 1)                             # centre to centre
    top = start = y = 0.93                                    # y: the bottom of what is drawn
    ax.text(0.55, top + 0.01, "X (input)", ha="center", va="bottom", fontsize=7)
    centre = top
    for kind, text in steps:
        if kind == "start":                                   # midway into the next box
            start = top if y == top else (y + centre - gap + 0.035) / 2
            continue
        centre -= gap
        half = 0.025 if kind == "plus" else 0.035
        if kind == "parallel":                                # one input, two branches, one sum
            for x in (0.38, 0.76):
                arrow(y, centre + half, 0.55, x)
            box(0.38, centre, attn, "attn", width=0.34)
            box(0.76, centre, mlp, "mlp", width=0.3)
        elif not (kind == "plus" and cfg.parallel):
            arrow(y, centre + half)
        if kind in ("norm", "attn", "mlp"):
            box(0.55, centre, text, kind)
        elif kind == "plus":
            if cfg.parallel:
                for x in (0.38, 0.76):
                    arrow(y, centre + half, x, 0.55)
                if skip_sa:
                    skip(top, centre)
            else:                                             # from this sub-block's input
                skip(start, centre)
            plus(0.55, centre)
        y = centre - half
    arrow(y, centre - gap + 0.02)
    ax.text(0.55, centre - gap + 0.01, "output", ha="center", va="top", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax
