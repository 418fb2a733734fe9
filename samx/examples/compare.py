"""Compare SGD and the sharpness-aware optimizers on noisy digits.

Trains the same MLP with each optimizer (SGD, optax.contrib.sam, SAM, ASAM,
AsyncSAM with an ascent batch of b/4 and of b, SAMPa-0 and SAMPa-0.2) on
scikit-learn's bundled digits data (no download) whose training labels carry
symmetric noise, with the same initialisation and batch order per seed, and
prints the test accuracy and the training wall time per optimizer. AsyncSAM
and SAMPa perturb the descent on the examples their perturbation came from
(see :func:`samx.evaluation_plan`); ``--optimizers`` also takes the unpaired
AsyncSAM variants. On a CPU-only machine each epoch runs in one jitted
``lax.scan``, every gradient on one device; when an accelerator is present the
methods run step by step through :class:`samx.runtime.Trainer`, AsyncSAM's
ascent on the host CPU beside the accelerator's descent, so that the
accuracy-against-time plot shows their real cost there (``--loop`` chooses,
``--no-host-ascent`` keeps AsyncSAM's ascent on the accelerator). Run
``python -m samx.examples.compare --help`` (or ``samx-compare --help``) for
the options.
"""

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys

from samx.examples.train import ALL, METHODS

DEFAULT_METHODS = tuple(METHODS)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="samx-compare",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--optimizers",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from: {', '.join(ALL)} (default:"
        f" {', '.join(DEFAULT_METHODS)})",
    )
    p.add_argument(
        "--seeds", type=int, default=None, help="seeds per optimizer (default 3)"
    )
    p.add_argument(
        "--noise", type=float, default=0.4, help="label noise in [0, 1] (default 0.4)"
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default 60)"
    )
    p.add_argument(
        "--out",
        default="samx-results",
        help="folder for results.json and plots (default samx-results)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 seed and 5 epochs unless given",
    )
    p.add_argument(
        "--loop",
        choices=("auto", "scan", "trainer"),
        default="auto",
        help="scan: each epoch in one jitted lax.scan, every gradient on one"
        " device; trainer: step by step through samx.runtime.Trainer, AsyncSAM's"
        " ascent on the host CPU (default auto: trainer when an accelerator is"
        " present, else scan)",
    )
    p.add_argument(
        "--no-host-ascent",
        action="store_true",
        help="with the trainer loop, AsyncSAM's ascent on the accelerator too",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parses and checks the options; bad ones exit with a message (status 2)."""
    parser = _parser()
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown or not names:
        parser.error(
            f"--optimizers: unknown {', '.join(unknown) or '(none given)'};"
            f" choose from {', '.join(ALL)}"
        )
    args.optimizers = list(dict.fromkeys(names))
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.epochs is None:
        args.epochs = 5 if args.quick else 60
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if not 0.0 <= args.noise <= 1.0:
        parser.error(f"--noise must be in [0, 1], got {args.noise}")
    return args


def resolve_loop(loop: str) -> str:
    """``"scan"`` or ``"trainer"``; ``"auto"``: the Trainer on an accelerator."""
    if loop != "auto":
        return loop
    import jax

    return "scan" if jax.default_backend() == "cpu" else "trainer"


def run(args: argparse.Namespace) -> dict[str, list]:
    """Trains every optimizer on every seed, interleaved; returns the results.

    Sets ``args.loop`` to the loop it used (``"scan"`` or ``"trainer"``).
    """
    from samx.examples.data import load_digits
    from samx.examples.stepwise import train_stepwise
    from samx.examples.train import train_classifier

    args.loop = resolve_loop(args.loop)
    if args.loop == "trainer":
        train = functools.partial(train_stepwise, host_ascent=not args.no_host_ascent)
    else:
        train = train_classifier

    results: dict[str, list] = {name: [] for name in args.optimizers}
    total = args.seeds * len(args.optimizers) * args.epochs
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="epoch", desc="training", file=sys.stderr)
    for seed in range(args.seeds):
        data = load_digits(noise=args.noise, seed=seed)
        for name in args.optimizers:
            if bar is not None:
                bar.set_postfix_str(f"{name}, seed {seed}")
            results[name].append(
                train(
                    ALL[name],
                    data,
                    seed=seed,
                    epochs=args.epochs,
                    on_epoch=bar.update if bar is not None else None,
                )
            )
    if bar is not None:
        bar.close()
    return results


def table(
    results: dict[str, list],
    noise: float,
    loop: str = "scan",
    host_ascent: bool = True,
) -> str:
    """A Markdown table: accuracy mean and std over seeds, wall time, cost.

    ``loop`` and ``host_ascent`` say, in a note, where the gradients ran.
    """
    sgd = results.get("sgd")
    sgd_step = (
        statistics.median(r.train_seconds / r.steps for r in sgd) if sgd else None
    )
    lines = [
        f"Test accuracy on digits with {noise:.0%} symmetric label noise"
        f" ({len(next(iter(results.values())))} seed(s)):",
        "",
        "| optimizer | test accuracy | std | wall time (s) | time/step vs SGD"
        " | sequential grads |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        method = ALL[name]
        accs = [r.test_accuracy for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        wall = statistics.mean(r.train_seconds for r in runs)
        per_step = statistics.median(r.train_seconds / r.steps for r in runs)
        ratio = f"{per_step / sgd_step:.2f}x" if sgd_step else "n/a"
        lines.append(
            f"| {method.label} | {statistics.mean(accs):.4f} | {std:.4f}"
            f" | {wall:.2f} | {ratio} | {method.sequential_grads} |"
        )
    if loop == "trainer":
        where = (
            "step by step through samx.runtime.Trainer on the accelerator,"
            + (
                " AsyncSAM's ascent on the host CPU"
                if host_ascent
                else " every gradient there"
            )
            + " (optax.contrib.sam: its pure step, one jit per step)"
        )
    else:
        where = "with every gradient on one device, an epoch per jitted lax.scan"
    lines += [
        "",
        f"Time per step is measured {where};"
        " 'sequential grads' is the cost given a device per independent gradient.",
    ]
    return "\n".join(lines)


def save(results: dict, args: argparse.Namespace, text: str) -> list[str]:
    """Writes results.json, table.md and two PNG plots into ``args.out``."""
    import jax

    from samx.examples import plots

    os.makedirs(args.out, exist_ok=True)
    record = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__,
        },
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("no_progress", "out")
        },
        "runs": {
            name: [dataclasses.asdict(r) for r in runs]
            for name, runs in results.items()
        },
    }
    paths = [os.path.join(args.out, f) for f in ("results.json", "table.md")]
    with open(paths[0], "w") as f:
        json.dump(record, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(text + "\n")
    title = f"digits, {args.noise:.0%} label noise, {args.seeds} seed(s)"
    paths.append(os.path.join(args.out, "accuracy_vs_time.png"))
    plots.accuracy_vs_time(results, paths[-1], title)
    paths.append(os.path.join(args.out, "final_accuracy.png"))
    plots.final_accuracy(results, paths[-1], title)
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    text = table(results, args.noise, args.loop, not args.no_host_ascent)
    print(text)
    for path in save(results, args, text):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
