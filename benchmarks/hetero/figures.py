"""The plots, and the table and plots written beside the JSON."""

import os

from hetero.report import table
from samx.examples import plots, timeline


def step_time_plot(rows: list[dict], path: str, title: str) -> None:
    plt = plots._pyplot()
    rows = [r for r in rows if "ratio_vs_sgd" in r and r["ratio_vs_sgd"]]
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(rows) + 1.4))
    ax.barh(
        range(len(rows)),
        [r["ratio_vs_sgd"] for r in rows],
        color=["tab:orange" if "host" in r["key"] else "tab:blue" for r in rows],
    )
    ax.set_yticks(range(len(rows)), [f"{r['label']} ({r['loop']})" for r in rows])
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("time per step / SGD's (orange: the ascent on the host CPU)")
    ax.set_title(title)
    fig.tight_layout()
    plots._save(fig, path)


def sweep_plot(rows: list[dict], path: str, title: str) -> None:
    """AsyncSAM's time per step / SGD's against the parameter count, each
    width marked by whether its calibrated b' hides behind the descent."""
    plt = plots._pyplot()
    rows = [r for r in rows if r.get("async_sam_vs_sgd")]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for hides, marker, color, label in (
        (True, "o", "tab:green", "b' hides behind the descent"),
        (False, "X", "tab:red", "even b' = 1 does not hide"),
    ):
        some = [r for r in rows if r["hides"] == hides]
        if not some:
            continue
        ax.scatter(
            [r["parameters"] for r in some],
            [r["async_sam_vs_sgd"] for r in some],
            marker=marker,
            color=color,
            label=label,
            zorder=3,
        )
    ax.plot(
        [r["parameters"] for r in rows],
        [r["async_sam_vs_sgd"] for r in rows],
        color="gray",
        lw=0.8,
    )
    for r in rows:
        ax.annotate(
            f"{r['width']} ch, b'={r['ascent_batch_size']}",
            (r["parameters"], r["async_sam_vs_sgd"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xlabel("parameters (the CNN at each first-stage width, log scale)")
    ax.set_ylabel("time per step / SGD's")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plots._save(fig, path)


def write_outputs(run, out: str, name: str, measured, accuracy) -> list[str]:
    """The table and the plots of what was measured; never raises."""
    paths = []
    parts = run.record["parts"]
    try:
        path = os.path.join(out, f"{name}.md")
        with open(path, "w") as f:
            f.write(table(run.record) + "\n")
        paths.append(path)
        accelerator = parts.get("machine", {}).get("accelerator")
        title = accelerator or f"{name}: no accelerator, CPU stand-ins"
        if "step_time" in parts:
            path = os.path.join(out, f"{name}-step_time.png")
            step_time_plot(parts["step_time"]["rows"], path, title)
            paths.append(path)
        if measured is not None:
            plt = plots._pyplot()
            path = os.path.join(out, f"{name}-timeline.png")
            ax = timeline.plot(measured, title=f"AsyncSAM timeline, {title}")
            ax.figure.tight_layout()
            ax.figure.savefig(path, dpi=120)
            plt.close(ax.figure)
            paths.append(path)
        if accuracy:
            path = os.path.join(out, f"{name}-accuracy_vs_time.png")
            plots.accuracy_vs_time(accuracy, path, f"digits CNN, 40% noise, {title}")
            paths.append(path)
        if any(
            r.get("async_sam_vs_sgd") for r in parts.get("sweep", {}).get("rows", [])
        ):
            path = os.path.join(out, f"{name}-sweep.png")
            sweep_plot(parts["sweep"]["rows"], path, f"model size, {title}")
            paths.append(path)
    except Exception as e:  # the JSON is already written; say what failed
        print(f"could not write the table or a plot: {e!r}", flush=True)
    return paths
