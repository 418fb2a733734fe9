"""Weight decay acts where it is placed: inside ``base``, or (wrongly) before samx.

Inside ``base`` it is the base optimizer's own decay (coupled, like PyTorch
SGD's ``weight_decay``); chained before a samx transform it changes only the
ascent gradient (SAM, AsyncSAM) or nothing (SAMPa), and the descent never sees
it. The references are plain optax trajectories.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _testing import mlp_problem, plain_trajectory, samx_trajectory

import samx
from samx import _chain

WD = 0.05
METHODS = {
    "sam": lambda base, rho: samx.sam(base, rho=rho),
    "async_sam": lambda base, rho: samx.async_sam(base, rho=rho),
    # rho = 0 (and then lam = 0) makes every transform its base optimizer.
    "sampa": lambda base, rho: samx.sampa(base, rho=rho, lam=0.2 if rho else 0.0),
}


def _sgd():
    return optax.sgd(0.1, momentum=0.9)


def _decayed_sgd():
    return optax.chain(optax.add_decayed_weights(WD), _sgd())


def _outside(method, rho):
    """The README's former mistake: the decay chained before the transform."""
    return optax.chain(optax.add_decayed_weights(WD), METHODS[method](_sgd(), rho))


def _problem(steps):
    params, loss, sample = mlp_problem(jax.random.key(0))
    batches = [sample(k) for k in jax.random.split(jax.random.key(1), steps)]
    return params, loss, batches


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_decay_before_the_transform_never_reaches_the_descent(method):
    # With rho = 0 every transform is its base: the decay chained before it is
    # lost (plain SGD, exactly), the decay inside base is SGD with decay.
    params, loss, batches = _problem(10)
    outside = samx_trajectory(_outside(method, 0.0), params, loss, batches)
    inside = samx_trajectory(
        METHODS[method](_decayed_sgd(), 0.0), params, loss, batches
    )
    no_decay = plain_trajectory(_sgd(), params, loss, batches)
    with_decay = plain_trajectory(_decayed_sgd(), params, loss, batches)
    for t in range(len(batches)):
        _assert_equal(outside[t], no_decay[t])
        _assert_equal(inside[t], with_decay[t])
    # The decay does matter: the two references differ.
    assert not np.allclose(no_decay[-1]["layer0"]["w"], with_decay[-1]["layer0"]["w"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_decay_before_the_transform_leaves_the_weights_as_large(method):
    # With rho > 0, 50 steps: the norm of the weights, decay before the
    # transform vs none vs inside base (measured: about 4.2, 4.2 and 0.7).
    params, loss, batches = _problem(50)
    rho = 0.1 if method == "sampa" else 0.05

    def norm(tx):
        return float(optax.tree.norm(samx_trajectory(tx, params, loss, batches)[-1]))

    outside = norm(_outside(method, rho))
    none = norm(METHODS[method](_sgd(), rho))
    inside = norm(METHODS[method](_decayed_sgd(), rho))
    assert abs(outside - none) < 0.01 * none, (outside, none)
    assert inside < 0.25 * none, (inside, none)
    if method == "sampa":  # it does not read its input: exactly no decay
        assert outside == none


# --- samx._chain: what the Trainer and the Flax helpers can see and warn about --


def _state(tx):
    params, _, _ = _problem(1)
    return tx.init(params)


def test_transforms_before_finds_a_transform_chained_before_samx():
    sampa = optax.inject_hyperparams(samx.sampa)(_sgd(), rho=0.1)
    found = {
        "decay-before": _outside("sam", 0.05),
        "clip-before-inject": optax.chain(optax.clip_by_global_norm(1.0), sampa),
        "inside-skip": samx.skip_nonfinite(
            optax.chain(optax.scale_by_rms(), samx.async_sam(_sgd()))
        ),
    }
    assert {k: _chain.transforms_before(_state(tx)) for k, tx in found.items()} == {
        "decay-before": ["EmptyState"],
        "clip-before-inject": ["EmptyState"],
        "inside-skip": ["ScaleByRmsState"],
    }
    # An abstract state (jax.eval_shape) is enough.
    params, _, _ = _problem(1)
    abstract = jax.eval_shape(_outside("sampa", 0.1).init, params)
    assert _chain.transforms_before(abstract) == ["EmptyState"]


def test_transforms_before_is_empty_where_nothing_precedes_samx():
    fine = [
        samx.sam(_decayed_sgd()),  # decay inside base: chained, but not before samx
        optax.chain(samx.sam(_sgd()), optax.clip(1.0)),  # after: acts on the step
        samx.skip_nonfinite(samx.sampa(_decayed_sgd())),
        _decayed_sgd(),  # no samx transform at all
    ]
    for tx in fine:
        assert _chain.transforms_before(_state(tx)) == []


def test_transforms_before_reads_an_nnx_optimizer_state():
    from flax import nnx

    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    wrong = nnx.Optimizer(model, _outside("sam", 0.05), wrt=nnx.Param)
    right = nnx.Optimizer(model, samx.sam(_decayed_sgd()), wrt=nnx.Param)
    assert _chain.transforms_before(wrong.opt_state) == ["EmptyState"]
    assert _chain.transforms_before(right.opt_state) == []


def test_warn_transforms_before_names_the_caller_and_the_fix():
    with pytest.warns(
        UserWarning, match=r"samx\.runtime\.Trainer: .* 1 transform.*inside `base`"
    ):
        _chain.warn_transforms_before(
            "samx.runtime.Trainer", _state(_outside("sam", 0.05))
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _chain.warn_transforms_before(
            "samx.runtime.Trainer", _state(samx.sam(_decayed_sgd()))
        )


def test_the_trainer_and_the_flax_helpers_warn_at_set_up():
    from flax import nnx

    import samx.flax
    from samx.runtime import Trainer

    params, loss, _ = _problem(1)
    with pytest.warns(UserWarning, match=r"samx\.runtime\.Trainer: .*inside `base`"):
        Trainer(_outside("sam", 0.05), loss).init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(samx.sam(_decayed_sgd()), loss).init(params)

    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _outside("sam", 0.05), wrt=nnx.Param)
    batch = {"x": jnp.ones((4, 2)), "y": jnp.ones((4, 3))}

    def nnx_loss(model, batch):
        return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

    with pytest.warns(UserWarning, match=r"samx\.flax\.nnx_grads: "):
        samx.flax.nnx_grads(nnx_loss, model, optimizer, batch)
    with pytest.warns(UserWarning, match=r"samx\.flax\.TrainState\.create: "):
        samx.flax.TrainState.create(
            apply_fn=None, params={"w": jnp.ones(2)}, tx=_outside("sampa", 0.1)
        )
