"""samx.sampa: a hand-written reference, step 0, lam = 0, the toy, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _testing import mlp_problem

import samx

BASES = {
    "sgd-momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
}


def _batches(t, batches):
    """grad_fn(., 0) on the previous batch, grad_fn(., 1) on the current one."""
    return batches[max(t - 1, 0)], batches[t]


def _train(tx, params, loss, batches):
    grad = jax.grad(loss)

    @jax.jit
    def step(params, state, previous, batch):
        updates, state = tx.update(
            None,
            state,
            params,
            grad_fn=lambda p, i: grad(p, previous if i == 0 else batch),
        )
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    trajectory = []
    for t in range(len(batches)):
        params, state = step(params, state, *_batches(t, batches))
        trajectory.append(params)
    return trajectory


def _reference(base, params, loss, batches, rho, lam):
    """SAMPa-lambda as ALGORITHMS.md writes it."""
    grad = jax.grad(loss)

    @jax.jit
    def step(params, state, g, previous, batch, first, lam):
        norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
        perturbed = jax.tree.map(lambda p, x: p + rho * x / (norm + 1e-12), params, g)
        dry_run, _ = base.update(g, state, params)  # its state is thrown away
        y = optax.apply_updates(params, dry_run)
        y = jax.tree.map(lambda p, q: jnp.where(first, p, q), params, y)  # y_1 = x_0
        big_g = grad(perturbed, previous)
        g = grad(y, batch)
        d = jax.tree.map(lambda a, b: (1 - lam) * a + lam * b, big_g, g)
        updates, state = base.update(d, state, params)
        return optax.apply_updates(params, updates), state, g

    state = base.init(params)
    g = jax.tree.map(jnp.zeros_like, params)
    trajectory = []
    for t in range(len(batches)):
        lam_t = lam(t) if callable(lam) else lam
        params, state, g = step(params, state, g, *_batches(t, batches), t == 0, lam_t)
        trajectory.append(params)
    return trajectory


def _assert_trees_close(a, b, tol, msg=""):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=msg)


LAMS = {
    "0.2": 0.2,
    "0": 0.0,
    "schedule": optax.linear_schedule(0.0, 1.0, 11),
}


@pytest.mark.parametrize("lam", sorted(LAMS))
@pytest.mark.parametrize("base", sorted(BASES))
def test_matches_the_reference_step_for_step(base, lam):
    params, loss, sample = mlp_problem(jax.random.key(0))
    batches = [sample(k) for k in jax.random.split(jax.random.key(1), 12)]
    rho = 0.1
    tx = samx.sampa(BASES[base](), rho=rho, lam=LAMS[lam])
    ours = _train(tx, params, loss, batches)
    theirs = _reference(BASES[base](), params, loss, batches, rho, LAMS[lam])
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        _assert_trees_close(a, b, 1e-5, f"step {t}")
    # The comparison can fail: SAMPa moved away from the base optimizer.
    plain = _train(samx.sampa(BASES[base](), rho=0.0, lam=0.0), params, loss, batches)
    assert not np.allclose(plain[-1]["layer0"]["w"], ours[-1]["layer0"]["w"], atol=1e-4)


def _first_step(tx, base, params, loss, batch):
    """Step 0 in one jit: the points grad_fn sees, the updates, base's updates."""
    grad = jax.grad(loss)

    @jax.jit
    def run(params):
        seen = {}

        def grad_fn(p, i):
            seen[i] = p
            return grad(p, batch)

        updates, state = tx.update(None, tx.init(params), params, grad_fn=grad_fn)
        expected, _ = base.update(grad(params, batch), base.init(params), params)
        return seen, updates, expected, state.aux_grad

    return run(params)


def test_first_step_evaluates_both_gradients_at_the_parameters():
    params, loss, sample = mlp_problem(jax.random.key(2))
    batch = sample(jax.random.key(3))
    # adamw's dry run would move y through the weight decay even with g = 0.
    base = optax.adamw(1e-2, weight_decay=0.5)
    dry_run, _ = base.update(
        jax.tree.map(jnp.zeros_like, params), base.init(params), params
    )
    assert not np.allclose(dry_run["layer0"]["w"], 0.0)
    tx = samx.sampa(base, rho=0.1, lam=0.2)
    seen, updates, expected, stored = _first_step(tx, base, params, loss, batch)
    assert sorted(seen) == [0, 1]
    _assert_trees_close(seen[0], params, 0.0)  # x~_0 = x_0
    _assert_trees_close(seen[1], params, 0.0)  # y_1 = x_0
    # Both gradients are the gradient at x_0: a plain base step.
    _assert_trees_close(updates, expected, 1e-7)
    _assert_trees_close(stored, jax.grad(loss)(params, batch), 1e-7)


