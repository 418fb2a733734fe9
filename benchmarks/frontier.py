"""The cost-accuracy frontier: test accuracy against time per step, every method.

One point per method and setting: the test accuracy (mean ± std over paired
seeds: the same initialisation, split, label noise and batch order for every
method of a seed) against the time per step relative to SGD, measured on one
device in one process (every method's compiled epoch timed in turn, shuffled,
for several rounds; medians after compilation). The methods:

- SGD, ``optax.contrib.sam`` and SAM;
- AsyncSAM at ``b/b'`` in {1, 2, 4, 8, 16, 32}, with samx's default radius
  ``rho / sqrt(b'/b)`` and with the paper's ``rho`` at every ``b'``
  (``rho_scaling="none"``);
- two comparators that isolate the causes: SAM whose ascent sees only the
  first ``b'`` examples (no staleness, the same cost as AsyncSAM; with
  ``rho`` and with ``rho / sqrt(b'/b)``), and SAM every k-th step with plain
  steps between (k in {2, 4}).

Two real datasets that install offline: scikit-learn's digits (an MLP
64-128-128-10, batch 64, 60 epochs) and the UCI Japanese Vowels speech data
that the ``aeon`` package ships (12 channels x 25 steps flattened, an MLP
300-128-128-9, batch 32, 100 epochs); symmetric label noise on the training
labels only. SGD with momentum 0.9, weight decay 5e-4, lr 0.01 cosine; one
``rho`` for every sharpness-aware method, SAM's best on both datasets (see
``docs/frontier.md``).

Usage: python benchmarks/frontier.py [--out DIR] [--seeds 5] [--quick]
Writes ``DIR/frontier.json``, ``DIR/frontier.md`` and ``DIR/frontier.png``.
``--quick`` runs a few methods for 2 epochs (CI: tests/test_benchmarks.py).
"""

import argparse
import dataclasses
import os
import random
import statistics
import time

import jax
from step_time import machine, write_json

import samx
from samx.examples import data, plots, train

RHO = 0.6
RATIOS = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Setting:
    """A dataset and the training run's settings on it."""

    load: str  # a loader of samx.examples.data
    batch_size: int
    epochs: int


SETTINGS = {
    "digits": Setting("load_digits", 64, 60),
    "japanese_vowels": Setting("load_japanese_vowels", 32, 100),
}


def methods(rho: float) -> list[train.Method]:
    """Every method of the frontier, with the radius ``rho``."""
    M = train.Method

    def async_sam(k, scaling):
        name = f"async_sam_{k}" + ("" if scaling == "sqrt" else "_unscaled")
        label = f"AsyncSAM (b/{k})" + ("" if scaling == "sqrt" else ", rho unscaled")
        wrap = lambda b: samx.async_sam(b, rho, rho_scaling=scaling)  # noqa: E731
        return M(name, label, wrap, 1, ascent_fraction=1 / k)

    def subset(k, scaled):
        r = rho * k**0.5 if scaled else rho
        name, label = f"sam_subset_{k}", f"SAM, ascent on b/{k}"
        if scaled:
            name, label = name + "_scaled", label + ", rho x sqrt(b/b')"
        wrap = lambda b: samx.sam(b, r)  # noqa: E731
        return M(name, label, wrap, 2, ascent_fraction=1 / k, ascent_subset=True)

    return [
        M("sgd", "SGD", lambda b: b, 1),
        M(
            "optax_sam",
            "optax.contrib.sam",
            lambda b: train._optax_sam(b, rho),
            2,
            convention="sam",
        ),
        M("sam", "SAM", lambda b: samx.sam(b, rho), 2),
        *(async_sam(k, "sqrt") for k in RATIOS),
        *(async_sam(k, "none") for k in RATIOS[1:]),
        *(subset(k, scaled) for k in (4, 16) for scaled in (False, True)),
        *(
            M(
                f"sam_every_{k}",
                f"SAM every {k} steps",
                lambda b: samx.sam(b, rho),
                2,
                every=k,
            )
            for k in (2, 4)
        ),
    ]


QUICK = (
    "sgd",
    "sam",
    "async_sam_4",
    "async_sam_4_unscaled",
    "sam_subset_4",
    "sam_every_2",
)


def load(name: str, noise: float, seed: int, root: str | None):
    loader = getattr(data, SETTINGS[name].load)
    return loader(noise, seed, root=root) if root else loader(noise, seed)


