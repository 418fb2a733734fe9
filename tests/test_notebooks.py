"""The notebooks run top to bottom in quick mode; the examples they drive.

Each notebook runs in a fresh ``python3`` kernel with ``SAMX_QUICK=1`` and is
not written back. Also: the Flax CNNs of ``samx.examples.flax_models``, the
toy of ``samx.examples.toy`` against a hand-written SAM, and the timeline of
``samx.examples.timeline``.
"""

import pathlib

import jax
import jax.numpy as jnp
import matplotlib
import nbclient
import nbformat
import numpy as np
import optax
import pytest

import samx

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_there_are_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {
        "01_quickstart.ipynb",
        "02_flax_nnx.ipynb",
        "03_two_devices.ipynb",
        "04_flax_linen.ipynb",
    } <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, monkeypatch):
    monkeypatch.setenv("SAMX_QUICK", "1")  # the kernel inherits the environment
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert 'QUICK = os.environ.get("SAMX_QUICK") == "1"' in first.source
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot"


# samx.examples.flax_models


def _digits_batch(n=64):
    from samx.examples import data

    d = data.load_digits(noise=0.0)
    return {"x": jnp.asarray(d.x_train[:n]), "y": jnp.asarray(d.y_train[:n])}


def test_nnx_cnn_shapes_modes_and_a_loss_decrease():
    from flax import nnx

    from samx.examples import flax_models

    model = flax_models.CNN(rngs=nnx.Rngs(0))
    batch = _digits_batch()
    assert model(batch["x"]).shape == (64, 10)
    assert model(batch["x"].reshape(64, 8, 8, 1)).shape == (64, 10)
    with pytest.raises(ValueError, match="64 features"):
        model(jnp.zeros((2, 10)))

    model.eval()  # running averages: the statistics do not move
    mean0 = np.array(model.bn1.mean[...])
    model(batch["x"])
    np.testing.assert_array_equal(model.bn1.mean[...], mean0)
    model.train()

    optimizer = nnx.Optimizer(model, optax.sgd(0.3, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(flax_models.nnx_loss)(model, batch)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, batch)) for _ in range(12)]
    assert losses[-1] < 0.9 * losses[0], losses
    assert not np.allclose(model.bn1.mean[...], mean0)  # train mode updates them
    np.testing.assert_allclose(losses[0], np.log(10.0), rtol=0.3)


def test_linen_cnn_shapes_state_and_a_loss_decrease():
    from samx.examples import flax_models

    params, stats = flax_models.linen_init(jax.random.key(0))
    batch = _digits_batch()
    logits = flax_models.linen_logits(params, stats, batch["x"])
    assert logits.shape == (64, 10)
    # The same architecture as the NNX model: same parameter count.
    from flax import nnx

    nnx_params = nnx.state(flax_models.CNN(rngs=nnx.Rngs(0)), nnx.Param)
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    # conv 9*16 + 16, bn 2*16, conv 9*16*32 + 32, bn 2*32, dense 32*10 + 10
    assert count(params) == count(nnx_params) == 5226

    tx = optax.sgd(0.3, momentum=0.9)

    @jax.jit
    def step(params, stats, opt_state):
        (loss, stats), grads = jax.value_and_grad(flax_models.linen_loss, has_aux=True)(
            params, stats, batch
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    opt_state, losses, new_stats = tx.init(params), [], stats
    for _ in range(12):
        params, new_stats, opt_state, loss = step(params, new_stats, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0], losses
    assert not np.allclose(
        jax.tree.leaves(new_stats)[0], jax.tree.leaves(stats)[0]
    )  # train mode moved the running statistics


def test_accuracy_counts_argmax_hits():
    from samx.examples import flax_models

    logits = jnp.array([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    labels = jnp.array([1, 0, 0, 1])
    assert float(flax_models.accuracy(logits, labels)) == 0.5


# samx.examples.toy


def test_toy_sam_curve_matches_a_hand_written_sam():
    from samx.examples import toy

    steps = 6
    curves = toy.figure1_curves(steps=steps, rand_seeds=2)
    x = np.asarray(jax.random.normal(jax.random.split(jax.random.key(0))[0], (5,)))
    x = x.astype(np.float64)
    expected = []
    for t in range(steps):
        e = toy.RHO * x / np.linalg.norm(x)  # grad f = 2x, so its direction is x
        x = x - toy.ETA0 / np.sqrt(t + 1) * 2 * (x + e)
        expected.append(np.sum(x**2))
    np.testing.assert_allclose(curves["SAM"], expected, rtol=1e-5)
    # OptSAM's first step has no perturbation: a plain gradient step.
    x0 = np.asarray(jax.random.normal(jax.random.split(jax.random.key(0))[0], (5,)))
    np.testing.assert_allclose(
        curves["OptSAM"][0], np.sum((x0 * (1 - 2 * toy.ETA0)) ** 2), rtol=1e-5
    )


def test_toy_rejects_bad_sizes():
    from samx.examples import toy

    with pytest.raises(ValueError, match=r"figure1_curves\(steps=\.\.\.\)"):
        toy.figure1_curves(steps=0)


# samx.examples.timeline


def test_timeline_watches_outlive_the_next_step_that_donates_the_state():
    # record() waits on the watched arrays in threads while the loop steps on:
    # a watched array of the state would be deleted by the next step.
    from samx.examples import timeline
    from samx.runtime import Trainer

    def loss_fn(params, batch):
        return jnp.mean((batch["x"] @ params - batch["y"]) ** 2)

    batch = {"x": np.ones((16, 4), np.float32), "y": np.ones(16, np.float32)}
    for tx in (samx.async_sam(optax.sgd(0.1)), samx.sampa(optax.sgd(0.1))):
        trainer = Trainer(tx, loss_fn, descent_device="cpu:0", ascent_device="cpu:1")
        state, metrics = trainer.step(trainer.init(jnp.zeros(4)), batch)
        watched = timeline.default_watches(state, metrics)
        trainer.step(state, batch)
        for _, _, x in watched:
            assert not x.is_deleted()
            jax.block_until_ready(x)


def test_timeline_rows_are_the_two_devices_and_times_are_ordered():
    from samx.examples import timeline
    from samx.runtime import Trainer

    def loss_fn(params, batch):
        return jnp.mean((batch["x"] @ params - batch["y"]) ** 2)

    batch = {"x": np.ones((16, 4), np.float32), "y": np.ones(16, np.float32)}
    trainer = Trainer(
        samx.async_sam(optax.sgd(0.1)),
        loss_fn,
        descent_device="cpu:0",
        ascent_device="cpu:1",
        ascent_batch_size=8,
    )
    state = trainer.init(jnp.zeros(4))
    state, timeline_ = timeline.record(trainer, state, [batch] * 3)
    assert int(state.step) == 3
    segments = timeline_.segments
    assert [(s.step, s.device, s.label) for s in segments] == [
        (t, device, label)
        for t in range(3)
        for device, label in (
            ("cpu:1", "ascent gradient"),
            ("cpu:0", "descent gradient"),
            ("cpu:0", "update"),
        )
    ]
    assert timeline_.dispatches == sorted(timeline_.dispatches)
    for s in segments:  # starts are inferred, never before the dispatch
        assert timeline_.dispatches[s.step] <= s.start <= s.end

    matplotlib.use("Agg")
    ax = timeline.plot(timeline_)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cpu:0", "cpu:1"]
