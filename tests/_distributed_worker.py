"""One process of tests/test_distributed.py's equality run.

Started by ``samx.runtime.launch.launch`` as 2 processes x 2 CPU devices:
``python _distributed_worker.py PROBLEM OUT``. ``PROBLEM`` is an .npz with
the parameters and the global batches (written by the test). Each process
trains on its own half of every batch, 6 steps: every method through the
Trainer (under ``transfer_guard("disallow")``, counting compilations after
the first step) and m-sharpness through ``make_data_parallel_step``, and
writes its final parameters to ``OUT/<case>_rank<r>.npz``; then prints the
errors that only a mesh over several processes raises.
"""

import sys


def main(problem, out):
    from samx.runtime.launch import initialize

    rank, n = initialize()

    import jax
    import numpy as np
    import optax
    from _testing import count_compilations
    from _testing import mlp_loss as loss
    from jax.sharding import Mesh

    import samx
    from samx.runtime import (
        Trainer,
        batch_sharding,
        make_data_parallel_step,
        replicated,
    )

    data = dict(np.load(problem))
    params = {}  # "layer0/w" -> params["layer0"]["w"]
    for key in [k for k in data if "/" in k]:
        layer, name = key.split("/")
        params.setdefault(layer, {})[name] = data.pop(key)
    size = data["x"].shape[1] // n

    def local(step):  # this process's part of the global batch of ``step``
        part = slice(rank * size, (rank + 1) * size)
        return {"x": data["x"][step, part], "y": data["y"][step, part]}

    mesh = Mesh(np.array(jax.devices()), ("data",))

    def save(case, params):
        flat = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(params)]
        np.savez(f"{out}/{case}_rank{rank}.npz", *flat)

    sgd = lambda: optax.sgd(0.1, momentum=0.9)  # noqa: E731
    cases = {
        "sam": (samx.sam(sgd(), rho=0.05), None),
        "async_sam": (samx.async_sam(sgd(), rho=0.05), None),
        "async_sam_small": (samx.async_sam(sgd(), rho=0.05), 2),
        "sampa": (samx.sampa(optax.adam(1e-2), rho=0.1, lam=0.2), None),
        "plain": (optax.adam(1e-2), None),
    }
    for case, (tx, ascent) in cases.items():
        trainer = Trainer(tx, loss, descent_device=mesh, ascent_batch_size=ascent)
        state = trainer.init(params)
        with jax.transfer_guard("disallow"):
            state, metrics = trainer.step(state, local(0))
            with count_compilations() as compiled:
                for step in range(1, len(data["x"])):
                    state, metrics = trainer.step(state, local(step))
                jax.block_until_ready(state)
        print(f"{case} compilations after the first step: {len(compiled)}")
        if case.startswith("async_sam"):
            (where,) = metrics["ascent_grad_norm"].devices()
            print(f"{case} ascent on process {where.process_index}", flush=True)
        save(case, state.params)
    tx = samx.sam(sgd(), rho=0.05)
    step_fn = make_data_parallel_step(tx, loss, mesh, m_sharpness=True)
    p = jax.device_put(params, replicated(mesh))
    s = jax.device_put(tx.init(params), replicated(mesh))
    with jax.transfer_guard("disallow"):
        for step in range(len(data["x"])):
            p, s, _ = step_fn(p, s, local(step))
    save("m_sharpness", p)

    # The errors that only a mesh over several processes raises.
    global_batch = jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh), x),
        local(0),
    )
    checks = {
        "sampa with an ascent device": lambda: Trainer(
            samx.sampa(sgd()), loss, descent_device=mesh, ascent_device="cpu:1"
        ).init(params),
        "a different ascent batch per process": lambda: Trainer(
            samx.async_sam(sgd()), loss, descent_device=mesh, ascent_batch_size=2 + rank
        ).init(params),
        "a global batch": lambda: trainer.step(state, global_batch),
    }
    for name, check in checks.items():
        try:
            check()
            print(f"{name}: no error")
        except ValueError as e:
            print(f"{name}: ValueError: {e}")


if __name__ == "__main__":
    main(*sys.argv[1:])
