"""samx.diagnostics: staleness cosine, sharpness, Hessian eigenvalue, slices."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from samx import diagnostics


def _tree(dtype=jnp.float32):
    return {
        "w": jnp.array([[1.0, -2.0], [0.5, 3.0]], dtype),
        "b": jnp.array([0.25, -1.0], dtype),
    }


def test_a_tree_with_itself_is_one_and_with_its_negative_minus_one():
    tree = _tree()
    negative = jax.tree.map(jnp.negative, tree)
    np.testing.assert_allclose(diagnostics.staleness_cosine(tree, tree), 1.0, 1e-6)
    np.testing.assert_allclose(diagnostics.staleness_cosine(tree, negative), -1.0, 1e-6)


def test_all_leaves_count_together():
    stale = {"w": jnp.array([1.0, 0.0]), "b": jnp.array([0.0])}
    fresh = {"w": jnp.array([0.0, 1.0]), "b": jnp.array([0.0])}
    np.testing.assert_allclose(diagnostics.staleness_cosine(stale, fresh), 0.0)
    # Orthogonal in "w", aligned in "b": the cosine of the whole vectors.
    stale = {"w": jnp.array([1.0, 0.0]), "b": jnp.array([1.0])}
    fresh = {"w": jnp.array([0.0, 1.0]), "b": jnp.array([1.0])}
    np.testing.assert_allclose(diagnostics.staleness_cosine(stale, fresh), 0.5, 1e-6)


def test_a_zero_tree_gives_zero_not_nan():
    tree = _tree()
    zero = jax.tree.map(jnp.zeros_like, tree)
    assert diagnostics.staleness_cosine(zero, tree) == 0.0
    assert diagnostics.staleness_cosine(tree, zero) == 0.0
    assert diagnostics.staleness_cosine(zero, zero) == 0.0


def test_bfloat16_trees_give_a_float32_result():
    tree = _tree(jnp.bfloat16)
    scaled = jax.tree.map(lambda x: 2 * x, tree)
    cosine = diagnostics.staleness_cosine(tree, scaled)
    assert cosine.dtype == jnp.float32
    assert cosine.shape == ()
    np.testing.assert_allclose(cosine, 1.0, 1e-6)


def test_under_jit():
    a, b = _tree(), jax.tree.map(lambda x: x + 1.0, _tree())
    expected = np.dot(
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]),
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)]),
    ) / (
        np.linalg.norm(np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]))
        * np.linalg.norm(np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)]))
    )
    got = jax.jit(diagnostics.staleness_cosine)(a, b)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_rejects_trees_that_differ():
    tree = _tree()
    with pytest.raises(ValueError, match=re.escape("`stale` has ['w']")):
        diagnostics.staleness_cosine(tree, {"b": tree["b"]})
    with pytest.raises(
        ValueError, match=re.escape("leaf ['w'] has shape (4,), but `stale`")
    ):
        diagnostics.staleness_cosine(tree, {"w": jnp.ones(4), "b": tree["b"]})


# --- quadratics with known answers ----------------------------------------------
#
# f(x) = 0.5 x^T A x + c, with x spread over a nested dict so that every function
# is exercised on a tree; the references below are in float64 NumPy.


def _orthogonal(seed, n):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def _quadratic(eigenvalues, seed=0, c=0.0):
    """``(A, Q, loss, to_tree, to_vec)``: ``f = 0.5 x^T A x + c``, ``A = Q L Q^T``."""
    n = len(eigenvalues)
    q = _orthogonal(seed, n)
    a = q @ np.diag(eigenvalues) @ q.T
    a32 = jnp.asarray(a, jnp.float32)

    def to_tree(x):
        x = jnp.asarray(x, jnp.float32)
        return {"w": x[:2].reshape(1, 2), "rest": {"v": x[2:]}}

    def to_vec(tree):
        return jnp.concatenate(
            [jnp.ravel(jnp.asarray(tree["w"], jnp.float32)), tree["rest"]["v"]]
        )

    def loss(tree):
        x = to_vec(tree)
        return 0.5 * x @ a32 @ x + c

    return a, q, loss, to_tree, to_vec


def _f(a, x, c=0.0):
    return 0.5 * x @ a @ x + c


def _trust_region_max(a, x, rho):
    """``max_{||e|| <= rho} f(x + e) - f(x)`` for PSD ``a`` (secular equation).

    The maximiser lies on the sphere, ``e = (mu I - A)^{-1} g`` with ``g = A x``
    and ``mu > lambda_max`` such that ``||e|| = rho``; found by bisection.
    """
    lam, q = np.linalg.eigh(a)
    g = q.T @ (a @ x)
    assert abs(g[-1]) > 1e-12  # the "easy case": g has a top-eigenvector component

    def norm(mu):
        return np.linalg.norm(g / (mu - lam))

    lo, hi = lam[-1] + 1e-300, lam[-1] + np.linalg.norm(g) / rho + 1.0
    for _ in range(300):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if norm(mid) > rho else (lo, mid)
    y = g / (0.5 * (lo + hi) - lam)
    return g @ y + 0.5 * y @ (lam * y)


def _sam_increase(a, x, rho):
    g = a @ x
    e = rho * g / np.linalg.norm(g)
    return _f(a, x + e) - _f(a, x)


# --- sharpness -------------------------------------------------------------------


def test_sharpness_near_a_minimum_is_half_rho_squared_lambda_max():
    # At x ~ 0 the exact maximum is 0.5 rho^2 lambda_max (+ the tiny g.e term).
    eigenvalues = [4.0, 1.0, 0.5, 0.0, 0.25]
    a, _, loss, to_tree, _ = _quadratic(eigenvalues, seed=1)
    x = 1e-4 * np.random.default_rng(2).normal(size=5)
    rho = 0.1
    got = diagnostics.sharpness(loss, to_tree(x), rho, num_steps=30)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, _trust_region_max(a, x, rho), rtol=1e-3)
    np.testing.assert_allclose(got, 0.5 * rho**2 * 4.0, rtol=2e-2)


def test_sharpness_at_an_exact_minimum_needs_a_key():
    eigenvalues = [4.0, 1.0, 0.5, 0.0, 0.25]
    _, _, loss, to_tree, _ = _quadratic(eigenvalues, seed=1)
    at_min, rho = to_tree(np.zeros(5)), 0.1
    # Without a key the ascent cannot leave e = 0 ...
    assert float(diagnostics.sharpness(loss, at_min, rho, num_steps=30)) == 0.0
    # ... with one it starts from a random direction and finds the top curvature.
    got = diagnostics.sharpness(loss, at_min, rho, num_steps=30, key=jax.random.key(3))
    np.testing.assert_allclose(got, 0.5 * rho**2 * 4.0, rtol=1e-3)
    # Away from a critical point the key changes nothing.
    x = to_tree(np.linspace(-1.0, 1.0, 5))
    np.testing.assert_array_equal(
        diagnostics.sharpness(loss, x, rho, key=jax.random.key(3)),
        diagnostics.sharpness(loss, x, rho),
    )


def test_sharpness_at_a_nonzero_point_matches_a_dense_search_of_the_circle():
    a = np.array([[2.0, 0.5], [0.5, 1.0]])
    x = np.array([0.1, 1.0])
    rho = 0.5
    t = np.linspace(0, 2 * np.pi, 400_001)
    e = rho * np.stack([np.cos(t), np.sin(t)], axis=1)
    exact = np.max(e @ (a @ x) + 0.5 * np.einsum("ni,ij,nj->n", e, a, e))
    np.testing.assert_allclose(_trust_region_max(a, x, rho), exact, rtol=1e-8)

    def loss(p):
        return 0.5 * p["x"] @ jnp.asarray(a, jnp.float32) @ p["x"]

    params = {"x": jnp.asarray(x, jnp.float32)}
    got = diagnostics.sharpness(loss, params, rho, num_steps=30)
    np.testing.assert_allclose(got, exact, rtol=1e-4)
    # The SAM step alone falls short of it here, by more than the tolerance.
    assert _sam_increase(a, x, rho) < exact * (1 - 1e-3)


def test_sharpness_in_five_dimensions_matches_the_secular_equation():
    a, _, loss, to_tree, _ = _quadratic([3.0, 2.0, 1.0, 0.1, 0.0], seed=3)
    x = np.random.default_rng(4).normal(size=5)
    for rho in (0.05, 0.5):
        got = diagnostics.sharpness(loss, to_tree(x), rho, num_steps=30)
        np.testing.assert_allclose(got, _trust_region_max(a, x, rho), rtol=1e-3)


def test_sharpness_is_at_least_the_sam_step_and_zero_steps_is_the_sam_step():
    a, _, loss, to_tree, _ = _quadratic([3.0, 2.0, 1.0, 0.1, 0.0], seed=5)
    x = np.random.default_rng(6).normal(size=5)
    rho = 0.3
    sam = _sam_increase(a, x, rho)
    one = diagnostics.sharpness(loss, to_tree(x), rho, num_steps=0)
    np.testing.assert_allclose(one, sam, rtol=1e-5)
    for steps in (1, 3, 10):
        got = diagnostics.sharpness(loss, to_tree(x), rho, num_steps=steps)
        assert float(got) >= float(one)
        assert float(got) <= _trust_region_max(a, x, rho) * (1 + 1e-5)


def test_sharpness_with_rho_zero_is_zero():
    _, _, loss, to_tree, _ = _quadratic([3.0, 2.0, 1.0], seed=7)
    x = np.random.default_rng(8).normal(size=3)
    assert diagnostics.sharpness(loss, to_tree(x), 0.0) == 0.0
    assert diagnostics.sharpness(loss, to_tree(x), 0, num_steps=0) == 0.0


def test_sharpness_step_size_is_used():
    # A tiny step cannot leave the SAM step within one ascent step.
    a, _, loss, to_tree, _ = _quadratic([3.0, 2.0, 1.0, 0.1, 0.0], seed=5)
    x = np.random.default_rng(6).normal(size=5)
    sam = diagnostics.sharpness(loss, to_tree(x), 0.3, num_steps=0)
    tiny = diagnostics.sharpness(loss, to_tree(x), 0.3, num_steps=1, step_size=0.0)
    np.testing.assert_allclose(tiny, sam, rtol=1e-6)


def test_sharpness_under_jit_and_vmap():
    a, _, loss, to_tree, _ = _quadratic([3.0, 2.0, 1.0, 0.1, 0.0], seed=9)
    x = np.random.default_rng(10).normal(size=5)
    params = to_tree(x)
    jitted = jax.jit(lambda p: diagnostics.sharpness(loss, p, 0.2, num_steps=30))
    np.testing.assert_allclose(jitted(params), _trust_region_max(a, x, 0.2), rtol=1e-3)
    # vmap over radii (traced rho) and over a batch of parameter points.
    rhos = jnp.array([0.0, 0.05, 0.2])
    by_rho = jax.vmap(lambda r: diagnostics.sharpness(loss, params, r, num_steps=30))
    expected = [0.0] + [_trust_region_max(a, x, r) for r in (0.05, 0.2)]
    np.testing.assert_allclose(by_rho(rhos), expected, rtol=1e-3, atol=1e-7)
    xs = np.random.default_rng(11).normal(size=(3, 5))
    batched = jax.vmap(to_tree)(jnp.asarray(xs, jnp.float32))
    by_point = jax.vmap(lambda p: diagnostics.sharpness(loss, p, 0.2, num_steps=30))
    np.testing.assert_allclose(
        by_point(batched), [_trust_region_max(a, xi, 0.2) for xi in xs], rtol=1e-3
    )


def test_sharpness_of_bfloat16_params_is_float32():
    def loss(p):
        return 0.5 * jnp.sum(jnp.square(p["x"]))

    params = {"x": jnp.array([1.0, 2.0], jnp.bfloat16)}
    got = diagnostics.sharpness(loss, params, 0.5)
    assert got.dtype == jnp.float32
    # f = 0.5 ||x||^2: the SAM step is the maximiser, rho ||x|| + 0.5 rho^2.
    np.testing.assert_allclose(got, 0.5 * np.sqrt(5) + 0.125, rtol=2e-2)


# --- Hessian top eigenvalue -------------------------------------------------------


def test_hessian_top_eigenvalue_of_a_quadratic_in_a_random_basis():
    eigenvalues = [5.0, 2.0, 1.0, -0.5, 0.1]
    _, q, loss, to_tree, to_vec = _quadratic(eigenvalues, seed=12)
    params = to_tree(np.random.default_rng(13).normal(size=5))
    eig = diagnostics.hessian_top_eigenvalue(
        loss, params, jax.random.key(0), num_iters=40
    )
    assert isinstance(eig, diagnostics.HessianEigen)
    assert eig.value.dtype == jnp.float32 and eig.value.shape == ()
    np.testing.assert_allclose(eig.value, 5.0, rtol=1e-3)
    assert jax.tree.structure(eig.vector) == jax.tree.structure(params)
    v = np.asarray(to_vec(eig.vector), np.float64)
    np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-5)
    assert abs(v @ q[:, 0]) > 0.999


def test_hessian_top_eigenvalue_finds_the_largest_magnitude_even_if_negative():
    _, q, loss, to_tree, to_vec = _quadratic([-6.0, 2.0, 1.0, 0.5], seed=14)
    params = to_tree(np.zeros(4))
    eig = diagnostics.hessian_top_eigenvalue(loss, params, jax.random.key(1))
    np.testing.assert_allclose(eig.value, -6.0, rtol=1e-3)
    assert abs(np.asarray(to_vec(eig.vector)) @ q[:, 0]) > 0.999


def test_hessian_top_eigenvalue_on_a_diagonal_dict_tree_under_jit_and_vmap():
    def loss(p):
        return 0.5 * (3.0 * jnp.sum(p["a"] ** 2) + jnp.sum(p["b"]["c"] ** 2))

    params = {"a": jnp.ones(()), "b": {"c": jnp.ones((2, 3))}}
    top = jax.jit(lambda p, k: diagnostics.hessian_top_eigenvalue(loss, p, k))
    eig = top(params, jax.random.key(2))
    np.testing.assert_allclose(eig.value, 3.0, rtol=1e-3)
    assert abs(float(eig.vector["a"])) > 0.999
    keys = jax.random.split(jax.random.key(3), 4)
    values = jax.vmap(lambda k: top(params, k).value)(keys)
    np.testing.assert_allclose(values, np.full(4, 3.0), rtol=1e-3)


def test_hessian_top_eigenvalue_of_a_non_quadratic_matches_jax_hessian():
    def loss(p):
        w, b = p["w"], p["b"]
        return jnp.sum(jnp.sin(w) * b) + 0.25 * jnp.sum(w**2) ** 2 + jnp.sum(b**3)

    params = {"w": jnp.array([0.3, -1.2, 0.8]), "b": jnp.array([1.5, 0.2, -0.4])}
    flat, unravel = ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda v: loss(unravel(v))))(flat)
    hessian = np.asarray(hessian, np.float64)
    lam, vecs = np.linalg.eigh(0.5 * (hessian + hessian.T))
    order = np.argsort(-np.abs(lam))
    assert abs(lam[order[1]]) < 0.8 * abs(lam[order[0]])  # a clear spectral gap
    eig = diagnostics.hessian_top_eigenvalue(
        loss, params, jax.random.key(4), num_iters=60
    )
    np.testing.assert_allclose(eig.value, lam[order[0]], rtol=1e-3)
    v = np.asarray(ravel_pytree(eig.vector)[0], np.float64)
    assert abs(v @ vecs[:, order[0]]) > 0.999


def test_hessian_top_eigenvalue_of_bfloat16_params_is_float32():
    def loss(p):
        return 0.5 * (4.0 * p["x"][0] ** 2 + p["x"][1] ** 2)

    params = {"x": jnp.array([1.0, 1.0], jnp.bfloat16)}
    eig = diagnostics.hessian_top_eigenvalue(loss, params, jax.random.key(5))
    assert eig.value.dtype == jnp.float32
    assert eig.vector["x"].dtype == jnp.float32
    np.testing.assert_allclose(eig.value, 4.0, rtol=2e-2)


def test_diagnostics_work_on_an_nnx_state_of_params():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    x = jnp.asarray(np.random.default_rng(15).normal(size=(8, 3)), jnp.float32)

    def loss(s):
        return jnp.mean(nnx.merge(graphdef, s)(x) ** 2)

    # The loss is quadratic in the parameters: a reference Hessian via ravel.
    flat, unravel = ravel_pytree(state)
    hessian = jax.jit(jax.hessian(lambda v: loss(unravel(v))))(flat)
    hessian = np.asarray(hessian, np.float64)
    lam = np.linalg.eigvalsh(0.5 * (hessian + hessian.T))

    @jax.jit
    def run(state, key):
        k1, k2 = jax.random.split(key)
        eig = diagnostics.hessian_top_eigenvalue(loss, state, k1, num_iters=100)
        sharp = diagnostics.sharpness(loss, state, 0.05)
        d = diagnostics.filter_normalized_direction(k2, state)
        curve = diagnostics.loss_slice_1d(loss, state, d, jnp.linspace(-1, 1, 3))
        return eig, sharp, d, curve

    eig, sharp, d, curve = run(state, jax.random.key(6))
    assert type(eig.vector) is type(state) and type(d) is type(state)
    np.testing.assert_allclose(eig.value, lam[-1], rtol=1e-3)
    assert float(sharp) > 0.0
    np.testing.assert_allclose(
        np.linalg.norm(d["kernel"][...], axis=0),
        np.linalg.norm(state["kernel"][...], axis=0),
        rtol=1e-5,
    )
    np.testing.assert_allclose(curve[1], loss(state), rtol=1e-6)


# --- filter-normalised directions -----------------------------------------------


def _network_params():
    rng = np.random.default_rng(16)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
        },
        "conv": {"kernel": jnp.asarray(rng.normal(size=(2, 2, 3, 5)), jnp.float32)},
        "scale": jnp.asarray(rng.normal(size=()), jnp.float32),
    }


def _filter_norms(x):
    x = np.asarray(x, np.float64)
    return np.sqrt(np.sum(x**2, axis=tuple(range(x.ndim - 1))))


def test_filter_norms_match_the_params_and_1d_leaves_are_zero():
    params = _network_params()
    params["conv"]["kernel"] = params["conv"]["kernel"].at[..., 2].set(0.0)
    d = jax.jit(diagnostics.filter_normalized_direction)(jax.random.key(0), params)
    assert jax.tree.structure(d) == jax.tree.structure(params)
    for path in (("dense", "kernel"), ("conv", "kernel")):
        got, want = d[path[0]][path[1]], params[path[0]][path[1]]
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(_filter_norms(got), _filter_norms(want), rtol=1e-5)
        # A random direction, not the params rescaled.
        cos = np.vdot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want))
        assert abs(cos) < 0.9
    assert np.all(np.asarray(d["conv"]["kernel"][..., 2]) == 0.0)
    assert np.all(np.asarray(d["dense"]["bias"]) == 0.0)
    assert d["scale"].shape == () and float(d["scale"]) == 0.0


def test_filter_normalized_direction_keeps_1d_leaves_when_asked():
    params = _network_params()
    keep = jax.jit(
        functools.partial(diagnostics.filter_normalized_direction, ignore_1d=False)
    )
    d = keep(jax.random.key(1), params)
    for got, want in (
        (d["dense"]["bias"], params["dense"]["bias"]),
        (d["scale"], params["scale"]),
    ):
        np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(want), rtol=1e-5)
    assert np.any(np.asarray(d["dense"]["bias"]) != 0.0)


def test_filter_normalized_direction_is_deterministic_in_key_and_jits():
    params = _network_params()
    direction = jax.jit(diagnostics.filter_normalized_direction)
    first = diagnostics.filter_normalized_direction(jax.random.key(2), params)
    again = direction(jax.random.key(2), params)
    other = direction(jax.random.key(3), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), first, again)
    assert not np.allclose(first["dense"]["kernel"], other["dense"]["kernel"])
    raw = direction(jax.random.PRNGKey(2), params)
    np.testing.assert_allclose(
        _filter_norms(raw["conv"]["kernel"]),
        _filter_norms(params["conv"]["kernel"]),
        rtol=1e-5,
    )


# --- loss slices ------------------------------------------------------------------


def test_loss_slice_1d_of_a_quadratic_is_the_closed_form():
    a, _, loss, to_tree, _ = _quadratic([3.0, 2.0, 1.0, 0.1, 0.0], seed=17, c=0.5)
    rng = np.random.default_rng(18)
    x, d = rng.normal(size=5), rng.normal(size=5)
    alphas = np.linspace(-1.0, 1.0, 7)
    got = diagnostics.loss_slice_1d(loss, to_tree(x), to_tree(d), jnp.asarray(alphas))
    assert got.shape == (7,) and got.dtype == jnp.float32
    want = alphas**2 * 0.5 * (d @ a @ d) + alphas * ((a @ x) @ d) + _f(a, x, 0.5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    batched = diagnostics.loss_slice_1d(
        loss, to_tree(x), to_tree(d), jnp.asarray(alphas), batch_size=3
    )
    np.testing.assert_allclose(batched, got, rtol=1e-6)


def test_loss_surface_2d_of_a_quadratic_is_the_closed_form():
    a, _, loss, to_tree, _ = _quadratic([3.0, 2.0, 1.0, 0.1, 0.0], seed=19, c=-0.25)
    rng = np.random.default_rng(20)
    x, d1, d2 = rng.normal(size=5), rng.normal(size=5), rng.normal(size=5)
    alphas, betas = np.linspace(-1.0, 1.0, 4), np.linspace(-0.5, 1.5, 3)
    got = diagnostics.loss_surface_2d(
        loss, to_tree(x), to_tree(d1), to_tree(d2), alphas, betas
    )
    assert got.shape == (4, 3) and got.dtype == jnp.float32
    g = a @ x
    aa, bb = np.meshgrid(alphas, betas, indexing="ij")
    want = (
        _f(a, x, -0.25)
        + aa * (g @ d1)
        + bb * (g @ d2)
        + 0.5 * aa**2 * (d1 @ a @ d1)
        + aa * bb * (d1 @ a @ d2)
        + 0.5 * bb**2 * (d2 @ a @ d2)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    batched = diagnostics.loss_surface_2d(
        loss, to_tree(x), to_tree(d1), to_tree(d2), alphas, betas, batch_size=5
    )
    np.testing.assert_allclose(batched, got, rtol=1e-6)


def test_slices_under_jit_and_vmap():
    a, _, loss, to_tree, _ = _quadratic([3.0, 2.0, 1.0], seed=21)
    rng = np.random.default_rng(22)
    x, d1, d2 = (to_tree(rng.normal(size=3)) for _ in range(3))
    alphas, betas = jnp.linspace(-1.0, 1.0, 5), jnp.linspace(0.0, 1.0, 2)
    line = jax.jit(lambda p, d, al: diagnostics.loss_slice_1d(loss, p, d, al))
    plane = jax.jit(
        lambda p, u, v, al, be: diagnostics.loss_surface_2d(loss, p, u, v, al, be)
    )
    curve = line(x, d1, alphas)
    surface = plane(x, d1, d2, alphas, betas)
    assert surface.shape == (5, 2)
    # beta = 0 is the 1-D slice along d1; the centre is the loss at params.
    np.testing.assert_allclose(surface[:, 0], curve, rtol=1e-6)
    np.testing.assert_allclose(curve[2], loss(x), rtol=1e-6)
    directions = jax.tree.map(lambda u, v: jnp.stack([u, v]), d1, d2)
    both = jax.vmap(lambda d: line(x, d, alphas))(directions)
    np.testing.assert_allclose(both[0], curve, rtol=1e-6)
    np.testing.assert_allclose(both[1], line(x, d2, alphas), rtol=1e-6)


# --- bad inputs ------------------------------------------------------------------


def _bad_input_cases():
    _, _, loss, to_tree, _ = _quadratic([3.0, 2.0, 1.0], seed=23)
    p = to_tree(np.ones(3))
    key = jax.random.key(0)
    al = jnp.linspace(-1.0, 1.0, 3)
    sharp = diagnostics.sharpness
    top = diagnostics.hessian_top_eigenvalue
    fnd = diagnostics.filter_normalized_direction
    line, plane = diagnostics.loss_slice_1d, diagnostics.loss_surface_2d
    bad_d = {"w": jnp.ones((2, 1)), "rest": {"v": jnp.ones(1)}}
    return [
        (TypeError, "sharpness(loss_fn=...)", lambda: sharp("loss", p, 0.1)),
        (ValueError, "sharpness(rho=...)", lambda: sharp(loss, p, -0.1)),
        (TypeError, "sharpness(rho=...)", lambda: sharp(loss, p, "0.1")),
        (
            ValueError,
            "sharpness(num_steps=...)",
            lambda: sharp(loss, p, 0.1, num_steps=-1),
        ),
        (
            TypeError,
            "sharpness(num_steps=...)",
            lambda: sharp(loss, p, 0.1, num_steps=2.0),
        ),
        (
            TypeError,
            "sharpness(num_steps=...)",
            lambda: sharp(loss, p, 0.1, num_steps=True),
        ),
        (
            ValueError,
            "sharpness(step_size=...)",
            lambda: sharp(loss, p, 0.1, step_size=-1),
        ),
        (ValueError, "sharpness(eps=...)", lambda: sharp(loss, p, 0.1, eps=-1.0)),
        (
            ValueError,
            "must return a scalar",
            lambda: sharp(lambda q: q["rest"]["v"], p, 0.1),
        ),
        (
            TypeError,
            "sharpness(params=...)",
            lambda: sharp(loss, {"w": jnp.ones(2, int)}, 0.1),
        ),
        (ValueError, "sharpness(params=...)", lambda: sharp(loss, {}, 0.1)),
        (TypeError, "hessian_top_eigenvalue(loss_fn=...)", lambda: top(None, p, key)),
        (
            ValueError,
            "hessian_top_eigenvalue(num_iters=...)",
            lambda: top(loss, p, key, num_iters=0),
        ),
        (TypeError, "hessian_top_eigenvalue(key=...)", lambda: top(loss, p, 0)),
        (
            TypeError,
            "hessian_top_eigenvalue(key=...)",
            lambda: top(loss, p, jax.random.split(key)),
        ),
        (TypeError, "filter_normalized_direction(key=...)", lambda: fnd(p, key)),
        (
            TypeError,
            "filter_normalized_direction(ignore_1d=...)",
            lambda: fnd(key, p, ignore_1d="yes"),
        ),
        (TypeError, "loss_slice_1d(loss_fn=...)", lambda: line(1.0, p, p, al)),
        (
            ValueError,
            "`direction` leaf ['w'] has shape (2, 1)",
            lambda: line(loss, p, bad_d, al),
        ),
        (
            ValueError,
            "`direction` does not have the tree structure",
            lambda: line(loss, p, {"w": p["w"]}, al),
        ),
        (
            ValueError,
            "loss_slice_1d(alphas=...)",
            lambda: line(loss, p, p, jnp.ones((2, 2))),
        ),
        (ValueError, "loss_slice_1d(alphas=...)", lambda: line(loss, p, p, 0.5)),
        (
            ValueError,
            "loss_slice_1d(batch_size=...)",
            lambda: line(loss, p, p, al, batch_size=0),
        ),
        (ValueError, "`d2` leaf ['w']", lambda: plane(loss, p, p, bad_d, al, al)),
        (
            ValueError,
            "loss_surface_2d(betas=...)",
            lambda: plane(loss, p, p, p, al, al[None]),
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_input_cases())))
def test_bad_inputs_raise_naming_the_argument(case):
    error, message, call = _bad_input_cases()[case]
    with pytest.raises(error, match=re.escape(message)):
        call()
