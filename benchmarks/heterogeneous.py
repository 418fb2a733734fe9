"""The headline on an accelerator: AsyncSAM's ascent on the host CPU, SAMPa fused.

One process, one command. On a machine with an accelerator it measures, in
this order, and writes each part to ``DIR/<machine>.json`` as soon as it is
done (so an interrupted run leaves what it had):

1. the machine: the accelerator, the host CPU model and cores, jax and jaxlib;
2. AsyncSAM's ascent batch b', calibrated on the CNN
   (:func:`samx.runtime.calibrate_ascent_batch`: candidate b' on the host CPU
   timed against the descent gradient on the accelerator);
3. time per step relative to SGD, on a ResNet-20-size CNN (no normalisation
   layers) on synthetic 32x32x3 float32 data, batch 128: SGD, SAM, AsyncSAM
   through the Trainer with the descent on the accelerator and the ascent on
   the host CPU at the calibrated b', b/4 and b/8, AsyncSAM with both
   gradients on the accelerator, SAMPa fused by ``vmap`` on the accelerator
   and as two gradients in one jit; and the Trainer against the pure
   single-jit step for each. Every loop is fed NumPy batches and dispatches
   one step per call; the loops take turns (interleaved), everything is
   compiled and run before the clock starts, and each figure is the median
   over rounds of a few steps;
4. a measured timeline of a few AsyncSAM steps (:mod:`samx.examples.timeline`:
   when the CPU ascent and the accelerator descent finish, and whether they
   overlap);
5. time to accuracy: the Flax (linen) CNN with BatchNorm on digits with 40%
   label noise, SGD, SAM, AsyncSAM (b/4, its ascent on the host CPU) and SAMPa
   through the Trainer, test accuracy against training wall time.

Every row names where each of its gradients ran. It also writes
``DIR/<machine>.md`` (the tables) and PNG plots. ``--budget-s`` bounds the
run: each part has a share of it, and at the limit the run stops and writes
what it has (also on SIGTERM or Ctrl-C). Exit status: 0 complete, 3 stopped
by the budget, 130 interrupted.

``--smoke`` runs the same code with tiny sizes on two CPU devices (cpu:0
stands in for the accelerator, cpu:1 for the host CPU), in well under a
minute; the tests run it. Its figures say nothing about an accelerator.

Usage:
  PYTHONPATH=. python3 benchmarks/heterogeneous.py --out DIR [--budget-s 225]
  python benchmarks/heterogeneous.py --smoke --out DIR
"""

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from step_time import machine, problem

from samx.examples import flax_models, plots, timeline
from samx.examples.data import load_digits
from samx.examples.flax_train import LEARNING_RATE
from samx.examples.stepwise import (
    describe,
    device_name,
    fit,
    pure_stepper,
    trainer_stepper,
)
from samx.examples.train import ALL, METHODS, RunResult, base_optimizer
from samx.runtime import Trainer, calibrate_ascent_batch


class Sizes(NamedTuple):
    """The sizes of a run."""

    image: int  # the CNN's inputs: image x image x 3
    blocks: int  # residual blocks per stage (3: ResNet-20)
    batch: int
    rounds: int  # timed rounds per loop, at most
    inner: int  # steps per timing
    repeats: int  # calibration timings per candidate
    timeline_steps: int
    epochs: int  # time to accuracy
    digits_batch: int


FULL = Sizes(32, 3, 128, 30, 5, 10, 6, 30, 64)
SMOKE = Sizes(8, 0, 16, 3, 2, 2, 3, 1, 64)

# Each part should end by this fraction of --budget-s; a part that starts
# later than its share is skipped, and the run stops at the whole budget.
SHARES = {
    "calibration": 0.15,
    "step_time": 0.70,
    "timeline": 0.75,
    "time_to_accuracy": 0.95,
}
MIN_ROUNDS = 3
# The time-to-accuracy methods: SGD and one of each samx transform.
ACCURACY_METHODS = ("sgd", "sam", "async_sam", "sampa")
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


