"""samx.async_sam: a hand-written reference, step 0, independence, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _testing import mlp_problem, plain_trajectory

import samx

BASES = {
    "sgd-momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
}


def _quarter(batch):
    """The ascent batch: the first quarter of the descent batch."""
    return jax.tree.map(lambda x: x[: x.shape[0] // 4], batch)


def _train(tx, params, loss, batches):
    """Ascent gradient on a quarter of each batch, descent on the whole batch."""
    grad = jax.grad(loss)

    @jax.jit
    def step(params, state, batch):
        updates, state = tx.update(
            grad(params, _quarter(batch)),
            state,
            params,
            grad_fn=lambda p, i: grad(p, batch),
        )
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    trajectory = []
    for batch in batches:
        params, state = step(params, state, batch)
        trajectory.append(params)
    return trajectory


def _reference(base, params, loss, batches, rho, adaptive=False, eta=0.01):
    """AsyncSAM as ALGORITHMS.md writes it, with ASAM's default weight mask."""
    grad = jax.grad(loss)

    @jax.jit
    def step(params, state, previous, batch):
        ascent = grad(params, _quarter(batch))  # a_t
        if adaptive:  # T = |x| + eta on weight matrices, 1 on biases
            t = jax.tree.map(
                lambda p: jnp.abs(p) + eta if p.ndim >= 2 else jnp.ones_like(p), params
            )
        else:
            t = jax.tree.map(jnp.ones_like, params)
        tg = jax.tree.map(jnp.multiply, t, previous)
        norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tg)))
        perturbed = jax.tree.map(
            lambda p, s, x: p + rho * s * x / (norm + 1e-12), params, t, tg
        )
        updates, state = base.update(grad(perturbed, batch), state, params)
        return optax.apply_updates(params, updates), state, ascent

    state = base.init(params)
    previous = jax.tree.map(jnp.zeros_like, params)  # a_{-1} = 0
    trajectory = []
    for batch in batches:
        params, state, previous = step(params, state, previous, batch)
        trajectory.append(params)
    return trajectory


def _assert_trees_close(a, b, tol, msg=""):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=msg)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("base", sorted(BASES))
def test_matches_the_reference_step_for_step(base, adaptive):
    params, loss, sample = mlp_problem(jax.random.key(0))
    batches = [sample(k) for k in jax.random.split(jax.random.key(1), 12)]
    rho = 0.5 if adaptive else 0.05
    tx = samx.async_sam(BASES[base](), rho=rho, adaptive=adaptive)
    ours = _train(tx, params, loss, batches)
    theirs = _reference(BASES[base](), params, loss, batches, rho, adaptive)
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        _assert_trees_close(a, b, 1e-5, f"step {t}")
    # The comparison can fail: AsyncSAM moved away from the base optimizer.
    plain = _train(BASES[base](), params, loss, batches)[-1]
    assert not np.allclose(plain["layer0"]["w"], ours[-1]["layer0"]["w"], atol=1e-4)


def test_first_step_is_a_plain_base_step():
    params, loss, sample = mlp_problem(jax.random.key(2))
    batch = sample(jax.random.key(3))
    grad = jax.grad(loss)
    base = optax.adam(1e-2)
    tx = samx.async_sam(base, rho=1.0)

    @jax.jit
    def first_step(params):
        seen = []

        def grad_fn(p, i):
            seen.append(p)
            return grad(p, batch)

        ascent = grad(params, _quarter(batch))
        updates, state = tx.update(ascent, tx.init(params), params, grad_fn=grad_fn)
        expected, _ = base.update(grad(params, batch), base.init(params), params)
        return seen[0], updates, expected, state.ascent_grad, ascent

    point, updates, expected, stored, ascent = first_step(params)
    _assert_trees_close(point, params, 0.0)
    _assert_trees_close(updates, expected, 0.0)
    _assert_trees_close(stored, ascent, 0.0)  # kept for the next step


