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
