"""Helpers shared by the tests: compilation counting and small problems."""

import contextlib
import logging
import math
import re

import jax
import jax.numpy as jnp
import optax


class _ListHandler(logging.Handler):
    def __init__(self, records):
        super().__init__(level=logging.DEBUG)
        self.records = records

    def emit(self, record):
        self.records.append(record.getMessage())


@contextlib.contextmanager
def count_compilations():
    """Yields a list that holds one entry per XLA compilation in the block."""
    messages: list[str] = []
    compiled: list[str] = []
    handler = _ListHandler(messages)
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield compiled
    finally:
        logger.removeHandler(handler)
        compiled.extend(m for m in messages if re.search(r"Finished .*compil", m))


def parabola(dtype=jnp.float32):
    """``sum((x - x*)**2)``: start, minimiser, objective (as in optax's suite)."""
    start = jnp.array([-1.0, 10.0, 1.0], dtype)
    target = jnp.array([1.0, -1.0, 1.0], dtype)

    def objective(x):
        return jnp.sum(jnp.square(x - target))

    return start, target, objective


def rosenbrock(dtype=jnp.float32):
    """Rosenbrock's function with its minimum at (1, 1)."""
    start = jnp.array([0.0, 0.0], dtype)
    target = jnp.array([1.0, 1.0], dtype)

    def objective(x):
        return jnp.square(1.0 - x[0]) + 100.0 * jnp.square(x[1] - x[0] ** 2)

    return start, target, objective


def mlp_loss(params, batch):
    """The mean squared error of :func:`mlp_problem`'s MLP (tanh between layers)."""
    h, layers = batch["x"], len(params)
    for i in range(layers):
        layer = params[f"layer{i}"]
        h = h @ layer["w"] + layer["b"][None, :]
        if i < layers - 1:
            h = jnp.tanh(h)
    return jnp.mean(jnp.square(h - batch["y"]))


def dropout_model():
    """An NNX MLP 8-16-4 (tanh) with dropout (rate 0.5) on its hidden units;
    ``model.layers[2].rngs`` is the dropout stream."""
    from flax import nnx

    rngs = nnx.Rngs(0, dropout=1)
    return nnx.Sequential(
        nnx.Linear(8, 16, rngs=rngs),
        jnp.tanh,
        nnx.Dropout(0.5, rngs=rngs),
        nnx.Linear(16, 4, rngs=rngs),
    )


def flax_loss(model, batch):
    """The mean squared error of an NNX model: ``loss_fn(model, batch)``."""
    return jnp.mean(jnp.square(model(batch["x"]) - batch["y"]))


def batch_norm_loss(params, state, batch):
    """:func:`mlp_loss` with a BatchNorm in training mode after its first layer.

    The hidden units are normalised with the batch's mean and variance (which
    couple the examples of a batch); ``state``, the running mean, moves
    towards the batch mean and does not change the loss. The loss of
    ``samx.runtime.Trainer(has_state=True)``: ``-> (loss, new_state)``.
    """
    h = batch["x"] @ params["layer0"]["w"] + params["layer0"]["b"][None, :]
    mean, var = h.mean(0), h.var(0)
    h = jnp.tanh((h - mean[None, :]) / jnp.sqrt(var[None, :] + 1e-5))
    out = h @ params["layer1"]["w"] + params["layer1"]["b"][None, :]
    return jnp.mean(jnp.square(out - batch["y"])), 0.9 * state + 0.1 * mean


def mlp_problem(key, sizes=(8, 16, 4), batch=32):
    """A small MLP regression: params, a loss and a batch sampler."""
    keys = jax.random.split(key, len(sizes))
    params = {
        f"layer{i}": {
            "w": jax.random.normal(keys[i], (m, n)) / jnp.sqrt(m),
            "b": jnp.zeros((n,)),
        }
        for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    }

    def sample(key):
        kx, ky = jax.random.split(key)
        return {
            "x": jax.random.normal(kx, (batch, sizes[0])),
            "y": jax.random.normal(ky, (batch, sizes[-1])),
        }

    return params, mlp_loss, sample


def pure_step(tx, method, loss, ascent, pairing="paired"):
    """One step of the pure transform, as a user writes it (no samx runtime).

    ``step(params, state, prev, batch)``, with the batches written out here, not
    taken from samx's plan: AsyncSAM's ascent on the first ``ascent`` examples
    of ``batch``; AsyncSAM's and SAMPa's ``grad_fn(., 0)`` on ``prev``
    (paired) or on ``batch`` (unpaired), SAMPa's ``grad_fn(., 1)`` on
    ``batch``. Not jitted, so the caller picks the placement.
    """
    grad = jax.grad(loss)

    def step(params, state, prev, batch):
        perturbed = prev if pairing == "paired" else batch
        if method == "async_sam":
            small = jax.tree.map(lambda x: x[:ascent], batch)
            size = jax.tree.leaves(batch)[0].shape[0]
            updates, state = tx.update(
                grad(params, small),
                state,
                params,
                grad_fn=lambda p, i: grad(p, perturbed),
                ascent_fraction=min(ascent, size) / size,
            )
        elif method == "sampa":
            pair = (perturbed, batch)
            updates, state = tx.update(
                None, state, params, grad_fn=lambda p, i: grad(p, pair[i])
            )
        else:
            updates, state = tx.update(
                grad(params, batch), state, params, grad_fn=lambda p, i: grad(p, batch)
            )
        return optax.apply_updates(params, updates), state

    return step


