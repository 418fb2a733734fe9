"""Checkpoints with orbax: every state saves, restores and continues its trajectory.

The reference is the uninterrupted run: training N steps, saving, restoring into
a target built from a fresh state and training M more steps must give, bit for
bit, the parameters of N + M steps without the interruption.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _testing import count_compilations, mlp_problem

import samx
from samx.runtime import Trainer, abstract_state

CPU0, CPU1 = jax.devices("cpu")[:2]
N, M = 3, 3  # steps before the checkpoint, steps after it
BATCH, ASCENT = 16, 4  # the batch, AsyncSAM's ascent batch in the Trainer

SGD_MOMENTUM = optax.sgd(0.1, momentum=0.9)
ADAM = optax.adam(1e-2)
RHO = optax.linear_schedule(0.1, 0.02, transition_steps=5)  # depends on the count

# name: (factory, kwargs, static_args for inject_hyperparams)
TRANSFORMS = {
    "sam": (samx.sam, {"base": SGD_MOMENTUM, "rho": 0.05}, ()),
    "asam": (samx.sam, {"base": ADAM, "rho": 0.5, "adaptive": True}, ("adaptive",)),
    "async_sam": (samx.async_sam, {"base": SGD_MOMENTUM, "rho": 0.05}, ()),
    "sampa-0": (samx.sampa, {"base": ADAM, "rho": 0.1, "lam": 0.0}, ()),
    "sampa-0.2": (samx.sampa, {"base": SGD_MOMENTUM, "rho": 0.1, "lam": 0.2}, ()),
}


def _make(name, wrapper):
    factory, kwargs, static = TRANSFORMS[name]
    if wrapper == "alone":
        return factory(**kwargs)
    if wrapper == "chain":
        return optax.chain(optax.clip_by_global_norm(1.0), factory(**kwargs))
    if wrapper == "skip":  # its counters are part of the state too
        return samx.skip_nonfinite(factory(**kwargs))
    # inject_hyperparams, with rho a schedule evaluated by the wrapper
    return optax.inject_hyperparams(factory, static_args=static)(
        **{**kwargs, "rho": RHO}
    )


def _batches(sample, n, seed=1):
    return [
        jax.tree.map(np.asarray, sample(k))
        for k in jax.random.split(jax.random.key(seed), n)
    ]


def _pure_step(tx, loss, sampa):
    """One jitted step of the pure transform (SAMPa's grad_fn(., 0): prev)."""
    grad = jax.grad(loss)

    @jax.jit
    def step(params, opt_state, prev, batch):
        pair = (prev, batch) if sampa else (batch,)

        def grad_fn(p, i):
            return grad(p, pair[i])

        updates, opt_state = tx.update(
            grad(params, batch), opt_state, params, grad_fn=grad_fn
        )
        return optax.apply_updates(params, updates), opt_state

    return step


def _stored_grads(opt_state):
    """The stored gradients (AsyncSAM's ascent_grad, SAMPa's aux_grad) in a state."""
    kinds = (samx.AsyncSAMState, samx.SAMPaState)
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds))
    return [
        x.ascent_grad if isinstance(x, samx.AsyncSAMState) else x.aux_grad
        for x in found
        if isinstance(x, kinds)
    ]


def _zero_stored(opt_state):
    """``opt_state`` with its stored gradients set to zero."""

    def zero(x):
        if isinstance(x, samx.AsyncSAMState):
            return x._replace(ascent_grad=jax.tree.map(jnp.zeros_like, x.ascent_grad))
        if isinstance(x, samx.SAMPaState):
            return x._replace(aux_grad=jax.tree.map(jnp.zeros_like, x.aux_grad))
        return x

    kinds = (samx.AsyncSAMState, samx.SAMPaState)
    return jax.tree.map(zero, opt_state, is_leaf=lambda x: isinstance(x, kinds))


def _assert_same(restored, saved):
    """Same structure (NamedTuple types included), dtypes and values."""
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        assert isinstance(x, jax.Array)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def _assert_equal_trees(a, b, msg=""):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y, err_msg=msg)


