import numpy as np
import pytest
from matplotlib.figure import Figure

import depthlab as dl
from depthlab import explore, plots


def _plot(depth=2, kind="a"):
    fig, axes = plots.figure(takeaway=f"depth {depth}, {kind}")
    plots.layer_profile(axes[0, 0], {kind: np.logspace(-depth, 0, depth + 1)})
    return fig


def test_figure_style_and_helpers():
    fig, axes = plots.figure(2, 1, takeaway="t")
    assert isinstance(fig, Figure) and axes.shape == (1, 2)
    assert fig.get_facecolor()[:3] == (1.0, 1.0, 1.0)
    assert fig._repr_png_().startswith(b"\x89PNG")      # displays without the inline backend
    plots.layer_profile(axes[0, 0], {"a": [1e-3, 1e-1, 1]})
    assert axes[0, 0].get_yscale() == "log" and axes[0, 0].get_xlabel()
    plots.curves(axes[0, 1], {"run": list(range(20))}, smooth=5, reference=3.0,
                 reference_label="ref")
    assert axes[0, 1].get_legend() is not None
    fig2, ax2 = plots.figure()
    plots.heatmap(ax2[0, 0], np.eye(2), ["r0", "r1"], ["c0", "c1"], xlabel="x", ylabel="y",
                  cbar_label="acc")
    assert len(ax2[0, 0].texts) == 4


def test_explorer_static_mode_draws_frames_for_the_website(monkeypatch):
    calls, shown = [], []

    def plot(**kw):
        calls.append(kw)
        return _plot(**kw)

    monkeypatch.setattr(explore, "_display", shown.append)
    assert explore.explorer(plot, {"depth": [2, 4], "kind": ["a", "b"]}, {"depth": 4},
                            static=True) is None
    assert len(calls) == 4 and {"depth": 4, "kind": "a"} in calls    # every combination
    html = shown[0].data
    assert html.count("data:image/png;base64,") >= 4
    assert "data-control='depth'" in html and "data-key='depth=4|kind=a'" in html
    assert "All 4 settings drawn" in html and "Not drawn" not in html
    calls.clear()
    explore.explorer(plot, {"depth": [2, 4], "kind": ["a", "b"]}, {"depth": 4}, static=True,
                     frames=[{"depth": 2, "kind": "b"}])             # only what was computed
    assert calls == [{"depth": 4, "kind": "a"}, {"depth": 2, "kind": "b"}]
    # the page says which settings are missing, and why (here: measured, per frame)
    assert "2 of 4 settings drawn" in shown[-1].data
    assert "Not drawn: 2 other combinations of the values drawn. Why: each frame" in \
        shown[-1].data


def test_an_explorer_names_the_settings_it_did_not_draw():
    controls = {"depth": [4, 8, 12, 24], "norm": ["none", "layer"], "init": ["torch", "xavier"]}
    drawn = [{"depth": 12, "norm": n, "init": "torch"} for n in ("none", "layer")]
    assert explore.missing_settings(controls, drawn) == "depth 4, 8, 24; init xavier"
    drawn.append({"depth": 4, "norm": "none", "init": "xavier"})
    assert explore.missing_settings(controls, drawn) == \
        "depth 8, 24; 5 other combinations of the values drawn"   # of 2 × 2 × 2, 3 drawn
    every = [{"depth": d, "norm": n, "init": i} for d in controls["depth"]
             for n in controls["norm"] for i in controls["init"]]
    assert explore.missing_settings(controls, every) == ""


def test_explorer_live_mode_builds_widgets_that_redraw():
    widgets = pytest.importorskip("ipywidgets")
    calls = []

    def plot(**kw):
        calls.append(kw)
        return _plot(**kw)

    box = explore.explorer(plot, {"depth": [2, 4], "kind": ["a", "b"]}, static=False)
    assert isinstance(box, widgets.VBox)
    controls = box.children[0].children
    assert isinstance(controls[0], widgets.SelectionSlider)
    assert isinstance(controls[1], widgets.Dropdown)
    controls[1].value = "b"                           # a change redraws with the new value
    assert calls[-1] == {"depth": 2, "kind": "b"}