class Stop(BaseException):
    """The budget ran out, or the run was interrupted.

    A ``BaseException``, like ``KeyboardInterrupt``: library code that catches
    ``Exception`` (jax's compilation cache does) must not swallow it.
    """


class Run:
    """The budget, the progress log and the record, saved after every part."""

    def __init__(self, args, slug):
        self.start = time.perf_counter()
        self.budget = args.budget_s
        self.path = os.path.join(args.out, f"{slug}.json")
        self.record: dict[str, Any] = {"complete": False, "parts": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self, part: str) -> float:
        """Seconds left in ``part``'s share of the budget."""
        return SHARES[part] * self.budget - self.elapsed()

    def log(self, message: str) -> None:
        cpu = time.process_time()
        print(f"[{self.elapsed():6.1f}s, cpu {cpu:6.1f}s] {message}", flush=True)

    def save(self) -> None:
        self.record["elapsed_s"] = round(self.elapsed(), 2)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.record, f, indent=2)
        os.replace(tmp, self.path)  # a reader never sees half a file

    def part(self, name: str, value: Any) -> None:
        self.record["parts"][name] = value
        self.save()


@contextlib.contextmanager
def stop_at(seconds: float):
    """Raises :class:`Stop` in the main thread after ``seconds``, on SIGTERM.

    A signal is handled when Python code runs, so a compilation in progress
    finishes first; the alarm repeats every 5 s until the caller cancels it
    (``signal.setitimer(signal.ITIMER_REAL, 0)``).
    """

    def handler(signum, frame):
        raise Stop("budget" if signum == signal.SIGALRM else "terminated")

    old = {s: signal.signal(s, handler) for s in (signal.SIGALRM, signal.SIGTERM)}
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3), 5.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in old.items():
            signal.signal(s, h)


def devices() -> tuple[jax.Device, jax.Device]:
    """``(accelerator, host CPU)``; without an accelerator cpu:0 and cpu:1 stand in."""
    descent = jax.devices()[0]
    cpus = jax.devices("cpu")
    if descent.platform != "cpu":
        return descent, cpus[0]
    return descent, cpus[1] if len(cpus) > 1 else cpus[0]


def slug(descent: jax.Device, smoke: bool) -> str:
    """The machine's name in file names, e.g. ``nvidia-h200``."""
    if descent.platform == "cpu":
        name = f"cpu-{os.cpu_count()}core"
    else:
        name = re.sub(r"[^a-z0-9]+", "-", descent.device_kind.lower()).strip("-")
    return name + ("-smoke" if smoke else "")


def machine_info(descent: jax.Device, host: jax.Device, sizes: Sizes) -> dict:
    """The machine, the versions and the sizes the figures come from."""
    versions = {}
    for package in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    info = machine()
    info.update(
        accelerator=None if descent.platform == "cpu" else descent.device_kind,
        descent_device=device_name(descent),
        host_device=device_name(host),
        stand_in=descent.platform == "cpu",
        versions=versions,
        default_matmul_precision=str(
            getattr(jax.config, "jax_default_matmul_precision", "unknown")
        ),
        sizes=sizes._asdict(),
        dtype="float32",
    )
    return info


def synthetic_batches(sizes: Sizes, count: int = 4):
    """``(params, loss, [NumPy batches])`` of the ResNet-20-size CNN."""
    params, _, loss = problem("resnet20", 1, 0, 0, sizes.image, sizes.blocks)
    rng = np.random.default_rng(0)
    shape = (sizes.batch, sizes.image, sizes.image, 3)
    batches = [
        {
            "x": rng.standard_normal(shape, dtype=np.float32),
            "y": rng.integers(0, 10, sizes.batch).astype(np.int32),
        }
        for _ in range(count)
    ]
    return params, loss, batches


# -- 2. calibration -------------------------------------------------------------


