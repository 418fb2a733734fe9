"""samx.sam: against optax.contrib.sam, hand-derived steps, edge cases, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _testing import mlp_problem, plain_trajectory, samx_trajectory

import samx

BASES = {
    "sgd": lambda: optax.sgd(0.1),
    "sgd-momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
}


def _train(tx, params, loss, batches):
    """Runs ``tx`` over ``batches``; ``grad_fn`` uses the step's own batch."""
    return samx_trajectory(tx, params, loss, batches)


@pytest.mark.parametrize("base", sorted(BASES))
def test_equals_optax_contrib_sam_step_for_step(base):
    params, loss, sample = mlp_problem(jax.random.key(0))
    batches = [sample(k) for k in jax.random.split(jax.random.key(1), 20)]
    rho = 0.05
    ours = _train(samx.sam(BASES[base](), rho=rho), params, loss, batches)
    reference = optax.contrib.sam(
        BASES[base](),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )
    theirs = _train(reference, params, loss, batches)
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6, err_msg=f"step {t}")
    # The comparison can fail: SAM moved away from plain SGD.
    plain = _train(BASES[base](), params, loss, batches)[-1]
    assert not np.allclose(plain["layer0"]["w"], ours[-1]["layer0"]["w"], atol=1e-4)


def test_sam_step_by_hand_on_a_quadratic():
    # f(x) = 0.5 * sum(a * x**2), so grad f(x) = a * x.
    a = np.array([1.0, 4.0, 9.0])
    x = np.array([1.0, -1.0, 0.5])
    rho, lr = 0.1, 0.05
    g = a * x  # [1, -4, 4.5]
    e = rho * g / np.sqrt(np.sum(g**2))  # ||g|| = sqrt(1 + 16 + 20.25)
    expected = x - lr * a * (x + e)

    def loss(p):
        return 0.5 * jnp.sum(jnp.asarray(a, jnp.float32) * p**2)

    [got] = _train(
        samx.sam(optax.sgd(lr), rho=rho),
        jnp.asarray(x, jnp.float32),
        lambda p, _: loss(p),
        [None],
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_asam_step_by_hand():
    # Weight matrix (masked by default) and a bias (T = 1).
    cw, cb = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.5, 2.0])
    w, b = np.array([[0.5, -1.0], [2.0, 0.25]]), np.array([1.0, -3.0])
    rho, eta, lr = 0.5, 0.01, 0.1
    gw, gb = cw * w, cb * b
    tw, tb = np.abs(w) + eta, np.ones(2)
    norm = np.sqrt(np.sum((tw * gw) ** 2) + np.sum((tb * gb) ** 2))
    ew, eb = rho * tw**2 * gw / norm, rho * tb**2 * gb / norm
    expected = {"w": w - lr * cw * (w + ew), "b": b - lr * cb * (b + eb)}

    def loss(p, _):
        return 0.5 * (
            jnp.sum(jnp.asarray(cw, jnp.float32) * p["w"] ** 2)
            + jnp.sum(jnp.asarray(cb, jnp.float32) * p["b"] ** 2)
        )

    params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    for mask in (None, {"w": True, "b": False}, lambda p: {"w": True, "b": False}):
        tx = samx.sam(optax.sgd(lr), rho=rho, adaptive=True, eta=eta, mask=mask)
        [got] = _train(tx, params, loss, [None])
        np.testing.assert_allclose(got["w"], expected["w"], rtol=1e-6)
        np.testing.assert_allclose(got["b"], expected["b"], rtol=1e-6)
    # Masking every leaf is a different formula (T on the bias too).
    tx = samx.sam(optax.sgd(lr), rho=rho, adaptive=True, eta=eta, mask={"w": 1, "b": 1})
    [other] = _train(tx, params, loss, [None])
    assert not np.allclose(other["b"], expected["b"], rtol=1e-4)


def test_rho_schedule_is_evaluated_at_the_step_count():
    a = jnp.array([1.0, 4.0])
    lr = 0.1
    schedule = optax.linear_schedule(0.2, 0.0, 4)  # 0.2, 0.15, 0.1, 0.05

    def loss(p, _):
        return 0.5 * jnp.sum(a * p**2)

    x = np.array([1.0, 1.0])
    got = _train(
        samx.sam(optax.sgd(lr), rho=schedule), jnp.asarray(x), loss, [None] * 4
    )
    an = np.asarray(a)
    for t, rho in enumerate([0.2, 0.15, 0.1, 0.05]):
        g = an * x
        x = x - lr * an * (x + rho * g / np.linalg.norm(g))
        np.testing.assert_allclose(got[t], x, rtol=1e-6)


