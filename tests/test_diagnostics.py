"""samx.diagnostics.staleness_cosine."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
