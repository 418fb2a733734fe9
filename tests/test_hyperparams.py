"""Changing ``rho`` and ``lam`` between steps, through ``optax.inject_hyperparams``,
in each loop (docs/choosing.md): the next step uses the new value, without
compiling again."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _testing import count_compilations
from flax import nnx

import samx
import samx.flax
from samx.runtime import Trainer

BASE = optax.sgd(0.1, momentum=0.9)
RNG = np.random.default_rng(0)
BATCHES = [
    {
        "x": RNG.normal(size=(8, 3)).astype(np.float32),
        "y": RNG.normal(size=8).astype(np.float32),
    }
    for _ in range(4)
]


def loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)


class Linear(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.array([1.0, -0.5, 0.25]))
        self.b = nnx.Param(jnp.zeros(()))

    def __call__(self, x):
        return x @ self.w + self.b


def nnx_loss(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def _params():
    return {"w": jnp.array([1.0, -0.5, 0.25]), "b": jnp.zeros(())}


def _set(hyperparams, name, value):
    """The docs' way: an array like the old one (dtype, device), in place."""
    if isinstance(hyperparams[name], nnx.Variable):  # nnx.Optimizer
        hyperparams[name][...] = value
    else:
        hyperparams[name] = jnp.full_like(hyperparams[name], value)


# Each loop, from a transform: (step(batch), params(), opt_state()). The plain
# loop's grad_fn sees the current batch, for every method.


def _plain(tx):
    grad = jax.grad(loss)

    @jax.jit
    def step(params, opt_state, batch):
        updates, opt_state = tx.update(
            grad(params, batch), opt_state, params, grad_fn=lambda p, i: grad(p, batch)
        )
        return optax.apply_updates(params, updates), opt_state

    run = {"params": _params()}
    run["opt_state"] = tx.init(run["params"])

    def do(batch):
        run["params"], run["opt_state"] = step(run["params"], run["opt_state"], batch)

    return do, lambda: run["params"], lambda: run["opt_state"]


def _nnx_optimizer(tx):
    model = Linear()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = samx.flax.make_nnx_train_step(nnx_loss)
    return (
        lambda batch: step(model, optimizer, batch),
        lambda: {"w": model.w[...], "b": model.b[...]},
        lambda: optimizer.opt_state,
    )


def _runtime_trainer(tx):
    trainer = Trainer(tx, loss, descent_device="cpu:0", ascent_device="cpu:1")
    run = {"state": trainer.init(_params())}

    def do(batch):
        run["state"], _ = trainer.step(run["state"], batch)

    return do, lambda: run["state"].params, lambda: run["state"].opt_state


def _flax_trainer(tx):
    trainer = samx.flax.Trainer(
        Linear(), tx, nnx_loss, descent_device="cpu:0", ascent_device="cpu:1"
    )
    return (
        trainer.step,
        lambda: {
            "w": trainer.state.params["w"][...],
            "b": trainer.state.params["b"][...],
        },
        lambda: trainer.state.opt_state,
    )


def _linen(tx):
    step = samx.flax.make_linen_train_step(lambda p, stats, b: (loss(p, b), stats))
    run = {"state": samx.flax.TrainState.create(apply_fn=None, params=_params(), tx=tx)}

    def do(batch):
        run["state"], _ = step(run["state"], batch)

    return do, lambda: run["state"].params, lambda: run["state"].opt_state


LOOPS = {
    "plain": _plain,
    "nnx.Optimizer": _nnx_optimizer,
    "runtime.Trainer": _runtime_trainer,
    "flax.Trainer": _flax_trainer,
    "linen.TrainState": _linen,
}


def _reference(rhos):
    """SAM's parameters in a plain loop, one step per radius (0: the base step)."""
    grad, params = jax.grad(loss), _params()
    state = samx.sam(BASE).init(params)
    for rho, batch in zip(rhos, BATCHES[: len(rhos)], strict=True):
        g = grad(params, batch)
        if rho:
            tx = samx.sam(BASE, rho=rho)
            updates, state = tx.update(
                g, state, params, grad_fn=lambda p, i, b=batch: grad(p, b)
            )
        else:  # the base optimizer's step, from SAM's base state
            updates, base_state = BASE.update(g, state.base_state, params)
            state = state._replace(base_state=base_state)
        params = optax.apply_updates(params, updates)
    return params


def _close(actual, expected):
    return all(
        np.allclose(a, e, rtol=1e-5, atol=1e-6)
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    )


@pytest.mark.parametrize("loop", LOOPS)
def test_rho_set_to_zero_gives_the_base_step(loop):
    do, params, opt_state = LOOPS[loop](optax.inject_hyperparams(samx.sam)(BASE))
    for batch in BATCHES[:2]:
        do(batch)
    assert float(opt_state().hyperparams["rho"]) == pytest.approx(0.05)
    assert _close(params(), _reference([0.05, 0.05]))
    _set(opt_state().hyperparams, "rho", 0.0)
    with count_compilations() as compiled:
        do(BATCHES[2])
    assert compiled == [], f"setting rho compiled again: {compiled}"
    assert float(opt_state().hyperparams["rho"]) == 0.0
    assert _close(params(), _reference([0.05, 0.05, 0.0])), "not the base step"
    assert not _close(params(), _reference([0.05, 0.05, 0.05])), "rho had no effect"


CHANGES = {  # name: (factory, kwargs, the hyperparameter, its new value)
    "async_sam-rho": (samx.async_sam, {"rho": 0.05}, "rho", 0.5),
    "sampa-lam": (samx.sampa, {"rho": 0.1, "lam": 0.2}, "lam", 0.9),
}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("change", CHANGES)
def test_a_value_set_between_steps_is_the_next_steps(loop, change):
    # Against the same loop with a schedule that switches at the third step.
    factory, kwargs, name, value = CHANGES[change]
    do, params, opt_state = LOOPS[loop](
        optax.inject_hyperparams(factory)(BASE, **kwargs)
    )
    scheduled = dict(kwargs)
    scheduled[name] = lambda count: jnp.where(count < 2, kwargs[name], value)
    do_ref, params_ref, _ = LOOPS[loop](factory(BASE, **scheduled))
    unchanged, params_unchanged, _ = LOOPS[loop](factory(BASE, **kwargs))
    for i, batch in enumerate(BATCHES):
        if i == 2:
            _set(opt_state().hyperparams, name, value)
        with count_compilations() as compiled:
            do(batch)
        assert i < 2 or compiled == [], f"setting {name} compiled again: {compiled}"
        do_ref(batch)
        unchanged(batch)
    assert float(opt_state().hyperparams[name]) == pytest.approx(value)
    assert _close(params(), params_ref())
    assert not _close(params(), params_unchanged()), f"{name} had no effect"