def test_explorer_rejects_a_default_outside_the_options():
    pytest.importorskip("ipywidgets")
    with pytest.raises(ValueError, match="depth"):
        explore.make_controls({"depth": [2, 4]}, {"depth": 3})


def test_public_api_is_importable():
    for name in dl.__all__:
        assert hasattr(dl, name), name


def test_versus_and_parity_plots():
    fig, axes = plots.figure(2)
    plots.versus(axes[0, 0], [5, 10, 20], {"a": [1, 1e-3, 1e-6]}, xlabel="depth",
                 ylabel="ratio", logy=True, reference=1.0)
    assert axes[0, 0].get_yscale() == "log" and len(axes[0, 0].lines) == 2
    plots.predicted_vs_measured(axes[0, 1], {"x": 1e-3, "y": 2.0}, {"x": 2e-3, "y": 1.5},
                                quantity="ratio")
    assert len(axes[0, 1].texts) == 2 and axes[0, 1].get_xscale() == "log"


def test_api_table_documents_every_public_function():
    table = dl.api_table()
    rows = table.splitlines()[2:]
    assert len(rows) > 40
    assert not [r for r in rows if r.endswith("|  |")], "public names without a docstring"
    for name in ("gradient_profile", "ClaimBook", "explorer", "figure", "train"):
        assert f"`{name}`" in table


def test_norm_axes_diagram_highlights_the_pooled_entries():
    fig, axes = plots.figure(2)
    plots.norm_axes_diagram(axes[0, 0], "batch", batch=2, tokens=3, features=4)
    plots.norm_axes_diagram(axes[0, 1], "layer", batch=2, tokens=3, features=4)

    def orange(ax):
        return sum(p.get_facecolor()[:3] != (1.0, 1.0, 1.0) for p in ax.patches)

    assert orange(axes[0, 0]) == 6           # one feature over all 2*3 tokens
    assert orange(axes[0, 1]) == 4           # one token's 4 features


def test_versus_draws_a_seed_band_and_bars_show_exact_zeros():
    fig, axes = plots.figure(2)
    runs = np.array([[0.5, 0.6, 0.7], [0.8, 0.9, 0.95]])          # 2 x-values, 3 seeds
    plots.versus(axes[0, 0], [2, 8], {"BN": runs}, xlabel="batch", ylabel="acc")
    assert list(axes[0, 0].lines[0].get_ydata()) == [0.6, 0.9]   # the median over seeds
    assert len(axes[0, 0].collections) == 1                      # the min-max band
    plots.bars(axes[0, 1], ["others", "future"], {"LN": [0.0, 0.0], "BN": [0.3, 0.07]},
               ylabel="max |Δ output|", log=True)
    zeros = [t for t in axes[0, 1].texts if t.get_text() == "0"]
    assert len(zeros) == 2 and axes[0, 1].get_yscale() == "log"
    assert len(axes[0, 1].patches) == 4


def test_points_draws_sets_a_curve_and_the_diagonal():
    fig, axes = plots.figure(2)
    plots.points(axes[0, 0], {"a": np.zeros((5, 2)), "b": np.ones((3, 2))},
                 curve=([0, 1], [1, 0]), curve_label="boundary", xlabel="x₁", ylabel="x₂")
    assert len(axes[0, 0].collections) == 2 and len(axes[0, 0].lines) == 1
    plots.points(axes[0, 1], {"w": np.array([[1e-3, 2e-3], [1.0, 0.9]])}, diagonal=True,
                 log=True, xlabel="true", ylabel="estimated")
    assert axes[0, 1].get_xscale() == "log" and len(axes[0, 1].lines) == 1


def test_moving_average():
    assert list(plots.moving_average([1, 2, 3, 4], 2)) == [1.5, 2.5, 3.5]
    assert list(plots.moving_average([1, 2], 5)) == [1, 2]          # too short: unchanged


