"""samx.flax.Trainer: an NNX model on two devices, against the one-device step.

The reference is the one-device ``samx.flax`` step (``nnx.Optimizer`` and
:func:`samx.flax.make_nnx_train_step`, itself checked against a hand-written
functional loop in test_flax.py) on the same batches, from the same model:
parameters, BatchNorm statistics, RNG counts and keys, loss and aux.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _testing import count_compilations
from flax import nnx

import samx
import samx.flax

CPU0, CPU1 = jax.devices("cpu")[:2]
STEPS = 5
ASCENT = 8  # AsyncSAM's ascent batch, of a batch of 16


class Net(nnx.Module):
    """Conv -> BatchNorm -> ReLU -> Dropout -> mean pool -> Dense."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.dense = nnx.Linear(4, 10, rngs=rngs)

    def __call__(self, x):
        h = self.drop(nnx.relu(self.bn(self.conv(x))))
        return self.dense(h.mean(axis=(1, 2)))


def _net():
    # An "rbg" dropout key: XLA:CPU compiles threefry's dropout mask about 3x
    # slower. The Trainer treats keys alike, whatever their implementation.
    return Net(nnx.Rngs(0, dropout=jax.random.key(1, impl="rbg")))


def loss_aux(model, batch):
    logits = model(batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, {"logits": logits}


def _batches(n=STEPS):
    rng = np.random.default_rng(0)
    return [
        {
            "x": rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
            "y": rng.integers(0, 10, 16).astype(np.int32),
        }
        for _ in range(n)
    ]


def _base():
    return optax.sgd(0.1, momentum=0.9)


TRANSFORMS = {
    "sam": lambda: samx.sam(_base(), rho=0.5),
    "async_sam": lambda: samx.async_sam(_base(), rho=0.5),
    "sampa": lambda: samx.sampa(_base(), rho=0.5, lam=0.2),
    "plain": _base,
}


def _trainer(method, model, **kwargs):
    return samx.flax.Trainer(
        model,
        TRANSFORMS[method](),
        loss_aux,
        descent_device=CPU0,
        ascent_device=CPU1,
        ascent_batch_size=ASCENT if method == "async_sam" else None,
        has_aux=True,
        **kwargs,
    )


def _comparable(tree):
    """PRNG keys as their data, so that trees of them compare."""
    return jax.tree.map(
        lambda x: (
            jax.random.key_data(x)
            if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
            else x
        ),
        tree,
    )


def _close(a, b, tol=1e-5):
    a, b = _comparable(a), _comparable(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=tol, atol=tol), a, b
    )


def _devices(tree):
    return {d for x in jax.tree.leaves(tree) for d in x.devices()}


@functools.cache
def _run(method):
    """Trains 5 steps through the Trainer, descent on cpu:0, ascent on cpu:1.

    Returns the trainer, its state after each step, the last metrics and the
    compilations after the first step; the steps run under
    ``transfer_guard("disallow")``, and the parameters stay on cpu:0.
    """
    trainer = _trainer(method, _net())
    # A step donates the state it is given: the states kept are copies.
    keep = functools.partial(jax.tree.map, jnp.copy)
    states = [keep(trainer.state)]
    first, *others = _batches()
    with jax.transfer_guard("disallow"):
        metrics = trainer.step(first)
        states.append(keep(trainer.state))
        with count_compilations() as compiled:
            for batch in others:
                metrics = trainer.step(batch)
                states.append(keep(trainer.state))
                assert _devices(trainer.state.params) == {CPU0}
            jax.block_until_ready(metrics)
    return trainer, states, metrics, compiled