@pytest.mark.parametrize("base", sorted(BASES))
def test_rho_zero_gives_exactly_the_base_trajectory(base):
    params, loss, sample = mlp_problem(jax.random.key(2))
    batches = [sample(k) for k in jax.random.split(jax.random.key(3), 10)]
    ours = _train(samx.sam(BASES[base](), rho=0.0), params, loss, batches)
    theirs = plain_trajectory(BASES[base](), params, loss, batches)
    for t, params in enumerate(theirs):
        for x, y in zip(jax.tree.leaves(ours[t]), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(x, y)


def test_zero_gradient_gives_zero_perturbation_and_finite_update():
    seen = []
    params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for adaptive in (False, True):
        tx = samx.sam(optax.sgd(0.1), rho=0.05, adaptive=adaptive)

        def grad_fn(p, i):
            seen.append(p)
            return jax.tree.map(jnp.ones_like, p)

        updates, _ = tx.update(zeros, tx.init(params), params, grad_fn=grad_fn)
        for x, y in zip(
            jax.tree.leaves(seen[-1]), jax.tree.leaves(params), strict=True
        ):
            np.testing.assert_array_equal(x, y)
        for u in jax.tree.leaves(updates):
            np.testing.assert_allclose(u, -0.1 * np.ones_like(u))


def test_bf16_params_give_bf16_updates():
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.bfloat16)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    tx = samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    updates, state = jax.jit(
        lambda g, s, p: tx.update(g, s, p, grad_fn=lambda q, i: g)
    )(grads, tx.init(params), params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert all(
        m.dtype == jnp.bfloat16 for m in jax.tree.leaves(state.base_state[0].trace)
    )


def test_norm_is_computed_in_float32():
    # 256 float16 entries of 300: the sum of squares (2.3e7) overflows float16
    # (max 65504); computed in float32 the perturbation has norm rho.
    params = jnp.zeros(256, jnp.float16)
    grads = jnp.full(256, 300.0, jnp.float16)
    seen = []
    tx = samx.sam(optax.sgd(0.1), rho=0.5)

    def grad_fn(p, i):
        seen.append(p)
        return grads

    updates, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    e = np.asarray(seen[0], np.float32)
    np.testing.assert_allclose(np.linalg.norm(e), 0.5, rtol=1e-2)
    assert np.all(np.isfinite(np.asarray(updates, np.float32)))


def test_no_implicit_dtype_promotion_in_samx():
    params = {"w": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.ones(2, jnp.float32)}
    with jax.numpy_dtype_promotion("strict"):
        for adaptive in (False, True):
            tx = samx.sam(optax.sgd(0.1), rho=jnp.float32(0.05), adaptive=adaptive)
            updates, _ = jax.jit(
                lambda s, p: tx.update(p, s, p, grad_fn=lambda q, i: q)  # noqa: B023
            )(tx.init(params), params)
            assert updates["w"].dtype == jnp.bfloat16


# --- composition ---------------------------------------------------------------


def _one_step(tx, params, ascent_grad, descent_grad):
    updates, _ = tx.update(
        ascent_grad, tx.init(params), params, grad_fn=lambda p, i: descent_grad
    )
    return updates


def test_clipping_inside_sam_clips_the_descent_gradient():
    params = jnp.array([0.0, 0.0])
    g, d = jnp.array([3.0, 4.0]), jnp.array([30.0, 40.0])  # ||d|| = 50
    tx = samx.sam(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), rho=0.1)
    np.testing.assert_allclose(_one_step(tx, params, g, d), -d / 50.0, rtol=1e-6)


