"""Accuracy on noisy digits: every optimizer, noise 0%, 20% and 40%, 5 seeds.

The main job's setting (``python -m samx.examples.compare``) at each noise
level, plus AsyncSAM at b/4 with the paper's radius (``rho_scaling="none"``) and
AsyncSAM unpaired (the ascent of the previous batch perturbing the descent on
the current one) at b/4 and b; writes
``benchmarks/results/accuracy-digits.json`` and prints a table.

Usage: python benchmarks/accuracy.py [--seeds 5] [--epochs 60] [--json PATH]
"""

import argparse
import dataclasses
import statistics

from step_time import machine, write_json

from samx.examples import compare
from samx.examples.train import ALL, METHODS

OPTIMIZERS = (
    *METHODS,
    "async_sam_unscaled",
    "async_sam_unpaired",
    "async_sam_b_unpaired",
)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--noise", default="0,0.2,0.4")
    p.add_argument("--json", default="benchmarks/results/accuracy-digits.json")
    args = p.parse_args(argv)
    levels = [float(v) for v in args.noise.split(",")]
    record = {"machine": machine(), "settings": vars(args), "noise": {}}
    lines = [
        "| optimizer | " + " | ".join(f"noise {n:.0%}" for n in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    summary = {name: [] for name in OPTIMIZERS}
    for noise in levels:
        run_args = compare.parse_args(
            [
                f"--seeds={args.seeds}",
                f"--epochs={args.epochs}",
                f"--noise={noise}",
                f"--optimizers={','.join(OPTIMIZERS)}",
                "--no-progress",
            ]
        )
        results = compare.run(run_args)
        record["noise"][str(noise)] = {
            name: [dataclasses.asdict(r) for r in runs]
            for name, runs in results.items()
        }
        for name, runs in results.items():
            accs = [r.test_accuracy for r in runs]
            summary[name].append(
                f"{statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f}"
            )
    for name, cells in summary.items():
        lines.append(f"| {ALL[name].label} | " + " | ".join(cells) + " |")
    print(
        f"Test accuracy on digits (mean ± std over {args.seeds} seeds,"
        f" {args.epochs} epochs):\n"
    )
    print("\n".join(lines))
    write_json(record, args.json)
    return record


if __name__ == "__main__":
    main()
