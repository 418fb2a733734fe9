"""Data parallel on a mesh: the one-device trajectory, and m-sharpness."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _testing import m_sharpness_reference, mlp_problem, pure_step
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import samx
from samx.runtime import Trainer, make_data_parallel_step

DEVICES = jax.devices("cpu")[:8]
MESH = Mesh(np.array(DEVICES), ("data",))
MESH_4x2 = Mesh(np.array(DEVICES).reshape(4, 2), ("data", "model"))
BATCH, ASCENT, STEPS = 32, 8, 3

TRANSFORMS = {
    "sam": lambda: samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05),
    "asam": lambda: samx.sam(optax.sgd(0.1), rho=0.5, adaptive=True),
    "async_sam": lambda: samx.async_sam(optax.sgd(0.1, momentum=0.9), rho=0.05),
    "sampa": lambda: samx.sampa(optax.adam(1e-2), rho=0.1, lam=0.2),
    "plain": lambda: optax.adam(1e-2),
}


def _problem(steps=STEPS):
    params, loss, sample = mlp_problem(jax.random.key(0), batch=BATCH)
    batches = [
        jax.tree.map(np.asarray, sample(k))
        for k in jax.random.split(jax.random.key(1), steps)
    ]
    return params, loss, batches


def _method(name):
    return "sam" if name == "asam" else name


def _make_step(tx, method, loss, out_shardings):
    """The pure transform in a jitted step, as a user writes it (no samx runtime)."""
    return jax.jit(pure_step(tx, method, loss, ASCENT), out_shardings=out_shardings)


def _trajectory(tx, method, loss, params, batches, put_params, put_batch):
    params = put_params(params)
    state = jax.jit(tx.init)(params)
    # (jit leaves the outputs that ignore its inputs, e.g. a step count, on
    # one device: replicate them where the parameters are.)
    first = jax.tree.leaves(params)[0].sharding
    if isinstance(first, NamedSharding):
        every = NamedSharding(first.mesh, P())
        state = jax.tree.map(
            lambda x: (
                x if x.devices() == first.device_set else jax.device_put(x, every)
            ),
            state,
        )
    # Pinned to the shardings the state starts with: XLA's propagation alone
    # may, e.g., split a bias along "model".
    step = _make_step(
        tx, method, loss, jax.tree.map(lambda x: x.sharding, (params, state))
    )
    out, prev = [], put_batch(batches[0])
    for batch in batches:
        batch = put_batch(batch)
        params, state = step(params, state, prev, batch)
        prev = batch
        out.append((params, state))
    return out


_EXPECTED = {}


def _expected(name, steps=STEPS):
    """The one-device trajectory of ``name``, computed once per module."""
    if (name, steps) not in _EXPECTED:
        params, loss, batches = _problem(steps)
        _EXPECTED[name, steps] = _trajectory(
            TRANSFORMS[name](),
            _method(name),
            loss,
            params,
            batches,
            _one_device,
            _one_device,
        )
    return _EXPECTED[name, steps]


def _assert_close(a, b, msg=""):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=msg)


def _same_sharding(x, sharding):
    return x.sharding.is_equivalent_to(sharding, x.ndim)


def _one_device(tree):
    return jax.device_put(tree, DEVICES[0])


# --- 1. the transforms, unchanged, on a mesh ------------------------------------


@pytest.mark.parametrize("name", ["sam", "async_sam", "sampa", "plain"])
def test_batch_sharded_step_equals_the_one_device_step(name):
    params, loss, batches = _problem()
    method = _method(name)
    expected = _expected(name)
    every = NamedSharding(MESH, P())
    split = NamedSharding(MESH, P("data"))
    got = _trajectory(
        TRANSFORMS[name](),
        method,
        loss,
        params,
        batches,
        lambda t: jax.device_put(t, every),
        lambda t: jax.device_put(t, split),
    )
    for t, ((p, s), (q, r)) in enumerate(zip(got, expected, strict=True)):
        _assert_close((p, s), (q, r), f"step {t}")
        for x in jax.tree.leaves((p, s)):
            assert _same_sharding(x, every), x.sharding


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_model_sharded_weights_keep_the_true_global_norm(name):
    # A weight matrix split along "model": the perturbation's norm must still be
    # the norm over every device's piece, or the trajectory would differ.
    params, loss, batches = _problem()
    method = _method(name)
    specs = jax.tree.map(lambda _: P(), params)
    specs["layer0"]["w"] = P(None, "model")
    specs["layer1"]["w"] = P("model", None)
    shardings = jax.tree.map(lambda s: NamedSharding(MESH_4x2, s), specs)
    expected = _expected(name)
    got = _trajectory(
        TRANSFORMS[name](),
        method,
        loss,
        params,
        batches,
        lambda t: jax.device_put(t, shardings),
        lambda t: jax.device_put(t, NamedSharding(MESH_4x2, P("data"))),
    )
    for t, ((p, s), (q, r)) in enumerate(zip(got, expected, strict=True)):
        _assert_close((p, s), (q, r), f"step {t}")
        for x, sharding in zip(
            jax.tree.leaves(p), jax.tree.leaves(shardings), strict=True
        ):
            assert _same_sharding(x, sharding), (x.sharding, sharding)


def test_data_parallel_step_keeps_the_shardings_it_is_given():
    params, loss, batches = _problem()
    tx = TRANSFORMS["sam"]()
    specs = jax.tree.map(lambda _: P(), params)
    specs["layer0"]["w"] = P(None, "model")
    shardings = jax.tree.map(lambda s: NamedSharding(MESH_4x2, s), specs)
    step = make_data_parallel_step(tx, loss, MESH_4x2)
    p = jax.device_put(params, shardings)
    s = tx.init(p)
    expected = _expected("sam")
    with jax.transfer_guard("disallow"):
        for t, batch in enumerate(batches):
            p, s, metrics = step(p, s, batch)
            _assert_close(p, expected[t][0], f"step {t}")
            for x, sharding in zip(
                jax.tree.leaves(p), jax.tree.leaves(shardings), strict=True
            ):
                assert _same_sharding(x, sharding), (x.sharding, sharding)
    assert _same_sharding(metrics["loss"], NamedSharding(MESH_4x2, P()))


# --- 2. the Trainer's descent on a mesh -----------------------------------------


@pytest.mark.parametrize(
    "name, ascent",
    [
        ("sam", None),
        ("async_sam", None),
        ("async_sam", "cpu:7"),
        ("sampa", None),
    ],
)
def test_trainer_on_a_mesh_equals_the_pure_transform(name, ascent):
    params, loss, batches = _problem()
    method = _method(name)
    expected = _expected(name)
    trainer = Trainer(
        TRANSFORMS[name](),
        loss,
        descent_device=MESH,
        ascent_device=ascent,
        ascent_batch_size=ASCENT if method == "async_sam" else None,
    )
    every, split = NamedSharding(MESH, P()), NamedSharding(MESH, P("data"))
    state = trainer.init(params)
    with jax.transfer_guard("disallow"):
        for t, batch in enumerate(batches):
            state, metrics = trainer.step(state, batch)
            _assert_close(state.params, expected[t][0], f"step {t}")
            tree = (state.step, state.params, state.opt_state, metrics["loss"])
            for x in jax.tree.leaves(tree):
                assert _same_sharding(x, every), x.sharding
            if method == "sampa":
                for x in jax.tree.leaves(state.prev_batch):
                    assert _same_sharding(x, split), x.sharding
            if method == "async_sam":
                where = jax.devices("cpu")[7 if ascent else 0]
                assert metrics["ascent_grad_norm"].devices() == {where}
    _assert_close(state.opt_state, expected[-1][1])


def test_trainer_on_a_mesh_with_model_state_and_a_batch_axis():
    # The model state (a running mean of the inputs) is computed over the
    # whole, sharded batch and stays replicated; the batch goes along "data".
    params, loss, batches = _problem()

    def loss_fn(p, ms, batch):
        return loss(p, batch), {"mean": 0.9 * ms["mean"] + 0.1 * batch["x"].mean(0)}

    mesh = Mesh(np.array(DEVICES).reshape(2, 4), ("model", "data"))
    trainer = Trainer(
        TRANSFORMS["sam"](),
        loss_fn,
        has_state=True,
        descent_device=mesh,
        batch_axis="data",
    )
    state = trainer.init(params, {"mean": jnp.zeros(8)})
    mean = np.zeros(8, np.float32)
    with jax.transfer_guard("disallow"):
        for batch in batches:
            state, _ = trainer.step(state, batch)
            mean = 0.9 * mean + 0.1 * batch["x"].mean(0)
    np.testing.assert_allclose(state.model_state["mean"], mean, rtol=1e-5, atol=1e-6)
    assert _same_sharding(state.model_state["mean"], NamedSharding(mesh, P()))
    with pytest.raises(ValueError, match=r"batch size 30 is not divisible by the 4"):
        trainer.step(state, jax.tree.map(lambda x: x[:30], batches[0]))


def test_trainer_mesh_bad_input():
    params, loss, batches = _problem(1)
    trainer = Trainer(TRANSFORMS["sam"](), loss, descent_device=MESH)
    with pytest.raises(
        ValueError, match=r"Trainer.step\(batch=...\).*batch size 12 is not divisible"
    ):
        trainer.step(trainer.init(params), jax.tree.map(lambda x: x[:12], batches[0]))
    with pytest.raises(ValueError, match=r"batch axis 'batch' is not an axis"):
        Trainer(TRANSFORMS["sam"](), loss, descent_device=MESH, batch_axis="batch")
    with pytest.raises(ValueError, match=r"batch_axis=.*needs .*Mesh"):
        Trainer(TRANSFORMS["sam"](), loss, descent_device="cpu:0", batch_axis="data")


# --- 3. m-sharpness ---------------------------------------------------------------


def test_m_sharpness_equals_the_per_shard_reference():
    params, loss, batches = _problem()
    tx = TRANSFORMS["sam"]()
    step = make_data_parallel_step(tx, loss, MESH, m_sharpness=True)
    expected = m_sharpness_reference(params, loss, batches, 0.05, n=8)
    every = NamedSharding(MESH, P())
    p = jax.device_put(params, every)
    s = jax.device_put(tx.init(p), every)
    with jax.transfer_guard("disallow"):
        for t, batch in enumerate(batches):
            p, s, metrics = step(p, s, batch)
            _assert_close(p, expected[t], f"step {t}")
            for x in jax.tree.leaves((p, s, metrics)):
                assert _same_sharding(x, every), x.sharding
    # The global step is ordinary SAM, and differs from m-sharpness.
    global_step = make_data_parallel_step(TRANSFORMS["sam"](), loss, MESH)
    q, r = jax.device_put(params, every), jax.device_put(tx.init(params), every)
    for batch in batches:
        q, r, _ = global_step(q, r, batch)
    sam = _expected("sam")
    _assert_close(q, sam[-1][0])
    assert not np.allclose(q["layer0"]["w"], p["layer0"]["w"], atol=1e-5)
    # m-sharpness with one shard is global SAM.
    one = Mesh(np.array(DEVICES[:1]), ("data",))
    step1 = make_data_parallel_step(TRANSFORMS["sam"](), loss, one, m_sharpness=True)
    q, r = params, TRANSFORMS["sam"]().init(params)
    for batch in batches:
        q, r, _ = step1(q, r, batch)
    _assert_close(q, sam[-1][0])


def test_data_parallel_step_bad_input():
    params, loss, batches = _problem(1)
    for name, m in [("async_sam", True), ("sampa", True), ("plain", True)]:
        tx = TRANSFORMS[name]()
        step = make_data_parallel_step(tx, loss, MESH, m_sharpness=m)
        with pytest.raises(ValueError, match=r"m_sharpness=True.*samx.sam"):
            step(params, tx.init(params), batches[0])
    tx = TRANSFORMS["sampa"]()
    step = make_data_parallel_step(tx, loss, MESH)
    with pytest.raises(ValueError, match=r"'sampa'.*Trainer\(tx, loss_fn"):
        step(params, tx.init(params), batches[0])
    tx = TRANSFORMS["sam"]()
    step = make_data_parallel_step(tx, loss, MESH, m_sharpness=True)
    with pytest.raises(ValueError, match=r"batch size 20 is not divisible by the 8"):
        step(params, tx.init(params), jax.tree.map(lambda x: x[:20], batches[0]))
    with pytest.raises(ValueError, match=r"batch axis 'batch'"):
        make_data_parallel_step(tx, loss, MESH, axis="batch")
    with pytest.raises(TypeError, match=r"mesh=.*jax.sharding.Mesh"):
        make_data_parallel_step(tx, loss, DEVICES)
    with pytest.raises(TypeError, match=r"optax transform"):
        make_data_parallel_step(optax.sgd, loss, MESH)