def calibrate(run, descent, host, params, loss, batch, sizes) -> int:
    c = calibrate_ascent_batch(
        loss,
        params,
        batch,
        fast_device=descent,
        slow_device=host,
        repeats=sizes.repeats,
    )
    run.part(
        "calibration",
        {
            "batch_size": c.batch_size,
            "ascent_batch_size": c.ascent_batch_size,
            "descent_device": device_name(c.fast_device),
            "ascent_device": device_name(c.slow_device),
            "descent_seconds": c.descent_seconds,
            "ascent_seconds": {str(k): v for k, v in c.ascent_seconds.items()},
        },
    )
    run.log(
        f"calibrated b' = {c.ascent_batch_size} of {c.batch_size}: descent"
        f" {c.descent_seconds * 1e3:.2f} ms on {device_name(descent)}; ascent on"
        f" {device_name(host)}: "
        + ", ".join(f"{k}: {v * 1e3:.2f} ms" for k, v in c.ascent_seconds.items())
    )
    return c.ascent_batch_size


# -- 3. step time ---------------------------------------------------------------


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


def step_times(run, descent, host, params, loss, batches, sizes, calibrated):
    rows = step_rows(sizes.batch, calibrated)
    # Rows with the same loop (b' calibrated to b/4, say) share its timings.
    same = {row.key: row._replace(key="", label="", pure=None) for row in rows}
    loops: dict[Row, list] = {}
    took = 0.0  # the last loop's compilation and warm-up
    for row in sorted(rows, key=lambda r: PRIORITY.index(r.key)):
        if same[row.key] in loops:
            continue
        if run.left("step_time") <= took:
            run.log(f"step time: out of its share of the budget before {row.key}")
            break
        took = time.perf_counter()
        stepper = stepper_for(row, params, loss, sizes.batch, descent, host)
        state = stepper.init(batches[0])
        for batch in batches[:3]:  # compile, then warm up
            state = stepper.step(state, batch)
        jax.block_until_ready(state)
        loops[same[row.key]] = [stepper, state]
        took = time.perf_counter() - took
        run.log(f"compiled {row.key}: {describe(stepper.gradients)}")
    times: dict[Row, list[float]] = {config: [] for config in loops}

    def save(rounds: int) -> list[dict]:
        """The rows' medians so far, saved: an interrupted run keeps them."""
        out = summarize(rows, same, loops, times)
        run.part("step_time", {"rounds": rounds, "inner": sizes.inner, "rows": out})
        return out

    rounds, out = 0, save(0)
    while rounds < sizes.rounds and (rounds < MIN_ROUNDS or run.left("step_time") > 0):
        for config, loop in loops.items():  # interleaved
            stepper, state = loop
            start = time.perf_counter()
            for i in range(sizes.inner):
                state = stepper.step(state, batches[(rounds + i) % len(batches)])
            jax.block_until_ready(state)
            times[config].append((time.perf_counter() - start) / sizes.inner)
            loop[1] = state
        rounds += 1
        out = save(rounds)
    run.log(f"step time: {rounds} interleaved rounds of {sizes.inner} steps")
    return out


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


# -- 4. timeline ----------------------------------------------------------------


def record_timeline(run, descent, host, params, loss, batches, sizes, calibrated):
    tx = ALL["async_sam"].wrap(base_optimizer(0.01, 10_000))
    trainer = Trainer(
        tx,
        loss,
        descent_device=descent,
        ascent_device=host,
        ascent_batch_size=calibrated,
    )
    state = trainer.init(params)
    for batch in batches[:2]:  # compile, then warm up
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready((state, metrics))
    steps = [batches[i % len(batches)] for i in range(sizes.timeline_steps)]
    _, measured = timeline.record(trainer, state, steps)
    per_step = []
    for step in range(sizes.timeline_steps):
        seg = {s.label: s for s in measured.segments if s.step == step}
        a, d = seg.get("ascent gradient"), seg.get("descent gradient")
        if a is None or d is None:
            continue
        overlap = max(0.0, min(a.end, d.end) - max(a.start, d.start))
        shorter = min(a.end - a.start, d.end - d.start)
        per_step.append(
            {
                "step": step,
                "overlap_s": overlap,
                "overlap_of_shorter": overlap / shorter if shorter > 0 else None,
            }
        )
    value = {
        "ascent_batch_size": calibrated,
        "segments": [s._asdict() for s in measured.segments],
        "dispatches": measured.dispatches,
        "returns": measured.returns,
        "overlap": per_step,
        "note": "only completion times are measured; each start is inferred"
        " (the later of the step's dispatch and the previous completion on that"
        " device), so a segment can include waiting",
    }
    run.part("timeline", value)
    run.log(
        f"timeline: {len(measured.segments)} segments over {sizes.timeline_steps} steps"
    )
    return measured