@pytest.mark.parametrize("wrapper", ["alone", "chain", "inject", "skip"])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_state_restores_and_continues(tmp_path, name, wrapper):
    params0, loss, sample = mlp_problem(jax.random.key(0), sizes=(8, 4), batch=BATCH)
    batches = _batches(sample, N + M)
    tx = _make(name, wrapper)
    init = lambda: jax.device_put(tx.init(params0), CPU0)  # noqa: E731 (committed)
    step = _pure_step(tx, loss, sampa=name.startswith("sampa"))

    def run(params, opt_state, start, stop):
        for t in range(start, stop):
            params, opt_state = step(
                params, opt_state, batches[max(t - 1, 0)], batches[t]
            )
        return params, opt_state

    params, opt_state = run(jax.device_put(params0, CPU0), init(), 0, N)
    expected, _ = run(params, opt_state, N, N + M)
    saved = {"params": params, "opt_state": opt_state}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", saved)
        ckptr.wait_until_finished()
        # The target: a fresh init, abstract (or concrete, for the chains).
        fresh = {"params": params0, "opt_state": tx.init(params0)}
        if wrapper != "chain":
            fresh = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
        restored = ckptr.restore(tmp_path / "ckpt", fresh)

    _assert_same(restored, saved)
    stored = _stored_grads(restored["opt_state"])
    assert len(stored) == (1 if name.startswith(("async", "sampa")) else 0)
    for g in stored:  # the saved gradient, not the zeros of a fresh init
        assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g))
    got, _ = run(restored["params"], restored["opt_state"], N, N + M)
    _assert_equal_trees(got, expected, f"{name} {wrapper}")

    # The comparison can fail: without the stored gradient (AsyncSAM, SAMPa),
    # or without the base's momentum (SAM), the trajectory is another one.
    damaged = _zero_stored(restored["opt_state"]) if stored else init()
    lost, _ = run(restored["params"], damaged, N, N + M)
    assert any(
        np.any(np.asarray(x) != np.asarray(y))
        for x, y in zip(jax.tree.leaves(lost), jax.tree.leaves(expected), strict=True)
    )


def _running_mean_problem():
    """A linear regression with a model state: a running mean of the inputs."""
    params, loss, sample = mlp_problem(jax.random.key(0), sizes=(8, 4), batch=BATCH)

    def loss_fn(params, model_state, batch):
        mean = 0.9 * model_state["mean"] + 0.1 * batch["x"].mean(axis=0)
        centred = {**batch, "x": batch["x"] - model_state["mean"][None, :]}
        return loss(params, centred), {"mean": mean}

    return params, {"mean": np.zeros(8, np.float32)}, loss_fn, sample


TRAINERS = {
    "sam": (lambda: samx.sam(SGD_MOMENTUM, rho=0.05), None),
    "async_sam": (lambda: samx.async_sam(SGD_MOMENTUM, rho=0.05), ASCENT),
    "sampa": (lambda: samx.sampa(ADAM, rho=0.1, lam=0.2), None),
}


def _trainer(name, loss_fn):
    make, ascent_batch_size = TRAINERS[name]
    return Trainer(
        make(),
        loss_fn,
        descent_device=CPU0,
        ascent_device=CPU1,
        ascent_batch_size=ascent_batch_size,
        has_state=True,
    )


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_trainer_state_restores_placed_and_continues(tmp_path, name):
    params, model_state, loss_fn, sample = _running_mean_problem()
    batches = _batches(sample, N + M)
    trainer = _trainer(name, loss_fn)
    state = trainer.init(params, model_state)
    for batch in batches[:N]:
        state, _ = trainer.step(state, batch)
    saved = jax.tree.map(jnp.copy, state)  # the next step donates `state`
    for batch in batches[N:]:  # the uninterrupted run; compiles every piece
        state, _ = trainer.step(state, batch)
    expected = state

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", saved)
        ckptr.wait_until_finished()
        # A fresh Trainer (as after a restart) builds the target.
        target = abstract_state(
            _trainer(name, loss_fn), params, model_state, batch=batches[0]
        )
        restored = ckptr.restore(tmp_path / "ckpt", target)

    _assert_same(restored, saved)
    assert int(restored.step) == N
    # AsyncSAM and SAMPa (paired) keep the previous batch: their descent runs on it.
    assert (restored.prev_batch is None) == (name == "sam")
    if name != "sam":  # the previous batch is the last one trained on
        _assert_equal_trees(restored.prev_batch, batches[N - 1])
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        assert x.committed and x.sharding == y.sharding
        assert x.devices() == {CPU0}
    # Placed like the live state: the compiled step is reused as it is.
    with count_compilations() as compiled, jax.transfer_guard("disallow"):
        state = restored
        for batch in batches[N:]:
            state, _ = trainer.step(state, batch)
        jax.block_until_ready(state)
    assert compiled == []
    assert jax.tree.structure(state) == jax.tree.structure(expected)
    _assert_equal_trees(state, expected, name)


