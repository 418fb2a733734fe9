"""Float64 (``jax_enable_x64``): exact against the base and the official codes.

The references below are the official codes' arithmetic written out in NumPy
float64: SAMPa's ``train.py`` (LIONS-EPFL/SAMPa) with both ranks simulated in
one process, and the ``ASAM`` class (SamsungLabs/ASAM) with PyTorch's SGD. The
gradients come from ``jax.grad`` of the test's own loss; everything the
optimizers do with them (norms, perturbations, momentum, weight decay, the
mix) is written here, independently of samx.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _testing import plain_trajectory, samx_trajectory

import samx

STEPS = 15
LR, MU, WD = 0.1, 0.9, 5e-4  # SGD as in both official codes: momentum, coupled decay


def _coupled_sgd():
    """PyTorch's ``SGD(lr, momentum, weight_decay)`` as an optax chain."""
    return optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MU))


def _problem(seed):
    """An MLP with a LayerNorm, PyTorch's parameter names, float64."""
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "fc0": {
            "weight": jax.random.normal(k[0], (6, 12), jnp.float64) / 2.5,
            "bias": jnp.full((12,), 0.1, jnp.float64),
        },
        "norm0": {
            "weight": 1.0 + 0.1 * jax.random.normal(k[1], (12,), jnp.float64),
            "bias": jnp.zeros((12,), jnp.float64),
        },
        "fc1": {
            "weight": jax.random.normal(k[2], (12, 3), jnp.float64) / 3.5,
            "bias": jnp.zeros((3,), jnp.float64),
        },
    }

    def loss(p, batch):
        h = batch["x"] @ p["fc0"]["weight"] + p["fc0"]["bias"][None, :]
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) / jnp.sqrt(var + 1e-5)
        h = h * p["norm0"]["weight"][None, :] + p["norm0"]["bias"][None, :]
        h = jnp.tanh(h) @ p["fc1"]["weight"] + p["fc1"]["bias"][None, :]
        return jnp.mean(jnp.square(h - batch["y"]))

    keys = jax.random.split(k[3], 2 * STEPS)
    batches = [
        {
            "x": jax.random.normal(keys[2 * t], (16, 6), jnp.float64),
            "y": jax.random.normal(keys[2 * t + 1], (16, 3), jnp.float64),
        }
        for t in range(STEPS)
    ]
    return params, loss, batches


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _assert_close(a, b, tol, msg=""):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=msg)


RHO_ZERO = {
    "sam": lambda base: samx.sam(base, rho=0.0),
    "asam": lambda base: samx.sam(base, rho=0.0, adaptive=True),
    "async_sam": lambda base: samx.async_sam(base, rho=0.0),
    "sampa": lambda base: samx.sampa(base, rho=0.0, lam=0.0),
}


@pytest.mark.parametrize("method", sorted(RHO_ZERO))
def test_rho_zero_is_exactly_the_base_trajectory_in_float64(method):
    with jax.enable_x64(True):
        params, loss, batches = _problem(0)
        ours = samx_trajectory(RHO_ZERO[method](_coupled_sgd()), params, loss, batches)
        theirs = plain_trajectory(_coupled_sgd(), params, loss, batches)
        assert jax.tree.leaves(ours[-1])[0].dtype == jnp.float64
        for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                np.testing.assert_array_equal(x, y, err_msg=f"step {t}")


