"""The command line, and the parts in their order (see ``heterogeneous.py``)."""

import argparse
import contextlib
import os
import signal

from hetero.budget import SHARES, Run, Stop, stop_at
from hetero.calibration import calibrate
from hetero.figures import write_outputs
from hetero.machine import FULL, SMOKE, devices, machine_info, slug, synthetic_batches
from hetero.overlap import record_timeline
from hetero.report import table
from hetero.steps import step_times
from hetero.sweep import sweep
from hetero.time_to_accuracy import time_to_accuracy
from samx.examples.stepwise import device_name

DESCRIPTION = "The headline on an accelerator: AsyncSAM's ascent on the host CPU."


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION)
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


def not_measured(parts: dict) -> list[str]:
    """What the record lacks: parts, step-time rows, methods, sweep widths."""
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
    # The sweep's more_widths are measured while its share allows: optional.
    sweep = parts.get("sweep", {})
    timed = {r["width"] for r in sweep.get("rows", []) if "skipped" not in r}
    skipped += [f"sweep width {w}" for w in sweep.get("widths", []) if w not in timed]
    return skipped


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
            if run.left("sweep") > 0:
                sweep(run, descent, host, batches, sizes)
            status = 0
        except (Stop, KeyboardInterrupt) as e:
            signal.setitimer(signal.ITIMER_REAL, 0)
            reason = str(e) or "interrupted"
            run.record["stopped"] = reason
            run.log(f"stopped ({reason}): writing what was measured")
            status = 3 if reason == "budget" else 130
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)  # nothing may stop the save
            skipped = not_measured(run.record["parts"])
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
