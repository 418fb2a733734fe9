"""A loader that refills one NumPy buffer trains as fresh arrays do (issue 23, 1).

Preallocated and prefetching loaders write every batch into the same NumPy
arrays. On the CPU backend ``jax.device_put`` (and a jit's argument transfer)
may alias a suitably aligned NumPy array instead of copying it, and a jitted
computation reads its arguments when it runs, after the call has returned. A
loop that keeps the batch (AsyncSAM's and SAMPa's previous batch) or reads it
later (the host-CPU ascent) then sees the refilled buffer.

Each test runs a loop twice on the same batches: once from fresh arrays (a
copy per step, never written again: the reference) and once from one aligned
buffer refilled before every step, after waiting for the previous step to
finish (``wait``) or not. The trajectories must be bit-identical.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _testing import mlp_loss
from flax import nnx
from jax.sharding import Mesh

import samx
import samx.flax
from samx.runtime import Trainer, make_data_parallel_step

STEPS, BATCH, ASCENT = 5, 8, 4
CPU0, CPU1 = jax.devices("cpu")[:2]


def _aligned(shape, dtype):
    """An uninitialised array whose data starts on a 64-byte boundary (the
    alignment at which XLA:CPU takes a NumPy array without copying)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _batches(sizes=(3, 4)):
    rng = np.random.default_rng(0)
    return [
        {
            "x": rng.normal(size=(BATCH, sizes[0])).astype(np.float32),
            "y": rng.normal(size=(BATCH, sizes[1])).astype(np.float32),
        }
        for _ in range(STEPS)
    ]


def _params(sizes=(3, 4)):
    rng = np.random.default_rng(1)
    return {
        "layer0": {
            "w": rng.normal(size=sizes).astype(np.float32),
            "b": np.zeros(sizes[1], np.float32),
        }
    }


def _feed(step, batches, refill, wait):
    """Calls ``step(batch)`` per batch: fresh copies, or one refilled buffer."""
    buffer = {k: _aligned(v.shape, v.dtype) for k, v in batches[0].items()}
    out = None
    for batch in batches:
        if refill:
            for k, v in batch.items():
                buffer[k][...] = v
            out = step(buffer)
        else:
            out = step({k: v.copy() for k, v in batch.items()})
        if wait:
            jax.block_until_ready(out)
    return out


def _same(loop, wait):
    """``loop()`` gives a fresh ``(step, result)``; both runs end equal."""
    batches = _batches()
    results = []
    for refill in (False, True):
        step, result = loop()
        _feed(step, batches, refill, wait)
        results.append(jax.tree.map(np.asarray, result()))
    jax.tree.map(np.testing.assert_array_equal, *results)


TRANSFORMS = {
    "async_sam": lambda: samx.async_sam(optax.sgd(0.1), rho=0.1),
    "sampa": lambda: samx.sampa(optax.sgd(0.1), rho=0.1, lam=0.5),
}


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "no_wait"])
@pytest.mark.parametrize(
    "method, ascent_device",
    [("async_sam", CPU0), ("async_sam", CPU1), ("sampa", CPU0), ("sampa", CPU1)],
    ids=["async_sam-1dev", "async_sam-2dev", "sampa-1dev", "sampa-2dev"],
)
def test_runtime_trainer(method, ascent_device, wait):
    def loop():
        trainer = Trainer(
            TRANSFORMS[method](),
            mlp_loss,
            descent_device=CPU0,
            ascent_device=ascent_device,
            ascent_batch_size=ASCENT if method == "async_sam" else None,
        )
        box = [trainer.init(_params())]

        def step(batch):
            box[0], metrics = trainer.step(box[0], batch)
            return metrics

        return step, lambda: box[0].params

    _same(loop, wait)


class _Linear(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


def _nnx_loss(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "no_wait"])
def test_flax_trainer(wait):
    def loop():
        trainer = samx.flax.Trainer(
            _Linear(nnx.Rngs(0)),
            TRANSFORMS["sampa"](),
            _nnx_loss,
            descent_device=CPU0,
            ascent_device=CPU0,
        )
        return trainer.step, lambda: nnx.state(trainer.model, nnx.Param)

    _same(loop, wait)


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "no_wait"])
@pytest.mark.parametrize("jitted", ["make_nnx_train_step", "nnx.jit", "eager"])
def test_nnx_steps(jitted, wait):
    if jitted == "nnx.jit" and not wait:
        pytest.skip("a jit of one's own reads NumPy arguments when it runs")

    def loop():
        model = _Linear(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, TRANSFORMS["async_sam"](), wrt=nnx.Param)
        if jitted == "nnx.jit":
            inner = nnx.jit(
                samx.flax.nnx_train_step,
                static_argnames=("loss_fn", "ascent_batch_size"),
            )

            def step(batch):
                return inner(
                    model, optimizer, batch, _nnx_loss, ascent_batch_size=ASCENT
                )
        elif jitted == "eager":

            def step(batch):
                return samx.flax.nnx_train_step(
                    model, optimizer, batch, _nnx_loss, ascent_batch_size=ASCENT
                )
        else:
            inner = samx.flax.make_nnx_train_step(_nnx_loss, ascent_batch_size=ASCENT)

            def step(batch):
                return inner(model, optimizer, batch)

        return step, lambda: nnx.state(model, nnx.Param)

    _same(loop, wait)


def _linen_loss(params, batch_stats, batch):
    out = nn.Dense(4).apply({"params": params}, batch["x"])
    return jnp.mean((out - batch["y"]) ** 2), batch_stats


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "no_wait"])
@pytest.mark.parametrize("jitted", ["make_linen_train_step", "jax.jit", "eager"])
def test_linen_steps(jitted, wait):
    if jitted == "jax.jit" and not wait:
        pytest.skip("a jit of one's own reads NumPy arguments when it runs")

    def loop():
        params = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
        box = [
            samx.flax.TrainState.create(
                apply_fn=None, params=params, tx=TRANSFORMS["sampa"]()
            )
        ]
        if jitted in ("jax.jit", "eager"):
            inner = samx.flax.linen_train_step
            if jitted == "jax.jit":
                inner = jax.jit(inner, static_argnames="loss_fn")
            first = _batches()[0]  # the state keeps a batch from the first step
            box[0] = box[0].replace(prev_batch=jax.tree.map(jnp.array, first))

            def step(batch):
                box[0], metrics = inner(box[0], batch, loss_fn=_linen_loss)
                return metrics
        else:
            inner = samx.flax.make_linen_train_step(_linen_loss)

            def step(batch):
                box[0], metrics = inner(box[0], batch)
                return metrics

        return step, lambda: box[0].params

    _same(loop, wait)


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "no_wait"])
def test_data_parallel_step(wait):
    mesh = Mesh(np.array([CPU0, CPU1]), ("data",))

    def loop():
        tx = samx.sam(optax.sgd(0.1), rho=0.1)
        box = [jax.device_put(_params(), CPU0)]
        box.append(tx.init(box[0]))
        inner = make_data_parallel_step(tx, mlp_loss, mesh)

        def step(batch):
            box[0], box[1], metrics = inner(box[0], box[1], batch)
            return metrics

        return step, lambda: box[0]

    _same(loop, wait)
