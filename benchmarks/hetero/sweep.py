"""Part 6: the model-size sweep: up to which size does the host CPU pay?

The CNN of part 3 at several widths of its first stage (16 channels:
ResNet-20 size; each doubling about quadruples the parameters and the work),
on the same batches. Per width: the parameter count; the calibration
(:func:`samx.runtime.calibrate_ascent_batch`: the descent seconds, the host
seconds per ascent example at the calibrated b', the transfer seconds, b' and
whether it ``hides`` behind the descent); and AsyncSAM with its ascent on the
host CPU at that b' against SGD, timed as part 3 times its rows (interleaved,
medians after compilation, the same functions). ``Sizes.widths`` are measured
in any case, ``Sizes.more_widths`` while the sweep's share of the budget
allows: a width starts only if its time, predicted from the last one's, fits.
"""

import time

from hetero.calibration import as_record, calibrated
from hetero.machine import cnn, parameter_count
from hetero.steps import compile_loops, interleave, step_rows, summarize

# The two rows of part 3 that each width times.
SGD, ASYNC_SAM = "sgd", "async_sam/host/calibrated"


def one_width(run, width, descent, host, batches, sizes) -> tuple[dict, float]:
    """``(row, seconds)``: the sweep's row for ``width``, and an estimate of
    the seconds it spent running computations (not compiling them), the part
    that grows with the model."""
    params, loss = cnn(sizes, width)
    c, warned = calibrated(loss, params, batches[0], descent, host, sizes.repeats)
    row = {"width": width, "parameters": parameter_count(params)}
    row.update(as_record(c, warned))
    rows = [
        r
        for r in step_rows(sizes.batch, c.ascent_batch_size)
        if r.key in (SGD, ASYNC_SAM)
    ]
    same, loops = compile_loops(
        run, "sweep", rows, params, loss, batches, sizes.batch, descent, host
    )
    times, rounds = interleave(
        run, "sweep", loops, batches, sizes.sweep_rounds, sizes.inner
    )
    sgd, asam = summarize(rows, same, loops, times)
    if "skipped" in asam or "skipped" in sgd:
        row["skipped"] = "budget"
        return row, 0.0
    row.update(
        sgd_step_s=sgd["median_step_s"],
        async_sam_step_s=asam["median_step_s"],
        async_sam_vs_sgd=asam["ratio_vs_sgd"],
        where=asam["where"],
        rounds=rounds,
        inner=sizes.inner,
        finite=sgd["finite"] and asam["finite"],
    )
    # Each timing of the calibration runs once more than its repeats (a
    # transfer twice more), and each loop 3 steps before its rounds.
    timed = sizes.repeats + 1
    computing = (
        timed * (c.descent_seconds + sum(c.ascent_seconds.values()))
        + (timed + 1) * c.transfer_seconds
        + (3 + rounds * sizes.inner) * (row["sgd_step_s"] + row["async_sam_step_s"])
    )
    return row, computing


def predicted(took: float, computing: float, growth: float) -> float:
    """The next width's seconds: the last one's compilation as it was, its
    computations ``growth`` times longer."""
    computing = min(max(computing, 0.0), took)
    return took - computing + growth * computing


def sweep(run, descent, host, batches, sizes) -> list[dict]:
    rows: list[dict] = []

    def save():
        run.part(
            "sweep",
            {
                "model": "the CNN of the step-time part, first-stage width varied",
                "batch_size": sizes.batch,
                "widths": list(sizes.widths),
                "more_widths": list(sizes.more_widths),
                "rows": rows,
            },
        )

    save()
    widths = (*sizes.widths, *sizes.more_widths)
    need, out = 0.0, False  # the next width's predicted seconds; out of budget
    for i, width in enumerate(widths):
        required = width in sizes.widths
        out = out or run.left("sweep") <= need
        if out:
            rows.append({"width": width, "required": required, "skipped": "budget"})
            save()
            run.log(f"sweep: out of its share of the budget before width {width}")
            continue
        start = time.perf_counter()
        row, computing = one_width(run, width, descent, host, batches, sizes)
        row["required"] = required
        rows.append(row)
        save()
        took = time.perf_counter() - start
        if i + 1 < len(widths):
            need = predicted(took, computing, (widths[i + 1] / width) ** 2)
        if "skipped" not in row:
            run.log(
                f"sweep: width {width}, {row['parameters']} parameters: b' ="
                f" {row['ascent_batch_size']}"
                f" ({'hides' if row['hides'] else 'does not hide'}), AsyncSAM"
                f" {row['async_sam_vs_sgd']:.2f}x SGD; {took:.1f} s"
                + (f", the next predicted {need:.1f} s" if i + 1 < len(widths) else "")
            )
    return rows
