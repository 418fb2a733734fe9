"""samx.microbatched: k micro-batches give the large-batch step, for every transform."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from _testing import count_compilations, mlp_problem

import samx

KS = (1, 2, 4)
STEPS = 4


def _quarter(batch):
    """AsyncSAM's ascent batch: the first quarter of the descent batch."""
    return jax.tree.map(lambda x: x[: x.shape[0] // 4], batch)


def _run(method, grad, params, batches):
    """A trajectory of ``method`` where every gradient comes from ``grad``.

    ``grad(params, batch)`` is either the large-batch gradient or its
    micro-batched version; everything else is the same.
    """
    if method == "adam":
        tx = optax.adam(1e-2)
    elif method == "sam":
        tx = samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    elif method == "async_sam":
        tx = samx.async_sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    else:
        tx = samx.sampa(optax.sgd(0.1, momentum=0.9), rho=0.1, lam=0.2)

    @jax.jit
    def step(params, state, prev, batch):
        if method == "adam":
            updates, state = tx.update(grad(params, batch), state, params)
        elif method == "async_sam":  # the ascent on a quarter of the batch
            updates, state = tx.update(
                grad(params, _quarter(batch)),
                state,
                params,
                grad_fn=lambda p, i: grad(p, batch),
            )
        elif method == "sampa":  # G on the previous batch, g on the current one
            updates, state = tx.update(
                None,
                state,
                params,
                grad_fn=lambda p, i: grad(p, prev if i == 0 else batch),
            )
        else:
            updates, state = tx.update(
                grad(params, batch),
                state,
                params,
                grad_fn=lambda p, i: grad(p, batch),
            )
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    trajectory = []
    for t, batch in enumerate(batches):
        params, state = step(params, state, batches[max(t - 1, 0)], batch)
        trajectory.append(params)
    return trajectory


@pytest.mark.parametrize("method", ["adam", "sam", "async_sam", "sampa"])
def test_microbatches_give_the_large_batch_trajectory(method):
    params, loss, sample = mlp_problem(jax.random.key(0), batch=32)
    batches = [sample(k) for k in jax.random.split(jax.random.key(1), STEPS)]
    grad = jax.grad(loss)
    large = _run(method, grad, params, batches)
    for k in KS:
        small = _run(method, samx.microbatched(grad, k), params, batches)
        for t, (a, b) in enumerate(zip(small, large, strict=True)):
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                np.testing.assert_allclose(
                    x, y, rtol=1e-5, atol=1e-5, err_msg=f"k={k}, step {t}"
                )
    if method == "sam":  # the comparison can fail: another batch, another path
        quarter = _run(method, lambda p, b: grad(p, _quarter(b)), params, batches)
        assert not np.allclose(
            quarter[-1]["layer0"]["w"], large[-1]["layer0"]["w"], atol=1e-4
        )


def test_is_the_mean_over_strided_microbatches():
    # fn sees micro-batches of n / k rows (rows j, j + k, ...); the result is
    # their mean.
    seen = []

    def fn(params, batch):
        seen.append(batch["x"].shape)
        return {"s": params * jnp.max(batch["x"], axis=0)}  # not linear in rows

    x = jnp.arange(24.0).reshape(12, 2)
    out = samx.microbatched(fn, 3)(jnp.float32(2.0), {"x": x})
    maxima = [np.max(np.asarray(x)[j::3], axis=0) for j in range(3)]
    np.testing.assert_allclose(out["s"], 2.0 * np.mean(maxima, axis=0), rtol=1e-6)
    assert set(seen) == {(4, 2)}  # never the whole batch: one micro-batch's memory


@pytest.mark.skipif(
    jax.__version_info__ < (0, 10, 1),
    reason="JAX < 0.10.1 cannot differentiate a matmul over a batch sharded in"
    " Explicit mode without out_sharding (the loss fails, with or without samx)",
)
def test_a_batch_sharded_along_axis_0_stays_sharded():
    # Data parallel over the 8 CPU devices with explicit sharding: each
    # micro-batch is split over all the devices (a contiguous split is refused).
    explicit = (jax.sharding.AxisType.Explicit,)
    mesh = jax.make_mesh((8,), ("data",), axis_types=explicit)
    params, loss, sample = mlp_problem(jax.random.key(9), batch=64)
    batch = sample(jax.random.key(10))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = jax.device_put(batch, spec)
    seen = []

    def grad(p, b):
        seen.append(jax.typeof(b["x"]).sharding.spec)
        return jax.grad(loss)(p, b)

    with jax.set_mesh(mesh):
        out = jax.jit(samx.microbatched(grad, 4))(params, sharded)
    assert seen[-1][0] == "data"  # the micro-batch rows are sharded
    ref = jax.grad(loss)(params, batch)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_one_scan_over_microbatches_in_the_jaxpr():
    params, loss, sample = mlp_problem(jax.random.key(2), batch=16)
    jaxpr = jax.make_jaxpr(samx.microbatched(jax.grad(loss), 4))(
        params, sample(jax.random.key(3))
    )
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 4


def test_value_and_grad_gives_the_mean_loss_and_gradient():
    params, loss, sample = mlp_problem(jax.random.key(4), batch=16)
    batch = sample(jax.random.key(5))
    (value, grads) = samx.microbatched(jax.value_and_grad(loss), 4)(params, batch)
    ref_value, ref_grads = jax.value_and_grad(loss)(params, batch)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_accumulates_in_float32_and_keeps_the_output_dtype():
    # Micro-batch results 1, 0.0029, 0.0029, 0.0029 in bfloat16: summed in
    # bfloat16 every small term is lost (1 + 0.0029 rounds to 1).
    rows = np.array([1.0, 0.0029, 0.0029, 0.0029], ml_dtypes.bfloat16)

    def fn(params, batch):
        return params * batch[0]

    out = samx.microbatched(fn, 4)(jnp.ones((), jnp.bfloat16), jnp.asarray(rows))
    assert out.dtype == jnp.bfloat16
    exact = np.mean(rows.astype(np.float64)).astype(ml_dtypes.bfloat16)
    in_bf16 = rows[0]
    for r in rows[1:]:
        in_bf16 = (in_bf16 + r).astype(ml_dtypes.bfloat16)
    in_bf16 = (in_bf16 / 4).astype(ml_dtypes.bfloat16)
    assert exact != in_bf16  # the test can tell the two apart
    assert out == exact


def test_jitted_with_no_recompilation():
    params, loss, sample = mlp_problem(jax.random.key(6), batch=16)
    grad = samx.microbatched(jax.grad(loss), 4)
    tx = samx.sam(optax.sgd(0.1), rho=0.05)

    @jax.jit
    def step(params, state, batch):
        updates, state = tx.update(
            grad(params, batch), state, params, grad_fn=lambda p, i: grad(p, batch)
        )
        return optax.apply_updates(params, updates), state

    batches = [sample(k) for k in jax.random.split(jax.random.key(7), 4)]
    state = tx.init(params)
    params, state = step(params, state, batches[0])
    with count_compilations() as compiled:
        for batch in batches[1:]:
            params, state = step(params, state, batch)
    assert compiled == []


# Bad inputs.


@pytest.mark.parametrize("k", [0, -2, 2.0, True, "4", None])
def test_rejects_a_bad_number_of_microbatches(k):
    with pytest.raises(
        ValueError,
        match=re.escape("samx.microbatched(num_microbatches=...)` must be an int >= 1"),
    ):
        samx.microbatched(jax.grad(jnp.sum), k)


def test_rejects_a_fn_that_is_not_callable():
    with pytest.raises(TypeError, match=re.escape("samx.microbatched(fn=...)")):
        samx.microbatched("grad", 2)


def test_batch_size_not_divisible_names_both_numbers():
    g = samx.microbatched(lambda p, b: p * jnp.mean(b["x"]), 4)
    with pytest.raises(
        ValueError, match=re.escape("batch size 30 is not divisible by num_micro")
    ) as info:
        g(jnp.float32(1.0), {"x": jnp.ones((30, 2))})
    assert "num_microbatches=4" in str(info.value)


def test_leaves_with_different_leading_sizes_are_named():
    g = samx.microbatched(lambda p, b: p * jnp.mean(b["x"]), 2)
    with pytest.raises(
        ValueError, match=re.escape("leaf ['x'] has 8 and leaf ['y'] has 6")
    ):
        g(jnp.float32(1.0), {"x": jnp.ones((8, 2)), "y": jnp.ones(6)})


def test_a_scalar_leaf_is_named():
    g = samx.microbatched(lambda p, b: p * jnp.mean(b["x"]), 2)
    with pytest.raises(ValueError, match=re.escape("leaf ['t'] is a scalar")):
        g(jnp.float32(1.0), {"x": jnp.ones((8, 2)), "t": jnp.float32(0.5)})


def test_integer_outputs_are_rejected():
    g = samx.microbatched(lambda p, b: {"n": jnp.sum(b, dtype=jnp.int32)}, 2)
    with pytest.raises(TypeError, match=re.escape("leaf ['n'] has dtype int32")):
        g(jnp.float32(1.0), jnp.ones(4, jnp.int32))