def test_descent_point_does_not_depend_on_the_incoming_updates():
    params, loss, sample = mlp_problem(jax.random.key(4))
    batches = [sample(k) for k in jax.random.split(jax.random.key(5), 3)]
    tx = samx.async_sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    grad = jax.grad(loss)
    state = tx.init(params)
    for batch in batches:  # a few steps, so that a_{t-1} is not zero
        updates, state = tx.update(
            grad(params, batch), state, params, grad_fn=lambda p, i, b=batch: grad(p, b)
        )
        params = optax.apply_updates(params, updates)

    def points(incoming):
        seen = []

        def grad_fn(p, i):
            seen.append((p, i))
            return grad(p, batches[-1])

        updates, new_state = tx.update(incoming, state, params, grad_fn=grad_fn)
        [(point, index)] = seen
        assert index == 0
        return point, updates, new_state

    fresh = grad(params, batches[-1])
    other = jax.tree.map(lambda x: -3.0 * x + 1.0, fresh)
    point_a, updates_a, state_a = points(fresh)
    point_b, updates_b, state_b = points(other)
    _assert_trees_close(point_a, point_b, 0.0)
    _assert_trees_close(updates_a, updates_b, 0.0)
    # ... and the incoming gradient only lands in the state, for the next step.
    _assert_trees_close(state_a.ascent_grad, fresh, 0.0)
    _assert_trees_close(state_b.ascent_grad, other, 0.0)
    assert not np.allclose(point_a["layer0"]["w"], params["layer0"]["w"])


def test_stored_ascent_gradient_keeps_the_parameter_dtypes():
    params = {"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.float32)}
    tx = samx.async_sam(optax.sgd(0.1), rho=0.05)
    state = tx.init(params)
    f32 = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.float32), params)
    _, new_state = jax.jit(lambda u, s, p: tx.update(u, s, p, grad_fn=lambda q, i: q))(
        f32, state, params
    )
    assert jax.tree.map(jnp.result_type, new_state.ascent_grad) == {
        "w": jnp.bfloat16,
        "b": jnp.float32,
    }
    assert jax.tree.map(jnp.result_type, state.ascent_grad) == {
        "w": jnp.bfloat16,
        "b": jnp.float32,
    }


@pytest.mark.parametrize("base", sorted(BASES))
def test_rho_zero_gives_exactly_the_base_trajectory(base):
    params, loss, sample = mlp_problem(jax.random.key(6))
    batches = [sample(k) for k in jax.random.split(jax.random.key(7), 6)]
    ours = _train(samx.async_sam(BASES[base](), rho=0.0), params, loss, batches)
    theirs = plain_trajectory(BASES[base](), params, loss, batches)
    for t, params in enumerate(theirs):
        _assert_trees_close(ours[t], params, 0.0, f"step {t}")


# Bad inputs.


@pytest.mark.parametrize("rho", [-0.1, float("nan"), float("inf")])
def test_rejects_bad_rho(rho):
    with pytest.raises(ValueError, match=re.escape("samx.async_sam(rho=...)")):
        samx.async_sam(optax.sgd(0.1), rho=rho)


@pytest.mark.parametrize("name", ["eta", "eps"])
def test_rejects_negative_eta_and_eps(name):
    with pytest.raises(ValueError, match=re.escape(f"samx.async_sam({name}=...)")):
        samx.async_sam(optax.sgd(0.1), **{name: -1.0})


def test_rejects_a_base_that_is_not_a_transform():
    with pytest.raises(TypeError, match="did you pass the factory"):
        samx.async_sam(optax.sgd)
    with pytest.raises(TypeError, match=re.escape("samx.async_sam(base=...)")):
        samx.async_sam("sgd")


def test_mask_needs_adaptive():
    with pytest.raises(ValueError, match=re.escape("needs `adaptive=True`")):
        samx.async_sam(optax.sgd(0.1), mask={"w": True})


def _one_step(tx, **kwargs):
    params = {"layer": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}}
    grads = jax.tree.map(jnp.ones_like, params)
    return tx.update(grads, tx.init(params), params, **kwargs)


def test_missing_grad_fn_says_how_to_pass_it():
    tx = samx.async_sam(optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"samx\.async_sam: .*grad_fn=lambda p, i"):
        _one_step(tx)