def test_lam_zero_is_not_plain_sgd():
    params, loss, sample = mlp_problem(jax.random.key(4))
    batches = [sample(k) for k in jax.random.split(jax.random.key(5), 4)]
    ours = _train(samx.sampa(optax.sgd(0.1), rho=0.1, lam=0.0), params, loss, batches)
    grad = jax.grad(loss)
    plain = params
    for t, batch in enumerate(batches):
        plain = jax.tree.map(lambda p, g: p - 0.1 * g, plain, grad(plain, batch))
        if t == 0:  # x~_0 = x_0: the first step is an SGD step
            _assert_trees_close(ours[0], plain, 1e-6)
    assert not np.allclose(ours[-1]["layer0"]["w"], plain["layer0"]["w"], atol=1e-4)


def test_evaluation_points_do_not_depend_on_the_incoming_updates():
    params, loss, sample = mlp_problem(jax.random.key(6))
    batches = [sample(k) for k in jax.random.split(jax.random.key(7), 4)]
    tx = samx.sampa(optax.sgd(0.1, momentum=0.9), rho=0.1, lam=0.2)
    grad = jax.grad(loss)

    @jax.jit
    def step(incoming, params, state, previous, batch):
        seen = {}

        def grad_fn(p, i):
            seen[i] = p
            return grad(p, previous if i == 0 else batch)

        updates, state = tx.update(incoming, state, params, grad_fn=grad_fn)
        return seen, optax.apply_updates(params, updates), state

    state = tx.init(params)
    for t in range(3):  # a few steps, so that the stored g is not zero
        _, params, state = step(params, params, state, *_batches(t, batches))
    fresh = grad(params, batches[3])
    other = jax.tree.map(lambda x: -3.0 * x + 1.0, fresh)
    seen_a, params_a, state_a = step(fresh, params, state, *_batches(3, batches))
    seen_b, params_b, state_b = step(other, params, state, *_batches(3, batches))
    for i in (0, 1):
        _assert_trees_close(seen_a[i], seen_b[i], 0.0)
        assert not np.allclose(seen_a[i]["layer0"]["w"], params["layer0"]["w"])
    _assert_trees_close(params_a, params_b, 0.0)
    _assert_trees_close(state_a, state_b, 0.0)


def test_stored_gradient_keeps_the_parameter_dtypes():
    params = {"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.float32)}
    tx = samx.sampa(optax.sgd(0.1))
    state = tx.init(params)

    def grad_fn(p, i):  # float32 gradients for bfloat16 parameters
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)

    updates, new_state = jax.jit(lambda s, p: tx.update(None, s, p, grad_fn=grad_fn))(
        state, params
    )
    dtypes = {"w": jnp.bfloat16, "b": jnp.float32}
    assert jax.tree.map(jnp.result_type, state.aux_grad) == dtypes
    assert jax.tree.map(jnp.result_type, new_state.aux_grad) == dtypes


# The toy of the SAMPa paper (Figure 1): f(x) = ||x||^2 with a decaying step.
# SAM and SAMPa keep going down, at O(eta^2) in ||grad f||^2; the naive
# parallel SAMs stall at O(eta). Each run reports the mean of ||grad f(x)||^2
# over the last _TAIL steps (RandSAM also over 8 seeds: it is noisy).
_DIM, _ETA0, _RHO, _STEPS, _TAIL = 5, 0.05, 0.05, 4000, 1000


def _toy_lr(t):
    return _ETA0 / jnp.sqrt(jnp.asarray(t, jnp.float32) + 1.0)


def _toy_grad(x):
    return 2.0 * x


def _toy_sq(x):
    return jnp.sum(jnp.square(_toy_grad(x)))


def _toy_optax(tx, x0):
    def step(carry, _):
        x, state = carry
        updates, state = tx.update(
            _toy_grad(x), state, x, grad_fn=lambda p, i: _toy_grad(p)
        )
        x = optax.apply_updates(x, updates)
        return (x, state), _toy_sq(x)

    _, history = jax.lax.scan(step, (x0, tx.init(x0)), length=_STEPS)
    return jnp.mean(history[-_TAIL:])


def _rand_sam(x0, key):
    """Perturbs along rho * e / ||e|| with e Gaussian, a new e every step."""

    def step(x, inputs):
        t, k = inputs
        e = jax.random.normal(k, x.shape)
        x = x - _toy_lr(t) * _toy_grad(x + _RHO * e / jnp.linalg.norm(e))
        return x, _toy_sq(x)

    keys = jax.random.split(key, _STEPS)
    _, history = jax.lax.scan(step, x0, (jnp.arange(_STEPS), keys))
    return jnp.mean(history[-_TAIL:])


