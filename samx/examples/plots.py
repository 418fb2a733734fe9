"""Plots of the comparison (accuracy against wall time, final accuracy) and of
loss landscapes."""

import statistics
from typing import Any

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


_FAMILIES = (  # name prefix, legend, colour, marker; the first that matches
    ("async_sam_", "AsyncSAM, rho / sqrt(b'/b) (default)", "tab:blue", "o"),
    ("sam_subset_", "SAM, ascent on b'", "tab:green", "s"),
    ("sam_every_", "SAM every k steps", "tab:purple", "D"),
    ("sgd", "SGD", "black", "x"),
    ("optax_sam", "optax.contrib.sam", "tab:gray", "+"),
    ("sam", "SAM", "tab:red", "*"),
)


def _family(name: str) -> tuple[str, str, str]:
    if name.startswith("async_sam_") and name.endswith("_unscaled"):
        return "AsyncSAM, rho at every b' (paper)", "tab:orange", "o"
    if name.startswith("sam_subset_") and name.endswith("_scaled"):
        return "SAM, ascent on b', rho / sqrt(b'/b)", "tab:olive", "s"
    return next(f[1:] for f in _FAMILIES if name.startswith(f[0]))


def _frontier_panel(ax, record: dict, dataset: str, noise: str) -> None:
    results, cost = record["results"][dataset][noise], record["cost"][dataset]
    seen = set()
    for name, r in results.items():
        label, colour, marker = _family(name)
        ax.errorbar(
            cost[name],
            r["mean"],
            yerr=r["std"],
            fmt=marker,
            color=colour,
            capsize=2,
            label=None if label in seen else label,
        )
        seen.add(label)
        fraction = record["ascent_fraction"][name]
        tag = f"b/{round(1 / fraction)}" if fraction < 1 else ""
        if name.startswith("sam_every_"):
            tag = f"k={name.rsplit('_', 1)[1]}"
        if tag:
            ax.annotate(
                tag,
                (cost[name], r["mean"]),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=7,
                color=colour,
            )
    for suffix in ("", "_unscaled"):  # each AsyncSAM family as a line, by b/b'
        names = sorted(
            (n for n in results if n.startswith("async_sam_") and n.endswith(suffix)),
            key=lambda n: record["ascent_fraction"][n],
        )
        names = [n for n in names if suffix or not n.endswith("_unscaled")]
        if len(names) > 1:
            ax.plot(
                [cost[n] for n in names],
                [results[n]["mean"] for n in names],
                color=_family(names[0])[1],
                alpha=0.35,
                linewidth=1,
            )
    ax.set_title(f"{dataset}, {float(noise):.0%} label noise", fontsize=10)
    ax.set_xlabel("time per step relative to SGD (one device)")
    ax.set_ylabel("test accuracy (mean ± std)")
    ax.grid(alpha=0.3)


def frontier(record: dict, path: str) -> None:
    """Accuracy against cost, one panel per dataset and noise level.

    ``record`` is ``benchmarks/frontier.py``'s: ``results[dataset][noise]
    [method]`` with ``mean`` and ``std``, ``cost[dataset][method]`` (time per
    step relative to SGD) and ``ascent_fraction[method]``.
    """
    plt = _pyplot()
    panels = [(d, n) for d, by_noise in record["results"].items() for n in by_noise]
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(6.2 * cols, 4.6 * rows), squeeze=False
    )
    for ax, (dataset, noise) in zip(axes.flat, panels, strict=False):
        _frontier_panel(ax, record, dataset, noise)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_landscapes(
    steps: Any, surfaces: dict, line: Any, slices: dict, *, width: float = 9.0
):
    """Loss landscapes of several solutions, and their 1-D slices.

    Top row: one filled contour panel per solution, on levels spaced
    logarithmically and shared by the panels (one colour bar); a red cross at
    the solution. Bottom: the slices along the first direction, on a log
    scale. ``width`` is in inches: at 9, a page column about 740 px wide shows
    the 10-point tick labels at about 11 px.

    Args:
      steps: the grid's steps along each direction, as given to
        :func:`samx.diagnostics.loss_surface_2d`.
      surfaces: ``{label: surface}``, ``surface[i, j]`` the loss at step
        ``steps[i]`` along the first direction and ``steps[j]`` along the
        second.
      line: the steps of the slices.
      slices: ``{label: slice}``, as :func:`samx.diagnostics.loss_slice_1d`
        returns.
      width: the figure's width, in inches.

    Returns:
      The matplotlib figure.
    """
    import matplotlib.colors
    import matplotlib.pyplot as plt
    import numpy as np

    low = min(float(np.min(s)) for s in surfaces.values())
    high = max(float(np.max(s)) for s in surfaces.values())
    levels = np.geomspace(low, high, 16)
    norm = matplotlib.colors.LogNorm(low, high)
    names = list(surfaces)
    fig, axes = plt.subplot_mosaic(
        [names, ["slice"] * len(names)],
        figsize=(width, width * 0.85),
        layout="constrained",
        height_ratios=(1.25, 1),
    )
    for name in names:
        ax = axes[name]
        surface = np.asarray(surfaces[name]).T  # contourf wants [y, x]
        filled = ax.contourf(steps, steps, surface, levels=levels, norm=norm)
        ax.contour(steps, steps, surface, levels=levels, colors="k", linewidths=0.3)
        ax.plot(0, 0, "r+", markersize=10)
        ax.set_title(f"{name} solution")
        ax.set_xlabel("step along direction 1")
        ax.set_xticks([-1, -0.5, 0, 0.5, 1])
        ax.set_yticks([-1, -0.5, 0, 0.5, 1])
        ax.set_aspect("equal")
    axes[names[0]].set_ylabel("step along direction 2")
    fig.colorbar(
        filled,
        ax=[axes[n] for n in names],
        label="loss on the fixed batch",
        format="%.3g",
    )
    ax = axes["slice"]
    for name in names:
        ax.plot(line, slices[name], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step along direction 1")
    ax.set_ylabel("loss on the fixed batch")
    ax.set_title("1-D slice along direction 1")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
