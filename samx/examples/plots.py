"""Plots of the comparison: accuracy against wall time, final accuracy."""

import statistics

from samx.examples.train import ALL


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _accuracy_vs_time_figure(results: dict, title: str = ""):
    """The figure of :func:`accuracy_vs_time`; the band is the seeds' spread."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, runs in results.items():
        epochs = len(runs[0].curve)
        seconds = [statistics.mean(r.curve[e][0] for r in runs) for e in range(epochs)]
        accs = [[r.curve[e][1] for r in runs] for e in range(epochs)]
        (line,) = ax.plot(seconds, [statistics.mean(a) for a in accs])
        line.set_label(ALL[name].label)
        if len(runs) > 1:  # the lowest and the highest seed at each epoch
            ax.fill_between(
                seconds,
                [min(a) for a in accs],
                [max(a) for a in accs],
                color=line.get_color(),
                alpha=0.15,
                linewidth=0,
            )
    ax.set_xlabel("training wall time (s), compilation excluded")
    ax.set_ylabel("test accuracy (mean over seeds; band: min to max)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_vs_time(results: dict, path: str, title: str = "") -> None:
    """Test accuracy after each epoch against training wall time, seed means.

    With several seeds, a band shows the lowest and highest seed at each
    epoch, so that the differences between the curves can be read against it.
    """
    _save(_accuracy_vs_time_figure(results, title), path)


def _final_accuracy_figure(results: dict, title: str = ""):
    """The figure of :func:`final_accuracy`."""
    plt = _pyplot()
    names = list(results)
    accs = [[r.test_accuracy for r in results[n]] for n in names]
    means = [statistics.mean(a) for a in accs]
    stds = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = range(len(names))
    ax.bar(x, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    for i, a in enumerate(accs):  # every seed, so that the spread shows
        spread = [i + 0.25 * (k / max(len(a) - 1, 1) - 0.5) for k in range(len(a))]
        ax.plot(spread, a, "o", color="black", markersize=3, zorder=3)
        ax.annotate(
            f"{means[i]:.3f}",
            (i, means[i] + stds[i]),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    ax.set_xticks(x, [ALL[n].label for n in names], rotation=30, ha="right")
    ax.set_ylabel("final test accuracy (mean ± std; dots: seeds)")
    ax.set_ylim(0.0, 1.05)  # bars start at 0: their lengths compare honestly
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def final_accuracy(results: dict, path: str, title: str = "") -> None:
    """Final test accuracy per optimizer: bars from 0, std bars, every seed."""
    _save(_final_accuracy_figure(results, title), path)


def _save(fig, path: str) -> None:
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
