"""Non-finite gradients: the stored-gradient policy, samx.skip_nonfinite."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _testing import mlp_loss as _mlp_loss
from _testing import mlp_problem

import samx
import samx.runtime

BAD = 2  # the step with the non-finite gradient
STEPS = 5


def _problem(seed):
    params, loss, sample = mlp_problem(jax.random.key(seed), batch=16)
    batches = [sample(k) for k in jax.random.split(jax.random.key(seed + 1), STEPS)]
    return params, jax.grad(loss), batches


def _quarter(batch):
    return jax.tree.map(lambda x: x[: x.shape[0] // 4], batch)


def _poison(tree, bad, value):
    """``tree`` with ``value`` in one entry of one leaf when ``bad``."""
    leaves, treedef = jax.tree.flatten(tree)
    last = leaves[-1]
    leaves[-1] = last.at[(0,) * last.ndim].set(jnp.where(bad, value, last.ravel()[0]))
    return jax.tree.unflatten(treedef, leaves)


def _assert_trees_close(a, b, tol, msg=""):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=msg)


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# --- AsyncSAM: a non-finite ascent gradient gives a zero perturbation ---------


def _async_reference(base, params, grad, batches, rho, bad_step):
    """AsyncSAM as ALGORITHMS.md writes it; step ``bad_step + 1`` unperturbed."""

    @jax.jit
    def step(params, state, previous, batch, bad):
        ascent = grad(params, _quarter(batch))
        norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(previous)))
        perturbed = jax.tree.map(
            lambda p, x: p + rho * x / (norm + 1e-12), params, previous
        )
        updates, state = base.update(grad(perturbed, batch), state, params)
        ascent = jax.tree.map(lambda a: jnp.where(bad, 0.0, a), ascent)
        return optax.apply_updates(params, updates), state, ascent

    state = base.init(params)
    previous = jax.tree.map(jnp.zeros_like, params)
    trajectory = []
    for t, batch in enumerate(batches):
        params, state, previous = step(params, state, previous, batch, t == bad_step)
        trajectory.append(params)
    return trajectory


def test_async_sam_nan_ascent_does_not_poison_the_state():
    params, grad, batches = _problem(0)
    rho = 0.05
    tx = samx.async_sam(optax.sgd(0.1, momentum=0.9), rho=rho)

    @jax.jit
    def step(params, state, batch, bad):
        ascent = _poison(grad(params, _quarter(batch)), bad, jnp.nan)
        updates, state = tx.update(
            ascent, state, params, grad_fn=lambda p, i: grad(p, batch)
        )
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    ours = []
    for t, batch in enumerate(batches):
        params, state = step(params, state, batch, t == BAD)
        ours.append(params)
    assert _all_finite(ours) and _all_finite(state)
    base = optax.sgd(0.1, momentum=0.9)
    start = _problem(0)[0]
    theirs = _async_reference(base, start, grad, batches, rho, BAD)
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        _assert_trees_close(a, b, 1e-5, f"step {t}")
    # The comparison can fail: with a_BAD kept, step BAD + 1 is not a plain step.
    kept = _async_reference(base, start, grad, batches, rho, bad_step=-1)
    assert not np.allclose(kept[BAD + 1]["layer0"]["w"], ours[BAD + 1]["layer0"]["w"])


def test_async_sam_stored_gradient_that_overflows_its_dtype_gives_no_perturbation():
    # 1e6 is finite in float32 and infinite in float16.
    params = {"w": jnp.ones(3, jnp.float16), "b": jnp.ones(2, jnp.float32)}
    tx = samx.async_sam(optax.sgd(0.1), rho=0.05)
    big = {"w": jnp.full(3, 1e6, jnp.float32), "b": jnp.ones(2, jnp.float32)}
    _, state = tx.update(big, tx.init(params), params, grad_fn=lambda p, i: p)
    assert state.ascent_grad["w"].dtype == jnp.float16
    points = []

    def grad_fn(p, i):
        points.append(p)
        return jax.tree.map(jnp.ones_like, p)

    ones = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(ones, state, params, grad_fn=grad_fn)
    _assert_trees_close(points[0], params, 0.0)  # the next step is unperturbed
    assert _all_finite(state)  # and stores the fresh gradient


# --- SAMPa: a non-finite auxiliary gradient is left out, then not used --------


def _sampa_reference(base, params, grad, batches, rho, lam, bad_step):
    """SAMPa as ALGORITHMS.md writes it, with the non-finite policy written out.

    At ``bad_step`` one entry of g_{t+1} is NaN (as the test poisons it): that
    entry is left out of d; the next step, whose stored g is not finite, has
    no perturbation, and y = x in the entries where the dry run is not finite.
    """

    @jax.jit
    def step(params, state, g, previous, batch, first, bad):
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g)]))
        norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
        perturbed = jax.tree.map(
            lambda p, x: jnp.where(ok, p + rho * x / (norm + 1e-12), p), params, g
        )
        dry_run, _ = base.update(g, state, params)
        y = optax.apply_updates(params, dry_run)
        y = jax.tree.map(lambda p, q: jnp.where(first | jnp.isnan(q), p, q), params, y)
        big_g = grad(perturbed, previous)
        g = _poison(grad(y, batch), bad, jnp.nan)
        d = jax.tree.map(
            lambda a, b: (1 - lam) * a + lam * jnp.where(jnp.isnan(b), 0.0, b),
            big_g,
            g,
        )
        updates, state = base.update(d, state, params)
        return optax.apply_updates(params, updates), state, g

    state = base.init(params)
    g = jax.tree.map(jnp.zeros_like, params)
    trajectory = []
    for t, batch in enumerate(batches):
        previous = batches[max(t - 1, 0)]
        params, state, g = step(
            params, state, g, previous, batch, t == 0, t == bad_step
        )
        trajectory.append(params)
    return trajectory


def _sampa_run(tx, start, grad, batches, bad_step):
    """Jitted SAMPa steps; one entry of ``grad_fn(_, 1)`` is NaN at ``bad_step``."""

    @jax.jit
    def step(params, state, previous, batch, bad):
        def grad_fn(p, i):
            if i == 0:
                return grad(p, previous)
            return _poison(grad(p, batch), bad, jnp.nan)

        updates, state = tx.update(None, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    params, state = start, tx.init(start)
    trajectory, states = [], [state]
    for t, batch in enumerate(batches):
        previous = batches[max(t - 1, 0)]
        params, state = step(params, state, previous, batch, t == bad_step)
        trajectory.append(params)
        states.append(state)
    return trajectory, states


@pytest.mark.parametrize("lam", [0.2, 0.0])
def test_sampa_nan_auxiliary_gradient_recovers(lam):
    start, grad, batches = _problem(2)
    rho = 0.1
    tx = samx.sampa(optax.sgd(0.1, momentum=0.9), rho=rho, lam=lam)
    ours, states = _sampa_run(tx, start, grad, batches, BAD)
    state = states[-1]
    assert _all_finite(ours) and _all_finite(state)
    base = optax.sgd(0.1, momentum=0.9)
    theirs = _sampa_reference(base, start, grad, batches, rho, lam, BAD)
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        _assert_trees_close(a, b, 1e-5, f"step {t}")
    # The comparison can fail: a normal run goes elsewhere after BAD.
    normal = _sampa_reference(base, start, grad, batches, rho, lam, bad_step=-1)
    assert not np.allclose(normal[BAD + 1]["layer0"]["w"], ours[BAD + 1]["layer0"]["w"])


# --- samx.skip_nonfinite --------------------------------------------------------


def _run(tx, start, grad, batches, bad_step, nan_in="descent", ascent=None):
    """A jitted trajectory; at ``bad_step`` one entry of a gradient is NaN."""
    ascent = ascent or (lambda b: b)

    @jax.jit
    def step(params, state, batch, bad):
        grads = grad(params, ascent(batch))
        if nan_in == "input":
            grads = _poison(grads, bad, jnp.nan)

        def grad_fn(p, i):
            d = grad(p, batch)
            return _poison(d, bad, jnp.nan) if nan_in == "descent" else d

        updates, new_state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), new_state, updates

    params, state = start, tx.init(start)
    trajectory, states, updates = [], [state], []
    for t, batch in enumerate(batches):
        params, state, u = step(params, state, batch, t == bad_step)
        trajectory.append(params)
        states.append(state)
        updates.append(u)
    return trajectory, states, updates


def test_skip_nonfinite_skips_a_nan_descent_gradient_with_a_finite_input():
    start, grad, batches = _problem(4)
    inner = samx.sam(optax.adam(1e-2), rho=0.05)
    tx = samx.skip_nonfinite(inner)
    ours, states, updates = _run(tx, start, grad, batches, BAD)
    # The bad step: zero updates, params unchanged, inner state unchanged.
    assert all(np.all(u == 0) for u in jax.tree.leaves(updates[BAD]))
    _assert_trees_close(ours[BAD], ours[BAD - 1], 0.0)
    _assert_trees_close(states[BAD + 1].inner_state, states[BAD].inner_state, 0.0)
    counters = [(int(s.notfinite_count), int(s.total_notfinite)) for s in states]
    assert counters == [(0, 0), (0, 0), (0, 0), (1, 1), (0, 1), (0, 1)]
    for s in states[1:]:
        assert s.notfinite_count.dtype == s.total_notfinite.dtype == jnp.int32
    # ... and training goes on as if the bad batch had not been there.
    good = [b for t, b in enumerate(batches) if t != BAD]
    plain, _, _ = _run(inner, start, grad, good, bad_step=-1)
    _assert_trees_close(ours[-1], plain[-1], 1e-6)
    # The input gradient was finite: optax.apply_if_finite would not have helped.
    unguarded, _, _ = _run(inner, start, grad, batches, BAD)
    assert not _all_finite(unguarded[BAD])


def test_skip_nonfinite_skips_a_step_whose_new_state_is_not_finite():
    # A transform with finite updates but a non-finite state.
    def update(updates, state, params=None):
        return jax.tree.map(jnp.zeros_like, updates), {"s": state["s"] / updates}

    inner = optax.GradientTransformation(lambda p: {"s": jnp.ones_like(p)}, update)
    tx = samx.skip_nonfinite(inner)
    params = jnp.ones(2)
    state = tx.init(params)
    _, state = tx.update(jnp.array([1.0, 0.0]), state, params)  # 1 / 0 = inf
    np.testing.assert_array_equal(state.inner_state["s"], [1.0, 1.0])
    assert int(state.notfinite_count) == 1
    _, state = tx.update(jnp.array([2.0, 4.0]), state, params)
    np.testing.assert_array_equal(state.inner_state["s"], [0.5, 0.25])
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 1


def test_skip_nonfinite_uses_no_cond_and_keeps_dtypes_under_strict_promotion():
    params = {"w": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.ones(2, jnp.float32)}
    tx = samx.skip_nonfinite(samx.async_sam(optax.sgd(0.1), rho=jnp.float32(0.05)))
    state = tx.init(params)

    def update(state, params):
        return tx.update(params, state, params, grad_fn=lambda q, i: q)

    with jax.numpy_dtype_promotion("strict"):
        updates, new_state = jax.jit(update)(state, params)
        jaxpr = str(jax.make_jaxpr(update)(state, params))
    dtypes = lambda t: jax.tree.map(jnp.result_type, t)  # noqa: E731
    assert dtypes(updates) == dtypes(params)
    assert dtypes(new_state) == dtypes(state)
    assert "cond[" not in jaxpr
    # The check can fail: optax.apply_if_finite does use lax.cond.
    other = optax.apply_if_finite(optax.sgd(0.1), 2)
    assert "cond[" in str(
        jax.make_jaxpr(lambda s, p: other.update(p, s, p))(other.init(params), params)
    )


COMPOSED = {
    "chain-outside": (
        lambda: optax.chain(
            optax.clip_by_global_norm(1.0),
            samx.skip_nonfinite(samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)),
        ),
        lambda: optax.chain(
            optax.clip_by_global_norm(1.0),
            samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05),
        ),
        lambda s: s[1],
    ),
    "chain-inside": (
        lambda: samx.skip_nonfinite(
            optax.chain(
                samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05),
                optax.clip_by_global_norm(0.05),
            )
        ),
        lambda: optax.chain(
            samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05),
            optax.clip_by_global_norm(0.05),
        ),
        lambda s: s,
    ),
    "inject-inside": (
        lambda: samx.skip_nonfinite(
            optax.inject_hyperparams(samx.sam)(optax.adam(1e-2), rho=0.05)
        ),
        lambda: optax.inject_hyperparams(samx.sam)(optax.adam(1e-2), rho=0.05),
        lambda s: s,
    ),
    "inject-outside": (
        lambda: optax.inject_hyperparams(
            lambda rho: samx.skip_nonfinite(samx.sam(optax.adam(1e-2), rho=rho))
        )(rho=0.05),
        lambda: optax.inject_hyperparams(
            lambda rho: samx.sam(optax.adam(1e-2), rho=rho)
        )(rho=0.05),
        lambda s: s.inner_state,
    ),
}


@pytest.mark.parametrize("name", sorted(COMPOSED))
def test_skip_nonfinite_composes(name):
    guarded, plain, skip_state = COMPOSED[name]
    start, grad, batches = _problem(6)
    batches = batches[:4]
    ours, states, _ = _run(guarded(), start, grad, batches, BAD)
    _assert_trees_close(ours[BAD], ours[BAD - 1], 0.0)
    assert int(skip_state(states[BAD + 1]).notfinite_count) == 1
    assert int(skip_state(states[-1]).total_notfinite) == 1
    good = [b for t, b in enumerate(batches) if t != BAD]
    theirs, _, _ = _run(plain(), start, grad, good, bad_step=-1)
    _assert_trees_close(ours[-1], theirs[-1], 1e-6)


# A non-finite *stored* gradient alone does not make skip_nonfinite skip: the
# transforms neutralise it at the next step, which has no perturbation.


def test_skip_nonfinite_applies_an_async_sam_step_whose_stored_gradient_is_nan():
    start, grad, batches = _problem(0)
    rho = 0.05
    base = optax.sgd(0.1, momentum=0.9)
    tx = samx.skip_nonfinite(samx.async_sam(base, rho=rho))
    ours, states, updates = _run(
        tx, start, grad, batches, BAD, nan_in="input", ascent=_quarter
    )
    # Nothing skipped: the bad step's descent is applied, and the next step is
    # a plain step (the reference zeroes a_BAD, as the policy says).
    assert [int(s.total_notfinite) for s in states] == [0] * (STEPS + 1)
    theirs = _async_reference(base, start, grad, batches, rho, BAD)
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        _assert_trees_close(a, b, 1e-5, f"step {t}")
    assert not _all_finite(states[BAD + 1].inner_state.ascent_grad)  # stored ...
    assert _all_finite(states[BAD + 2].inner_state)  # ... and replaced
    # The comparison can fail: skipping the bad step goes elsewhere.
    assert not np.allclose(ours[BAD]["layer0"]["w"], ours[BAD - 1]["layer0"]["w"])


def test_skip_nonfinite_applies_a_sampa_step_whose_stored_gradient_is_nan():
    start, grad, batches = _problem(2)
    rho, lam = 0.1, 0.2
    base = optax.sgd(0.1, momentum=0.9)
    tx = samx.skip_nonfinite(samx.sampa(base, rho=rho, lam=lam))
    ours, states = _sampa_run(tx, start, grad, batches, BAD)
    assert [int(s.total_notfinite) for s in states] == [0] * (STEPS + 1)
    theirs = _sampa_reference(base, start, grad, batches, rho, lam, BAD)
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        _assert_trees_close(a, b, 1e-5, f"step {t}")
    assert not _all_finite(states[BAD + 1].inner_state.aux_grad)
    assert not np.allclose(ours[BAD]["layer0"]["w"], ours[BAD - 1]["layer0"]["w"])


def test_skip_nonfinite_still_skips_when_the_stored_gradient_comes_with_a_bad_step():
    # A corrupt batch that spoils the descent too: skipped, old state kept but
    # the stored gradient, the step's own (here NaN: the next step is then
    # unperturbed, by AsyncSAM's own rule).
    start, grad, batches = _problem(4)
    tx = samx.skip_nonfinite(samx.async_sam(optax.sgd(0.1), rho=0.05))

    @jax.jit
    def step(params, state, batch, bad):
        def nan_if_bad(g):
            return jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), g)

        updates, new_state = tx.update(
            nan_if_bad(grad(params, _quarter(batch))),
            state,
            params,
            grad_fn=lambda p, i: nan_if_bad(grad(p, batch)),
        )
        return optax.apply_updates(params, updates), new_state

    params, state = start, tx.init(start)
    for t, batch in enumerate(batches[: BAD + 1]):
        before = state
        params, state = step(params, state, batch, t == BAD)
    assert int(state.total_notfinite) == 1
    _assert_trees_close(
        state.inner_state._replace(ascent_grad=None),
        before.inner_state._replace(ascent_grad=None),
        0.0,
    )
    assert all(
        np.isnan(x).all() for x in jax.tree.leaves(state.inner_state.ascent_grad)
    )


@pytest.mark.parametrize("wrapper", ["apply_if_finite", "skip_nonfinite"])
def test_a_nan_batch_in_the_paired_loop(wrapper):
    """The issue's run: one NaN batch, AsyncSAM in the paired loop.

    The bad batch returns as the descent batch one step later.
    ``optax.apply_if_finite`` only saw the input gradient there (its counter
    said 2 skips, the parameters became NaN): it is refused, naming
    ``samx.skip_nonfinite``, which skips both steps the bad batch touches and
    ends finite.
    """
    start, grad, batches = _problem(8)
    batches = list(batches)
    batches[BAD] = jax.tree.map(lambda x: x.at[0].set(jnp.nan), batches[BAD])
    inner = samx.async_sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    if wrapper == "apply_if_finite":
        tx = optax.apply_if_finite(inner, max_consecutive_errors=3)
    else:
        tx = samx.skip_nonfinite(inner)

    @jax.jit
    def step(params, state, batch, prev):  # the paired loop of docs/choosing.md
        updates, state = tx.update(
            grad(params, _quarter(batch)),
            state,
            params,
            grad_fn=lambda p, i: grad(p, prev),
            ascent_fraction=0.25,
        )
        return optax.apply_updates(params, updates), state

    params, state, prev = start, tx.init(start), batches[0]
    if wrapper == "apply_if_finite":
        with pytest.raises(ValueError, match=re.escape("samx.skip_nonfinite(tx)")):
            step(params, state, batches[1], prev)
        return
    for batch in batches[1:]:
        params, state = step(params, state, batch, prev)
        prev = batch
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))
    assert int(state.total_notfinite) == 1  # the step whose descent saw it


def test_skip_nonfinite_rejects_what_is_not_a_transform():
    with pytest.raises(TypeError, match=re.escape("samx.skip_nonfinite(inner=...)")):
        samx.skip_nonfinite(samx.sam)
    with pytest.raises(TypeError, match=re.escape("samx.skip_nonfinite(inner=...)")):
        samx.skip_nonfinite("sam")


# --- After a skipped step, the perturbation is paired with the kept batch -----


def _overflowing(batches, step, ascent):
    """``batches`` with ``y = inf`` in the examples of ``batches[step]`` past
    the first ``ascent``: its ascent gradient is finite, a descent on the
    whole batch is not."""
    batches = [jax.tree.map(np.array, b) for b in batches]
    batches[step]["y"][ascent:] = np.inf
    return batches


def _paired_async_sam_with_skips(base, params, grad, batches, rho, ascent):
    """Paired AsyncSAM (ALGORITHMS.md, ``rho_scaling="none"``) under the
    skip rule, written out: a step whose update is not finite leaves the
    parameters and the base state as they were and stores its own ascent
    gradient, computed at those parameters on the current batch, which the
    next step's descent (on that batch, kept as the previous one) is perturbed
    along."""

    @jax.jit
    def step(params, state, stored, prev, batch):
        a = grad(params, jax.tree.map(lambda x: x[:ascent], batch))
        norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(stored)))
        point = jax.tree.map(lambda p, g: p + rho * g / (norm + 1e-12), params, stored)
        updates, new_state = base.update(grad(point, prev), state, params)
        leaves = jax.tree.leaves((updates, new_state))
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        params = jax.tree.map(keep, optax.apply_updates(params, updates), params)
        return params, jax.tree.map(keep, new_state, state), a, ok

    state, stored = base.init(params), jax.tree.map(jnp.zeros_like, params)
    prev, skips = batches[0], 0
    for batch in batches:
        params, state, stored, ok = step(params, state, stored, prev, batch)
        prev, skips = batch, skips + (not bool(ok))
    return params, skips


def test_after_a_skipped_step_async_sam_stays_paired():
    # The descent on batch 2 overflows at step 3 and is skipped; step 4's
    # descent runs on batch 3, the batch the Trainer keeps: its perturbation
    # must come from batch 3 (the skipped step's own ascent), not from batch 2
    # (the old state's), which step 4 never sees.
    params, grad, batches = _problem(3)
    ascent, rho = 4, 0.5
    batches = _overflowing(batches, BAD, ascent)
    base = optax.sgd(0.1, momentum=0.9)
    tx = samx.skip_nonfinite(samx.async_sam(base, rho=rho, rho_scaling="none"))
    trainer = samx.runtime.Trainer(tx, _mlp_loss, ascent_batch_size=ascent)
    state = trainer.init(params)
    for batch in batches:
        state, _ = trainer.step(state, batch)
    expected, skips = _paired_async_sam_with_skips(
        base, params, grad, batches, rho, ascent
    )
    assert skips == int(state.opt_state.total_notfinite) == 1
    _assert_trees_close(state.params, expected, 1e-5)


def test_after_a_skipped_step_sampa_stores_the_current_batch_gradient():
    # SAMPa: batch 2 spoils its auxiliary gradient at step 2 (left out of the
    # descent) and the descent on it at step 3 (skipped). The skipped step
    # keeps the parameters and stores the gradient at them on batch 3 (its
    # auxiliary point falls back to the parameters where the dry run along the
    # non-finite stored gradient is not finite): the next step's perturbation
    # comes from batch 3, the one its descent sees.
    params, grad, batches = _problem(4)
    batches = _overflowing(batches, BAD, 0)
    tx = samx.skip_nonfinite(samx.sampa(optax.sgd(0.1), rho=0.1, lam=0.5))
    trainer = samx.runtime.Trainer(tx, _mlp_loss)
    state = trainer.init(params)
    for batch in batches[: BAD + 1]:
        state, _ = trainer.step(state, batch)
    before = jax.tree.map(np.array, state.params)
    state, _ = trainer.step(state, batches[BAD + 1])
    assert int(state.opt_state.total_notfinite) == 1
    _assert_trees_close(state.params, before, 0.0)
    _assert_trees_close(
        state.opt_state.inner_state.aux_grad, grad(before, batches[BAD + 1]), 1e-6
    )
