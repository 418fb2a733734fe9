"""Pure building blocks shared by the samx transforms.

The global norm is taken over all leaves together and computed in float32
whatever the parameters' dtype; the perturbation is computed in float32 and
cast to each parameter's dtype only when it is added to the parameters.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

Mask = Any  # a pytree of bools like params, or a callable params -> such a tree


def f32_global_norm(tree: Any) -> jax.Array:
    """The L2 norm over all leaves of ``tree``, accumulated in float32."""
    squares = [
        jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in jax.tree.leaves(tree)
    ]
    return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def hparam_value(value: Any, count: jax.Array) -> jax.Array:
    """A float32 scalar from a number, an array or a schedule of ``count``."""
    if callable(value):
        value = value(count)
    return jnp.asarray(value, jnp.float32)


def weights_mask(params: Any) -> Any:
    """The default ASAM mask: leaves with ``ndim >= 2`` (the weights)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def resolve_mask(fn: str, mask: Mask | None, params: Any) -> Any:
    """The mask as a tree of Python bools with the structure of ``params``."""
    if mask is None:
        return weights_mask(params)
    tree = mask(params) if callable(mask) else mask
    try:
        return jax.tree.map(lambda _, m: bool(m), params, tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{fn}: `mask` must be a tree of bools with the structure of"
            " `params` (or a function of `params` that returns one)."
        ) from e


def perturbation(
    direction: Any,
    params: Any,
    rho: jax.Array,
    *,
    eps: float | jax.Array,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    mask: Any = None,
) -> Any:
    """The ascent step ``e`` in float32, one leaf per parameter.

    SAM: ``e = rho * g / (||g|| + eps)``. ASAM (``adaptive=True``):
    ``T = |x| + eta`` on the leaves where ``mask`` is true and ``T = 1``
    elsewhere, ``e = rho * T**2 * g / (||T * g|| + eps)``. A zero direction
    gives a zero perturbation, and so does a direction with a NaN or an
    infinity (its norm is then not finite): a non-finite stored gradient never
    reaches the parameters. The check reuses the norm, a scalar, and the
    selection fuses into the elementwise product: no extra pass over the tree.

    Args:
      direction: the gradient that sets the direction, a tree like ``params``.
      params: the parameters (used by ASAM only).
      rho: the radius, a float32 scalar.
      eps: added to the norm.
      adaptive: ASAM's scale-invariant perturbation.
      eta: ASAM's offset in ``T = |x| + eta``.
      mask: a tree of Python bools like ``params`` (resolved); ASAM only.

    Returns:
      A float32 tree like ``params``.
    """
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), direction)
    eta = jnp.asarray(eta, jnp.float32)
    eps = jnp.asarray(eps, jnp.float32)
    if adaptive:
        one = jnp.ones((), jnp.float32)
        scale = jax.tree.map(
            lambda p, m: jnp.abs(jnp.asarray(p, jnp.float32)) + eta if m else one,
            params,
            mask,
        )
        tg = jax.tree.map(jnp.multiply, scale, g)
        norm = f32_global_norm(tg)
        ok, inv = jnp.isfinite(norm), rho / (norm + eps)
        return jax.tree.map(lambda t, x: jnp.where(ok, inv * t * x, 0), scale, tg)
    norm = f32_global_norm(g)
    ok, inv = jnp.isfinite(norm), rho / (norm + eps)
    return jax.tree.map(lambda x: jnp.where(ok, inv * x, 0), g)


def add_perturbation(params: Any, e: Any) -> Any:
    """``params + e`` in float32, cast back to each parameter's dtype."""
    return jax.tree.map(
        lambda p, x: (jnp.asarray(p, jnp.float32) + x).astype(jnp.result_type(p)),
        params,
        e,
    )


def perturbed_params(
    fn: str,
    params: Any,
    direction: Any,
    rho: Any,
    count: jax.Array,
    *,
    eps: float | jax.Array,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    mask: Mask | None = None,
) -> Any:
    """``params + e(direction)``, with ``rho`` evaluated at ``count``."""
    e = perturbation(
        direction,
        params,
        hparam_value(rho, count),
        eps=eps,
        adaptive=adaptive,
        eta=eta,
        mask=resolve_mask(fn, mask, params) if adaptive else None,
    )
    return add_perturbation(params, e)


def increment(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the int32 maximum."""
    return optax.safe_increment(count)
