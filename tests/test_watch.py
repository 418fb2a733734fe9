"""A run that goes non-finite warns, without waiting on the device.

The issue's run: one NaN batch, no ``samx.skip_nonfinite``, a CNN whose ReLU
and max-pooling turn NaN weights into a finite, chance-level loss. The
parameters became NaN and nothing said so. And a ``rho`` injected out of range
at run time, which samx cannot read inside a step.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import samx
import samx.flax
from samx import runtime
from samx.examples.flax_models import CNN


def _cnn_loss(model, batch):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def _images(t, bad_step=None):
    x = np.random.default_rng(t).normal(size=(16, 8, 8, 1)).astype(np.float32)
    if t == bad_step:
        x[0, 0, 0, 0] = np.nan
    return {"x": x, "y": np.arange(16) % 10}


def _flax_run(tx, bad_step, steps=6, **kwargs):
    trainer = samx.flax.Trainer(CNN(rngs=nnx.Rngs(0)), tx, _cnn_loss, **kwargs)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(steps):
            metrics = trainer.step(_images(t, bad_step))
            jax.block_until_ready(metrics)  # the step is done: its norm is read
            losses.append(float(metrics["loss"]))
    params = jax.tree.leaves(nnx.state(trainer.model, nnx.Param))
    finite = all(bool(jnp.isfinite(p).all()) for p in params)
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    return ours, finite, losses


@pytest.mark.parametrize(
    "method", ["sam", "async_sam", "sampa"], ids=["sam", "async_sam", "sampa"]
)
def test_a_nan_batch_without_skip_nonfinite_warns(method):
    kwargs = {"ascent_batch_size": 4} if method == "async_sam" else {}
    tx = getattr(samx, method)(optax.sgd(0.1, momentum=0.9), rho=0.05)
    caught, finite, losses = _flax_run(tx, bad_step=2, **kwargs)
    assert not finite
    assert all(np.isfinite(losses))  # the loss alone did not show it
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "samx.flax.Trainer.step" in message
    assert "samx.skip_nonfinite" in message
    assert caught[0].filename == __file__  # points at the loop, not samx


def test_skip_nonfinite_or_a_clean_run_does_not_warn():
    tx = samx.skip_nonfinite(samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05))
    caught, finite, _ = _flax_run(tx, bad_step=2)
    assert finite and caught == []
    caught, finite, _ = _flax_run(samx.sam(optax.sgd(0.1), rho=0.05), bad_step=None)
    assert finite and caught == []


def _loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


@pytest.mark.parametrize(
    ("method", "name", "value"),
    [("sam", "rho", -0.1), ("async_sam", "rho", -0.1), ("sampa", "lam", 1.5)],
)
def test_a_hyperparameter_injected_out_of_range_warns(method, name, value):
    tx = optax.inject_hyperparams(getattr(samx, method))(optax.sgd(0.1))
    trainer = runtime.Trainer(tx, _loss)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    batch = {"x": x, "y": x @ np.array([1.0, -1.0, 0.5], np.float32)}
    state = trainer.init({"w": jnp.zeros(3)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(5):
            if t == 1:  # set between steps, as a user would
                hyperparams = dict(state.opt_state.hyperparams)
                hyperparams[name] = jnp.asarray(value, jnp.float32)
                state = state._replace(
                    opt_state=state.opt_state._replace(hyperparams=hyperparams)
                )
            state, metrics = trainer.step(state, batch)
            jax.block_until_ready(metrics)
    caught = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(caught) == 1
    assert "samx.runtime.Trainer.step" in str(caught[0].message)
    assert f"`{name}`" in str(caught[0].message) or "`lam`" in str(caught[0].message)
    # The step was made NaN on purpose, not silently another method.
    assert not bool(jnp.isfinite(state.params["w"]).all())


def _nnx_run(make_step, bad_step, steps=5):
    model = CNN(rngs=nnx.Rngs(0))
    tx = samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = make_step(_cnn_loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(steps):
            jax.block_until_ready(step(model, optimizer, _images(t, bad_step)))
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_the_nnx_helper_step_warns_too():
    caught = _nnx_run(samx.flax.make_nnx_train_step, bad_step=1)
    assert len(caught) == 1
    assert "make_nnx_train_step" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the loop, not samx
    assert _nnx_run(samx.flax.make_nnx_train_step, bad_step=None) == []


def test_the_linen_helper_step_warns_too():
    from samx.examples.flax_models import LinenCNN

    cnn = LinenCNN()
    variables = cnn.init(jax.random.key(0), _images(0)["x"], train=False)
    state = samx.flax.TrainState.create(
        apply_fn=cnn.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=samx.sampa(optax.sgd(0.1, momentum=0.9), rho=0.05),
    )

    def loss(params, batch_stats, batch):
        logits, updates = cnn.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["x"],
            train=True,
            mutable=["batch_stats"],
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return ce.mean(), updates["batch_stats"]

    step = samx.flax.make_linen_train_step(loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(5):
            state, metrics = step(state, _images(t, bad_step=1))
            jax.block_until_ready(metrics)
    caught = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(caught) == 1
    assert "make_linen_train_step" in str(caught[0].message)
    assert caught[0].filename == __file__


def test_the_data_parallel_step_warns_too():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    step = runtime.make_data_parallel_step(
        samx.sam(optax.sgd(0.1), rho=0.05), _loss, mesh
    )
    params = {"w": jnp.zeros(3)}
    opt_state = samx.sam(optax.sgd(0.1), rho=0.05).init(params)
    x = np.ones((8, 3), np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(4):
            y = np.full(8, np.nan if t == 1 else 1.0, np.float32)
            params, opt_state, metrics = step(params, opt_state, {"x": x, "y": y})
            jax.block_until_ready(metrics)
    caught = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(caught) == 1
    assert "make_data_parallel_step's step" in str(caught[0].message)
    assert caught[0].filename == __file__
