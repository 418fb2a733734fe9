"""Part 3: time per step relative to SGD, every loop in one process.

Every loop is fed NumPy batches and dispatches one step per call; the loops
take turns (interleaved), everything is compiled and run before the clock
starts, and each figure is the median over rounds of a few steps. The sweep
(:mod:`hetero.sweep`) times its loops with the same functions.
"""

import dataclasses
import statistics
import time
from typing import NamedTuple

import jax
import numpy as np

from hetero.budget import MIN_ROUNDS
from samx.examples.stepwise import describe, pure_stepper, trainer_stepper
from samx.examples.train import ALL, base_optimizer


class Row(NamedTuple):
    key: str
    label: str
    method: str  # a name of samx.examples.train.ALL
    loop: str  # "pure jit" or "Trainer"
    computed: str  # how its gradients are computed
    ascent_batch_size: int | None = None  # AsyncSAM's b'
    on_host: bool = False  # AsyncSAM's ascent on the host CPU
    sampa_vmap: bool | None = None
    pure: str | None = None  # the key of the pure step it is compared with


def step_rows(batch: int, calibrated: int) -> list[Row]:
    """The rows of the step-time table; the first is the baseline."""
    rows = [
        Row("sgd", "SGD", "sgd", "pure jit", "one jit"),
        Row("sgd/trainer", "SGD", "sgd", "Trainer", "one jit", pure="sgd"),
        Row("sam", "SAM", "sam", "pure jit", "one jit, two sequential gradients"),
        Row(
            "sam/trainer",
            "SAM",
            "sam",
            "Trainer",
            "one jit, two sequential gradients",
            pure="sam",
        ),
    ]
    for key, size in (
        ("calibrated", calibrated),
        ("b/4", batch // 4),
        ("b/8", batch // 8),
    ):
        rows.append(
            Row(
                f"async_sam/host/{key}",
                f"AsyncSAM, ascent on the host CPU, b' = {size} ({key})",
                "async_sam",
                "Trainer",
                "two devices, at the same time",
                ascent_batch_size=max(1, size),
                on_host=True,
            )
        )
    quarter = max(1, batch // 4)
    rows += [
        Row(
            "async_sam/accelerator",
            f"AsyncSAM, both gradients on the accelerator, b' = {quarter}",
            "async_sam",
            "pure jit",
            "one jit",
            ascent_batch_size=quarter,
        ),
        Row(
            "async_sam/accelerator/trainer",
            f"AsyncSAM, both gradients on the accelerator, b' = {quarter}",
            "async_sam",
            "Trainer",
            "one jit",
            ascent_batch_size=quarter,
            pure="async_sam/accelerator",
        ),
        Row("sampa/vmap", "SAMPa, vmap-fused", "sampa_fused", "pure jit", "vmap"),
        Row(
            "sampa/vmap/trainer",
            "SAMPa, vmap-fused",
            "sampa_fused",
            "Trainer",
            "vmap",
            sampa_vmap=True,
            pure="sampa/vmap",
        ),
        Row(
            "sampa/two",
            "SAMPa, two gradients in one jit",
            "sampa",
            "pure jit",
            "one jit, two gradients",
        ),
        Row(
            "sampa/two/trainer",
            "SAMPa, two gradients in one jit",
            "sampa",
            "Trainer",
            "one jit, two gradients",
            sampa_vmap=False,
            pure="sampa/two",
        ),
    ]
    return rows


def stepper_for(row: Row, params, loss, batch: int, descent, host):
    method = ALL[row.method]
    if row.ascent_batch_size is not None:
        fraction = row.ascent_batch_size / batch
        method = dataclasses.replace(method, ascent_fraction=fraction)
    tx = method.wrap(base_optimizer(0.01, 10_000))
    if row.loop == "pure jit":
        return pure_stepper(method, tx, loss, params, batch_size=batch, device=descent)
    return trainer_stepper(
        method,
        tx,
        loss,
        params,
        batch_size=batch,
        descent_device=descent,
        ascent_device=host if row.on_host else descent,
        sampa_vmap=row.sampa_vmap,
    )


def finite(tree) -> bool:
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


# The order in which the loops are compiled and timed: the headline rows
# first, so that a run short of budget skips the Trainer-overhead twins.
PRIORITY = (
    "sgd",
    "async_sam/host/calibrated",
    "sampa/vmap",
    "sam",
    "async_sam/host/b/4",
    "async_sam/host/b/8",
    "async_sam/accelerator",
    "sampa/two",
    "sgd/trainer",
    "sampa/vmap/trainer",
    "sam/trainer",
    "async_sam/accelerator/trainer",
    "sampa/two/trainer",
)


def compile_loops(run, part, rows, params, loss, batches, batch, descent, host):
    """``(same, loops)``: each distinct loop of ``rows``, in their order,
    compiled and warmed up while ``part``'s share of the budget lasts.

    Rows with the same loop (b' calibrated to b/4, say) share it: ``same``
    maps each row's key to its loop's key in ``loops``, whose values are
    ``[stepper, state]``.
    """
    same = {row.key: row._replace(key="", label="", pure=None) for row in rows}
    loops: dict[Row, list] = {}
    took = 0.0  # the last loop's compilation and warm-up
    for row in rows:
        if same[row.key] in loops:
            continue
        if run.left(part) <= took:
            run.log(f"{part}: out of its share of the budget before {row.key}")
            break
        took = time.perf_counter()
        stepper = stepper_for(row, params, loss, batch, descent, host)
        state = stepper.init(batches[0])
        for b in batches[:3]:  # compile, then warm up
            state = stepper.step(state, b)
        jax.block_until_ready(state)
        loops[same[row.key]] = [stepper, state]
        took = time.perf_counter() - took
        run.log(f"{part}: compiled {row.key}: {describe(stepper.gradients)}")
    return same, loops


def interleave(run, part, loops, batches, rounds: int, inner: int, on_round=None):
    """``(times, rounds)``: up to ``rounds`` rounds in which each loop runs
    ``inner`` steps in turn, at least ``MIN_ROUNDS``, more while ``part``'s
    share lasts; ``times[loop]`` holds its seconds per step, one a round.
    ``on_round(times, rounds)`` after each round."""
    times: dict[Row, list[float]] = {config: [] for config in loops}
    done = 0
    while done < rounds and (done < MIN_ROUNDS or run.left(part) > 0):
        for config, loop in loops.items():
            stepper, state = loop
            start = time.perf_counter()
            for i in range(inner):
                state = stepper.step(state, batches[(done + i) % len(batches)])
            jax.block_until_ready(state)
            times[config].append((time.perf_counter() - start) / inner)
            loop[1] = state
        done += 1
        if on_round is not None:
            on_round(times, done)
    return times, done


def step_times(run, descent, host, params, loss, batches, sizes, calibrated):
    rows = step_rows(sizes.batch, calibrated)
    ordered = sorted(rows, key=lambda r: PRIORITY.index(r.key))
    same, loops = compile_loops(
        run, "step_time", ordered, params, loss, batches, sizes.batch, descent, host
    )

    def save(times, rounds: int) -> None:
        """The rows' medians so far, saved: an interrupted run keeps them."""
        out = summarize(rows, same, loops, times)
        run.part("step_time", {"rounds": rounds, "inner": sizes.inner, "rows": out})

    save({}, 0)
    times, rounds = interleave(
        run, "step_time", loops, batches, sizes.rounds, sizes.inner, save
    )
    run.log(f"step time: {rounds} interleaved rounds of {sizes.inner} steps")
    return summarize(rows, same, loops, times)


def summarize(rows, same, loops, times) -> list[dict]:
    """Each row's median step time, its ratios and where its gradients ran."""
    medians = {
        row.key: statistics.median(times[same[row.key]])
        for row in rows
        if times.get(same[row.key])
    }
    base = medians.get("sgd")
    out = []
    for row in rows:
        entry = {
            "key": row.key,
            "label": row.label,
            "loop": row.loop,
            "computed": row.computed,
            "ascent_batch_size": row.ascent_batch_size,
        }
        if row.key in medians:
            stepper, state = loops[same[row.key]]
            median = medians[row.key]
            entry.update(
                gradients=[g._asdict() for g in stepper.gradients],
                where=describe(stepper.gradients),
                median_step_s=median,
                ratio_vs_sgd=median / base if base else None,
                trainer_vs_pure=(
                    median / medians[row.pure] if row.pure in medians else None
                ),
                rounds=len(times[same[row.key]]),
                finite=finite(stepper.params(state)),
            )
        else:
            entry["skipped"] = "budget"
        out.append(entry)
    return out
