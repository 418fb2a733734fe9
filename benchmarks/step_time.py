"""Per-step time of SGD and the sharpness-aware optimizers, as ratios to SGD.

All optimizers train the same model on the same synthetic batches in one
process: an MLP (64-512-512-10) and a ResNet-20-size CNN (32x32x3 inputs). Each
timed call runs 10 MLP steps in one jitted ``lax.scan`` (to average out
dispatch) or 1 CNN step in one jit (XLA:CPU runs convolutions many times slower
inside a loop body), the optimizers take turns call by call (interleaved, so
machine noise hits all alike), every step function is compiled and run before
the clock starts, and the figure is the median over ``--rounds`` calls.
``sampa_fused`` is SAMPa with both gradients in one ``vmap``-ed call. Ratios are the
figure to quote; absolute times on a shared CPU are not.

The row ``sgd+grad(b/4)`` is a reference, not an optimizer: SGD plus one
extra gradient on a quarter of the batch, the least AsyncSAM (b' = b/4) can
cost on one device. On a CPU a gradient on b/4 examples costs more than a
quarter of one on b (fixed per-step work does not shrink with the batch), so
the paper's ideal 1.25x needs a batch large enough for the cost to scale.

Usage: python benchmarks/step_time.py [--quick] [--json PATH]
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from samx.examples import models
from samx.examples.train import (
    METHODS,
    VARIANTS,
    base_optimizer,
    classification_loss,
    make_step,
)

ALL = {**METHODS, **VARIANTS}
DEFAULT = ("sgd", "optax_sam", "sam", "async_sam", "sampa", "sampa_fused")


def machine() -> dict:
    """The machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def write_json(result: dict, path: str | None) -> None:
    """Writes ``result`` to ``path`` as indented JSON (nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def problem(
    model: str,
    batch: int,
    width: int,
    seed: int = 0,
    image: int = 32,
    blocks: int = 3,
    cnn_width: int = 16,
):
    """``(params, batch, loss)`` for "mlp" (64 features) or "resnet20" (32x32x3).

    ``width`` is the MLP's hidden width; ``image`` and ``blocks`` shrink the
    CNN's inputs (``image x image x 3``) and its residual blocks per stage, for
    smoke runs; ``cnn_width`` is the CNN's channels in its first stage (16:
    ResNet-20).
    """
    kx, ky = jax.random.split(jax.random.key(seed + 1))
    labels = jax.random.randint(ky, (batch,), 0, 10)
    if model == "mlp":
        params = models.init_mlp(jax.random.key(seed), (64, width, width, 10))
        x = jax.random.normal(kx, (batch, 64))
        return params, {"x": x, "y": labels}, classification_loss
    if model == "resnet20":
        # One compiled init, not an XLA:CPU compilation per eager op.
        init = jax.jit(models.init_resnet20, static_argnames=("width", "blocks"))
        params = init(jax.random.key(seed), width=cnn_width, blocks=blocks)
        x = jax.random.normal(kx, (batch, image, image, 3))

        def loss(params, batch):
            return classification_loss(params, batch, apply=models.resnet20)

        return params, {"x": x, "y": labels}, loss
    raise ValueError(f"unknown model {model!r}")


FLOOR = "sgd+grad(b/4)"


def _floor_step(tx, loss):
    """SGD plus an unused-but-kept gradient on the first quarter of the batch."""
    grad = jax.grad(loss)

    def step(carry, batch):
        params, opt_state, _ = carry
        quarter = jax.tree.map(lambda x: x[: max(1, x.shape[0] // 4)], batch)
        updates, opt_state = tx.update(grad(params, batch), opt_state, params)
        extra = grad(params, quarter)
        return (optax.apply_updates(params, updates), opt_state, batch), extra

    return step


def compiled_runner(name: str, params, batch, loss, inner: int):
    """A compiled function that runs ``inner`` steps of ``name`` from a carry."""
    if name == FLOOR:
        tx = base_optimizer(0.05, 10_000)
        step = _floor_step(tx, loss)
    else:
        method = ALL[name]
        tx = method.wrap(base_optimizer(0.05, 10_000))
        step = make_step(method, loss, tx)
    batches = jax.tree.map(lambda x: jnp.stack([x] * inner), batch)

    def run(carry):
        if inner == 1:  # XLA:CPU runs convolutions far slower inside a loop body
            return step(carry, batch)
        carry, extra = jax.lax.scan(step, carry, batches)
        return carry, extra

    carry = (params, tx.init(params), batch)
    return jax.jit(run).lower(carry).compile(), carry


def measure(
    names, *, model: str, batch: int, width: int, inner: int, rounds: int
) -> dict:
    params, data, loss = problem(model, batch, width)
    runners = {}
    for name in names:
        fn, carry = compiled_runner(name, params, data, loss, inner)
        carry = jax.block_until_ready(fn(carry))[0]  # warm-up
        runners[name] = [fn, carry]
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            fn, carry = runners[name]
            start = time.perf_counter()
            carry = jax.block_until_ready(fn(carry))[0]
            times[name].append((time.perf_counter() - start) / inner)
            runners[name][1] = carry
    return {name: statistics.median(t) for name, t in times.items()}


def _sizes(text: str) -> list[int]:
    sizes = [int(v) for v in text.split(",") if v.strip()]
    if not sizes or min(sizes) < 4:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 4, got {text!r}")
    return sizes


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizers", default=",".join(DEFAULT))
    p.add_argument("--models", default="mlp,resnet20", help="mlp and/or resnet20")
    p.add_argument("--mlp-batch", type=_sizes, default=[128, 512], help="e.g. 128,512")
    p.add_argument("--cnn-batch", type=_sizes, default=[128])
    p.add_argument("--width", type=int, default=512, help="the MLP's hidden width")
    p.add_argument("--rounds", type=int, default=40, help="MLP timed calls each")
    p.add_argument("--cnn-rounds", type=int, default=20, help="CNN timed steps each")
    p.add_argument("--quick", action="store_true", help="few rounds: a smoke run")
    p.add_argument("--json", help="write the results to this path")
    args = p.parse_args(argv)
    names = [n for n in args.optimizers.split(",") if n]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        p.error(f"unknown optimizers {unknown}; choose from {sorted(ALL)}")
    model_names = [m for m in args.models.split(",") if m]
    if not model_names or set(model_names) - {"mlp", "resnet20"}:
        p.error(f"--models: choose from mlp, resnet20; got {args.models!r}")
    if "sgd" not in names:
        names.insert(0, "sgd")
    if "async_sam" in names:
        names.append(FLOOR)
    if args.quick:
        args.rounds, args.width, args.mlp_batch, args.cnn_batch = 3, 64, [32], [8]
        args.cnn_rounds = 3
    info = machine()
    print(
        f"Per-step time relative to SGD, medians of {args.rounds} interleaved"
        f" timed calls after compilation; {info['cpu']}, {info['cores']} cores,"
        f" jax {jax.__version__}\n"
    )
    rows = []
    for model in model_names:
        # The MLP runs 10 steps per timed call to average out dispatch.
        inner = 10 if model == "mlp" else 1
        for batch in args.mlp_batch if model == "mlp" else args.cnn_batch:
            medians = measure(
                names,
                model=model,
                batch=batch,
                width=args.width,
                inner=inner,
                rounds=args.rounds if model == "mlp" else args.cnn_rounds,
            )
            label = f"mlp-64-{args.width}-{args.width}-10" if model == "mlp" else model
            rows += [
                {
                    "model": label,
                    "batch": batch,
                    "optimizer": name,
                    "median_step_s": medians[name],
                    "ratio_vs_sgd": medians[name] / medians["sgd"],
                }
                for name in names
            ]
            print(f"{label}, batch {batch}, {inner} step(s) per timed call:\n")
            print("| optimizer | time/step vs SGD |")
            print("|---|---|")
            for name in names:
                print(f"| {name} | {medians[name] / medians['sgd']:.3f}x |")
            if "sam" in medians and "optax_sam" in medians:
                ratio = medians["sam"] / medians["optax_sam"]
                print(f"\nsamx.sam / optax.contrib.sam: {ratio:.3f}")
            print()
    result = {
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "rows": rows,
    }
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