@pytest.mark.parametrize("method", sorted(TRANSFORMS))
def test_two_devices_equal_the_one_device_step(method):
    trainer, _, metrics, compiled = _run(method)
    assert compiled == []
    if method in ("async_sam", "sampa"):  # the ascent role ran on the other device
        assert metrics["ascent_grad_norm"].devices() == {CPU1}

    # The reference: the one-device samx.flax step, on the same batches.
    model = _net()
    optimizer = nnx.Optimizer(model, TRANSFORMS[method](), wrt=nnx.Param)
    step = samx.flax.make_nnx_train_step(
        loss_aux,
        has_aux=True,
        ascent_batch_size=ASCENT if method == "async_sam" else None,
    )
    for batch in _batches():
        want = step(model, optimizer, batch)

    _, params, rest = nnx.split(model, nnx.Param, ...)
    _close(trainer.state.params, nnx.as_pure(params))
    _close(trainer.state.model_state, nnx.as_pure(rest))  # statistics, RNG state
    _close(metrics["loss"], want["loss"])
    _close(metrics["aux"], want["aux"])
    # Dropout draws once per forward pass: its stream moved once per step.
    assert int(trainer.model.drop.rngs.count[...]) == STEPS
    assert not np.allclose(trainer.model.bn.mean[...], 0.0)


def test_a_checkpoint_mid_run_restores_into_an_abstract_model_bit_exactly(tmp_path):
    # AsyncSAM (paired): the state holds the previous batch and the RNG state.
    _, states, _, _ = _run("async_sam")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", states[3])
        ckptr.wait_until_finished()
        # After a restart: no model is allocated to build the target.
        fresh = _trainer("async_sam", nnx.eval_shape(_net))
        target = fresh.abstract_state(_batches()[0])
        fresh.state = ckptr.restore(tmp_path / "ckpt", target)

    assert int(fresh.state.step) == 3
    for x in jax.tree.leaves(fresh.state):
        assert x.committed and x.devices() == {CPU0}
    for batch in _batches()[3:]:
        fresh.step(batch)
    _close(fresh.state, states[-1], tol=0)


def test_the_model_is_merged_on_demand_and_changing_it_changes_nothing():
    trainer = _trainer("sam", _net())
    model = trainer.model
    model.eval()  # evaluation mode, on this module only
    model.bn.mean[...] = jnp.ones(4)
    assert model.bn.use_running_average
    assert not trainer.model.bn.use_running_average
    np.testing.assert_array_equal(trainer.state.model_state["bn"]["mean"], 0.0)


def test_one_batch_size_per_run_from_the_first_batch_after_a_new_state():
    # The rule of every samx loop (docs/pairing.md): the first batch sets the
    # size; assigning a state starts a new run, whose first batch sets it again.
    def loss(model, batch):
        return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

    full = {"x": np.ones((8, 3), np.float32), "y": np.zeros((8, 1), np.float32)}
    short = jax.tree.map(lambda x: x[:5], full)
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    trainer = samx.flax.Trainer(model, samx.sam(_base(), rho=0.05), loss)
    start = jax.tree.map(jnp.copy, trainer.state)  # a step donates the state
    trainer.step(full)
    with pytest.raises(ValueError, match=r"Trainer\.step\(batch=...\)` has 5 ex"):
        trainer.step(short)
    trainer.step(full)  # the run goes on
    trainer.state = start
    trainer.step(short)  # a new run, of batches of 5
    with pytest.raises(ValueError, match=r"has 8 examples, but this run's .* 5:"):
        trainer.step(full)


def _recorded_calibration(monkeypatch, calibrate):
    """``calibrate()`` with a fake clock; the gradients it timed, in order.

    The descent takes 8 ms on CPU0; b' examples take 1 ms + b' * 0.5 ms
    elsewhere: b' = 8 of 16 hides. Each timed function is also run, so the
    gradients can be compared.
    """
    timed = []

    def fake(fn, args, repeats):
        examples = jax.tree.leaves(args[2])[0]
        (device,) = examples.devices()
        timed.append((device, examples.shape[0], jax.tree.leaves(fn(*args))))
        return 0.008 if device == CPU0 else 0.001 + 0.0005 * examples.shape[0]

    monkeypatch.setattr("samx.runtime._calibrate._median_seconds", fake)
    monkeypatch.setattr(  # the transfers: a fixed time too
        "samx.runtime._calibrate._transfer_seconds", lambda *args: 0.001
    )
    return calibrate(), timed