def async_sam_reference(
    base,
    params,
    loss,
    batches,
    *,
    rho,
    ascent,
    pairing,
    scaling="sqrt",
    ascent_grad=None,
):
    """AsyncSAM as ALGORITHMS.md writes it, without samx: the trajectory.

    Step t: ``a_t = grad L(x_t; B_t[:ascent])``; ``d_t = grad L(x_t + r
    a_{t-1} / (||a_{t-1}|| + 1e-12); D_t)`` with ``D_t = B_{t-1}`` (paired,
    ``B_{-1} = B_0``) or ``B_t`` (unpaired); ``x_{t+1} = x_t +
    base.update(d_t)``; ``a_{-1} = 0``. The radius ``r`` is ``rho *
    sqrt(b / b')`` (``scaling="sqrt"``, b' = ``ascent`` of the b examples) or
    ``rho`` (``"none"``). ``ascent_grad(params, B_t)``, if given, replaces
    the ascent gradient ``a_t``.
    """
    grad = jax.grad(loss)
    size = jax.tree.leaves(batches[0])[0].shape[0]
    radius = rho * (math.sqrt(size / min(ascent, size)) if scaling == "sqrt" else 1)

    @jax.jit
    def step(params, state, previous, descent_batch, batch):
        if ascent_grad is None:
            a = grad(params, jax.tree.map(lambda x: x[:ascent], batch))
        else:
            a = ascent_grad(params, batch)
        norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(previous)))
        point = jax.tree.map(
            lambda p, g: p + radius * g / (norm + 1e-12), params, previous
        )
        updates, state = base.update(grad(point, descent_batch), state, params)
        return optax.apply_updates(params, updates), state, a

    state, previous = base.init(params), jax.tree.map(jnp.zeros_like, params)
    out, prev = [], batches[0]
    for batch in batches:
        descent_batch = prev if pairing == "paired" else batch
        params, state, previous = step(params, state, previous, descent_batch, batch)
        prev = batch
        out.append(params)
    return out


def plain_trajectory(tx, params, loss, batches):
    """The parameters after each step of a plain optax ``tx`` (no ``grad_fn``)."""
    grad = jax.grad(loss)

    @jax.jit
    def step(params, state, batch):
        updates, state = tx.update(grad(params, batch), state, params)
        return optax.apply_updates(params, updates), state

    state, out = tx.init(params), []
    for batch in batches:
        params, state = step(params, state, batch)
        out.append(params)
    return out


def samx_trajectory(tx, params, loss, batches, *, previous_for_0=False):
    """The parameters after each jitted step of a samx ``tx``.

    The input is the gradient at the parameters on the step's batch;
    ``grad_fn(_, i)`` evaluates on the step's batch, or, for ``i = 0`` with
    ``previous_for_0`` (SAMPa's batches), on the previous step's batch.
    """
    grad = jax.grad(loss)

    @jax.jit
    def step(params, state, previous, batch):
        def grad_fn(p, i):
            return grad(p, previous if previous_for_0 and i == 0 else batch)

        updates, state = tx.update(grad(params, batch), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    state, out = tx.init(params), []
    for t, batch in enumerate(batches):
        params, state = step(params, state, batches[max(t - 1, 0)], batch)
        out.append(params)
    return out


def m_sharpness_reference(params, loss, batches, rho, n, eps=1e-12):
    """SAM's m-sharpness on one device, without samx: the trajectory.

    For each of the ``n`` equal shards k of a batch: ``e_k = rho g_k /
    ||g_k||``, ``d_k = grad L_k(x + e_k)``; optax's sgd (0.1, momentum 0.9) on
    the mean of the ``d_k``.
    """
    grad = jax.grad(loss)
    base = optax.sgd(0.1, momentum=0.9)
    state, out = base.init(params), []

    def norm(tree):
        return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))

    @jax.jit
    def descent(params, batch):
        size = jax.tree.leaves(batch)[0].shape[0]
        ds = []
        for k in range(n):
            shard = jax.tree.map(
                lambda x, k=k: x[k * size // n : (k + 1) * size // n], batch
            )
            g = grad(params, shard)
            scale = rho / (norm(g) + eps)
            ds.append(
                grad(jax.tree.map(lambda p, x, s=scale: p + s * x, params, g), shard)
            )
        return jax.tree.map(lambda *x: sum(x) / n, *ds)

    for batch in batches:
        d = descent(params, batch)
        updates, state = base.update(d, state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out
