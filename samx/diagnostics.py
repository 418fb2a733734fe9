"""Diagnostics for sharpness-aware training: pure, jittable functions."""

from typing import Any

import jax
import jax.numpy as jnp

from samx import _checks, _perturb


def staleness_cosine(stale: Any, fresh: Any, eps: float = 1e-12) -> jax.Array:
    """The cosine similarity of two gradient trees, all leaves together.

    For instance the stale gradient that AsyncSAM or SAMPa perturbs along
    against the fresh gradient at the current parameters: the AsyncSAM paper
    (Fig. 1) motivates its one-step staleness with it, and the SAMPa paper's
    appendix reports a cosine above 0.99. The trees are flattened into one
    vector each and the result is ``<N(stale), N(fresh)>`` with
    ``N(g) = g / (||g|| + eps)``, computed in float32 whatever the leaves'
    dtype and clipped to ``[-1, 1]``; a zero tree gives 0, not NaN.

    Args:
      stale: a tree of arrays, e.g. the gradient stored in an optimizer state.
      fresh: a tree of arrays with the structure and leaf shapes of ``stale``.
      eps: added to each norm.

    Returns:
      A float32 scalar in ``[-1, 1]``.

    Raises:
      ValueError: if the trees differ in structure or leaf shapes.

    Examples:
      >>> import jax.numpy as jnp, samx
      >>> stale = {"w": jnp.array([1.0, 0.0]), "b": jnp.array(1.0)}
      >>> fresh = {"w": jnp.array([1.0, 1.0]), "b": jnp.array(0.0)}
      >>> samx.diagnostics.staleness_cosine(stale, fresh).round(4)
      Array(0.5, dtype=float32)

    References:
      Jo, Lim, Lee, `Asynchronous Sharpness-Aware Minimization For Fast and
      Accurate Deep Learning <https://arxiv.org/abs/2503.11147>`_, 2025

      Xie, Pethick, Cevher, `SAMPa: Sharpness-aware Minimization Parallelized
      <https://arxiv.org/abs/2410.10683>`_, NeurIPS 2024
    """
    fn = "samx.diagnostics.staleness_cosine"
    _checks.check_like_params(fn, "`fresh`", fresh, stale, ref="`stale`")
    inv_stale = 1 / (_perturb.f32_global_norm(stale) + eps)
    inv_fresh = 1 / (_perturb.f32_global_norm(fresh) + eps)
    dots = [
        jnp.sum(jnp.asarray(a, jnp.float32) * jnp.asarray(b, jnp.float32))
        for a, b in zip(jax.tree.leaves(stale), jax.tree.leaves(fresh), strict=True)
    ]
    dot = sum(dots, jnp.zeros((), jnp.float32))
    return jnp.clip(dot * inv_stale * inv_fresh, -1.0, 1.0)