def test_nnx_calibration_is_the_manual_split_merge_calibration(monkeypatch):
    # The NNX path (issue 21) against what a user wrote by hand: nnx.split,
    # a (params, rest, batch) loss that merges, samx.runtime's calibration.
    batch = _batches(1)[0]
    model = _net()
    before = nnx.clone(model)
    devices = {"fast_device": CPU0, "slow_device": CPU1}
    nnx_c, nnx_timed = _recorded_calibration(
        monkeypatch,
        lambda: samx.flax.calibrate_ascent_batch(
            model, loss_aux, batch, has_aux=True, **devices
        ),
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def manual_loss(params, rest, batch):
        merged = nnx.merge(graphdef, params, rest)
        loss, _ = loss_aux(merged, batch)
        return loss, nnx.state(merged, nnx.Not(nnx.Param))

    manual_c, manual_timed = _recorded_calibration(
        monkeypatch,
        lambda: samx.runtime.calibrate_ascent_batch(
            manual_loss,
            nnx.as_pure(params),
            batch,
            model_state=nnx.as_pure(rest),
            has_state=True,
            **devices,
        ),
    )
    assert nnx_c == manual_c and nnx_c.ascent_batch_size == 8
    assert nnx_c.transfer_seconds == 0.001 and nnx_c.hides
    assert [t[:2] for t in nnx_timed] == [t[:2] for t in manual_timed]
    assert nnx_timed[0][:2] == (CPU0, 16)  # the descent, on the whole batch
    for (*_, a), (*_, b) in zip(nnx_timed, manual_timed, strict=True):
        _close(a, b, tol=0)  # the same gradient: the same pass
    _close(nnx.state(model), nnx.state(before), tol=0)  # the model is not changed


def test_the_flax_trainer_takes_the_calibration_itself(monkeypatch):
    batch = _batches(1)[0]
    devices = {"fast_device": CPU0, "slow_device": CPU1}
    calibration, _ = _recorded_calibration(
        monkeypatch,
        lambda: samx.flax.calibrate_ascent_batch(
            _net(), loss_aux, batch, has_aux=True, **devices
        ),
    )

    def trainer_on(ascent_device):
        return samx.flax.Trainer(
            _net(),
            samx.async_sam(optax.sgd(0.1)),
            loss_aux,
            has_aux=True,
            descent_device=CPU0,
            ascent_device=ascent_device,
            ascent_batch_size=calibration,
        )

    trainer = trainer_on(CPU1)
    assert trainer.runtime.ascent_batch_size == calibration.ascent_batch_size == 8
    assert trainer.runtime.calibration is calibration
    trainer.step(batch)
    with pytest.raises(ValueError, match=r"timed .* as the ascent device"):
        trainer_on(CPU0)


def test_batch_axis_and_sampa_vmap_reach_the_runtime_trainer():
    # On a ("model", "data") mesh the batch is split along "data", not along
    # the mesh's first axis.
    mesh = jax.sharding.Mesh(
        np.array(jax.devices("cpu")[:4]).reshape(2, 2), ("model", "data")
    )
    trainer = samx.flax.Trainer(
        _net(),
        TRANSFORMS["sampa"](),
        loss_aux,
        descent_device=mesh,
        batch_axis="data",
        sampa_vmap=True,
        has_aux=True,
    )
    assert trainer.runtime.batch_axis == "data" and trainer.runtime.sampa_vmap
    trainer.step(_batches(1)[0])
    spec = jax.tree.leaves(trainer.state.prev_batch)[0].sharding.spec
    assert spec[0] == "data"
    assert trainer.plan == trainer.runtime.plan()
