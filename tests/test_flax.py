"""samx.flax: NNX and linen helpers, BatchNorm statistics from the descent pass.

Every helper result is compared with a hand-written functional loop: pure
functions of (params, batch_stats), the transform's ``update`` with a
``grad_fn`` written here that keeps the statistics of the descent pass
(ALGORITHMS.md, last section), and for SAM the descent point recomputed by
hand.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _testing import count_compilations
from flax import nnx

import samx
import samx.flax

BN_MOMENTUM = 0.5  # large, so that a wrong pass's statistics show
RHO = 0.5
STEPS = 10


def _batches():
    kx, ky = jax.random.split(jax.random.key(42))
    x = jax.random.normal(kx, (STEPS, 16, 8, 8, 1))
    y = jax.random.randint(ky, (STEPS, 16), 0, 10)
    return [{"x": x[t], "y": y[t]} for t in range(STEPS)]


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _base():
    return optax.sgd(0.1, momentum=0.9)


TRANSFORMS = {
    "sam": lambda: samx.sam(_base(), rho=RHO),
    "async_sam": lambda: samx.async_sam(_base(), rho=RHO),
    "sampa": lambda: samx.sampa(_base(), rho=RHO, lam=0.2),
    "plain": _base,
}


def _close(a, b, tol=1e-5):
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=tol, atol=tol), a, b
    )


def _differ(a, b, tol=1e-4):
    diff = max(
        jax.tree.leaves(jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b))
    )
    assert diff > tol, f"the trees agree to {diff}"


# ---------------------------------------------------------------- reference


def reference_run(tx, method, loss, params, stats, batches, pairing="paired"):
    """The ALGORITHMS.md loop: ``loss(params, stats, batch) -> (loss, stats)``.

    Paired: AsyncSAM's and SAMPa's ``grad_fn(., 0)`` on the previous batch (the
    first batch at the first step), where their stored gradient came from;
    unpaired: on the current batch.
    """
    vg = jax.value_and_grad(loss, has_aux=True)
    opt_state = tx.init(params)
    prev = batches[0]
    for batch in batches:
        kept = {}

        def grad_fn(p, i, batch=batch, prev=prev, stats=stats, kept=kept):
            stored = method in ("sampa", "async_sam") and pairing == "paired"
            b = prev if (stored and i == 0) else batch
            (value, new_stats), g = vg(p, stats, b)
            if i == 0:  # the descent pass: its statistics are the only ones kept
                kept["stats"], kept["loss"] = new_stats, value
            return g

        if method == "sampa":
            updates = jax.tree.map(jnp.zeros_like, params)
        elif method == "async_sam":
            ascent = jax.tree.map(lambda a: a[:8], batch)
            _, updates = vg(params, stats, ascent)  # its statistics are dropped
        else:
            (value, new_stats), updates = vg(params, stats, batch)
            if method == "plain":
                kept["stats"], kept["loss"] = new_stats, value
        extra = {}
        if method == "async_sam":  # b'/b: AsyncSAM's radius is rho / sqrt(b'/b)
            extra["ascent_fraction"] = 8 / jax.tree.leaves(batch)[0].shape[0]
        if method == "plain":
            u, opt_state = tx.update(updates, opt_state, params)
        else:
            u, opt_state = tx.update(
                updates, opt_state, params, grad_fn=grad_fn, **extra
            )
        params = optax.apply_updates(params, u)
        stats = kept["stats"]
        prev = batch
    return params, stats, kept["loss"]


def sam_one_step_reference(loss, params, stats, batch, lr=0.1):
    """One SAM step with plain SGD, by hand: descent point, stats, naive stats."""
    vg = jax.value_and_grad(loss, has_aux=True)
    (_, stats_at_x), g = vg(params, stats, batch)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(g)))
    point = jax.tree.map(lambda p, v: p + RHO * v / norm, params, g)
    (descent_loss, descent_stats), d = vg(point, stats, batch)
    _, naive_stats = loss(point, stats_at_x, batch)  # both passes update
    new_params = jax.tree.map(lambda p, v: p - lr * v, params, d)
    return new_params, descent_stats, naive_stats, stats_at_x, descent_loss


# ---------------------------------------------------------------------- NNX


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=BN_MOMENTUM, rngs=rngs)
        self.dense = nnx.Linear(4, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.conv(x)))
        return self.dense(h.mean(axis=(1, 2)))


def nnx_loss(model, batch):
    return _xent(model(batch["x"]), batch["y"])


def nnx_pure():
    """Pure ``loss(params, stats, batch)`` from nnx.split / nnx.merge."""
    graphdef, params, stats = nnx.split(CNN(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)

    def loss(params, stats, batch):
        model = nnx.merge(graphdef, params, stats)
        value = nnx_loss(model, batch)
        return value, nnx.as_pure(nnx.state(model, nnx.BatchStat))

    return loss, nnx.as_pure(params), nnx.as_pure(stats)


def nnx_params_stats(model):
    return (
        nnx.as_pure(nnx.state(model, nnx.Param)),
        nnx.as_pure(nnx.state(model, nnx.BatchStat)),
    )


def _cases():
    """(method, pairing): the paired default for all, unpaired where it differs."""
    return [(m, "paired") for m in TRANSFORMS] + [
        ("async_sam", "unpaired"),
        ("sampa", "unpaired"),
    ]


def _warm_up_batch():
    """A batch the run never sees: compiling on it must not leak into the run."""
    return jax.tree.map(lambda x: x[::-1] + 1, _batches()[0])


@pytest.mark.parametrize("method, pairing", _cases())
def test_nnx_train_step_matches_reference_and_compiles_once(method, pairing):
    # The step keeps the previous batch on the optimizer: the loop passes the
    # current batch only, and compiling on copies first leaks nothing.
    batches = _batches()
    model = CNN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, TRANSFORMS[method](), wrt=nnx.Param)
    step = samx.flax.make_nnx_train_step(
        nnx_loss,
        ascent_batch_size=8 if method == "async_sam" else None,
        pairing=pairing,
    )
    jax.block_until_ready(
        step(nnx.clone(model), nnx.clone(optimizer), _warm_up_batch())
    )
    with count_compilations() as compiled:
        for batch in batches:
            metrics = step(model, optimizer, batch)
        jax.block_until_ready(metrics)
    assert compiled == []

    loss, params, stats = nnx_pure()
    want_params, want_stats, want_loss = reference_run(
        TRANSFORMS[method](), method, loss, params, stats, batches, pairing
    )
    got_params, got_stats = nnx_params_stats(model)
    _close(got_params, want_params)
    _close(got_stats, want_stats)
    _close(metrics["loss"], want_loss)
    _differ(got_stats, stats)  # the statistics did move
    paired = method in ("async_sam", "sampa") and pairing == "paired"
    assert hasattr(optimizer, "prev_batch") == paired
    if method in ("async_sam", "sampa"):  # and the pairing matters
        other = "unpaired" if pairing == "paired" else "paired"
        _differ(
            got_params,
            reference_run(
                TRANSFORMS[method](), method, loss, params, stats, batches, other
            )[0],
        )


def test_nnx_prev_batch_overrides_the_kept_batch():
    # SAMPa (paired) told at every step that the previous batch is the current
    # one: the unpaired run.
    batches = _batches()[:3]
    model = CNN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, TRANSFORMS["sampa"](), wrt=nnx.Param)
    step = samx.flax.make_nnx_train_step(nnx_loss)
    for batch in batches:
        step(model, optimizer, batch, prev_batch=batch)
    loss, params, stats = nnx_pure()
    want_params, want_stats, _ = reference_run(
        TRANSFORMS["sampa"](), "sampa", loss, params, stats, batches, "unpaired"
    )
    _close(nnx_params_stats(model), (want_params, want_stats))


def test_nnx_sam_step_keeps_descent_stats_only():
    batch = _batches()[0]
    model = CNN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, samx.sam(optax.sgd(0.1), rho=RHO), wrt=nnx.Param)
    metrics = samx.flax.nnx_train_step(model, optimizer, batch, nnx_loss)

    loss, params, stats = nnx_pure()
    want_params, descent, naive, at_x, descent_loss = sam_one_step_reference(
        loss, params, stats, batch
    )
    got_params, got_stats = nnx_params_stats(model)
    _close(got_params, want_params)
    _close(got_stats, descent)
    _close(metrics["loss"], descent_loss)
    _differ(got_stats, naive)
    _differ(got_stats, at_x)


def _with_a_corrupt_batch():
    """Two good batches with a batch of NaN images between them."""
    good = _batches()[:2]
    bad = {"x": jnp.full_like(good[0]["x"], jnp.nan), "y": good[0]["y"]}
    return good, [good[0], bad, good[1]]


def _safe_sam():
    return samx.skip_nonfinite(samx.sam(optax.sgd(0.1, momentum=0.9), rho=RHO))


def test_nnx_corrupt_batch_keeps_the_statistics_and_skips_the_step():
    good, with_bad = _with_a_corrupt_batch()
    models = {}
    for name, batches in (("clean", good), ("corrupt", with_bad)):
        model = CNN(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, _safe_sam(), wrt=nnx.Param)
        step = samx.flax.make_nnx_train_step(nnx_loss)
        for t, batch in enumerate(batches):
            before = nnx_params_stats(model)
            step(model, optimizer, batch)
            if name == "corrupt" and t == 1:  # NaN statistics and gradients
                _close(nnx_params_stats(model), before, tol=0)
        models[name] = model
    # The run with the corrupt batch is the run without it.
    _close(nnx_params_stats(models["corrupt"]), nnx_params_stats(models["clean"]))


def test_nnx_corrupt_batch_keeps_the_statistics_without_skip_nonfinite():
    _, (_, bad, _) = _with_a_corrupt_batch()
    model = CNN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, samx.sam(optax.sgd(0.1), rho=RHO), wrt=nnx.Param)
    _, stats = nnx_params_stats(model)
    samx.flax.nnx_train_step(model, optimizer, bad, nnx_loss)
    params_after, stats_after = nnx_params_stats(model)
    _close(stats_after, stats, tol=0)  # not NaN: the start-of-step statistics
    assert not all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params_after))


def test_nnx_grads_with_optimizer_update_and_aux():
    batch = _batches()[0]
    model = CNN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, samx.sam(optax.sgd(0.1), rho=RHO), wrt=nnx.Param)

    def loss_aux(model, batch):
        logits = model(batch["x"])
        return _xent(logits, batch["y"]), {"logits": logits}

    grads, grad_fn = samx.flax.nnx_grads(
        loss_aux, model, optimizer, batch, has_aux=True
    )
    assert isinstance(grads, nnx.State)
    with pytest.raises(RuntimeError, match="only after the optimizer"):
        _ = grad_fn.loss
    optimizer.update(model, grads, grad_fn=grad_fn)
    assert grad_fn.aux["logits"].shape == (16, 10)

    loss, params, stats = nnx_pure()
    want_params, descent, _, _, descent_loss = sam_one_step_reference(
        loss, params, stats, batch
    )
    got_params, got_stats = nnx_params_stats(model)
    _close(got_params, want_params)
    _close(got_stats, descent)
    _close(grad_fn.value[0], descent_loss)


def _under_cond(tx):
    """``tx`` with its update traced under ``lax.cond``, as wrappers do."""

    def update(updates, state, params=None, **extra_args):
        def run(_):
            return tx.update(updates, state, params, **extra_args)

        return jax.lax.cond(True, run, run, None)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def test_nnx_update_under_lax_cond_is_a_clear_error():
    batch = _batches()[0]
    model = CNN(nnx.Rngs(0))
    tx = _under_cond(samx.sam(optax.sgd(0.1)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = nnx.jit(samx.flax.nnx_train_step, static_argnames="loss_fn")
    with pytest.raises(RuntimeError, match="lax.cond"):
        step(model, optimizer, batch, nnx_loss)
    # optax.MultiSteps is refused before, by samx.sam itself.
    tx = optax.MultiSteps(samx.sam(optax.sgd(0.1)), every_k_schedule=2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    with pytest.raises(ValueError, match="samx.microbatched"):
        step(model, optimizer, batch, nnx_loss)


def test_nnx_bad_inputs():
    batch = _batches()[0]
    model = CNN(nnx.Rngs(0))
    sam_opt = nnx.Optimizer(model, samx.sam(optax.sgd(0.1)), wrt=nnx.Param)
    async_opt = nnx.Optimizer(model, samx.async_sam(optax.sgd(0.1)), wrt=nnx.Param)
    grads = samx.flax.nnx_grads
    with pytest.raises(TypeError, match="loss_fn"):
        grads("loss", model, sam_opt, batch)
    with pytest.raises(TypeError, match="model"):
        grads(nnx_loss, {"w": 1.0}, sam_opt, batch)
    with pytest.raises(TypeError, match="optimizer"):
        grads(nnx_loss, model, samx.sam(optax.sgd(0.1)), batch)
    with pytest.raises(ValueError, match="scalar loss"):
        grads(lambda m, b: m(b["x"]).sum(axis=1), model, sam_opt, batch)
    with pytest.raises(ValueError, match="has_aux=True"):
        grads(lambda m, b: (nnx_loss(m, b), 0.0), model, sam_opt, batch)
    with pytest.raises(ValueError, match="leading batch axis"):
        grads(nnx_loss, model, sam_opt, {**batch, "w": jnp.float32(1.0)})
    with pytest.raises(ValueError, match="same leading batch size"):
        grads(nnx_loss, model, sam_opt, {**batch, "y": batch["y"][:8]})
    with pytest.raises(ValueError, match="prev_batch.*evaluates no gradient on it"):
        grads(nnx_loss, model, sam_opt, batch, prev_batch=batch)
    with pytest.raises(ValueError, match=r"prev_batch=\.\.\.\)` is required"):
        grads(nnx_loss, model, async_opt, batch)
    with pytest.raises(ValueError, match=r"pairing=\.\.\.\)` must be 'paired'"):
        grads(nnx_loss, model, async_opt, batch, pairing="previous")
    with pytest.raises(ValueError, match="ascent_batch_size.*not samx.async_sam"):
        grads(nnx_loss, model, sam_opt, batch, ascent_batch_size=8)
    with pytest.raises(ValueError, match=r"ascent_batch_size.*\[1, 16\]"):
        grads(nnx_loss, model, async_opt, batch, prev_batch=batch, ascent_batch_size=32)
    with pytest.raises(ValueError, match="not both"):
        grads(
            nnx_loss,
            model,
            async_opt,
            batch,
            prev_batch=batch,
            ascent_batch=batch,
            ascent_batch_size=8,
        )
    with pytest.raises(TypeError, match="nnx.Optimizer"):
        samx.flax.nnx_train_step(model, sam_opt.opt_state, batch, nnx_loss)


# -------------------------------------------------------------------- linen


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Conv(4, (3, 3))(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)(h)
        h = nn.relu(h)
        return nn.Dense(10)(h.mean(axis=(1, 2)))


LINEN = LinenCNN()


def linen_loss(params, batch_stats, batch):
    logits, updates = LINEN.apply(
        {"params": params, "batch_stats": batch_stats},
        batch["x"],
        train=True,
        mutable=["batch_stats"],
    )
    return _xent(logits, batch["y"]), updates["batch_stats"]


def linen_state(tx):
    variables = LINEN.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
    return samx.flax.TrainState.create(
        apply_fn=LINEN.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
    )


@pytest.mark.parametrize("method, pairing", _cases())
def test_linen_train_step_matches_reference_and_compiles_once(method, pairing):
    batches = _batches()
    state = linen_state(TRANSFORMS[method]())
    start = state
    step = samx.flax.make_linen_train_step(
        linen_loss,
        ascent_batch_size=8 if method == "async_sam" else None,
        pairing=pairing,
    )
    jax.block_until_ready(step(state, _warm_up_batch()))  # compiles; discarded
    with count_compilations() as compiled:
        for batch in batches:  # the state keeps the previous batch
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    assert compiled == []
    assert int(state.step) == STEPS
    paired = method in ("async_sam", "sampa") and pairing == "paired"
    assert (state.prev_batch is not None) == paired

    want_params, want_stats, want_loss = reference_run(
        TRANSFORMS[method](),
        method,
        linen_loss,
        start.params,
        start.batch_stats,
        batches,
        pairing,
    )
    _close(state.params, want_params)
    _close(state.batch_stats, want_stats)
    _close(metrics["loss"], want_loss)
    _differ(state.batch_stats, start.batch_stats)


def test_linen_sam_step_keeps_descent_stats_only():
    batch = _batches()[0]
    state = linen_state(samx.sam(optax.sgd(0.1), rho=RHO))
    want_params, descent, naive, at_x, descent_loss = sam_one_step_reference(
        linen_loss, state.params, state.batch_stats, batch
    )
    grads, grad_fn = samx.flax.linen_grads(linen_loss, state, batch)
    new = samx.flax.apply_gradients(state, grads, grad_fn=grad_fn)
    new = new.replace(batch_stats=grad_fn.model_state)
    _close(new.params, want_params)
    _close(new.batch_stats, descent)
    _close(grad_fn.loss, descent_loss)
    _differ(new.batch_stats, naive)
    _differ(new.batch_stats, at_x)


def test_linen_corrupt_batch_keeps_the_statistics_and_skips_the_step():
    good, with_bad = _with_a_corrupt_batch()
    step = samx.flax.make_linen_train_step(linen_loss)
    states = {}
    for name, batches in (("clean", good), ("corrupt", with_bad)):
        state = linen_state(_safe_sam())
        for t, batch in enumerate(batches):
            before = state
            state, _ = step(state, batch)
            if name == "corrupt" and t == 1:
                _close(state.params, before.params, tol=0)
                _close(state.batch_stats, before.batch_stats, tol=0)
        states[name] = state
    _close(states["corrupt"].params, states["clean"].params)
    _close(states["corrupt"].batch_stats, states["clean"].batch_stats)
    assert int(states["corrupt"].opt_state.total_notfinite) == 1


def test_linen_apply_gradients_matches_flax_for_plain_optax():
    batch = _batches()[0]
    state = linen_state(optax.adam(1e-2))
    grads = jax.grad(lambda p: linen_loss(p, state.batch_stats, batch)[0])(state.params)
    ours = samx.flax.apply_gradients(state, grads)
    theirs = state.apply_gradients(grads=grads)
    _close(ours.params, theirs.params, tol=0)
    assert int(ours.step) == 1


def test_linen_update_under_lax_cond_is_a_clear_error():
    batch = _batches()[0]
    state = linen_state(_under_cond(samx.sampa(optax.sgd(0.1))))
    step = jax.jit(samx.flax.linen_train_step, static_argnames="loss_fn")
    with pytest.raises(RuntimeError, match="lax.cond"):
        step(state, batch, linen_loss, prev_batch=batch)
    state = linen_state(optax.MultiSteps(samx.sampa(optax.sgd(0.1)), 2))
    with pytest.raises(ValueError, match="samx.microbatched"):
        step(state, batch, linen_loss, prev_batch=batch)


def test_linen_bad_inputs():
    batch = _batches()[0]
    state = linen_state(samx.sam(optax.sgd(0.1)))
    grads = samx.flax.linen_grads
    with pytest.raises(TypeError, match="loss_fn"):
        grads(None, state, batch)
    with pytest.raises(TypeError, match="TrainState"):
        grads(linen_loss, {"params": state.params}, batch)

    def whole_dict(params, batch_stats, batch):
        loss, stats = linen_loss(params, batch_stats, batch)
        return loss, {"batch_stats": stats}

    with pytest.raises(ValueError, match=r"\['batch_stats'\]"):
        grads(whole_dict, state, batch)
    with pytest.raises(ValueError, match=r"\(loss, new_batch_stats\)"):
        grads(lambda p, s, b: linen_loss(p, s, b)[0], state, batch)
    with pytest.raises(ValueError, match="scalar loss"):
        grads(lambda p, s, b: (jnp.ones(3), s), state, batch)
    with pytest.raises(ValueError, match="leading batch axis"):
        grads(linen_loss, state, {"x": batch["x"], "y": jnp.int32(0)})
    with pytest.raises(ValueError, match="prev_batch"):
        grads(linen_loss, state, batch, prev_batch=batch)
    with pytest.raises(ValueError, match="ascent_batch"):
        grads(linen_loss, state, batch, ascent_batch=batch)
    with pytest.raises(ValueError, match="does not have the tree structure"):
        samx.flax.apply_gradients(state, {"w": jnp.zeros(3)})


@pytest.mark.parametrize("flavour", ["nnx", "linen"])
@pytest.mark.parametrize("method", ["sam", "async_sam", "sampa"])
def test_donating_steps_give_the_same_run_and_free_the_given_arrays(flavour, method):
    # make_*_train_step(donate=True): the jitted update reuses the given
    # state's buffers (the old arrays are deleted) and the run is bit-identical
    # to donate=False. The batches are JAX arrays, which the step also keeps
    # as the previous batch: a state that is donated must not share them.
    rng = np.random.default_rng(0)
    batches = [
        {
            "x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
        }
        for _ in range(3)
    ]
    ascent = 4 if method == "async_sam" else None

    def run(donate):
        if flavour == "nnx":
            model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
            opt = nnx.Optimizer(model, TRANSFORMS[method](), wrt=nnx.Param)
            step = samx.flax.make_nnx_train_step(
                lambda m, b: jnp.mean((m(b["x"]) - b["y"]) ** 2),
                ascent_batch_size=ascent,
                donate=donate,
            )
            given = model.kernel.get_value()
            for batch in batches:
                step(model, opt, batch)
            return given, model.kernel.get_value()
        dense = nn.Dense(2)
        params = dense.init(jax.random.key(0), batches[0]["x"])["params"]
        state = samx.flax.TrainState.create(
            apply_fn=None, params=params, tx=TRANSFORMS[method]()
        )

        def loss(params, stats, batch):
            out = dense.apply({"params": params}, batch["x"])
            return jnp.mean((out - batch["y"]) ** 2), stats

        step = samx.flax.make_linen_train_step(
            loss, ascent_batch_size=ascent, donate=donate
        )
        given = params["kernel"]
        for batch in batches:
            state, _ = step(state, batch)
        return given, state.params["kernel"]

    given, kept = run(donate=False)
    given_donated, donated = run(donate=True)
    assert not given.is_deleted() and given_donated.is_deleted()
    assert all(not x.is_deleted() for b in batches for x in jax.tree.leaves(b))
    np.testing.assert_array_equal(donated, kept)