def test_figure_check_finds_the_defects_a_reader_would_object_to():
    fig, axes = plots.figure(2)
    ax = axes[0, 0]
    ax.plot(range(10), range(10), label="rising")
    ax.plot(range(10), [9 - v for v in range(10)], label="falling")
    ax.legend(loc="center")                                    # right on the crossing lines
    axes[0, 1].plot([0, 1], [0, 1])
    axes[0, 1].set_title("a very long title " * 8)             # runs off the figure
    axes[0, 1].annotate("label A", (0.5, 0.5))
    axes[0, 1].annotate("label B", (0.5, 0.5))                 # on top of label A
    problems = plots.figure_problems(fig)
    text = "\n".join(problems)
    assert "panel 0: the legend covers plotted data" in text
    assert "panel 0: the x axis has no label" in text
    assert "reaches outside the figure" in text
    assert "'label A'" in text and "overlap" in text
    with pytest.raises(plots.FigureProblem):
        plots.check_figure(fig)


def test_a_legend_over_the_data_is_moved_beside_the_panel():
    fig, axes = plots.figure()
    ax = axes[0, 0]
    for i in range(4):
        ax.plot(range(10), [i + 0.1 * v for v in range(10)], label=f"line {i}")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(loc="center")
    assert "legend covers" in " ".join(plots.figure_problems(fig))
    plots.place_legends(fig)
    assert plots.figure_problems(fig) == []


def test_showing_a_defective_figure_raises_when_checks_are_on(monkeypatch):
    fig, axes = plots.figure()
    axes[0, 0].plot([0, 1], [0, 1])                            # no axis labels
    monkeypatch.delenv("DEPTHLAB_FIGURE_CHECK", raising=False)
    assert fig._repr_png_().startswith(b"\x89PNG")
    monkeypatch.setenv("DEPTHLAB_FIGURE_CHECK", "1")
    with pytest.raises(plots.FigureProblem, match="no label"):
        fig._repr_png_()


def test_ticks_outside_a_log_view_are_not_reported():
    """A tick two decades below a log axis's view is not drawn; it must not count as cut off."""
    import numpy as np

    from depthlab import plots

    fig, axes = plots.figure(width=6.2, takeaway="a profile over ten decades")
    ax = axes[0, 0]
    ax.semilogy(np.arange(20), np.logspace(-11, -0.1, 20))
    ax.set_ylim(8.6e-12, 0.84)
    ax.set_xlabel("layer")
    ax.set_ylabel("gradient norm")
    plots._renderer(fig)
    drawn = {t.get_text() for t in plots._drawn_tick_labels(ax, ax.yaxis)}
    outside = {t.label1.get_text() for t in ax.yaxis.get_major_ticks()
               if t.get_loc() is not None and not 8.6e-12 <= t.get_loc() <= 0.84}
    assert drawn and not drawn & outside
    assert plots.figure_problems(fig) == []


def test_colliding_log_labels_are_thinned():
    """Over a decade and a half matplotlib labels 2, 3, 4, 6 × 10^k on a log axis; on a narrow
    panel they collide. tidy_log_ticks keeps 2 and 5 × 10^k and the powers of ten."""
    import numpy as np
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator

    from depthlab import plots

    fig, axes = plots.figure(2, takeaway="measured against predicted")
    x = np.array([0.025, 0.08, 0.1, 0.2, 0.3, 0.8])
    for ax in axes[0]:
        ax.loglog(x, x, "o")
        ax.set_xlabel("predicted sd")
        ax.set_ylabel("measured sd")
        # what matplotlib does on such a range (which minor ticks it labels varies by version)
        ax.xaxis.set_minor_locator(LogLocator(base=10.0, subs=tuple(range(2, 10))))
        ax.xaxis.set_minor_formatter(LogFormatterSciNotation(
            labelOnlyBase=False, minor_thresholds=(np.inf, np.inf)))
    assert any("overlap" in p for p in plots.figure_problems(fig))
    plots.tidy_log_ticks(fig)
    assert plots.figure_problems(fig) == []
    plots._renderer(fig)
    assert len(plots._drawn_tick_labels(axes[0, 0], axes[0, 0].xaxis)) >= 3


def test_a_y_label_taller_than_its_panel_is_broken_onto_two_lines():
    from depthlab import plots

    fig, axes = plots.figure(2, height=2.4, takeaway="a takeaway line above two short panels")
    for ax in axes[0]:
        ax.plot([0, 1], [0, 1])
        ax.set_xlabel("step")
        ax.set_ylabel("held-out accuracy after 100 steps of training")
    assert any("y label" in p for p in plots.figure_problems(fig))
    assert plots.fit_axis_labels(fig)
    assert "\n" in axes[0, 1].get_ylabel()
    assert plots.figure_problems(fig) == []
    assert not plots.fit_axis_labels(fig)            # nothing left to do