def step_cost(runs: dict, rounds: int, seconds: float) -> dict:
    """Median seconds per step of each compiled run, relative to SGD's.

    Each round times every method once, in a shuffled order, for about
    ``seconds`` (whole epochs; one epoch at 0): many short samples and their
    median, which a burst of load on a shared machine moves little. The carry
    goes on from round to round.
    """
    carries = {m: run.carry for m, run in runs.items()}
    samples = {m: [] for m in runs}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(runs)
        rng.shuffle(order)
        for m in order:
            run, steps, start = runs[m], 0, time.perf_counter()
            while steps == 0 or time.perf_counter() - start < seconds:
                carries[m], _ = run.run_epoch(carries[m], run.orders[0])
                jax.block_until_ready(carries[m])
                steps += run.steps_per_epoch
            samples[m].append((time.perf_counter() - start) / steps)
    medians = {m: statistics.median(s) for m, s in samples.items()}
    return {m: medians[m] / medians["sgd"] for m in runs}


def summary(accs: list[float], sgd: list[float], sam: list[float]) -> dict:
    """Mean ± std, the share of SAM's gain over SGD, the paired gap to SAM."""
    mean = statistics.mean
    gain = mean(sam) - mean(sgd)
    gaps = [a - s for a, s in zip(accs, sam, strict=True)]
    return {
        "accuracy": accs,
        "mean": mean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "share_of_sam_gain": (mean(accs) - mean(sgd)) / gain if gain > 0 else None,
        "paired_gap_to_sam": mean(gaps),
        "paired_gap_to_sam_std": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
    }


def run_setting(name, noise, args, chosen, keep):
    """Every method at one (dataset, noise): accuracies by method."""
    setting = SETTINGS[name]
    epochs = args.epochs or setting.epochs
    accs = {m.name: [] for m in chosen}
    for seed in range(args.seeds):
        dataset = load(name, noise, seed, args.jv_root if name != "digits" else None)
        for m in chosen:
            run = train.compile_run(
                m, dataset, seed=seed, epochs=epochs, batch_size=setting.batch_size
            )
            accs[m.name].append(train.train_compiled(m.name, seed, run).test_accuracy)
            if seed == 0 and m.name not in keep:
                keep[m.name] = run
        print(f"  {name} noise {noise:.0%} seed {seed} done", flush=True)
    return {m: summary(a, accs["sgd"], accs["sam"]) for m, a in accs.items()}


def table(record: dict) -> str:
    """The Markdown table of the record: one row per method."""
    lines = []
    for name, by_noise in record["results"].items():
        levels = list(by_noise)
        lines += [
            f"\n### {name}\n",
            "| method | time/step vs SGD | "
            + " | ".join(f"noise {float(n):.0%} (share of SAM's gain)" for n in levels)
            + " |",
            "|---|---|" + "---|" * len(levels),
        ]
        for m, label in record["labels"].items():
            cells = []
            for n in levels:
                r = by_noise[n][m]
                share = r["share_of_sam_gain"]
                share = "" if share is None else f" ({share:.0%})"
                cells.append(f"{r['mean']:.4f} ± {r['std']:.4f}{share}")
            cost = record["cost"][name][m]
            lines.append(f"| {label} | {cost:.2f}x | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--noise", default="0,0.2,0.4")
    p.add_argument("--datasets", default=",".join(SETTINGS))
    p.add_argument("--epochs", type=int, default=None, help="default: per dataset")
    p.add_argument("--rho", type=float, default=RHO)
    p.add_argument("--rounds", type=int, default=100, help="timing rounds")
    p.add_argument("--seconds", type=float, default=0.0, help="per timing sample")
    p.add_argument("--jv-root", default=None, help="Japanese Vowels .ts folder")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.rounds, args.seconds = 2, 2, 2, 0.0
        args.noise = "0.4"
    chosen = [m for m in methods(args.rho) if not args.quick or m.name in QUICK]
    record = {
        "machine": machine(),
        "settings": vars(args),
        "labels": {m.name: m.label for m in chosen},
        "ascent_fraction": {m.name: m.ascent_fraction for m in chosen},
        "results": {},
        "cost": {},
    }
    for name in args.datasets.split(","):
        keep: dict = {}
        record["results"][name] = {
            str(noise): run_setting(name, float(noise), args, chosen, keep)
            for noise in args.noise.split(",")
        }
        record["cost"][name] = step_cost(keep, args.rounds, args.seconds)
    os.makedirs(args.out, exist_ok=True)
    write_json(record, os.path.join(args.out, "frontier.json"))
    text = table(record)
    with open(os.path.join(args.out, "frontier.md"), "w") as f:
        f.write(text)
    plots.frontier(record, os.path.join(args.out, "frontier.png"))
    print(text)
    return record


if __name__ == "__main__":
    main()