def _opt_sam(x0):
    """Perturbs along the previous perturbed gradient grad f(x~_{t-1})."""

    def step(carry, t):
        x, previous = carry
        n = jnp.linalg.norm(previous) + 1e-12
        perturbed_grad = _toy_grad(x + _RHO * previous / n)
        x = x - _toy_lr(t) * perturbed_grad
        return (x, perturbed_grad), _toy_sq(x)

    _, history = jax.lax.scan(step, (x0, jnp.zeros_like(x0)), jnp.arange(_STEPS))
    return jnp.mean(history[-_TAIL:])


@jax.jit
def _toy(key):
    k0, k1 = jax.random.split(key)
    x0 = jax.random.normal(k0, (_DIM,))
    rand = jax.vmap(lambda k: _rand_sam(x0, k))(jax.random.split(k1, 8))
    return {
        "sam": _toy_optax(samx.sam(optax.sgd(_toy_lr), _RHO), x0),
        "sampa-0": _toy_optax(samx.sampa(optax.sgd(_toy_lr), _RHO, 0.0), x0),
        "sampa-0.5": _toy_optax(samx.sampa(optax.sgd(_toy_lr), _RHO, 0.5), x0),
        "randsam": jnp.mean(rand),
        "optsam": _opt_sam(x0),
    }


def test_toy_sam_and_sampa_converge_where_naive_parallel_sams_stall():
    result = {k: float(v) for k, v in _toy(jax.random.key(0)).items()}
    converging = max(result["sam"], result["sampa-0"], result["sampa-0.5"])
    stalling = min(result["randsam"], result["optsam"])
    assert stalling >= 100 * converging, result
    assert converging < 1e-6, result


# Bad inputs.


@pytest.mark.parametrize("rho", [-0.1, float("nan"), float("inf")])
def test_rejects_bad_rho(rho):
    with pytest.raises(ValueError, match=re.escape("samx.sampa(rho=...)")):
        samx.sampa(optax.sgd(0.1), rho=rho)


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_rejects_lam_outside_zero_one(lam):
    with pytest.raises(ValueError, match=re.escape("samx.sampa(lam=...)")):
        samx.sampa(optax.sgd(0.1), lam=lam)


def test_a_lam_schedule_that_leaves_zero_one_is_rejected_when_built():
    with pytest.raises(
        ValueError,
        match=r"`samx\.sampa\(lam=\.\.\.\)` at step 1000 .*\[0\.0, 1\.0\], got 2\.",
    ):
        samx.sampa(optax.sgd(0.1), lam=optax.linear_schedule(0.0, 2.0, 1000))
    with pytest.raises(ValueError, match=r"`samx\.sampa\(rho=\.\.\.\)` at step 0"):
        samx.sampa(optax.sgd(0.1), rho=optax.constant_schedule(-0.1))
    samx.sampa(optax.sgd(0.1), lam=optax.linear_schedule(0.0, 1.0, 1000))


def test_accepts_lam_at_the_ends_and_as_an_array():
    for lam in (0.0, 1.0, jnp.asarray(0.5), optax.constant_schedule(0.3)):
        samx.sampa(optax.sgd(0.1), lam=lam)


def test_rejects_a_base_that_is_not_a_transform():
    with pytest.raises(TypeError, match="did you pass the factory"):
        samx.sampa(optax.sgd)
    with pytest.raises(TypeError, match=re.escape("samx.sampa(base=...)")):
        samx.sampa("sgd")


def _one_step(tx, **kwargs):
    params = {"layer": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}}
    return tx.update(None, tx.init(params), params, **kwargs)


def test_missing_grad_fn_says_how_to_pass_it():
    tx = samx.sampa(optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"samx\.sampa: .*grad_fn=lambda p, i"):
        _one_step(tx)


def test_missing_params():
    tx = samx.sampa(optax.sgd(0.1))
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"samx\.sampa: .*`params`"):
        tx.update(None, tx.init(params), None, grad_fn=lambda p, i: p)


@pytest.mark.parametrize("bad", [0, 1])
def test_grad_fn_result_with_a_wrong_structure_names_the_leaf(bad):
    tx = samx.sampa(optax.sgd(0.1))

    def grad_fn(p, i):
        return {"layer": {"b": p["layer"]["b"]}} if i == bad else p

    with pytest.raises(
        ValueError, match=re.escape(f"`grad_fn(_, {bad})`") + r".*\['layer'\]\['w'\]"
    ):
        _one_step(tx, grad_fn=grad_fn)


@pytest.mark.parametrize("bad", [0, 1])
def test_grad_fn_result_with_a_wrong_shape_names_the_leaf(bad):
    tx = samx.sampa(optax.sgd(0.1))

    def grad_fn(p, i):
        if i != bad:
            return p
        return {"layer": {"w": p["layer"]["w"].T, "b": p["layer"]["b"]}}

    with pytest.raises(
        ValueError,
        match=re.escape(f"`grad_fn(_, {bad})` leaf ['layer']['w'] has shape (3, 2)"),
    ):
        _one_step(tx, grad_fn=grad_fn)
