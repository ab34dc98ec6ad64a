"""Explorers: interactive sweeps in a notebook, and pre-drawn frames on the website.

``explorer(plot, controls, defaults)`` draws ``plot(**defaults)``. In a live notebook (Jupyter,
Colab) it adds one widget per control and redraws on change. On the built website there is no
kernel: the book's build sets ``DEPTHLAB_STATIC=1``, and the explorer draws one frame per
combination of settings (all of them when there are at most ``max_frames``, or the ones listed
in ``frames``), embeds them in the page, and a few lines of JavaScript in the book's theme
(``_static/depthlab.js``) show the frame that matches the controls the reader picks. Plot
functions used this way should read results the chapter has already computed (or compute
something cheap at initialisation): nothing should be trained only for the website.

Written against the API common to ipywidgets 7 and 8 (Colab ships 7.7.1).
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

STATIC_ENV = "DEPTHLAB_STATIC"
MAX_FRAMES = 16


def _display(obj: Any) -> None:
    try:
        from IPython.display import display  # only in a notebook (the library runs without)
    except ImportError:
        return
    display(obj)


def _show_figure(fig: Figure) -> None:
    _display(fig)
    plt.close(fig)          # a no-op for depthlab's figures, which pyplot does not track


def make_controls(controls: Mapping[str, Sequence], defaults: Mapping[str, Any]) -> dict:
    """One widget per control: a slider over numeric choices, a dropdown otherwise."""
    import ipywidgets as widgets  # optional (depthlab[widgets]): only for a live explorer

    made = {}
    for name, options in controls.items():
        options = list(options)
        value = defaults.get(name, options[0])
        if value not in options:
            raise ValueError(f"default {name}={value!r} is not one of the options {options}")
        style = {"description_width": "initial"}
        if all(isinstance(o, (int, float)) and not isinstance(o, bool) for o in options):
            made[name] = widgets.SelectionSlider(options=options, value=value, description=name,
                                                 continuous_update=False, style=style)
        else:
            made[name] = widgets.Dropdown(options=options, value=value, description=name,
                                          style=style)
    return made


def _key(setting: Mapping[str, Any], names: Sequence[str]) -> str:
    return "|".join(f"{n}={setting[n]}" for n in names)


def missing_settings(controls: Mapping[str, Sequence],
                     drawn: Sequence[Mapping[str, Any]]) -> str:
    """The settings of ``controls`` not in ``drawn``, in words: the values no drawn frame has
    ("depth 5, 10, 50"), then how many other combinations of drawn values are missing.
    Empty when every setting was drawn."""
    names = list(controls)
    keys = {_key(s, names) for s in drawn}
    every = [dict(zip(names, combo)) for combo in itertools.product(*controls.values())]
    missing = [s for s in every if _key(s, names) not in keys]
    if not missing:
        return ""
    never = {n: [v for v in controls[n] if all(s[n] != v for s in drawn)] for n in names}
    parts = [f"{n} {', '.join(str(v) for v in vs)}" for n, vs in never.items() if vs]
    rest = [s for s in missing if not any(s[n] in never[n] for n in names)]
    if rest:
        parts.append(f"{len(rest)} other combination{'s' if len(rest) > 1 else ''} of the "
                     "values drawn")
    return "; ".join(parts)


def frames_html(plot: Callable[..., Figure], controls: Mapping[str, Sequence],
                defaults: Mapping[str, Any], settings: Sequence[Mapping[str, Any]],
                why: str | None = None) -> str:
    """The website's explorer: a ``<select>`` per control and one PNG frame per setting.

    ``settings`` lists the combinations drawn. The note under the figure says which settings
    were not drawn and why: ``why`` if the chapter says, else the measured cost (each frame
    is computed while the website is built). Choosing a setting that was not drawn says so.
    Returns the HTML (the frames as data URLs, the default one shown first).
    """
    names = list(controls)
    frames = {}
    start = time.perf_counter()
    for setting in settings:
        fig = plot(**setting)
        png = fig._repr_png_() if hasattr(fig, "_repr_png_") else _png(fig)
        plt.close(fig)
        frames[_key(setting, names)] = "data:image/png;base64," + base64.b64encode(png).decode()
    per_frame = (time.perf_counter() - start) / max(1, len(frames))
    default_key = _key(defaults, names)
    selects = []
    for n in names:
        opts = "".join(
            f"<option value='{html.escape(str(o))}'"
            f"{' selected' if o == defaults[n] else ''}>{html.escape(str(o))}</option>"
            for o in controls[n])
        selects.append(f"<label>{html.escape(n)} <select data-control='{html.escape(n)}'>"
                       f"{opts}</select></label>")
    total = len(list(itertools.product(*controls.values())))
    missing = missing_settings(controls, settings)
    if not missing:
        note = (f"All {total} settings drawn when this page was built; run the notebook (Colab "
                "button at the top) to change the code.")
        why = ""
    else:
        why = why or (f"each frame is computed while the website is built (about "
                      f"{per_frame:.1f} s each here, more for a setting whose experiment the "
                      "chapter did not run), and this page draws the settings the chapter "
                      "discusses")
        note = (f"{len(frames)} of {total} settings drawn when this page was built. Not drawn: "
                f"{missing}. Why: {why}. The notebook (Colab button at the top) draws every "
                "setting.")
    return (f"<div class='depthlab-explorer' data-names='{html.escape(json.dumps(names))}' "
            f"data-frames='{html.escape(json.dumps(frames))}'>"
            f"<div class='depthlab-explorer-controls'>{''.join(selects)}</div>"
            f"<img class='depthlab-explorer-frame' alt='explorer figure' "
            f"data-key='{html.escape(default_key)}' src='{frames.get(default_key, '')}'/>"
            f"<p class='depthlab-explorer-missing' hidden>This setting was not drawn for the "
            f"website ({html.escape(why)}): run the notebook to see it.</p>"
            f"<p class='depthlab-explorer-note'><em>{html.escape(note)}</em></p></div>")


def _png(fig: Figure) -> bytes:

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    return buf.getvalue()


def explorer(plot: Callable[..., Figure], controls: Mapping[str, Sequence],
             defaults: Mapping[str, Any] | None = None, *, static: bool | None = None,
             frames: Sequence[Mapping[str, Any]] | None = None,
             max_frames: int = MAX_FRAMES, why: str | None = None):
    """Show ``plot(**defaults)`` and, in a live kernel, widgets that redraw it.

    ``plot`` takes one keyword per control and returns a matplotlib Figure. Returns the widget
    box (or ``None`` in static mode). ``static=None`` reads ``DEPTHLAB_STATIC``. In static
    mode the frames drawn are ``frames`` if given, else every combination when there are at
    most ``max_frames``, else the default alone; the page lists the settings not drawn, and
    ``why`` (default: the measured cost of a frame).
    """
    defaults = dict(defaults or {})
    for name, options in controls.items():
        options = list(options)
        defaults.setdefault(name, options[0])
        if defaults[name] not in options:
            raise ValueError(f"default {name}={defaults[name]!r} is not one of the options "
                             f"{options}")
    if static is None:
        static = bool(os.environ.get(STATIC_ENV))
    try:
        import ipywidgets as widgets  # optional (depthlab[widgets]): only for a live explorer
    except ImportError:
        static = True
    if static:
        names = list(controls)
        if frames is None:
            every = [dict(zip(names, combo)) for combo in itertools.product(*controls.values())]
            frames = every if len(every) <= max_frames else [defaults]
        settings = list(frames)
        if _key(defaults, names) not in {_key(s, names) for s in settings}:
            settings.insert(0, defaults)
        try:
            from IPython.display import HTML  # only in a notebook
        except ImportError:
            _show_figure(plot(**defaults))
            return None
        _display(HTML(frames_html(plot, controls, defaults, settings, why)))
        return None

    made = make_controls(controls, defaults)

    def redraw(**kwargs: Any) -> None:
        _show_figure(plot(**kwargs))

    out = widgets.interactive_output(redraw, made)
    box = widgets.VBox([widgets.HBox(list(made.values())), out])
    _display(box)
    return box