def test_clipping_before_sam_only_clips_the_ascent_and_is_undone():
    params = jnp.array([1.0, -2.0])
    g, d = jnp.array([30.0, 40.0]), jnp.array([-7.0, 2.0])
    seen = []

    def grad_fn(p, i):
        seen.append(p)
        return d

    clipped = optax.chain(optax.clip_by_global_norm(1.0), samx.sam(optax.sgd(1.0)))
    plain = samx.sam(optax.sgd(1.0))
    u1, _ = clipped.update(g, clipped.init(params), params, grad_fn=grad_fn)
    u2, _ = plain.update(g, plain.init(params), params, grad_fn=grad_fn)
    np.testing.assert_allclose(u1, u2, rtol=1e-6)  # the descent is not clipped
    np.testing.assert_allclose(u1, -d, rtol=1e-6)
    np.testing.assert_allclose(seen[0], seen[1], rtol=1e-6)  # same ascent point


def test_base_sees_the_clean_parameters():
    # Decoupled weight decay acts on the clean parameters, not the perturbed ones.
    params = jnp.array([1.0, 2.0])
    g = jnp.array([1.0, 0.0])
    tx = samx.sam(optax.adamw(0.0, weight_decay=0.1), rho=0.5)
    _one_step(tx, params, g, g)
    tx = samx.sam(optax.add_decayed_weights(0.1), rho=0.5)
    np.testing.assert_allclose(_one_step(tx, params, g, g), g + 0.1 * params)


# --- bad input -----------------------------------------------------------------


@pytest.mark.parametrize("rho", [-0.1, float("nan"), float("inf"), -jnp.inf])
def test_bad_rho(rho):
    with pytest.raises(ValueError, match=r"samx.sam\(rho=...\)"):
        samx.sam(optax.sgd(0.1), rho=rho)


def test_rho_must_be_a_scalar():
    with pytest.raises(TypeError, match=r"rho=.*scalar.*\(2,\)"):
        samx.sam(optax.sgd(0.1), rho=jnp.array([0.1, 0.2]))
    with pytest.raises(TypeError, match=r"rho=.*must be a number"):
        samx.sam(optax.sgd(0.1), rho="0.05")


def test_a_rho_schedule_is_checked_when_the_transform_is_built():
    # Negative from step 10 on: the error names the argument and the step.
    def bad(count):
        return 0.05 - 0.01 * count

    with pytest.raises(
        ValueError, match=r"`samx\.sam\(rho=\.\.\.\)` at step 10 .*-0\.05"
    ):
        samx.sam(optax.sgd(0.1), rho=bad)
    # Infinite at step 0; an array rather than a scalar; a callable that is
    # not a schedule of the step count.
    with pytest.raises(ValueError, match=r"at step 0 must be finite"):
        samx.sam(optax.sgd(0.1), rho=lambda count: jnp.inf * count / count)
    with pytest.raises(TypeError, match=r"at step 0 must be a scalar.*\(2,\)"):
        samx.sam(optax.sgd(0.1), rho=lambda count: jnp.ones(2))
    with pytest.raises(TypeError, match=r"rho=\.\.\.\)` is callable.*step count 0"):
        samx.sam(optax.sgd(0.1), rho=lambda: 0.05)
    # Schedules that stay in range are accepted, optax's included ...
    for rho in (
        optax.linear_schedule(0.05, 0.0, 1000),
        optax.cosine_decay_schedule(0.1, 10_000),
        optax.warmup_cosine_decay_schedule(0.0, 0.1, 100, 10_000),
        lambda count: 0.05,
    ):
        samx.sam(optax.sgd(0.1), rho=rho)
    # ... and so is one that leaves it between the counts checked (documented:
    # the values are not checked inside a step).
    samx.sam(optax.sgd(0.1), rho=lambda count: jnp.where(count == 5, -1.0, 0.05))


def test_a_rho_schedule_is_not_evaluated_eagerly_when_traced():
    # Built inside jit, a schedule that closes over a traced value cannot be
    # checked: the transform is built without error.
    @jax.jit
    def build_and_step(scale, params):
        tx = samx.sam(optax.sgd(0.1), rho=lambda count: -scale * count)
        updates, _ = tx.update(params, tx.init(params), params, grad_fn=lambda p, i: p)
        return updates

    assert np.all(np.isfinite(build_and_step(1.0, jnp.ones(2))))


@pytest.mark.parametrize("name", ["eta", "eps"])
def test_bad_eta_and_eps(name):
    with pytest.raises(ValueError, match=rf"samx.sam\({name}=...\)"):
        samx.sam(optax.sgd(0.1), adaptive=True, **{name: -1.0})


