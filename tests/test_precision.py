"""bfloat16 end to end, and float32 master parameters with a bfloat16 loss.

Every leaf of the parameters, the updates and the optimizer state keeps its
dtype through jitted steps (no silent float32 promotion, no demotion of the
int32 counters); the bfloat16 run tracks a float32 run; the loss goes down.
Under ``jax.numpy_dtype_promotion("strict")`` where optax allows it: SGD with
momentum is strict-clean, ``optax.adam`` is not (its bias correction mixes a
Python float with the int32 count), so adam runs under standard promotion.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _testing import mlp_problem

import samx

STEPS = 6

# The base, the promotion mode it allows, how far (relative to the distance
# moved) the bfloat16 run may end from the float32 one. Adam divides by the
# root of a bfloat16 second moment, which amplifies the rounding.
BASES = {
    "sgd-momentum": (lambda: optax.sgd(0.1, momentum=0.9), "strict", 0.06),
    "adam": (lambda: optax.adam(1e-2), "standard", 0.15),
}
METHODS = {
    "sam": lambda base: samx.sam(base, rho=0.05),
    "asam": lambda base: samx.sam(base, rho=0.5, adaptive=True),
    "async_sam": lambda base: samx.async_sam(base, rho=0.05),
    "sampa": lambda base: samx.sampa(base, rho=0.1, lam=0.2),
}


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def _dtypes(tree):
    return jax.tree.map(jnp.result_type, tree)


def _quarter(batch):
    return jax.tree.map(lambda x: x[: x.shape[0] // 4], batch)


def _train(method, tx, params, grad, batches, promotion):
    """Jitted steps; returns the parameters after each, the updates, the states."""

    @jax.jit
    def step(params, state, previous, batch):
        if method == "async_sam":
            ascent = grad(params, _quarter(batch))
        elif method == "sampa":
            ascent = None
        else:
            ascent = grad(params, batch)
        updates, state = tx.update(
            ascent,
            state,
            params,
            grad_fn=lambda p, i: grad(
                p, previous if method == "sampa" and i == 0 else batch
            ),
        )
        return optax.apply_updates(params, updates), state, updates

    state = tx.init(params)
    trajectory, all_updates, states = [], [], [state]
    with jax.numpy_dtype_promotion(promotion):
        for t, batch in enumerate(batches):
            params, state, updates = step(params, state, batches[max(t - 1, 0)], batch)
            trajectory.append(params)
            all_updates.append(updates)
            states.append(state)
    return trajectory, all_updates, states


def _assert_dtypes_kept(params, trajectory, updates, states):
    want = _dtypes(params)
    for t, (p, u, s) in enumerate(zip(trajectory, updates, states[1:], strict=True)):
        assert _dtypes(p) == want, f"params drifted at step {t}"
        assert _dtypes(u) == want, f"updates drifted at step {t}"
        assert _dtypes(s) == _dtypes(states[0]), f"state drifted at step {t}"


def _state_dtypes(state):
    return {jnp.result_type(x) for x in jax.tree.leaves(state)}


def _mean_loss(loss, params, batches):
    params = _cast(params, jnp.float32)
    return float(np.mean([loss(params, b) for b in batches]))


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_bfloat16_end_to_end(method, base):
    make_base, promotion, tol = BASES[base]
    params, loss, sample = mlp_problem(jax.random.key(0), batch=32)
    batches = [sample(k) for k in jax.random.split(jax.random.key(1), STEPS)]
    grad = jax.grad(loss)
    tx = METHODS[method](make_base())

    low = _cast(params, jnp.bfloat16)
    low_batches = [_cast(b, jnp.bfloat16) for b in batches]
    trajectory, updates, states = _train(method, tx, low, grad, low_batches, promotion)
    _assert_dtypes_kept(low, trajectory, updates, states)
    # bfloat16 all the way: floating state leaves too; the counters stay int32,
    # and so does AsyncSAM's b'/b, a float32 scalar (no parameter-sized leaf).
    scalars = [x for x in jax.tree.leaves(states[0]) if jnp.ndim(x) == 0]
    trees = [x for x in jax.tree.leaves(states[0]) if jnp.ndim(x) > 0]
    assert _state_dtypes(trees) == {jnp.dtype(jnp.bfloat16)}
    assert _state_dtypes(scalars) <= {jnp.dtype(jnp.int32), jnp.dtype(jnp.float32)}
    for s in states[1:]:
        assert all(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(s))

    # The bfloat16 run tracks a float32 run ...
    high, _, _ = _train(method, tx, params, grad, batches, promotion)
    moved = optax.tree.norm(optax.tree.sub(high[-1], params))
    last = _cast(trajectory[-1], jnp.float32)
    apart = optax.tree.norm(optax.tree.sub(last, high[-1]))
    assert apart < tol * moved, (float(apart), float(moved))
    for x, y in zip(jax.tree.leaves(last), jax.tree.leaves(high[-1]), strict=True):
        np.testing.assert_allclose(x, y, atol=5e-2)
    # ... and the loss goes down.
    assert _mean_loss(loss, trajectory[-1], batches) < 0.95 * _mean_loss(
        loss, params, batches
    )


@pytest.mark.parametrize("method", ["async_sam", "sam", "sampa"])
def test_float32_master_params_with_a_bfloat16_loss(method):
    params, loss, sample = mlp_problem(jax.random.key(2), batch=32)
    batches = [sample(k) for k in jax.random.split(jax.random.key(3), STEPS)]

    def low_loss(params, batch):  # the forward pass in bfloat16
        return loss(_cast(params, jnp.bfloat16), _cast(batch, jnp.bfloat16))

    grad = jax.grad(low_loss)
    assert _dtypes(grad(params, batches[0])) == _dtypes(params)  # float32 grads
    tx = METHODS[method](optax.sgd(0.1, momentum=0.9))
    trajectory, updates, states = _train(method, tx, params, grad, batches, "strict")
    _assert_dtypes_kept(params, trajectory, updates, states)
    assert _state_dtypes(states[0]) == {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    assert _mean_loss(loss, trajectory[-1], batches) < 0.95 * _mean_loss(
        loss, params, batches
    )


def test_the_dtype_checks_can_fail():
    # A base that returns float32 updates for bfloat16 parameters is caught.
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    promote = optax.GradientTransformation(
        lambda p: optax.EmptyState(),
        lambda u, s, p=None: (_cast(u, jnp.float32), s),
    )
    tx = samx.sam(promote, rho=0.05)
    trajectory, updates, states = _train(
        "sam", tx, params, lambda p, b: p, [None], "standard"
    )
    with pytest.raises(AssertionError, match="updates drifted"):
        _assert_dtypes_kept(params, trajectory, updates, states)