def test_missing_params():
    tx = samx.async_sam(optax.sgd(0.1))
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"samx\.async_sam: .*`params`"):
        tx.update(params, tx.init(params), None, grad_fn=lambda p, i: p)


def test_grad_fn_result_with_a_wrong_structure_names_the_leaf():
    tx = samx.async_sam(optax.sgd(0.1))
    with pytest.raises(ValueError, match=re.escape("['layer']['w']")):
        _one_step(tx, grad_fn=lambda p, i: {"layer": {"b": p["layer"]["b"]}})


def test_grad_fn_result_with_a_wrong_shape_names_the_leaf():
    tx = samx.async_sam(optax.sgd(0.1))

    def grad_fn(p, i):
        return {"layer": {"w": p["layer"]["w"].T, "b": p["layer"]["b"]}}

    with pytest.raises(
        ValueError, match=re.escape("`grad_fn` leaf ['layer']['w'] has shape (3, 2)")
    ):
        _one_step(tx, grad_fn=grad_fn)


def test_updates_with_a_wrong_shape_names_the_leaf():
    tx = samx.async_sam(optax.sgd(0.1))
    params = {"w": jnp.ones((2, 3))}
    with pytest.raises(
        ValueError, match=re.escape("`updates` leaf ['w'] has shape (3,)")
    ):
        tx.update({"w": jnp.ones(3)}, tx.init(params), params, grad_fn=lambda p, i: p)


# ------------------------------------------- the radius at small ascent batches

# b' of the 16 examples at each step: the radius of step t follows b'_{t-1}.
ASCENT_SIZES = [2, 8, 4, 16, 1, 2, 8, 4, 16, 1, 2, 4]


def _scaled_reference(params, loss, batches, *, rho, lr, scaling, adaptive):
    """AsyncSAM with the radius ``rho * sqrt(b / b'_{t-1})``, in NumPy, no samx.

    SGD without momentum; ``a_t`` on the first ``b'_t`` examples of ``B_t``,
    the descent on ``B_t`` at ``x_t + r_t T^2 a_{t-1} / ||T a_{t-1}||``
    (``T = |x| + 0.01`` on the weight matrices with ``adaptive``, else 1).
    """
    grad = jax.grad(loss)
    to_np = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    x, prev, prev_fraction = to_np(params), None, 1.0
    out = []
    for batch, size in zip(batches, ASCENT_SIZES, strict=True):
        b = batch["x"].shape[0]
        small = jax.tree.map(lambda v, n=size: v[:n], batch)
        a = to_np(grad(jax.tree.map(jnp.float32, x), small))
        if prev is None:
            point = x
        else:
            t = jax.tree.map(
                lambda p: np.abs(p) + 0.01 if adaptive and p.ndim >= 2 else 1.0 + 0 * p,
                x,
            )
            ta = jax.tree.map(np.multiply, t, prev)
            norm = np.sqrt(sum(np.sum(v**2) for v in jax.tree.leaves(ta)))
            r = rho / np.sqrt(prev_fraction) if scaling == "sqrt" else rho
            point = jax.tree.map(
                lambda p, tt, g, r=r, norm=norm: p + r * tt * g / norm, x, t, ta
            )
        d = to_np(grad(jax.tree.map(jnp.float32, point), batch))
        x = jax.tree.map(lambda p, g: p - lr * g, x, d)
        prev, prev_fraction = a, size / b
        out.append(x)
    return out


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("scaling", ["sqrt", "none"])
def test_rho_scaling_equals_a_hand_written_reference_as_b_prime_changes(
    scaling, adaptive
):
    params, loss, sample = mlp_problem(jax.random.key(3), batch=16)
    batches = [sample(k) for k in jax.random.split(jax.random.key(4), 12)]
    rho = 0.5 if adaptive else 0.05
    tx = samx.async_sam(optax.sgd(0.1), rho=rho, adaptive=adaptive, rho_scaling=scaling)
    grad = jax.grad(loss)
    state = tx.init(params)
    expected = _scaled_reference(
        params, loss, batches, rho=rho, lr=0.1, scaling=scaling, adaptive=adaptive
    )
    for t, (batch, size) in enumerate(zip(batches, ASCENT_SIZES, strict=True)):
        small = jax.tree.map(lambda v, n=size: v[:n], batch)
        updates, state = tx.update(
            grad(params, small),
            state,
            params,
            grad_fn=lambda p, i, batch=batch: grad(p, batch),
            ascent_fraction=size / 16,
        )
        params = optax.apply_updates(params, updates)
        for x, y in zip(
            jax.tree.leaves(params), jax.tree.leaves(expected[t]), strict=True
        ):
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6, err_msg=f"step {t}")