def test_block_diagram_draws_what_the_config_says():
    """One ⊕ per sum, one skip line per skip connection, one box per norm: Pre-LN has two of
    each; removing the attention skip removes one line; the parallel block without skips sums
    its two branches with no skip at all; without norms there is no norm box."""
    def drawn(cfg):
        fig, axes = plots.figure()
        plots.block_diagram(axes[0, 0], cfg, title="x")
        ax = axes[0, 0]
        texts = [t.get_text() for t in ax.texts]
        skips = [line for line in ax.lines if line.get_gid() == "skip"]
        plots.check_figure(fig)
        return texts.count("+"), len(skips), sum("Norm" in t for t in texts), texts

    base = dl.TransformerConfig(d_model=32, n_heads=4)
    assert drawn(base)[:3] == (2, 2, 2)
    assert drawn(base.replace(norm_placement="post"))[:3] == (2, 2, 2)
    sas = base.replace(alpha_sa=0.0, attention="shaped", identity_values=True, beta_ff=0.1)
    plus, skips, norms, texts = drawn(sas)
    assert (plus, skips, norms) == (1, 1, 2)
    assert any("αI + βA − βC" in t and "V = W_O = I" in t for t in texts)
    assert "MLP × 0.1" in texts
    assert drawn(sas.replace(parallel=True))[:3] == (1, 0, 1)
    assert drawn(sas.replace(parallel=True, norm_placement="none", norm_kind="none"))[:3] == \
        (1, 0, 0)
    assert drawn(base.replace(parallel=True))[:3] == (1, 1, 1)      # GPT-J: one skip


def _short_panels_with_a_legend_on_the_data():
    fig, axes = plots.figure(2, height=2.8, takeaway="a takeaway line above two short panels")
    for ax in axes[0]:
        for i in range(3):
            ax.plot(range(10), [i + 0.1 * v for v in range(10)], label=f"line {i}")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out accuracy after 100 steps of training")   # too tall: wrapped
        ax.legend(loc="center")                                          # on the data: moved
    return fig


def test_a_shown_figure_is_painted_once_and_its_png_is_unchanged(monkeypatch):
    """Legend placement, tick thinning, label fitting and the check only lay the figure out
    (no pixels) and skip passes that cannot move anything: savefig paints it once, and the
    PNG is byte for byte the one a full draw before every step gave."""
    monkeypatch.setenv("DEPTHLAB_FIGURE_CHECK", "1")
    draws = {"painted": 0, "laid out": 0}
    draw = Figure.draw

    def counting(fig, renderer):
        draws["laid out" if "draw_path" in vars(renderer) else "painted"] += 1
        return draw(fig, renderer)

    monkeypatch.setattr(Figure, "draw", counting)
    png = _short_panels_with_a_legend_on_the_data()._repr_png_()
    assert draws["painted"] == 1

    def always_draw(fig):                    # what every step did before: a full draw
        if not isinstance(fig.canvas, plots.FigureCanvasAgg):
            plots.FigureCanvasAgg(fig)
        fig.canvas.draw()
        return fig.canvas.get_renderer()

    monkeypatch.setattr(plots, "_renderer", always_draw)
    assert _short_panels_with_a_legend_on_the_data()._repr_png_() == png


def test_a_change_that_leaves_the_figure_fresh_is_laid_out_again():
    """A label's new text does not mark a figure stale; once the layout has settled, the
    next pass would be skipped unless the change is declared (``_changed``)."""
    fig = _short_panels_with_a_legend_on_the_data()
    with plots._reusing_layout(fig):
        for _ in range(6):
            plots._renderer(fig)
        assert fig._depthlab_settled is not None             # nothing left to move
        assert plots.fit_axis_labels(fig)                     # wraps both y labels
        plots._renderer(fig)
        seen = plots._layout_state(fig)
    fig.canvas.draw()
    assert np.abs(plots._layout_state(fig) - seen).max() < 0.5     # pixels