def test_base_must_be_an_optax_transform():
    with pytest.raises(TypeError, match=r"samx.sam\(base=...\).*optax.sgd\(0.1\)"):
        samx.sam(optax.sgd)  # the factory, not the transform
    with pytest.raises(TypeError, match=r"samx.sam\(base=...\).*got str"):
        samx.sam("sgd")


def test_mask_needs_adaptive():
    with pytest.raises(ValueError, match="adaptive=True"):
        samx.sam(optax.sgd(0.1), mask={"w": True})


def test_missing_grad_fn_says_how_to_pass_it():
    tx = samx.sam(optax.sgd(0.1))
    params = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"grad_fn.*grad_fn=lambda p, i"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(TypeError, match="must be callable"):
        tx.update(params, tx.init(params), params, grad_fn=params)


def test_missing_params():
    tx = samx.sam(optax.sgd(0.1))
    with pytest.raises(ValueError, match="params"):
        tx.update(jnp.zeros(3), tx.init(jnp.zeros(3)), None, grad_fn=lambda p, i: p)


def test_grad_fn_with_the_wrong_tree_names_the_leaf():
    params = {"a": jnp.zeros(2), "b": {"c": jnp.zeros((2, 3))}}
    tx = samx.sam(optax.sgd(0.1))
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"grad_fn.*\['b'\]\['c'\]"):
        tx.update(params, state, params, grad_fn=lambda p, i: {"a": p["a"]})
    with pytest.raises(ValueError, match=r"grad_fn.*\['b'\]\['c'\] has shape \(3, 2\)"):
        tx.update(
            params,
            state,
            params,
            grad_fn=lambda p, i: {"a": p["a"], "b": {"c": jnp.zeros((3, 2))}},
        )
    with pytest.raises(ValueError, match=r"`updates`.*\['b'\]\['c'\]"):
        tx.update({"a": params["a"]}, state, params, grad_fn=lambda p, i: p)


def test_bad_mask_tree():
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    tx = samx.sam(optax.sgd(0.1), adaptive=True, mask={"w": True})
    with pytest.raises(ValueError, match="mask"):
        tx.update(params, tx.init(params), params, grad_fn=lambda p, i: p)


# --- samx.all_but_biases: the official ASAM code's rule, by path name -----------


def test_all_but_biases_selects_every_leaf_but_the_biases():
    assert samx.all_but_biases(
        {"fc": {"weight": 1, "bias": 2}, "norm": {"weight": 3, "bias": 4}}
    ) == {
        "fc": {"weight": True, "bias": False},
        "norm": {"weight": True, "bias": False},
    }
    # Haiku-style and hand-written dicts ("b"), lists, and no names at all.
    assert samx.all_but_biases([{"w": 1, "b": 2}, {"scale": 3}]) == [
        {"w": True, "b": False},
        {"scale": True},
    ]
    assert samx.all_but_biases((1, 2)) == (True, True)
    assert samx.all_but_biases({"b": 1}, names=("c",)) == {"b": True}


# A ResNet-like PyTorch state dict's parameter names (no buffers), flat.
_TORCH_NAMES = (
    "conv1.weight",
    "bn1.weight",
    "bn1.bias",
    "layer1.0.conv1.weight",
    "layer1.0.bn1.weight",
    "layer1.0.bn1.bias",
    "layer1.0.downsample.0.weight",
    "layer1.0.downsample.1.bias",
    "0.weight",
    "0.bias",
    "fc.weight",
    "fc.bias",
)


def test_all_but_biases_on_torch_style_keys_is_the_official_rule():
    # SamsungLabs/ASAM's asam.py scales `p` iff `"weight" in n` over
    # model.named_parameters(); a flat dict with those names, as a converted
    # PyTorch checkpoint is, must get the same mask (it selected every leaf).
    params = {name: np.ones(2, np.float32) for name in _TORCH_NAMES}
    official = {name: "weight" in name for name in _TORCH_NAMES}
    assert samx.all_but_biases(params) == official
    assert samx.all_but_biases({"dense/bias": 1, "dense/kernel": 2}) == {
        "dense/bias": False,
        "dense/kernel": True,
    }
    # Parts are compared whole.
    assert samx.all_but_biases({"bias_init.weight": 1, "fc.biases": 2}) == {
        "bias_init.weight": True,
        "fc.biases": True,
    }