# -- 5. time to accuracy --------------------------------------------------------


def time_to_accuracy(run, descent, host, sizes):
    data = load_digits(noise=0.4, seed=0)
    steps = sizes.epochs * (data.x_train.shape[0] // sizes.digits_batch)
    x_test, y_test = jax.device_put((data.x_test, data.y_test), descent)

    @jax.jit
    def test_accuracy(params, batch_stats):
        logits = flax_models.linen_logits(params, batch_stats, x_test)
        return flax_models.accuracy(logits, y_test)

    results, out = {}, {}

    def save():
        run.part(
            "time_to_accuracy",
            {
                "model": "samx.examples.flax_models.LinenCNN (BatchNorm)",
                "data": "digits, 40% symmetric label noise, seed 0",
                "epochs": sizes.epochs,
                "batch_size": sizes.digits_batch,
                "methods": out,
            },
        )

    took = 0.0  # the last method's run, compilation included
    for name in ACCURACY_METHODS:
        if run.left("time_to_accuracy") <= took:
            run.log(f"time to accuracy: out of its share of the budget before {name}")
            out[name] = {"skipped": "budget"}
            save()
            continue
        took = time.perf_counter()
        method = METHODS[name]
        params, batch_stats = flax_models.linen_init(jax.random.key(0))
        tx = method.wrap(base_optimizer(LEARNING_RATE, steps))
        plan = method.plan(jax.eval_shape(tx.init, params))
        stepper = trainer_stepper(
            method,
            tx,
            flax_models.linen_loss,
            params,
            batch_size=sizes.digits_batch,
            model_state=batch_stats,
            descent_device=descent,
            # The plan says which ascent belongs on the host CPU (AsyncSAM's).
            ascent_device=host if plan.ascent_placement == "host" else None,
        )
        _, curve, seconds, n = fit(
            stepper,
            data,
            epochs=sizes.epochs,
            batch_size=sizes.digits_batch,
            seed=0,
            evaluate=lambda s, st=stepper: test_accuracy(
                st.params(s), st.model_state(s)
            ),
        )
        took = time.perf_counter() - took
        results[name] = [RunResult(name, 0, curve[-1][1], seconds, n, curve)]
        out[name] = {
            "label": method.label,
            "gradients": [g._asdict() for g in stepper.gradients],
            "where": describe(stepper.gradients),
            "train_seconds": seconds,
            "steps": n,
            "curve": curve,
            "test_accuracy": curve[-1][1],
        }
        save()
        run.log(
            f"time to accuracy: {name} {curve[-1][1]:.3f} after {seconds:.2f} s"
            f" ({describe(stepper.gradients)})"
        )
    return results


# -- output ---------------------------------------------------------------------


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
        c = parts["calibration"]
        lines += [
            f"Calibrated b' = {c['ascent_batch_size']} of {c['batch_size']}"
            f" (descent {c['descent_seconds'] * 1e3:.2f} ms on"
            f" {c['descent_device']}; ascent on {c['ascent_device']}: "
            + ", ".join(
                f"b'={k}: {v * 1e3:.2f} ms" for k, v in c["ascent_seconds"].items()
            )
            + ").",
            "",
        ]
    if "step_time" in parts:
        s = parts["step_time"]
        lines += [
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
        lines += goals(s["rows"], gpu)
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
        a = parts["time_to_accuracy"]
        lines += [
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
                f"| {m['label']} | {m['where']} | {m['test_accuracy']:.4f}"
                f" | {seconds} |"
            )
        lines.append("")
    return "\n".join(lines)


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(run: Run, out: str, name: str, measured, accuracy) -> list[str]:
    """The table and the plots of what was measured; never raises."""
    paths = []
    try:
        path = os.path.join(out, f"{name}.md")
        with open(path, "w") as f:
            f.write(table(run.record) + "\n")
        paths.append(path)
        accelerator = run.record["parts"].get("machine", {}).get("accelerator")
        title = accelerator or f"{name}: no accelerator, CPU stand-ins"
        if "step_time" in run.record["parts"]:
            path = os.path.join(out, f"{name}-step_time.png")
            step_time_plot(run.record["parts"]["step_time"]["rows"], path, title)
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
    except Exception as e:  # the JSON is already written; say what failed
        print(f"could not write the table or a plot: {e!r}", flush=True)
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the JSON, table, plots")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes on two CPU devices (a test of the script, not a result)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=225.0,
        help="stop and write what was measured after this many seconds (default 225)",
    )
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    os.makedirs(args.out, exist_ok=True)
    descent, host = devices()
    name = slug(descent, args.smoke)
    run = Run(args, name)
    run.record["machine"] = name
    measured = accuracy = None
    status = 0
    with stop_at(args.budget_s):
        try:
            run.part("machine", machine_info(descent, host, sizes))
            run.log(
                f"{name}: descent on {device_name(descent)}, host ascent on"
                f" {device_name(host)}; budget {args.budget_s:.0f} s"
            )
            if descent.platform == "cpu" and not args.smoke:
                run.log("no accelerator: cpu:0 stands in; not a headline figure")
            params, loss, batches = synthetic_batches(sizes)
            calibrated = max(1, sizes.batch // 4)
            if run.left("calibration") > 0:
                calibrated = calibrate(
                    run, descent, host, params, loss, batches[0], sizes
                )
            if run.left("step_time") > 0:
                step_times(run, descent, host, params, loss, batches, sizes, calibrated)
            if run.left("timeline") > 0:
                measured = record_timeline(
                    run, descent, host, params, loss, batches, sizes, calibrated
                )
            if run.left("time_to_accuracy") > 0:
                accuracy = time_to_accuracy(run, descent, host, sizes)
            status = 0
        except (Stop, KeyboardInterrupt) as e:
            signal.setitimer(signal.ITIMER_REAL, 0)
            reason = str(e) or "interrupted"
            run.record["stopped"] = reason
            run.log(f"stopped ({reason}): writing what was measured")
            status = 3 if reason == "budget" else 130
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)  # nothing may stop the save
            parts = run.record["parts"]
            skipped = [p for p in SHARES if p not in parts]
            skipped += [
                f"step_time {r['key']}"
                for r in parts.get("step_time", {}).get("rows", [])
                if "skipped" in r
            ]
            skipped += [
                f"time_to_accuracy {k}"
                for k, m in parts.get("time_to_accuracy", {}).get("methods", {}).items()
                if "skipped" in m
            ]
            run.record["complete"] = not skipped and "stopped" not in run.record
            if skipped:
                run.record["skipped"] = skipped
                run.log(f"not measured (budget): {', '.join(skipped)}")
                status = status or 3
            run.save()
    paths = [run.path, *write_outputs(run, args.out, name, measured, accuracy)]
    with contextlib.suppress(Exception):  # the files are written; print is extra
        print(f"\n{table(run.record)}")
    for path in paths:
        print(f"wrote {path}")
    return status


if __name__ == "__main__":
    if "--smoke" not in sys.argv[1:]:
        # Identical computations (the Trainers' descent and update at each b')
        # compile once. Optional: a jax without this setting runs without it.
        with contextlib.suppress(AttributeError, ValueError):
            jax.config.update(
                "jax_compilation_cache_dir",
                os.path.join(tempfile.gettempdir(), "samx-heterogeneous-cache"),
            )
    if "--smoke" in sys.argv[1:]:
        # Set before JAX starts: two CPU devices (cpu:1 stands in for the host
        # CPU), and XLA's cheapest CPU code generation, which halves the smoke
        # run's compilation time; its timings mean nothing anyway.
        jax.config.update("jax_num_cpu_devices", 2)
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0"
    status = main()
    if status:
        # Stopped in the middle of device work: XLA's threads may still be
        # running it, and tearing the interpreter down under them can crash.
        # Everything is written; leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
