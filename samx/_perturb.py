"""Pure building blocks shared by the samx transforms.

The global norm is taken over all leaves together. It, the perturbation and
SAMPa's mix are computed in the *compute dtype*: the widest of float32 and the
parameters' floating dtypes, so float32 for float32, bfloat16 and float16
parameters and float64 for float64 ones (under ``jax_enable_x64``). The
perturbation is cast to each parameter's dtype only when it is added to the
parameters.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

Mask = Any  # a pytree of bools like params, or a callable params -> such a tree


def compute_dtype(params: Any) -> jnp.dtype:
    """The widest of float32 and the floating dtypes of ``params``' leaves.

    float64 when a leaf is float64 (only under ``jax_enable_x64``), else
    float32. Chosen by width, not by ``jnp.result_type``, so that it works
    under ``jax.numpy_dtype_promotion("strict")``.
    """
    dtypes = (jnp.result_type(p) for p in jax.tree.leaves(params))
    wide = any(jnp.issubdtype(d, jnp.floating) and d.itemsize > 4 for d in dtypes)
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def global_norm(tree: Any, dtype: Any = jnp.float32) -> jax.Array:
    """The L2 norm over all leaves of ``tree``, accumulated in ``dtype``."""
    squares = [
        jnp.sum(jnp.square(jnp.asarray(x, dtype))) for x in jax.tree.leaves(tree)
    ]
    return jnp.sqrt(sum(squares, jnp.zeros((), dtype)))


def f32_global_norm(tree: Any) -> jax.Array:
    """The L2 norm over all leaves of ``tree``, accumulated in float32."""
    return global_norm(tree, jnp.float32)


def hparam_value(
    value: Any,
    count: jax.Array,
    dtype: Any = jnp.float32,
    *,
    low: float = 0.0,
    high: float | None = None,
) -> jax.Array:
    """A ``dtype`` scalar from a number, an array or a schedule of ``count``.

    A value outside ``[low, high]`` gives NaN. Values known when the transform
    is built are checked then (``_checks.check_scalar``); this catches those
    that are not: a schedule between the steps it was checked at, or a value
    injected at run time by ``optax.inject_hyperparams``, which cannot be read
    inside a step without a host synchronisation. The step's updates are then
    NaN rather than silently those of another method (a negative ``rho``
    ascends the sharpness): ``samx.skip_nonfinite`` skips such steps, and
    samx's loops warn.
    """
    if callable(value):
        value = value(count)
    value = jnp.asarray(value, dtype)
    ok = value >= low if high is None else (value >= low) & (value <= high)
    return jnp.where(ok, value, jnp.asarray(jnp.nan, dtype))


def weights_mask(params: Any) -> Any:
    """The default ASAM mask: leaves with ``ndim >= 2`` (the weights)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _key_name(key: Any) -> Any:
    """The name in one entry of a tree path: a dict key or an attribute."""
    if isinstance(key, jax.tree_util.DictKey):
        return key.key
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    return None