def _flat_grad(loss, params):
    """The official codes' flat-vector view: grad(vector, batch) -> vector."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    grad = jax.jit(jax.grad(loss))

    def grad_vector(v, batch):
        return np.asarray(jax.flatten_util.ravel_pytree(grad(unravel(v), batch))[0])

    return np.asarray(flat, np.float64), unravel, grad_vector


def _torch_sgd_step(p, grad, buf):
    """``torch.optim.SGD(lr, momentum, weight_decay).step()`` on one tensor."""
    d = grad + WD * p
    buf = d.copy() if buf is None else buf * MU + d
    return p - LR * buf, buf


def _official_sampa(params, loss, batches, rho, lam):
    """LIONS-EPFL/SAMPa ``train.py``, ranks 0 and 1 in one process, float64.

    Each rank keeps its own copy of the parameters and of the SGD state; rank 0
    recovers ``g_t`` from the all-reduced sum, ``(agg - pert) / (og + 1e-15)``;
    rank 1 steps to ``y`` with SGD-momentum's would-be step (none before the
    first step, when SGD has no momentum buffer yet). The result is rank 0's.
    """
    x, unravel, grad = _flat_grad(loss, params)
    p0, p1, buf0, buf1 = x.copy(), x.copy(), None, None
    agg = pert = g1 = np.zeros_like(x)  # g1: rank 1's own copy of g_t
    out, data1 = [], batches[0]
    for batch in batches:
        # rank 0: the perturbed gradient, on the previous batch
        y0 = (agg - pert) / (lam + 1e-15)
        scale = rho / (np.linalg.norm(y0) + 1e-12)
        y0 = y0 * -scale
        q0 = p0 - y0
        pert = grad(q0, data1) * (1 - lam)
        agg0 = pert.copy()
        # rank 1: the gradient at y, on the current batch
        s1 = LR * (g1 + (WD * p1 + buf1 * MU)) if buf1 is not None else LR * g1
        q1 = p1 - s1
        g1 = grad(q1, batch)
        agg1 = lam * g1
        agg = agg0 + agg1  # fabric.all_reduce(sum)
        p0, p1 = q0 + y0, q1 + s1  # each rank restores its own copy
        p0, buf0 = _torch_sgd_step(p0, agg, buf0)
        p1, buf1 = _torch_sgd_step(p1, agg, buf1)
        data1 = batch
        out.append(unravel(p0))
    return out


def test_sampa_equals_the_official_code_in_float64():
    rho, lam = 0.1, 0.2
    with jax.enable_x64(True):
        params, loss, batches = _problem(1)
        tx = samx.sampa(_coupled_sgd(), rho=rho, lam=lam)
        ours = samx_trajectory(tx, params, loss, batches, previous_for_0=True)
        theirs = _official_sampa(params, loss, batches, rho, lam)
        for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _assert_close(_np(a), _np(b), 1e-12, f"step {t}")
        # The comparison can fail: SAMPa moved away from the base optimizer.
        plain = plain_trajectory(_coupled_sgd(), params, loss, batches)[-1]
        assert not np.allclose(
            _np(plain)["fc0"]["weight"], _np(ours[-1])["fc0"]["weight"], atol=1e-6
        )


def _named(tree):
    """``{"fc0.weight": array, ...}``: PyTorch's ``named_parameters`` names."""
    return {
        ".".join(str(k.key) for k in path): np.asarray(x, np.float64)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _official_asam(params, loss, batches, rho, eta, scaled):
    """SamsungLabs/ASAM ``ASAM.ascent_step`` then ``descent_step``, float64.

    ``scaled(name, x)`` says which parameters get ``T = |w| + eta``: the
    official code's rule is ``"weight" in name``.
    """
    grad = jax.jit(jax.grad(loss))
    treedef = jax.tree.structure(params)
    p, buf, out = _named(params), dict.fromkeys(_named(params)), []

    def grads_at(p, batch):
        return _named(grad(jax.tree.unflatten(treedef, list(p.values())), batch))

    for batch in batches:
        g, t, wgrads = grads_at(p, batch), {}, []
        for n in p:  # ascent_step
            if scaled(n, p[n]):
                t[n] = np.abs(p[n]) + eta
                g[n] = g[n] * t[n]
            wgrads.append(np.linalg.norm(g[n]))
        norm = np.linalg.norm(wgrads) + 1.0e-16
        e = {}
        for n in p:
            if scaled(n, p[n]):
                g[n] = g[n] * t[n]
            e[n] = g[n] * (rho / norm)
            p[n] = p[n] + e[n]
        d = grads_at(p, batch)
        for n in p:  # descent_step: restore, then SGD
            p[n] = p[n] - e[n]
            p[n], buf[n] = _torch_sgd_step(p[n], d[n], buf[n])
        out.append(dict(p))
    return out


def test_asam_equals_the_official_code_in_float64():
    rho, eta = 2.0, 0.01
    with jax.enable_x64(True):
        params, loss, batches = _problem(2)

        def asam(**mask):
            tx = samx.sam(
                _coupled_sgd(), rho=rho, adaptive=True, eta=eta, eps=1e-16, **mask
            )
            return [_named(p) for p in samx_trajectory(tx, params, loss, batches)]

        official = _official_asam(
            params, loss, batches, rho, eta, lambda n, x: "weight" in n
        )
        ours = asam(mask=samx.all_but_biases)
        for t, (a, b) in enumerate(zip(ours, official, strict=True)):
            _assert_close(a, b, 1e-12, f"step {t}")
        # The default mask, ndim >= 2, leaves the LayerNorm scale unscaled:
        # the official arithmetic with that rule, and a different trajectory.
        by_ndim = _official_asam(
            params, loss, batches, rho, eta, lambda n, x: x.ndim >= 2
        )
        default = asam()
        for t, (a, b) in enumerate(zip(default, by_ndim, strict=True)):
            _assert_close(a, b, 1e-12, f"step {t}")
        apart = max(
            np.max(np.abs(official[-1][n] - by_ndim[-1][n])) for n in official[-1]
        )
        assert apart > 1e-4, apart
        # ... and the comparison can fail: ASAM moved away from the base optimizer.
        plain = _named(plain_trajectory(_coupled_sgd(), params, loss, batches)[-1])
        assert not np.allclose(plain["fc0.weight"], ours[-1]["fc0.weight"], atol=1e-6)


# --- One dtype per run: a float64 batch among float32 ones is refused ---------


def _linear_loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


def _loops():
    """Each samx loop that compiles a step: ``step(batch)`` on a fresh run."""
    import flax.linen as nn
    from flax import nnx
    from jax.sharding import Mesh

    import samx.flax
    import samx.runtime

    def trainer(tx):
        plan = samx.evaluation_plan(tx.init({"w": jnp.zeros((3, 1))}))
        ascent = 2 if plan.uses("ascent") else None
        t = samx.runtime.Trainer(tx, _linear_loss, ascent_batch_size=ascent)
        box = [t.init({"w": jnp.zeros((3, 1), jnp.float32)})]

        def step(batch):
            box[0], _ = t.step(box[0], batch)

        return step

    def nnx_step():
        model = nnx.Linear(3, 1, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
        opt = nnx.Optimizer(model, samx.sampa(optax.sgd(0.1)), wrt=nnx.Param)
        inner = samx.flax.make_nnx_train_step(
            lambda m, b: jnp.mean((m(b["x"]) - b["y"]) ** 2)
        )
        return lambda batch: inner(model, opt, batch)

    def linen_step():
        def loss(params, stats, batch):
            out = nn.Dense(1).apply({"params": params}, batch["x"])
            return jnp.mean((out - batch["y"]) ** 2), stats

        params = nn.Dense(1).init(jax.random.key(0), jnp.ones((1, 3), jnp.float32))
        box = [
            samx.flax.TrainState.create(
                apply_fn=None, params=params["params"], tx=samx.sam(optax.sgd(0.1))
            )
        ]
        inner = samx.flax.make_linen_train_step(loss)

        def step(batch):
            box[0], _ = inner(box[0], batch)

        return step

    def data_parallel():
        tx = samx.sam(optax.sgd(0.1))
        mesh = Mesh(np.array(jax.devices("cpu")[:2]), ("data",))
        inner = samx.runtime.make_data_parallel_step(tx, _linear_loss, mesh)
        box = [{"w": jnp.zeros((3, 1), jnp.float32)}]
        box.append(tx.init(box[0]))

        def step(batch):
            box[0], box[1], _ = inner(box[0], box[1], batch)

        return step

    return {
        "Trainer-sam": lambda: trainer(samx.sam(optax.sgd(0.1))),
        "Trainer-async_sam": lambda: trainer(samx.async_sam(optax.sgd(0.1))),
        "make_nnx_train_step": nnx_step,
        "make_linen_train_step": linen_step,
        "make_data_parallel_step": data_parallel,
    }


@pytest.mark.parametrize("loop", list(_loops()))
def test_a_batch_of_another_dtype_is_refused_under_x64(loop):
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(4, 3)).astype(np.float32),
        "y": rng.normal(size=(4, 1)).astype(np.float32),
    }
    wide = dict(batch, x=batch["x"].astype(np.float64))
    with jax.enable_x64(True):
        step = _loops()[loop]()
        step(batch)
        with pytest.raises(ValueError, match=r"\['x'\] is float64.*float32 there"):
            step(wide)
        step(batch)  # the run goes on
    # Without x64 a float64 NumPy batch is computed in float32: accepted.
    step = _loops()[loop]()
    step(batch)
    step(wide)
