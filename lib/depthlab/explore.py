"""Explorers: interactive sweeps that also leave a static figure for the website.

``explorer(plot, controls, defaults)`` draws ``plot(**defaults)``. In a live notebook (Jupyter,
Colab) it adds one widget per control and redraws on change; on the built website there is no
kernel, so the book's build sets ``DEPTHLAB_STATIC=1`` and only the default figure is shown,
with a line telling the reader how to get the interactive version.

Written against the API common to ipywidgets 7 and 8 (Colab ships 7.7.1).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

STATIC_ENV = "DEPTHLAB_STATIC"


def _display(obj: Any) -> None:
    try:
        from IPython.display import display
    except ImportError:
        return
    display(obj)


def _show_figure(fig: Figure) -> None:
    _display(fig)
    plt.close(fig)          # a no-op for depthlab's figures, which pyplot does not track


def make_controls(controls: Mapping[str, Sequence], defaults: Mapping[str, Any]) -> dict:
    """One widget per control: a slider over numeric choices, a dropdown otherwise."""
    import ipywidgets as widgets

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


def explorer(plot: Callable[..., Figure], controls: Mapping[str, Sequence],
             defaults: Mapping[str, Any] | None = None, *, static: bool | None = None):
    """Show ``plot(**defaults)`` and, in a live kernel, widgets that redraw it.

    ``plot`` takes one keyword per control and returns a matplotlib Figure. Returns the widget
    box (or ``None`` in static mode). ``static=None`` reads ``DEPTHLAB_STATIC``.
    """
    defaults = dict(defaults or {})
    for name, options in controls.items():
        defaults.setdefault(name, list(options)[0])
    if static is None:
        static = bool(os.environ.get(STATIC_ENV))
    try:
        import ipywidgets as widgets
    except ImportError:
        static = True
    if static:
        _show_figure(plot(**defaults))
        _display_note(controls)
        return None

    made = make_controls(controls, defaults)

    def redraw(**kwargs: Any) -> None:
        _show_figure(plot(**kwargs))

    out = widgets.interactive_output(redraw, made)
    box = widgets.VBox([widgets.HBox(list(made.values())), out])
    _display(box)
    return box


def _display_note(controls: Mapping[str, Sequence]) -> None:
    names = ", ".join(controls)
    text = (f"Static figure at the default setting. Run this notebook (Colab button at the "
            f"top) to change {names} interactively.")
    try:
        from IPython.display import Markdown
        _display(Markdown(f"*{text}*"))
    except ImportError:
        print(text)