def test_trainer_state_on_a_mesh_restores_sharded(tmp_path):
    # Data parallel: the state replicated on the mesh, SAMPa's previous batch
    # split along its batch axis; the restored state must be placed the same.
    params, model_state, loss_fn, sample = _running_mean_problem()
    batches = _batches(sample, N + M)
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:4]), ("data",))

    def trainer():
        return Trainer(
            samx.sampa(ADAM, rho=0.1, lam=0.2),
            loss_fn,
            descent_device=mesh,
            has_state=True,
        )

    live = trainer()
    state = live.init(params, model_state)
    for batch in batches[:N]:
        state, _ = live.step(state, batch)
    saved = jax.tree.map(jnp.copy, state)  # the next step donates `state`
    for batch in batches[N:]:
        state, _ = live.step(state, batch)
    expected = state

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", saved)
        ckptr.wait_until_finished()
        target = abstract_state(trainer(), params, model_state, batch=batches[0])
        restored = ckptr.restore(tmp_path / "ckpt", target)

    _assert_same(restored, saved)
    assert restored.params["layer0"]["w"].sharding.spec == jax.sharding.PartitionSpec()
    assert restored.prev_batch["x"].sharding.spec == jax.sharding.PartitionSpec("data")
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        assert x.sharding == y.sharding
    with count_compilations() as compiled:
        state = restored
        for batch in batches[N:]:
            state, _ = live.step(state, batch)
        jax.block_until_ready(state)
    assert compiled == []
    _assert_equal_trees(state, expected)


def test_sampa_needs_the_batch_in_its_target(tmp_path):
    params, model_state, loss_fn, sample = _running_mean_problem()
    batch = _batches(sample, 1)[0]
    trainer = _trainer("sampa", loss_fn)
    # A state as after a step: it holds the previous batch.
    state = trainer.init(params, model_state)
    state = state._replace(prev_batch=jax.device_put(batch, CPU0))
    with pytest.raises(ValueError, match=r"abstract_state\(batch=\.\.\.\)"):
        abstract_state(trainer, params, model_state)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", state)
        ckptr.wait_until_finished()
        # A fresh init has no previous batch: orbax refuses it as a target.
        fresh = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, trainer.init(params, model_state)
        )
        with pytest.raises(ValueError, match="prev_batch"):
            ckptr.restore(tmp_path / "ckpt", fresh)
    # The other methods keep no batch, whatever is passed.
    other = abstract_state(_trainer("sam", loss_fn), params, model_state, batch=batch)
    assert other.prev_batch is None
    with pytest.raises(TypeError, match="trainer"):
        abstract_state(samx.sam(SGD_MOMENTUM), params)


def test_checkpoint_manager_keeps_the_last_steps_and_resumes(tmp_path):
    params, model_state, loss_fn, sample = _running_mean_problem()
    steps = 6
    batches = _batches(sample, steps + M)
    trainer = _trainer("sampa", loss_fn)
    options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=2)
    live = {}
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        state = trainer.init(params, model_state)
        for batch in batches[:steps]:
            state, _ = trainer.step(state, batch)
            t = int(state.step)
            live[t] = state
            manager.save(t, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        assert manager.all_steps() == [4, 6]
        assert manager.latest_step() == steps

    # As after a restart: a fresh manager on the same directory, the target
    # from a fresh Trainer (the steps below reuse the compiled one).
    target = abstract_state(
        _trainer("sampa", loss_fn), params, model_state, batch=batches[0]
    )
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        older = manager.restore(4, args=ocp.args.StandardRestore(target))
        _assert_same(older, live[4])
        state = manager.restore(
            manager.latest_step(), args=ocp.args.StandardRestore(target)
        )
    _assert_same(state, live[steps])
    for batch in batches[steps:]:
        state, _ = trainer.step(state, batch)

    expected = live[steps]
    for batch in batches[steps:]:
        expected, _ = trainer.step(expected, batch)
    _assert_equal_trees(state, expected)


def test_another_transforms_checkpoint_fails_in_orbax_naming_the_fields(tmp_path):
    # docs/checkpoints.md: a state saved by AsyncSAM does not restore into a
    # SAMPa Trainer's target; orbax refuses it before any step, naming the
    # stored gradients that differ. Its parameters alone restore (a new
    # method started from them), through orbax's partial restore.
    params, loss, sample = mlp_problem(jax.random.key(0), batch=8)
    batch = sample(jax.random.key(1))
    saver = Trainer(samx.async_sam(optax.sgd(0.1)), loss, ascent_batch_size=4)
    state, _ = saver.step(saver.init(params), batch)
    other = Trainer(samx.sampa(optax.sgd(0.1)), loss)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "run", state)
        ckpt.wait_until_finished()
        target = abstract_state(other, params, batch=batch)
        with pytest.raises(ValueError, match=r"(?s)ascent_grad.*aux_grad"):
            ckpt.restore(tmp_path / "run", target)
    with ocp.PyTreeCheckpointer() as ckpt:
        item = {"params": target.params}
        only = ckpt.restore(
            tmp_path / "run",
            args=ocp.args.PyTreeRestore(
                item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            ),
        )
    _assert_equal_trees(only["params"], state.params)
