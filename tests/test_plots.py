"""The main job's plots: bars from 0, and the seeds' spread shown."""

import statistics
from types import SimpleNamespace

import numpy as np

from samx.examples import plots

# Three seeds per optimizer, accuracies in the range the main job sees.
FINAL = {"sgd": [0.74, 0.77, 0.79], "sam": [0.86, 0.88, 0.91]}


def _results():
    return {
        name: [
            SimpleNamespace(
                test_accuracy=acc, curve=[(1.0, acc - 0.1), (2.0 + seed, acc)]
            )
            for seed, acc in enumerate(accs)
        ]
        for name, accs in FINAL.items()
    }


def test_final_accuracy_bars_start_at_zero_and_show_every_seed(tmp_path):
    fig = plots._final_accuracy_figure(_results())
    [ax] = fig.axes
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] >= 1.0
    heights = [bar.get_height() for bar in ax.patches]
    np.testing.assert_allclose(heights, [statistics.mean(a) for a in FINAL.values()])
    dots = [line.get_ydata() for line in ax.lines if line.get_marker() == "o"]
    np.testing.assert_allclose(dots, list(FINAL.values()))
    plots._pyplot().close(fig)
    plots.final_accuracy(_results(), str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_accuracy_vs_time_shows_the_spread_over_seeds(tmp_path):
    fig = plots._accuracy_vs_time_figure(_results())
    [ax] = fig.axes
    bands = ax.collections
    assert len(bands) == len(FINAL)  # one band per optimizer
    for band, accs in zip(bands, FINAL.values(), strict=True):
        y = band.get_paths()[0].vertices[:, 1]
        np.testing.assert_allclose([y.min(), y.max()], [min(accs) - 0.1, max(accs)])
    plots._pyplot().close(fig)
    # One seed: no spread to show.
    single = plots._accuracy_vs_time_figure({k: v[:1] for k, v in _results().items()})
    assert not single.axes[0].collections
    plots._pyplot().close(single)
    plots.accuracy_vs_time(_results(), str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


# A docs page column: 736 px (furo, measured in Chromium); notebook figures are
# drawn at 100 dpi and shrunk to fit it.
COLUMN_PX, DPI = 736, 100


def _landscape_figure():
    steps, line = np.linspace(-1, 1, 21), np.linspace(-1, 1, 85)
    x, y = np.meshgrid(steps, steps, indexing="ij")
    surfaces = {
        "SGD": np.exp(4 * x**2 + 3 * y**2),
        "SAM": 1.4 * np.exp(2 * x**2 + y**2),
    }
    slices = {"SGD": np.exp(4 * line**2), "SAM": 1.4 * np.exp(2 * line**2)}
    fig = plots.loss_landscapes(steps, surfaces, line, slices)
    fig.set_dpi(DPI)
    fig.canvas.draw()
    return fig


def _texts(fig):
    """Every visible label, title and tick label: (axes, text, box in pixels)."""
    renderer = fig.canvas.get_renderer()
    texts = [
        (ax, t)
        for ax in fig.axes
        for t in (ax.xaxis.label, ax.yaxis.label, ax.title)
        + tuple(ax.get_xticklabels())
        + tuple(ax.get_yticklabels())
        if t.get_visible() and t.get_text()
    ]
    return [(ax, t, t.get_window_extent(renderer)) for ax, t in texts]


def test_loss_landscapes_text_is_readable_in_a_page_column():
    fig = _landscape_figure()
    shrink = min(1.0, COLUMN_PX / (fig.get_figwidth() * DPI))
    for _, text, _ in _texts(fig):  # at least 10 px tall on the page
        assert text.get_fontsize() / 72 * DPI * shrink >= 10, text
    plots._pyplot().close(fig)


def test_loss_landscapes_labels_keep_apart():
    # The colour bar's label once touched the next panel's y label.
    fig = _landscape_figure()
    texts = _texts(fig)
    (colorbar,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    label = colorbar.yaxis.label.get_window_extent(fig.canvas.get_renderer())
    for i, (ax, a, box) in enumerate(texts):
        for _, b, other in texts[i + 1 :]:
            assert not box.overlaps(other), (a.get_text(), b.get_text())
        if ax is not colorbar:  # another panel's text: 10 px away from it
            assert not box.overlaps(label.padded(10)), a.get_text()
    plots._pyplot().close(fig)


def test_loss_landscapes_panels():
    fig = _landscape_figure()
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["SGD solution", "SAM solution", "1-D slice along direction 1"]
    (colorbar,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert colorbar.get_ylabel() == "loss on the fixed batch"
    assert colorbar.get_yscale() == "log"  # levels shared, spaced logarithmically
    plots._pyplot().close(fig)
