"""The Markdown tables of whatever the record holds, and the goals."""

import statistics

from hetero.calibration import describe

# The goals for an accelerator's figures: (row, figure, at most). Each is
# compared with what was measured, on an accelerator only; SAM's "about 2x"
# is reported, not judged.
GOALS = (
    ("async_sam/host/calibrated", "ratio_vs_sgd", 1.10),
    ("sampa/vmap", "ratio_vs_sgd", 1.4),
    *(
        (key, "trainer_vs_pure", 1.05)
        for key in (
            "sgd/trainer",
            "sam/trainer",
            "async_sam/accelerator/trainer",
            "sampa/vmap/trainer",
            "sampa/two/trainer",
        )
    ),
)


def table(record: dict) -> str:
    """The Markdown tables of whatever the record holds."""
    parts = record["parts"]
    info = parts.get("machine", {})
    gpu = info.get("accelerator") is not None
    lines = [
        f"# Heterogeneous run: {record.get('machine', '?')}",
        "",
        f"Accelerator: {info.get('accelerator') or 'none (cpu:0 stands in)'};"
        f" host CPU: {info.get('cpu')}, {info.get('cores')} cores; versions:"
        f" {info.get('versions')}; complete: {record['complete']}"
        + (f" (stopped: {record['stopped']})" if record.get("stopped") else ""),
        "",
    ]
    if not gpu:
        lines += ["No accelerator: these figures say nothing about one.", ""]
    if "calibration" in parts:
        lines += [f"Calibrated {describe(parts['calibration'])}.", ""]
    if "step_time" in parts:
        lines += step_time_table(parts["step_time"], info, gpu)
    if "timeline" in parts:
        t = parts["timeline"]
        shares = [
            o["overlap_of_shorter"] for o in t["overlap"] if o["overlap_of_shorter"]
        ]
        lines += [
            "## Timeline",
            "",
            f"AsyncSAM, b' = {t['ascent_batch_size']}:"
            f" {len(t['overlap'])} steps; the ascent and descent segments"
            " overlapped by a median of"
            f" {statistics.median(shares) if shares else 0.0:.0%} of the shorter"
            " (starts are inferred; see the JSON).",
            "",
        ]
    if "time_to_accuracy" in parts:
        lines += accuracy_table(parts["time_to_accuracy"], gpu)
    if "sweep" in parts:
        lines += sweep_table(parts["sweep"], gpu)
    return "\n".join(lines)


def step_time_table(s: dict, info: dict, gpu: bool) -> list[str]:
    lines = [
        "## Time per step",
        "",
        f"ResNet-20-size CNN, {info.get('dtype')}, batch"
        f" {info.get('sizes', {}).get('batch')}; medians of {s['rounds']}"
        f" interleaved rounds of {s['inner']} steps after compilation."
        " Where: each gradient's batch role[examples]@device.",
        "",
        "| row | loop | computed | where each gradient ran | vs SGD"
        " | Trainer / pure |" + (" ms/step |" if gpu else ""),
        "|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for r in s["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['label']} | {r['loop']} | skipped (budget) |")
            continue
        over = r["trainer_vs_pure"]
        lines.append(
            f"| {r['label']} | {r['loop']} | {r['computed']} | {r['where']}"
            f" | {r['ratio_vs_sgd']:.2f}x"
            f" | {f'{over:.2f}x' if over else ''} |"
            + (f" {r['median_step_s'] * 1e3:.2f} |" if gpu else "")
        )
    lines.append("")
    return lines + goals(s["rows"], gpu)


def accuracy_table(a: dict, gpu: bool) -> list[str]:
    lines = [
        "## Time to accuracy",
        "",
        f"{a['model']}, {a['data']}, {a['epochs']} epochs, batch"
        f" {a['batch_size']}, through the Trainer.",
        "",
        "| method | where each gradient ran | test accuracy | train seconds |",
        "|---|---|---|---|",
    ]
    for name, m in a["methods"].items():
        if "skipped" in m:
            lines.append(f"| {name} | skipped (budget) | | |")
            continue
        seconds = f"{m['train_seconds']:.2f}" if gpu else "(CPU)"
        lines.append(
            f"| {m['label']} | {m['where']} | {m['test_accuracy']:.4f} | {seconds} |"
        )
    return [*lines, ""]


def sweep_table(s: dict, gpu: bool) -> list[str]:
    """The model-size sweep; its absolute times on an accelerator only."""
    lines = [
        "## Model size",
        "",
        f"{s['model']}, batch {s['batch_size']}: per width, AsyncSAM (ascent on"
        " the host CPU at the calibrated b') against SGD, timed as above."
        " Descent: the gradient on the batch on the accelerator; host: the"
        " ascent's seconds per example at b'; transfers: the parameters to the"
        " host and the ascent gradient back; hides: b' with the transfers fits"
        " inside the descent."
        + ("" if gpu else " Absolute times: in the JSON (CPU stand-ins)."),
        "",
        "| width | parameters | b' | hides | AsyncSAM / SGD |"
        + (" descent ms | host ms/example | transfers ms |" if gpu else ""),
        "|---|---|---|---|---|" + ("---|---|---|" if gpu else ""),
    ]
    for r in s["rows"]:
        if "parameters" not in r:
            lines.append(f"| {r['width']} | not measured (budget) | | | |")
            continue
        ratio = r.get("async_sam_vs_sgd")
        lines.append(
            f"| {r['width']} | {r['parameters']:,} | {r['ascent_batch_size']}"
            f" of {r['batch_size']} | {'yes' if r['hides'] else 'no'}"
            f" | {f'{ratio:.2f}x' if ratio else 'not timed (budget)'} |"
            + (
                f" {r['descent_seconds'] * 1e3:.2f}"
                f" | {r['host_seconds_per_example'] * 1e3:.3f}"
                f" | {r['transfer_seconds'] * 1e3:.2f} |"
                if gpu
                else ""
            )
        )
    return [*lines, ""]


def goals(rows: list[dict], gpu: bool) -> list[str]:
    """The goals, each against its measured figure (on an accelerator only)."""
    if not gpu:
        return ["Goals: not judged without an accelerator.", ""]
    by_key = {r["key"]: r for r in rows}
    lines = ["Goals (measured above):", ""]
    for key, figure, most in GOALS:
        value = by_key.get(key, {}).get(figure)
        verdict = (
            "not measured"
            if value is None
            else f"{value:.2f}x, {'met' if value <= most else 'missed'}"
        )
        lines.append(f"- {key}, {figure} <= {most}x: {verdict}")
    sam = by_key.get("sam", {}).get("ratio_vs_sgd")
    lines += [f"- sam, ratio_vs_sgd about 2x: {sam:.2f}x" if sam else "", ""]
    return lines
