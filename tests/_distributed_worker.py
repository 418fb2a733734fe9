"""One process of tests/test_distributed.py's equality run.

Started by ``samx.runtime.launch.launch`` as 2 processes x 2 CPU devices:
``python _distributed_worker.py PROBLEM OUT``. ``PROBLEM`` is an .npz with
the parameters and the global batches (written by the test). Each process
trains on its own half of every batch, 6 steps: every method through the
Trainer (under ``transfer_guard("disallow")``, counting compilations after
the first step), AsyncSAM with the b' that ``calibrate_ascent_batch`` chose
on the mesh (its clock replaced here by one that makes each process choose
another b'), AsyncSAM with a BatchNorm in its loss, m-sharpness through
``make_data_parallel_step`` and ``samx.flax.Trainer`` on an NNX model with
dropout (for SAM, its parameters and RNG keys committed to this process's
second device), and writes its final parameters to
``OUT/<case>_rank<r>.npz``; then prints the errors that only a mesh over
several processes raises.
"""

import sys


def main(problem, out):
    from samx.runtime.launch import initialize

    rank, n = initialize()

    import jax
    import numpy as np
    import optax
    from _testing import batch_norm_loss, count_compilations, flax_loss
    from _testing import mlp_loss as loss
    from flax import nnx
    from jax.sharding import Mesh

    import samx
    import samx.flax
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

    def train(case, trainer, state):
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
        return state

    for case, (tx, ascent) in cases.items():
        trainer = Trainer(tx, loss, descent_device=mesh, ascent_batch_size=ascent)
        state = train(case, trainer, trainer.init(params))
    calibrated(params, mesh, rank, local(0), train)
    bn = Trainer(
        samx.async_sam(sgd(), rho=0.05),
        batch_norm_loss,
        descent_device=mesh,
        has_state=True,
    )
    train("async_sam_batchnorm", bn, bn.init(params, np.zeros(16, np.float32)))
    for case, tx in (("flax_sam", samx.sam), ("flax_async_sam", samx.async_sam)):
        try:  # SAM's model committed to a device, AsyncSAM's not
            flax_dropout(case, tx(sgd(), rho=0.05), mesh, local, save)
        except ValueError as e:
            print(f"{case}: ValueError: {e}")
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

    def unequal_batch():  # 8 examples on process 0, 4 on process 1
        return jax.tree.map(lambda x: x[: 8 - 4 * rank], local(0))

    def unequal_trainer():
        plain = Trainer(sgd(), loss, descent_device=mesh)
        plain.step(plain.init(params), unequal_batch())

    def unequal_step():
        step = make_data_parallel_step(optax.sgd(0.1), loss, mesh)
        step(p, optax.sgd(0.1).init(p), unequal_batch())

    def unequal_flax():
        model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
        samx.flax.Trainer(model, sgd(), flax_loss, descent_device=mesh).step(
            unequal_batch()
        )

    checks = {
        "sampa with an ascent device": lambda: Trainer(
            samx.sampa(sgd()), loss, descent_device=mesh, ascent_device="cpu:1"
        ).init(params),
        "a different ascent batch per process": lambda: Trainer(
            samx.async_sam(sgd()), loss, descent_device=mesh, ascent_batch_size=2 + rank
        ).init(params),
        "a global batch": lambda: trainer.step(state, global_batch),
        "unequal batches, Trainer": unequal_trainer,
        "unequal batches, make_data_parallel_step": unequal_step,
        "unequal batches, samx.flax.Trainer": unequal_flax,
    }
    for name, check in checks.items():
        try:
            check()
            print(f"{name}: no error")
        except ValueError as e:
            print(f"{name}: ValueError: {e}")


def calibrated(params, mesh, rank, batch, train):
    """AsyncSAM at the b' that calibrate_ascent_batch(fast_device=mesh) chose.

    Its clock is replaced: the descent (which still runs, sharded) takes 1 s
    and the ascent 0.1 s per example on process 0, 0.4 s on process 1, so that
    alone process 0 would choose b' = 8 and process 1 b' = 2.
    """
    import jax
    import optax
    from _testing import mlp_loss as loss

    import samx
    from samx.runtime import Trainer, _calibrate, calibrate_ascent_batch

    real = _calibrate._median_seconds

    def clock(fn, args, repeats):
        examples = jax.tree.leaves(args[2])[0]
        if len(examples.sharding.device_set) > 1:  # the descent, on the mesh
            real(fn, args, 1)
            return 1.0
        return examples.shape[0] * (0.1 if rank == 0 else 0.4)

    _calibrate._median_seconds = clock
    try:
        c = calibrate_ascent_batch(loss, params, batch, fast_device=mesh, repeats=1)
    except ValueError as e:
        print(f"calibration: ValueError: {e}")
        return
    finally:
        _calibrate._median_seconds = real
    alone = max(k for k, t in c.ascent_seconds.items() if t <= c.descent_seconds)
    print(f"calibration: alone b' = {alone}, agreed b' = {c.ascent_batch_size}")
    tx = samx.async_sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    trainer = Trainer(tx, loss, descent_device=mesh, ascent_batch_size=c)
    train("async_sam_calibrated", trainer, trainer.init(params))


def flax_dropout(case, tx, mesh, local, save):
    """samx.flax.Trainer on _testing's dropout MLP (for SAM, its parameters
    and RNG keys committed to this process's second device); saves the
    parameters and prints the dropout stream's count."""
    import jax
    from _testing import dropout_model, flax_loss
    from flax import nnx

    import samx.flax

    model = dropout_model()
    if case == "flax_sam":
        graphdef, variables = nnx.split(model)
        model = nnx.merge(graphdef, jax.device_put(variables, jax.local_devices()[1]))
    trainer = samx.flax.Trainer(model, tx, flax_loss, descent_device=mesh)
    for step in range(6):
        trainer.step(local(step))
    model = trainer.model
    save(case, nnx.state(model, nnx.Param))
    count = model.layers[2].rngs.count[...].addressable_data(0)
    print(f"{case} dropout count: {int(count)}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