def test_the_radius_grows_as_one_over_the_root_of_the_fraction():
    # On f(x) = x . c the descent point is x + r c / |c|: r read off directly.
    c = jnp.array([3.0, 4.0])
    seen = []
    tx = samx.async_sam(optax.sgd(0.0), rho=0.1)
    state = tx.init(jnp.zeros(2))
    for fraction in (0.25, 1 / 16, 1.0, 0.5):
        _, state = tx.update(
            c,
            state,
            jnp.zeros(2),
            grad_fn=lambda p, i: seen.append(float(jnp.linalg.norm(p))) or c,
            ascent_fraction=fraction,
        )
    # The first step is unperturbed; then the radius of the previous fraction.
    np.testing.assert_allclose(seen, [0.0, 0.2, 0.4, 0.1], rtol=1e-6)


def test_rho_zero_with_a_small_ascent_batch_is_exactly_the_base():
    params, loss, sample = mlp_problem(jax.random.key(0))
    batches = [sample(k) for k in jax.random.split(jax.random.key(1), 10)]
    grad = jax.grad(loss)
    tx = samx.async_sam(optax.sgd(0.1, momentum=0.9), rho=0.0)

    @jax.jit
    def step(p, state, batch):
        updates, state = tx.update(
            grad(p, _quarter(batch)),
            state,
            p,
            grad_fn=lambda q, i: grad(q, batch),
            ascent_fraction=0.25,
        )
        return optax.apply_updates(p, updates), state

    state, p = tx.init(params), params
    for batch in batches:
        p, state = step(p, state, batch)
    expected = plain_trajectory(optax.sgd(0.1, momentum=0.9), params, loss, batches)
    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(expected[-1]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_ascent_fraction_is_read_from_grad_fn_when_not_passed():
    class GradFn:
        ascent_fraction = 0.25

        def __call__(self, p, i):
            seen.append(float(jnp.linalg.norm(p)))
            return jnp.ones(2)

    seen = []
    tx = samx.async_sam(optax.sgd(0.0), rho=0.1)
    state = tx.init(jnp.zeros(2))
    for _ in range(2):
        _, state = tx.update(jnp.ones(2), state, jnp.zeros(2), grad_fn=GradFn())
    np.testing.assert_allclose(seen, [0.0, 0.2], rtol=1e-6)
    assert float(state.ascent_fraction) == 0.25


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho_scaling": "linear"}, r"rho_scaling=\.\.\.\)` must be 'sqrt'"),
        ({"rho_scaling": None}, r"rho_scaling=\.\.\.\)` must be 'sqrt'"),
    ],
)
def test_bad_rho_scaling_is_named_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        samx.async_sam(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize(
    "value, error",
    [
        (0.0, ValueError),
        (-0.5, ValueError),
        (float("nan"), ValueError),
        ("1/4", TypeError),
        (np.ones(2), TypeError),
    ],
)
def test_bad_ascent_fraction_is_named(value, error):
    tx = samx.async_sam(optax.sgd(0.1))
    state = tx.init(jnp.zeros(2))
    with pytest.raises(error, match=r"ascent_fraction=\.\.\.\)`"):
        tx.update(
            jnp.ones(2),
            state,
            jnp.zeros(2),
            grad_fn=lambda p, i: p,
            ascent_fraction=value,
        )
