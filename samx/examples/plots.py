"""Plots of the comparison: accuracy against wall time, final accuracy."""

import statistics

from samx.examples.train import ALL


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_time(results: dict, path: str, title: str = "") -> None:
    """Test accuracy after each epoch against training wall time, seed means."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, runs in results.items():
        epochs = len(runs[0].curve)
        seconds = [statistics.mean(r.curve[e][0] for r in runs) for e in range(epochs)]
        accs = [statistics.mean(r.curve[e][1] for r in runs) for e in range(epochs)]
        ax.plot(seconds, accs, label=ALL[name].label)
    ax.set_xlabel("training wall time (s), compilation excluded")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def final_accuracy(results: dict, path: str, title: str = "") -> None:
    """Final test accuracy per optimizer: mean with standard-deviation bars."""
    plt = _pyplot()
    names = list(results)
    means = [statistics.mean(r.test_accuracy for r in results[n]) for n in names]
    stds = [
        statistics.stdev([r.test_accuracy for r in results[n]])
        if len(results[n]) > 1
        else 0.0
        for n in names
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(names)), [ALL[n].label for n in names], rotation=30)
    ax.set_ylabel("final test accuracy (mean ± std over seeds)")
    ax.set_ylim(max(0.0, min(means) - 0.15), min(1.0, max(means) + 0.08))
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
