"""Which ``eps`` reproduces which reference code (docs/choosing.md), in float64.

``optax.contrib.sam`` (like the SAM paper's code, google-research/sam) divides
by the gradient norm alone: ``samx.sam(eps=0)`` is it to rounding, the default
``eps=1e-12`` is not. davda54/sam adds ``1e-12``: the default is it. (ASAM's
official ``1e-16`` and SAMPa's ``1e-12`` are checked in ``test_float64.py``.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _testing import mlp_problem, samx_trajectory

import samx

STEPS = 15
RHO = 0.5  # a larger radius shows eps more: e = rho * g / (||g|| + eps)
LR, MU, WD = 0.1, 0.9, 5e-4

BASES = {
    "sgd": lambda: optax.sgd(LR),
    "sgd-momentum": lambda: optax.sgd(LR, momentum=MU),
    "adam": lambda: optax.adam(1e-2),
}


@pytest.fixture
def problem():
    """An MLP in float64: params, loss and STEPS batches (x64 on meanwhile)."""
    with jax.enable_x64(True):
        params, loss, sample = mlp_problem(jax.random.key(0))
        keys = jax.random.split(jax.random.key(1), STEPS)
        params, batches = jax.tree.map(
            lambda x: x.astype(jnp.float64), (params, [sample(k) for k in keys])
        )
        yield params, loss, batches


def _apart(ours, theirs):
    """The largest difference of any parameter at any step."""
    return max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for x, y in zip(ours, theirs, strict=True)
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
    )


@pytest.mark.parametrize("base", BASES)
def test_eps_0_is_optax_contrib_sam(problem, base):
    params, loss, batches = problem
    contrib = optax.contrib.sam(
        BASES[base](),
        optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
        sync_period=2,
        opaque_mode=True,
    )
    theirs = samx_trajectory(contrib, params, loss, batches)
    assert jax.tree.leaves(theirs[-1])[0].dtype == jnp.float64

    exact = samx_trajectory(
        samx.sam(BASES[base](), RHO, eps=0.0), params, loss, batches
    )
    assert _apart(exact, theirs) <= 1e-15  # measured 1.1e-16 to 2.2e-16
    default = samx_trajectory(samx.sam(BASES[base](), RHO), params, loss, batches)
    assert _apart(default, theirs) > 1e-14  # measured 9.1e-14 to 6.0e-13


def _davda54_sam(params, loss, batches, rho):
    """davda54/sam's ``SAM(..., base_optimizer=SGD)``: ``first_step`` adds
    ``e = g * rho / (||g|| + 1e-12)``, ``second_step`` removes it and steps
    PyTorch's SGD (momentum, coupled weight decay), in NumPy float64."""
    grad = jax.jit(jax.grad(loss))
    p = jax.tree.map(np.asarray, params)
    buf, out = None, []
    for batch in batches:
        g = jax.tree.map(np.asarray, grad(p, batch))
        norm = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(g)))
        scale = rho / (norm + 1e-12)
        e = jax.tree.map(lambda x, s=scale: x * s, g)
        d = jax.tree.map(np.asarray, grad(jax.tree.map(np.add, p, e), batch))
        d = jax.tree.map(lambda x, w: x + WD * w, d, p)
        buf = d if buf is None else jax.tree.map(lambda b, x: b * MU + x, buf, d)
        p = jax.tree.map(lambda w, b: w - LR * b, p, buf)
        out.append(p)
    return out


def test_the_default_eps_is_davda54_sam(problem):
    params, loss, batches = problem
    theirs = _davda54_sam(params, loss, batches, RHO)
    torch_sgd = optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MU))
    default = samx_trajectory(samx.sam(torch_sgd, RHO), params, loss, batches)
    assert _apart(default, theirs) <= 1e-15  # measured 1.7e-16
    exact = samx_trajectory(samx.sam(torch_sgd, RHO, eps=0.0), params, loss, batches)
    assert _apart(exact, theirs) > 1e-14  # measured 6.0e-13


@pytest.mark.parametrize("method", ["sam", "async_sam", "sampa"])
def test_eps_zero_is_safe_on_a_zero_direction(method):
    # AsyncSAM's and SAMPa's stored gradient starts at zero: rho / (0 + 0) * 0
    # was NaN at their first step with eps=0. A zero direction: no perturbation.
    def loss(p, b):
        return jnp.mean((b @ p["w"] - 1.0) ** 2)

    params, batch = {"w": jnp.full(3, 0.3)}, jnp.eye(3)
    tx = getattr(samx, method)(optax.sgd(0.1), rho=0.05, eps=0.0)
    state = tx.init(params)
    for _ in range(3):
        grads = jax.grad(loss)(params, batch)
        updates, state = tx.update(
            grads, state, params, grad_fn=lambda p, i: jax.grad(loss)(p, batch)
        )
        params = optax.apply_updates(params, updates)
        assert bool(jnp.isfinite(params["w"]).all())
    zero = {"w": jnp.zeros(3)}
    tx = samx.sam(optax.sgd(0.1), rho=0.05, eps=0.0)
    updates, _ = tx.update(zero, tx.init(params), params, grad_fn=lambda p, i: zero)
    assert bool((updates["w"] == 0).all())