def test_asam_on_torch_style_keys_matches_the_official_step():
    # One official ASAM step (T = |x| + eta on the "weight" names only) on a
    # flat dict with torch-style names, derived in NumPy.
    rng = np.random.default_rng(0)
    x = {n: rng.normal(size=3) for n in ("0.weight", "0.bias", "1.weight", "1.bias")}
    c = {n: rng.uniform(0.5, 2.0, size=3) for n in x}
    rho, eta, lr = 0.5, 0.01, 0.1
    t = {n: np.abs(x[n]) + eta if "weight" in n else np.ones(3) for n in x}
    tg = {n: t[n] * c[n] * x[n] for n in x}
    norm = np.sqrt(sum(np.sum(v**2) for v in tg.values()))
    want = {n: x[n] - lr * c[n] * (x[n] + rho * t[n] * tg[n] / norm) for n in x}

    def loss(p, _):
        return 0.5 * sum(jnp.sum(jnp.asarray(c[n], jnp.float32) * p[n] ** 2) for n in p)

    params = {n: jnp.asarray(v, jnp.float32) for n, v in x.items()}
    tx = samx.sam(
        optax.sgd(lr), rho=rho, adaptive=True, eta=eta, mask=samx.all_but_biases
    )
    [got] = _train(tx, params, loss, [None])
    for n, v in want.items():
        np.testing.assert_allclose(got[n], v, rtol=1e-6, err_msg=n)


def test_all_but_biases_reads_an_nnx_state():
    nnx = pytest.importorskip("flax.nnx")  # not in CI's lowest-version leg
    # An nnx.State of Params: the path ends in `.value`.
    model = nnx.Sequential(
        nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.LayerNorm(3, rngs=nnx.Rngs(0))
    )
    state = nnx.state(model, nnx.Param)
    got = {
        jax.tree_util.keystr(path): m
        for path, m in jax.tree_util.tree_flatten_with_path(samx.all_but_biases(state))[
            0
        ]
    }
    assert got == {
        "['layers'][0]['bias'].value": False,
        "['layers'][0]['kernel'].value": True,
        "['layers'][1]['bias'].value": False,
        "['layers'][1]['scale'].value": True,
    }


def test_all_but_biases_scales_the_normalisation_scales_the_default_does_not():
    # A LayerNorm-like scale is 1-D: ASAM's T = |x| + eta applies to it only
    # with samx.all_but_biases. Hand-derived first step, as in the ASAM test.
    w, s, b = np.array([[0.5, -1.0], [2.0, 0.25]]), np.array([1.5, 0.5]), np.ones(2)
    cw, cs, cb = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([2.0, 1.0]), np.ones(2)
    rho, eta, lr = 0.5, 0.01, 0.1

    def expected(scale_s):
        t = {"w": np.abs(w) + eta, "s": np.abs(s) + eta if scale_s else 1.0, "b": 1.0}
        x, c = {"w": w, "s": s, "b": b}, {"w": cw, "s": cs, "b": cb}
        tg = {k: t[k] * c[k] * x[k] for k in x}
        norm = np.sqrt(sum(np.sum(v**2) for v in tg.values()))
        return {k: x[k] - lr * c[k] * (x[k] + rho * t[k] * tg[k] / norm) for k in x}

    def loss(p, _):
        return 0.5 * sum(
            jnp.sum(jnp.asarray(c, jnp.float32) * p[k] ** 2)
            for k, c in (("w", cw), ("s", cs), ("b", cb))
        )

    params = {k: jnp.asarray(v, jnp.float32) for k, v in (("w", w), ("s", s), ("b", b))}
    for mask, scale_s in ((samx.all_but_biases, True), (None, False)):
        tx = samx.sam(optax.sgd(lr), rho=rho, adaptive=True, eta=eta, mask=mask)
        [got] = _train(tx, params, loss, [None])
        for k, v in expected(scale_s).items():
            np.testing.assert_allclose(got[k], v, rtol=1e-6, err_msg=k)
    assert not np.allclose(expected(True)["s"], expected(False)["s"], rtol=1e-4)


def test_all_but_biases_names_must_be_a_tuple_of_strings():
    for names in ("bias", (), ("bias", 1), ["bias"]):
        with pytest.raises(TypeError, match=r"samx\.all_but_biases\(names=\.\.\.\)"):
            samx.all_but_biases({"b": 1}, names=names)