def all_but_biases(params: Any, *, names: tuple[str, ...] = ("bias", "b")) -> Any:
    """ASAM mask of the official code's rule: every leaf except the biases.

    A leaf is a bias when one of the names on its path (a dict key or an
    attribute name; a string key is split at ``.`` and ``/`` first) is in
    ``names``: ``["dense"]["bias"]`` (Flax), ``["linear"]["b"]`` (Haiku,
    hand-written dicts), ``["layers"][0]["bias"].value`` (an ``nnx.State``),
    ``["0.bias"]`` (a flat dict of PyTorch-style names, as converted
    checkpoints have) or ``["dense/bias"]``. Each part is compared whole, so
    ``"bias_init"`` is not a bias. Every other leaf is
    selected, normalisation scales included. This is the rule of the official
    ASAM code, which scales every PyTorch parameter whose name contains
    "weight": there, every parameter but the biases, the scales of BatchNorm
    and LayerNorm included (PyTorch names them "weight"). Leaves reached
    without names (a tuple ``(w, b)``, a bare array) are all selected.

    ``samx.sam(..., adaptive=True)`` and ``samx.async_sam`` select the leaves
    with ``ndim >= 2`` by default, which is the same on models without
    normalisation layers and leaves the (1-D) normalisation scales unscaled
    otherwise; pass ``mask=samx.all_but_biases`` to reproduce the official
    code.

    Args:
      params: the parameters, a pytree.
      names: the path keys that mark a bias, a tuple of strings. Use
        ``functools.partial(samx.all_but_biases, names=(...))`` for another
        convention.

    Returns:
      A tree of Python bools with the structure of ``params``: ``False`` on
      the biases, ``True`` elsewhere.

    Examples:
      >>> import jax.numpy as jnp, samx
      >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
      ...           "norm": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}}
      >>> samx.all_but_biases(params)
      {'dense': {'bias': False, 'kernel': True}, 'norm': {'bias': False, 'scale': True}}

    References:
      Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
      Scale-Invariant Learning of Deep Neural Networks
      <https://arxiv.org/abs/2102.11600>`_, 2021; its official code,
      `SamsungLabs/ASAM <https://github.com/SamsungLabs/ASAM>`_ (``asam.py``)
    """
    if not (
        isinstance(names, tuple) and names and all(isinstance(n, str) for n in names)
    ):
        raise TypeError(
            "`samx.all_but_biases(names=...)` must be a non-empty tuple of"
            f" strings, e.g. ('bias', 'b'), got {names!r}."
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    selected = [
        not any(part in names for k in path for part in _name_parts(k))
        for path, _ in flat
    ]
    return jax.tree.unflatten(treedef, selected)


def _name_parts(key: Any) -> tuple[Any, ...]:
    """The names in one path entry; a dotted or slashed string key is split.

    ``"0.bias"`` (a PyTorch state dict) gives ``("0", "bias")``,
    ``"dense/bias"`` (a flattened Flax dict) ``("dense", "bias")``.
    """
    name = _key_name(key)
    if isinstance(name, str):
        return tuple(name.replace("/", ".").split("."))
    return (name,)


def resolve_mask(fn: str, mask: Mask | None, params: Any) -> Any:
    """The mask as a tree of Python bools with the structure of ``params``."""
    if mask is None:
        return weights_mask(params)
    tree = mask(params) if callable(mask) else mask
    try:
        return jax.tree.map(lambda _, m: bool(m), params, tree)
    except (ValueError, TypeError) as e:
        hint = ""
        if isinstance(mask, bool) or getattr(mask, "ndim", None) == 0:
            hint = (
                f" It is a scalar, {mask!r}: through `optax.inject_hyperparams`, a"
                " callable mask is taken for a schedule of the step count unless"
                " listed in `static_args`, e.g."
                ' `optax.inject_hyperparams(samx.sam, static_args=("mask",))`.'
            )
        raise ValueError(
            f"{fn}: `mask` must be a tree of bools with the structure of"
            " `params` (or a function of `params` that returns one)." + hint
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
    """The ascent step ``e`` in the compute dtype, one leaf per parameter.

    SAM: ``e = rho * g / (||g|| + eps)``. ASAM (``adaptive=True``):
    ``T = |x| + eta`` on the leaves where ``mask`` is true and ``T = 1``
    elsewhere, ``e = rho * T**2 * g / (||T * g|| + eps)``. A zero direction
    gives a zero perturbation (with ``eps = 0`` too), and so does a direction
    with a NaN or an
    infinity (its norm is then not finite): a non-finite stored gradient never
    reaches the parameters. The check reuses the norm, a scalar, and the
    selection fuses into the elementwise product: no extra pass over the tree.

    Args:
      direction: the gradient that sets the direction, a tree like ``params``.
      params: the parameters (used by ASAM only).
      rho: the radius, a scalar.
      eps: added to the norm.
      adaptive: ASAM's scale-invariant perturbation.
      eta: ASAM's offset in ``T = |x| + eta``.
      mask: a tree of Python bools like ``params`` (resolved); ASAM only.

    Returns:
      A tree like ``params`` in the compute dtype (see the module docstring).
    """
    dtype = compute_dtype(params)
    g = jax.tree.map(lambda x: jnp.asarray(x, dtype), direction)
    rho = jnp.asarray(rho, dtype)
    eta = jnp.asarray(eta, dtype)
    eps = jnp.asarray(eps, dtype)
    if adaptive:
        one = jnp.ones((), dtype)
        scale = jax.tree.map(
            lambda p, m: jnp.abs(jnp.asarray(p, dtype)) + eta if m else one,
            params,
            mask,
        )
        tg = jax.tree.map(jnp.multiply, scale, g)
        norm = global_norm(tg, dtype)
        ok, inv = _usable(norm), rho / (norm + eps)
        return jax.tree.map(lambda t, x: jnp.where(ok, inv * t * x, 0), scale, tg)
    norm = global_norm(g, dtype)
    ok, inv = _usable(norm), rho / (norm + eps)
    return jax.tree.map(lambda x: jnp.where(ok, inv * x, 0), g)


def _usable(norm: jax.Array) -> jax.Array:
    """Whether a direction of this norm perturbs: finite and not zero (a zero
    direction gives no perturbation, also with ``eps = 0``, where ``rho / 0``
    times 0 would be NaN)."""
    return jnp.isfinite(norm) & (norm > 0)


def add_perturbation(params: Any, e: Any) -> Any:
    """``params + e`` in the compute dtype of each pair, cast to the params'."""

    def add(p, x):
        wide = compute_dtype((p, x))
        return (jnp.asarray(p, wide) + jnp.asarray(x, wide)).astype(jnp.result_type(p))

    return jax.tree.map(add, params, e)


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
    scale: Any = 1.0,
) -> Any:
    """``params + e(direction)``; ``rho`` evaluated at ``count``, times ``scale``."""
    dtype = compute_dtype(params)
    e = perturbation(
        direction,
        params,
        hparam_value(rho, count, dtype) * jnp.asarray(scale, dtype),
        eps=eps,
        adaptive=adaptive,
        eta=eta,
        mask=resolve_mask(fn, mask, params) if adaptive else None,
    )
    return add_perturbation(params, e)


def increment(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the int32 maximum."""
    return optax.safe_increment(count)
