"""Memory of each optimizer: its state, and the compiled step's buffers.

For the MLP (64-512-512-10, batch 128) and the ResNet-20-size CNN (batch 128)
of ``step_time.py``: the bytes of each optimizer's state (``tx.init``), and the
compiled step's ``memory_analysis()`` (arguments, outputs, temporaries),
relative to SGD with momentum. Exact counts, not timings: any machine gives the
same state sizes; the temporaries are XLA:CPU's.

Then donation: the peak bytes of ``samx.runtime.Trainer``'s jitted step (its
one-device piece, the one a CPU or a single accelerator runs) for SAM,
AsyncSAM and SAMPa, with ``donate=True`` (the default: the state given to the
step is reused for the new one) and ``donate=False``. Peak bytes are
``memory_analysis()``'s arguments + outputs + temporaries - aliased (the
donated input buffers the outputs reuse).

Usage: python benchmarks/memory.py [--json PATH]
"""

import argparse

import jax
import numpy as np
from step_time import ALL, DEFAULT, machine, problem, write_json

from samx import _plan
from samx.examples.train import base_optimizer, make_step
from samx.runtime import Trainer

DONATION = ("sam", "async_sam", "sampa")


def trainer_step_memory(method, params, batch, loss, donate: bool):
    """``memory_analysis()`` of the Trainer's one-device jitted step."""
    tx = method.wrap(base_optimizer(0.05, 10_000))
    trainer = Trainer(tx, loss, donate=donate)
    state = trainer.init(params)
    plan = trainer.plan()
    size = jax.tree.leaves(batch)[0].shape[0]
    args = _plan.update_args(plan, size, None)
    if plan.parallel and plan.updates is None and trainer.sampa_vmap:
        piece = trainer._one_jit(
            "vmap", trainer._vmapped, update_args=args, donate=True
        )
    else:
        piece = trainer._one_jit("fused", trainer._fused, update_args=args, donate=True)
    batch = jax.device_put(batch, trainer.descent_device)
    return piece.lower(state, batch, batch).compile().memory_analysis()


def peak_bytes(memory) -> int:
    return int(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )


def nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,resnet20", help="mlp and/or resnet20")
    p.add_argument("--json", help="write the results to this path")
    args = p.parse_args(argv)
    rows, donation = [], []
    for model in [m for m in args.models.split(",") if m]:
        params, batch, loss = problem(model, 128, 512)
        param_bytes = nbytes(params)
        for name in DONATION:
            peaks = {
                donate: peak_bytes(
                    trainer_step_memory(ALL[name], params, batch, loss, donate)
                )
                for donate in (False, True)
            }
            donation.append(
                {
                    "model": model,
                    "optimizer": name,
                    "param_bytes": param_bytes,
                    "peak_bytes_donated": peaks[True],
                    "peak_bytes_not_donated": peaks[False],
                    "saved_param_trees": (peaks[False] - peaks[True]) / param_bytes,
                }
            )
        for name in DEFAULT:
            method = ALL[name]
            tx = method.wrap(base_optimizer(0.05, 10_000))
            state = jax.eval_shape(tx.init, params)
            step = make_step(method, loss, tx)
            carry = (params, tx.init(params), batch)
            memory = jax.jit(step).lower(carry, batch).compile().memory_analysis()
            rows.append(
                {
                    "model": model,
                    "optimizer": name,
                    "param_bytes": param_bytes,
                    "state_bytes": nbytes(state),
                    "argument_bytes": int(memory.argument_size_in_bytes),
                    "output_bytes": int(memory.output_size_in_bytes),
                    "temp_bytes": int(memory.temp_size_in_bytes),
                }
            )
    sgd = {r["model"]: r for r in rows if r["optimizer"] == "sgd"}
    print(f"jax {jax.__version__}; state sizes are exact, buffers are XLA:CPU's.\n")
    print(
        "| model | optimizer | state (MB) | state beyond SGD (param trees)"
        " | step temporaries vs SGD | step arguments+outputs vs SGD |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = sgd[r["model"]]
        extra = (r["state_bytes"] - base["state_bytes"]) / r["param_bytes"]
        r["extra_state_param_trees"] = extra
        r["temp_vs_sgd"] = r["temp_bytes"] / base["temp_bytes"]
        io = r["argument_bytes"] + r["output_bytes"]
        r["io_vs_sgd"] = io / (base["argument_bytes"] + base["output_bytes"])
        print(
            f"| {r['model']} | {r['optimizer']} | {r['state_bytes'] / 1e6:.2f}"
            f" | {extra:+.2f} | {r['temp_vs_sgd']:.2f}x | {r['io_vs_sgd']:.2f}x |"
        )
    print(
        "\nDonation: the Trainer's jitted step, peak bytes (arguments + outputs"
        " + temporaries - aliased).\n"
    )
    print(
        "| model | optimizer | not donated (MB) | donated (MB) | saved (param trees) |"
    )
    print("|---|---|---|---|---|")
    for r in donation:
        before, after = r["peak_bytes_not_donated"], r["peak_bytes_donated"]
        print(
            f"| {r['model']} | {r['optimizer']} | {before / 1e6:.2f}"
            f" | {after / 1e6:.2f} | {r['saved_param_trees']:.2f} |"
        )
    result = {"machine": machine(), "rows": rows, "donation": donation}
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
