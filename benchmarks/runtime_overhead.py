"""The Trainer's per-step overhead over the pure transform's single-jit step.

Both loops take the same NumPy batches, put them on the device each step (as a
real input pipeline does) and dispatch one step per call; the pure loop is the
transform in one ``jax.jit`` on cpu:0, the main job's step
(``samx.examples.train.make_step``): both follow the transform's evaluation
plan, so they see the same batches. The
optimizers and loops take turns (interleaved), every function is compiled and
run before the clock starts, and each figure is the median over ``--rounds``
timings of ``--inner`` steps. Quoted as ratios: Trainer / pure.

"one device": the Trainer with every gradient on cpu:0 (SAMPa: both gradients
in one jit, the CPU default; "vmap": in one vmap-ed call). "two devices": the
ascent (AsyncSAM) or second gradient (SAMPa) on cpu:1. On a CPU-only machine
the two devices share the same cores, so two devices cannot be faster than
one there; the split is measured to show what the machinery costs.

"no batch copy": the same Trainer with its copy of the caller's NumPy batch
(``samx._plan.owned``, which lets a loader refill one buffer) switched off for
its steps: the ratio of the two rows is what the copy costs. ``--features``
sets the width of the input, and so the bytes copied per batch (3072: a
32x32x3 image).

Usage: python benchmarks/runtime_overhead.py [--quick] [--json PATH]
"""

import argparse
import contextlib
import statistics
import time

import jax
import numpy as np
import optax
from step_time import machine, write_json

import samx
from samx import _plan
from samx.examples import models, train
from samx.runtime import Trainer

ASCENT_FRACTION = 0.25  # AsyncSAM's b' = b/4

TRANSFORMS = {
    "sgd": lambda: optax.sgd(0.05, momentum=0.9),
    "sam": lambda: samx.sam(optax.sgd(0.05, momentum=0.9), rho=0.05),
    "async_sam": lambda: samx.async_sam(optax.sgd(0.05, momentum=0.9), rho=0.05),
    "sampa": lambda: samx.sampa(optax.sgd(0.05, momentum=0.9), rho=0.1, lam=0.2),
}


def method(name):
    """The main job's method record for a transform of this benchmark."""
    return train.Method(
        name,
        name,
        lambda base: TRANSFORMS[name](),
        1,
        ascent_fraction=ASCENT_FRACTION,
    )


class PureLoop:
    def __init__(self, name, params, device):
        self.tx = TRANSFORMS[name]()
        self.step_fn = jax.jit(
            train.make_step(method(name), train.classification_loss, self.tx)
        )
        self.device = device
        self.carry = jax.device_put((params, self.tx.init(params)), device)

    def step(self, batch):
        batch = jax.device_put(batch, self.device)
        params, state = self.carry[:2]
        prev = batch if len(self.carry) == 2 else self.carry[2]
        self.carry, _ = self.step_fn((params, state, prev), batch)
        return self.carry[0]


@contextlib.contextmanager
def no_batch_copy():
    """The Trainer's steps without its copy of the caller's batch."""
    owned = _plan.owned
    _plan.owned = lambda batch: batch
    try:
        yield
    finally:
        _plan.owned = owned


class TrainerLoop:
    def __init__(self, name, params, ascent, devices, copy=True, **kwargs):
        self.copy = copy
        tx = TRANSFORMS[name]()
        plan = samx.evaluation_plan(tx.init(params))
        self.trainer = Trainer(
            tx,
            train.classification_loss,
            descent_device=devices[0],
            ascent_device=devices[1],
            ascent_batch_size=ascent if plan.uses("ascent") else None,
            **kwargs,
        )
        self.state = self.trainer.init(params)

    def step(self, batch):
        with contextlib.nullcontext() if self.copy else no_batch_copy():
            self.state, _ = self.trainer.step(self.state, batch)
        return self.state.params


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--features", type=int, default=64, help="input width")
    p.add_argument("--inner", type=int, default=10, help="steps per timing")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.inner, args.width = 5, 3, 64
    cpu0, cpu1 = jax.devices("cpu")[:2]
    sizes = (args.features, args.width, args.width, 10)
    params = models.init_mlp(jax.random.key(0), sizes)
    rng = np.random.default_rng(0)
    batches = [
        {
            "x": rng.normal(size=(args.batch, args.features)).astype(np.float32),
            "y": rng.integers(0, 10, args.batch).astype(np.int32),
        }
        for _ in range(args.inner)
    ]
    ascent = method("async_sam").ascent_batch_size(args.batch)
    loops = {}
    for name in TRANSFORMS:
        plan = samx.evaluation_plan(TRANSFORMS[name]().init(params))
        loops[(name, "pure")] = PureLoop(name, params, cpu0)
        loops[(name, "trainer, one device")] = TrainerLoop(
            name, params, ascent, (cpu0, cpu0)
        )
        if plan.uses("previous"):  # the loops that keep a batch
            loops[(name, "trainer, one device, no batch copy")] = TrainerLoop(
                name, params, ascent, (cpu0, cpu0), copy=False
            )
        if plan.parallel and plan.updates is None:  # SAMPa: also vmap-ed
            loops[(name, "trainer, one device, vmap")] = TrainerLoop(
                name, params, ascent, (cpu0, cpu0), sampa_vmap=True
            )
        if plan.parallel:
            loops[(name, "trainer, two devices")] = TrainerLoop(
                name, params, ascent, (cpu0, cpu1)
            )
    for loop in loops.values():  # compile every piece, then warm up
        for batch in batches[:3]:
            jax.block_until_ready(loop.step(batch))
    times = {key: [] for key in loops}
    for _ in range(args.rounds):
        for key, loop in loops.items():
            start = time.perf_counter()
            for batch in batches:
                out = loop.step(batch)
            jax.block_until_ready(out)
            times[key].append((time.perf_counter() - start) / args.inner)
    medians = {key: statistics.median(t) for key, t in times.items()}
    rows = []
    for (name, loop), value in medians.items():
        rows.append(
            {
                "optimizer": name,
                "loop": loop,
                "median_step_s": value,
                "ratio_vs_pure": value / medians[(name, "pure")],
            }
        )
    info = machine()
    print(
        f"Trainer / pure single-jit step, mlp-{'-'.join(map(str, sizes))},"
        f" batch {args.batch} (AsyncSAM ascent {ascent}); median of {args.rounds}"
        f" interleaved timings of {args.inner} steps; {info['cpu']},"
        f" {info['cores']} cores, jax {jax.__version__}\n"
    )
    print("| optimizer | loop | time/step vs pure |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['optimizer']} | {row['loop']} | {row['ratio_vs_pure']:.3f}x |")
    result = {"machine": info, "settings": vars(args), "rows": rows}
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    # Two CPU devices for the two-device rows; set before JAX starts (importers,
    # e.g. the tests, configure their own devices).
    jax.config.update("jax_num_cpu_devices", 2)
    main()
