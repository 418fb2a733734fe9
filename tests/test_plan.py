"""The evaluation plan, and the example loop that follows it.

The example loop (``samx.examples.train.make_step``, the main job's step) is
checked against AsyncSAM and SAMPa written out from ALGORITHMS.md with the
batches of each pairing, and against the plain base optimizer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _testing import async_sam_reference, mlp_problem, plain_trajectory

import samx
from samx.examples import train

BATCH, STEPS = 32, 12


def _batches(sample, n=STEPS):
    return [sample(k) for k in jax.random.split(jax.random.key(1), n)]


def _example_loop(method, params, loss, batches):
    """The example step under ``lax.scan``, as the main job runs it."""
    tx = method.wrap(train.base_optimizer(0.05, 100))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)

    @jax.jit
    def run(params):
        carry = (params, tx.init(params), batches[0])

        def step(carry, batch):
            carry, _ = train.make_step(method, loss, tx)(carry, batch)
            return carry, carry[0]

        return jax.lax.scan(step, carry, stacked)[1]

    out = run(params)
    return [jax.tree.map(lambda x, t=t: x[t], out) for t in range(len(batches))]


def _assert_close(got, want, msg=""):
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(
                x, y, rtol=1e-5, atol=1e-5, err_msg=f"{msg} step {t}"
            )


@pytest.mark.parametrize(
    "name, pairing, ascent, scaling",
    [
        ("async_sam", "paired", BATCH // 4, "sqrt"),
        ("async_sam_b", "paired", BATCH, "sqrt"),
        ("async_sam_unscaled", "paired", BATCH // 4, "none"),
        ("async_sam_unpaired", "unpaired", BATCH // 4, "sqrt"),
        ("async_sam_b_unpaired", "unpaired", BATCH, "sqrt"),
    ],
)
def test_example_loop_async_sam_equals_the_hand_written_reference(
    name, pairing, ascent, scaling
):
    params, loss, sample = mlp_problem(jax.random.key(0), batch=BATCH)
    batches = _batches(sample)
    method = train.ALL[name]
    got = _example_loop(method, params, loss, batches)
    want = async_sam_reference(
        train.base_optimizer(0.05, 100),
        params,
        loss,
        batches,
        rho=train.SAM_RHO,
        ascent=ascent,
        pairing=pairing,
        scaling=scaling,
    )
    _assert_close(got, want, name)


def _sam_reference(params, loss, batches, *, rho, ascent, every, lr=0.05):
    """SAM written out, its ascent on the first ``ascent`` examples, taken at
    the steps ``t % every == 0`` (plain steps between); the example loop's
    base: coupled decay 5e-4, SGD momentum 0.9, cosine from ``lr`` over 100."""
    grad = jax.grad(loss)
    schedule = optax.cosine_decay_schedule(lr, 100)

    @jax.jit
    def step(params, m, t, batch):
        g = grad(params, jax.tree.map(lambda x: x[:ascent], batch))
        norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
        point = jax.tree.map(lambda p, v: p + rho * v / (norm + 1e-12), params, g)
        d = jax.lax.cond(
            t % every == 0, lambda: grad(point, batch), lambda: grad(params, batch)
        )
        d = jax.tree.map(lambda v, p: v + 5e-4 * p, d, params)
        m = jax.tree.map(lambda a, v: 0.9 * a + v, m, d)
        params = jax.tree.map(lambda p, a: p - schedule(t) * a, params, m)
        return params, m

    m, out = jax.tree.map(jnp.zeros_like, params), []
    for t, batch in enumerate(batches):
        params, m = step(params, m, t, batch)
        out.append(params)
    return out


@pytest.mark.parametrize("ascent_subset, every", [(True, 1), (False, 2), (False, 3)])
def test_example_loop_sam_comparators_equal_the_hand_written_reference(
    ascent_subset, every
):
    params, loss, sample = mlp_problem(jax.random.key(0), batch=BATCH)
    batches = _batches(sample)
    method = train.Method(
        "c",
        "comparator",
        lambda base: samx.sam(base, train.SAM_RHO),
        2,
        ascent_fraction=0.25 if ascent_subset else 1.0,
        ascent_subset=ascent_subset,
        every=every,
    )
    got = _example_loop(method, params, loss, batches)
    ascent = BATCH // 4 if ascent_subset else BATCH
    want = _sam_reference(
        params, loss, batches, rho=train.SAM_RHO, ascent=ascent, every=every
    )
    _assert_close(got, want, f"subset={ascent_subset} every={every}")


def _sampa_reference(base, params, loss, batches, rho, lam):
    """SAMPa as ALGORITHMS.md writes it (y from a dry run of ``base``), paired."""
    grad = jax.grad(loss)

    @jax.jit
    def step(params, state, g, first, prev, batch):
        norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
        tilde = jax.tree.map(lambda p, v: p + rho * v / (norm + 1e-12), params, g)
        dry, _ = base.update(g, state, params)
        y = jax.tree.map(
            lambda p, u: jnp.where(first, p, p + u), params, dry
        )  # y_1 := x_0
        big_g, g_next = grad(tilde, prev), grad(y, batch)
        d = jax.tree.map(lambda a, b: (1 - lam) * a + lam * b, big_g, g_next)
        updates, state = base.update(d, state, params)
        return optax.apply_updates(params, updates), state, g_next

    state, g = base.init(params), jax.tree.map(jnp.zeros_like, params)
    out, prev = [], batches[0]
    for t, batch in enumerate(batches):
        params, state, g = step(params, state, g, t == 0, prev, batch)
        prev = batch
        out.append(params)
    return out


@pytest.mark.parametrize("name", ["sampa", "sampa_fused"])
def test_example_loop_sampa_equals_the_hand_written_reference(name):
    params, loss, sample = mlp_problem(jax.random.key(0), batch=BATCH)
    batches = _batches(sample)
    got = _example_loop(train.ALL[name], params, loss, batches)
    want = _sampa_reference(
        train.base_optimizer(0.05, 100),
        params,
        loss,
        batches,
        train.SAM_RHO,
        train.SAMPA_LAM,
    )
    _assert_close(got, want, name)


def test_example_loop_sgd_is_the_base_optimizer():
    params, loss, sample = mlp_problem(jax.random.key(0), batch=BATCH)
    batches = _batches(sample)
    got = _example_loop(train.ALL["sgd"], params, loss, batches)
    want = plain_trajectory(train.base_optimizer(0.05, 100), params, loss, batches)
    _assert_close(got, want, "sgd")


# --- the plan as data -------------------------------------------------------------


def _plan(tx, **kwargs):
    return samx.evaluation_plan(tx.init({"w": jnp.zeros(2)}), **kwargs)


def _table(plan):
    return [(e.index, e.batch, e.device, e.keeps_state) for e in plan.evaluations]


def test_the_plans_are_the_documented_table():
    base = optax.sgd(0.1)
    assert _table(_plan(base)) == [(None, "current", "descent", True)]
    assert _table(_plan(samx.sam(base))) == [
        (None, "current", "descent", False),
        (0, "current", "descent", True),
    ]
    assert _table(_plan(samx.async_sam(base))) == [
        (None, "ascent", "ascent", False),
        (0, "previous", "descent", True),
    ]
    assert _table(_plan(samx.sampa(base))) == [
        (0, "previous", "descent", True),
        (1, "current", "ascent", False),
    ]
    assert _table(_plan(samx.async_sam(base), pairing="unpaired"))[1] == (
        0,
        "current",
        "descent",
        True,
    )
    assert _table(_plan(samx.sampa(base), pairing="unpaired"))[0] == (
        0,
        "current",
        "descent",
        True,
    )
    # Through a chain and injected hyperparameters; SAM is sequential.
    wrapped = optax.chain(optax.clip(1.0), optax.inject_hyperparams(samx.sam)(base))
    plan = _plan(wrapped)
    assert (plan.method, plan.perturbation, plan.parallel) == ("sam", "fresh", False)
    assert _plan(samx.async_sam(base)).ascent_placement == "host"
    assert _plan(samx.sampa(base)).ascent_placement == "peer"


def test_a_convention_for_another_library_and_bad_arguments():
    sam = optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.05), opaque_mode=True)
    assert _plan(sam).method == "plain"
    assert _plan(sam, method="sam").method == "sam"
    with pytest.raises(ValueError, match=r"evaluation_plan\(method=\.\.\.\)"):
        _plan(sam, method="adam")
    with pytest.raises(ValueError, match=r"evaluation_plan\(pairing=\.\.\.\)"):
        _plan(samx.async_sam(optax.sgd(0.1)), pairing="lagged")
