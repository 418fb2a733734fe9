"""Diagnostics for sharpness-aware training: pure, jittable functions.

Every function here takes the parameters as an arbitrary tree (a dict, nested
containers, a Flax ``nnx.State`` of ``Param`` s) and accumulates in float32
whatever the parameters' dtype. A ``loss_fn(params) -> scalar`` closes over
its batch; it is a static (Python) argument, so jit a function that closes
over it, e.g. ``jax.jit(lambda p: sharpness(loss_fn, p, 0.05))``.

The iterative functions loop with ``lax.fori_loop`` / ``lax.map``. On XLA:CPU,
convolutions inside such loops run far slower than the same convolutions
outside one (about 30x measured on a small CNN, jax 0.10); on a CPU, evaluate a
CNN's diagnostics with its convolutions written as matrix products, as
``samx.examples.flax_train.conv_as_matmul`` does for the notebooks.
"""

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from samx import _checks, _perturb

__all__ = (
    "HessianEigen",
    "filter_normalized_direction",
    "hessian_top_eigenvalue",
    "loss_slice_1d",
    "loss_surface_2d",
    "sharpness",
    "staleness_cosine",
)

# Li et al.'s filter normalisation adds this to the norm of each random filter.
_FILTER_EPS = 1e-10


# --- argument checks ---------------------------------------------------------


def _check_loss_fn(fn: str, loss_fn: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(
            f"`{fn}(loss_fn=...)` must be a callable `loss_fn(params) -> scalar`"
            f" (close over the batch), got {type(loss_fn).__name__}."
        )
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # e.g. a builtin without a signature
        return
    try:
        signature.bind(None)
    except TypeError:
        name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
        raise TypeError(
            f"`{fn}(loss_fn=...)` is called as `loss_fn(params)`, but"
            f" `{name}{signature}` does not take one positional argument: close"
            " over the batch, e.g. `loss_fn=lambda p: loss(p, batch)`."
        ) from None


def _check_params(fn: str, params: Any) -> None:
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError(f"`{fn}(params=...)` must be a tree with at least one leaf.")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            where = f"leaf {jax.tree_util.keystr(path)}" if path else "it"
            raise TypeError(
                f"`{fn}(params=...)` must be a tree of floating-point arrays, but"
                f" {where} is {getattr(dtype, 'name', type(leaf).__name__)}."
            )


def _check_count(fn: str, name: str, value: Any, low: int) -> None:
    if not _checks.is_int(value):
        raise TypeError(
            f"`{fn}({name}=...)` must be a Python int (it sets the number of"
            f" iterations, a static value), got {type(value).__name__}."
        )
    if value < low:
        raise ValueError(f"`{fn}({name}=...)` must be >= {low}, got {value}.")


def _check_key(fn: str, key: Any) -> None:
    typed = isinstance(key, jax.Array) and jnp.issubdtype(
        key.dtype, jax.dtypes.prng_key
    )
    raw = (
        isinstance(key, jax.Array)
        and key.dtype == jnp.uint32
        and jnp.shape(key) == (2,)
    )
    if not ((typed and jnp.shape(key) == ()) or raw):
        raise TypeError(
            f"`{fn}(key=...)` must be a single PRNG key, e.g."
            f" `jax.random.key(0)`, got {_describe(key)}."
        )


def _check_1d(fn: str, name: str, values: Any) -> None:
    array = values
    if not isinstance(values, jax.Array):  # a traced value is a jax.Array too
        try:
            array = np.asarray(values)
        except (TypeError, ValueError):  # e.g. a ragged list
            array = np.asarray(None)
    if not (
        jnp.issubdtype(array.dtype, jnp.floating)
        or jnp.issubdtype(array.dtype, jnp.integer)
    ):
        raise TypeError(
            f"`{fn}({name}=...)` must be a 1-D array of step sizes (numbers), got"
            f" {_describe(values)}"
            + (" of non-numbers." if isinstance(values, (list, tuple)) else ".")
        )
    shape = jnp.shape(array)
    if len(shape) != 1:
        raise ValueError(
            f"`{fn}({name}=...)` must be a 1-D array of step sizes, got shape {shape}."
        )


def _describe(x: Any) -> str:
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return f"an array of dtype {x.dtype} and shape {x.shape}"
    return type(x).__name__


# --- tree arithmetic, in float32 -----------------------------------------------


def _f32(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _vdot(a: Any, b: Any) -> jax.Array:
    """``<a, b>`` over all leaves, in float32."""
    dots = [
        jnp.sum(jnp.asarray(x, jnp.float32) * jnp.asarray(y, jnp.float32))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return sum(dots, jnp.zeros((), jnp.float32))


def _scale(s: jax.Array, tree: Any) -> Any:
    return jax.tree.map(lambda x: s * x, tree)


def _axpy(a: jax.Array, x: Any, y: Any) -> Any:
    """``a * x + y``, leaf by leaf."""
    return jax.tree.map(lambda u, v: a * u + v, x, y)


def _normalized(tree: Any, eps: jax.Array | float) -> Any:
    """``tree / (||tree|| + eps)`` in float32; a zero tree stays zero."""
    return _scale(1 / (_perturb.f32_global_norm(tree) + eps), _f32(tree))


def _scalar_loss(fn: str, loss_fn: Any) -> Any:
    """``loss_fn`` with its scalar output checked and cast to float32."""

    def f(params: Any) -> jax.Array:
        out = loss_fn(params)
        if not hasattr(out, "dtype") and not isinstance(out, (int, float)):
            hint = (
                " (a `(loss, aux)` pair? return the loss only)"
                if isinstance(out, (tuple, list))
                else ""
            )
            raise TypeError(
                f"`{fn}(loss_fn=...)` must return a scalar array, got"
                f" {type(out).__name__}{hint}."
            )
        if jnp.shape(out) != ():
            raise ValueError(
                f"`{fn}(loss_fn=...)` must return a scalar, got shape {jnp.shape(out)}."
            )
        if not jnp.issubdtype(jnp.result_type(out), jnp.floating):
            raise TypeError(
                f"`{fn}(loss_fn=...)` must return a floating-point scalar (its"
                f" gradient is taken), got dtype {jnp.result_type(out)}."
            )
        return jnp.asarray(out, jnp.float32)

    return f


def _gaussian_like(key: jax.Array, params: Any) -> Any:
    """A standard normal float32 tree like ``params``, drawn as one flat vector."""
    leaves, treedef = jax.tree.flatten(params)
    sizes = [int(np.prod(jnp.shape(x))) for x in leaves]
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    pieces = jnp.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [flat]
    return jax.tree.unflatten(
        treedef,
        [z.reshape(jnp.shape(x)) for z, x in zip(pieces, leaves, strict=True)],
    )


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
    _checks.check_scalar(fn, "eps", eps, allow_schedule=False)
    _checks.check_like_params(fn, "`fresh`", fresh, stale, ref="`stale`")
    inv_stale = 1 / (_perturb.f32_global_norm(stale) + eps)
    inv_fresh = 1 / (_perturb.f32_global_norm(fresh) + eps)
    return jnp.clip(_vdot(stale, fresh) * inv_stale * inv_fresh, -1.0, 1.0)


# --- public functions ----------------------------------------------------------


class HessianEigen(NamedTuple):
    """The result of :func:`hessian_top_eigenvalue`.

    Attributes:
      value: the eigenvalue of largest magnitude, a float32 scalar (the Rayleigh
        quotient ``v^T H v`` of ``vector``).
      vector: the unit eigenvector ``v``, a float32 tree like the parameters
        (norm over all leaves together).
    """

    value: jax.Array
    vector: Any


def sharpness(
    loss_fn: Any,
    params: Any,
    rho: float | jax.Array,
    *,
    num_steps: int = 5,
    step_size: float | jax.Array | None = None,
    eps: float = 1e-12,
    key: jax.Array | None = None,
) -> jax.Array:
    r"""The largest loss increase in the L2 ball of radius ``rho`` (estimated).

    Estimates ``max_{||e|| <= rho} L(x + e) - L(x)``, the quantity SAM
    minimises, with ``||e||`` the global L2 norm over all leaves, by normalised
    projected gradient ascent from the SAM step::

      e_0     = rho * N(grad L(x))                      # the SAM step
      e_{k+1} = P(e_k + alpha * N(grad L(x + e_k)))     # k = 0 .. num_steps - 1
      result  = max_k L(x + e_k) - L(x)                 # k = 0 .. num_steps

    where ``N(g) = g / (||g|| + eps)`` and ``P`` projects onto the ball
    (rescales ``e`` to norm ``rho`` when it is longer). The step is
    ``alpha = step_size``, or ``alpha = rho`` when ``step_size`` is None: a
    step as long as the radius, which moves along the sphere quickly on the
    curved problems where the SAM step is not the maximiser. The result is the
    best increase over the iterates, so it is at least the one-step SAM
    estimate (``num_steps=0``) and, as every iterate lies in the ball, at most
    the true maximum: a lower bound, which on a quadratic converges to the
    maximum (the top eigenvector direction near a minimum). At an exact
    critical point (a gradient that is exactly zero, e.g. a symmetric
    initialisation) the SAM step is ``e_0 = 0`` and the iterates cannot leave
    it: pass ``key`` to start there from a random direction of norm ``rho``
    instead (elsewhere ``key`` changes nothing); without ``key`` the estimate
    is then 0. The perturbed parameters are formed in float32
    and cast to each leaf's dtype before ``loss_fn`` sees them; the gradients
    and the loss differences are taken in float32. Costs ``num_steps + 1``
    gradient evaluations and one loss evaluation.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, with the batch closed over; a
        static (Python) argument.
      params: a tree of floating-point arrays.
      rho: the radius, ``>= 0``: a number or a scalar array (traced values, e.g.
        under ``jax.vmap`` over radii, are not checked). ``rho = 0`` gives 0.
      num_steps: the number of projected ascent steps after the SAM step, an
        ``int >= 0``; 0 gives the one-step SAM estimate.
      step_size: the ascent step ``alpha``, ``>= 0``; None means ``rho``.
      eps: added to the gradient norms, ``>= 0``.
      key: an optional PRNG key, e.g. ``jax.random.key(0)``, for the first
        direction where the gradient at ``params`` is exactly zero.

    Returns:
      A float32 scalar.

    Examples:
      >>> import jax, jax.numpy as jnp, samx
      >>> A = jnp.array([[2.0, 0.0], [0.0, 1.0]])
      >>> loss = lambda p: 0.5 * p["x"] @ A @ p["x"]
      >>> params = {"x": jnp.array([0.1, 1.0])}
      >>> sam_step = samx.diagnostics.sharpness(loss, params, 0.5, num_steps=0)
      >>> best = samx.diagnostics.sharpness(loss, params, 0.5, num_steps=10)
      >>> bool(best >= sam_step), round(float(best), 3)  # the exact max: 0.6437
      (True, 0.644)
      >>> at_min = {"x": jnp.zeros(2)}  # zero gradient: 0.5 * rho**2 * 2 = 0.25
      >>> samx.diagnostics.sharpness(
      ...     loss, at_min, 0.5, num_steps=20, key=jax.random.key(0)).round(3)
      Array(0.25, dtype=float32)

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
    """
    fn = "samx.diagnostics.sharpness"
    _check_loss_fn(fn, loss_fn)
    _check_params(fn, params)
    _checks.check_scalar(fn, "rho", rho, allow_schedule=False)
    _check_count(fn, "num_steps", num_steps, 0)
    if step_size is not None:
        _checks.check_scalar(fn, "step_size", step_size, allow_schedule=False)
    _checks.check_scalar(fn, "eps", eps, allow_schedule=False)
    if key is not None:
        _check_key(fn, key)
    f = _scalar_loss(fn, loss_fn)
    value_and_grad = jax.value_and_grad(f)
    rho = jnp.asarray(rho, jnp.float32)
    alpha = rho if step_size is None else jnp.asarray(step_size, jnp.float32)
    eps = jnp.asarray(eps, jnp.float32)

    def project(e: Any) -> Any:
        norm = _perturb.f32_global_norm(e)
        outside = norm > rho
        return _scale(jnp.where(outside, rho / jnp.where(outside, norm, 1), 1), e)

    def ascend(_: Any, carry: tuple[Any, jax.Array]) -> tuple[Any, jax.Array]:
        e, best = carry
        value, grad = value_and_grad(_perturb.add_perturbation(params, e))
        e = project(_axpy(alpha, _normalized(grad, eps), e))
        return e, jnp.maximum(best, value - loss0)

    loss0, grad0 = value_and_grad(params)
    e = _perturb.perturbation(grad0, params, rho, eps=eps)
    if key is not None:  # a random first direction where the gradient is zero
        critical = _perturb.f32_global_norm(grad0) == 0
        start = _scale(rho, _normalized(_gaussian_like(key, params), eps))
        e = jax.tree.map(
            lambda a, b: jnp.where(critical, b.astype(a.dtype), a), e, start
        )
    best = jnp.full((), -jnp.inf, jnp.float32)
    e, best = jax.lax.fori_loop(0, num_steps, ascend, (e, best))
    last = f(_perturb.add_perturbation(params, e))
    return jnp.maximum(best, last - loss0)


def hessian_top_eigenvalue(
    loss_fn: Any, params: Any, key: jax.Array, *, num_iters: int = 20
) -> HessianEigen:
    r"""The Hessian eigenvalue of largest magnitude, by power iteration.

    Power iteration on Hessian-vector products, forward-over-reverse
    (``jax.jvp`` of ``jax.grad``, never forming the Hessian)::

      v_0     = N(z),  z ~ Normal(0, I) drawn with ``key``
      v_{k+1} = N(H v_k)                          # k = 0 .. num_iters - 2
      value   = v^T H v  with v = v_{num_iters - 1}

    with ``N(w) = w / ||w||`` over all leaves together. It converges to the
    eigenvalue of largest *magnitude* (which may be negative away from a
    minimum) at the rate ``|lambda_2 / lambda_1|`` per iteration, so a small
    spectral gap needs more iterations. The vectors and the Rayleigh quotient
    are float32; the tangent is cast to each parameter's dtype for the
    Hessian-vector product. A zero Hessian gives 0 and a zero vector. Costs
    ``num_iters`` Hessian-vector products (about 2-3 gradients each).

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, with the batch closed over; a
        static (Python) argument; twice differentiable.
      params: a tree of floating-point arrays.
      key: a PRNG key, e.g. ``jax.random.key(0)``, for the start vector.
      num_iters: the number of Hessian-vector products, an ``int >= 1``.

    Returns:
      A :class:`HessianEigen` ``(value, vector)``: a float32 scalar and a unit
      float32 tree like ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp, samx
      >>> loss = lambda p: 0.5 * (3.0 * p["a"] ** 2 + p["b"] ** 2)
      >>> params = {"a": jnp.array(1.0), "b": jnp.array(2.0)}
      >>> eig = samx.diagnostics.hessian_top_eigenvalue(
      ...     loss, params, jax.random.key(0))
      >>> eig.value.round(4), jnp.abs(eig.vector["a"]).round(4)
      (Array(3., dtype=float32), Array(1., dtype=float32))

    References:
      Yao et al., `PyHessian: Neural Networks Through the Lens of the Hessian
      <https://arxiv.org/abs/1912.07145>`_, 2020

      Pearlmutter, `Fast Exact Multiplication by the Hessian
      <https://doi.org/10.1162/neco.1994.6.1.147>`_, 1994
    """
    fn = "samx.diagnostics.hessian_top_eigenvalue"
    _check_loss_fn(fn, loss_fn)
    _check_params(fn, params)
    _check_key(fn, key)
    _check_count(fn, "num_iters", num_iters, 1)
    grad = jax.grad(_scalar_loss(fn, loss_fn))
    eps = jnp.asarray(1e-30, jnp.float32)

    def hvp(v: Any) -> Any:
        tangent = jax.tree.map(lambda p, x: x.astype(jnp.result_type(p)), params, v)
        return _f32(jax.jvp(grad, (params,), (tangent,))[1])

    v = _normalized(_gaussian_like(key, params), eps)
    v = jax.lax.fori_loop(0, num_iters - 1, lambda _, v: _normalized(hvp(v), eps), v)
    return HessianEigen(value=_vdot(v, hvp(v)), vector=v)


def filter_normalized_direction(
    key: jax.Array, params: Any, *, ignore_1d: bool = True
) -> Any:
    """A random direction normalised filter by filter, as in Li et al. 2018.

    Draws a standard normal tree ``d`` like ``params`` (one flat draw over all
    leaves, in tree order) and rescales it so that plots along it are
    comparable across networks whose weights have different scales:

    * a leaf with ``ndim >= 2``: each *filter*, the slice ``[..., j]`` along
      the **last** axis, is rescaled to the norm of the same filter of
      ``params``: ``d[..., j] * ||p[..., j]|| / (||d[..., j]|| + 1e-10)``. The
      last axis is the output axis of Flax kernels, ``Dense`` ``(in, out)``
      and ``Conv`` ``(H, W, in, out)``; PyTorch puts it first, so transpose
      trees that follow that layout.
    * a leaf with ``ndim <= 1`` (biases, normalisation scales): zero when
      ``ignore_1d`` (Li et al.'s "ignore biasbn"), else the whole leaf is
      rescaled to the leaf's norm.

    Args:
      key: a PRNG key, e.g. ``jax.random.key(0)``; the same key gives the same
        direction.
      params: a tree of floating-point arrays, e.g. the parameters of a trained
        network.
      ignore_1d: zero the leaves with ``ndim <= 1``.

    Returns:
      A float32 tree like ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp, samx
      >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]]),
      ...           "bias": jnp.ones(2)}
      >>> d = samx.diagnostics.filter_normalized_direction(
      ...     jax.random.key(0), params)
      >>> jnp.linalg.norm(d["kernel"], axis=0).round(4), d["bias"]
      (Array([5., 1.], dtype=float32), Array([0., 0.], dtype=float32))

    References:
      Li et al., `Visualizing the Loss Landscape of Neural Nets
      <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018
    """
    fn = "samx.diagnostics.filter_normalized_direction"
    _check_key(fn, key)
    _check_params(fn, params)
    if not isinstance(ignore_1d, (bool, np.bool_)):
        raise TypeError(
            f"`{fn}(ignore_1d=...)` must be a bool, got {type(ignore_1d).__name__}."
        )

    def rescale(d: jax.Array, p: Any) -> jax.Array:
        p = jnp.asarray(p, jnp.float32)
        if p.ndim <= 1 and ignore_1d:
            return jnp.zeros_like(d)
        axes = tuple(range(p.ndim - 1)) if p.ndim >= 2 else None
        p_norm = jnp.sqrt(jnp.sum(jnp.square(p), axis=axes, keepdims=True))
        d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
        return d * p_norm / (d_norm + _FILTER_EPS)

    return jax.tree.map(rescale, _gaussian_like(key, params), params)


def loss_slice_1d(
    loss_fn: Any,
    params: Any,
    direction: Any,
    alphas: Any,
    *,
    batch_size: int | None = None,
) -> jax.Array:
    """The losses along a line: ``loss_fn(params + a * direction)`` for each ``a``.

    The points are formed in float32 and cast to each leaf's dtype; the losses
    are evaluated one point (or ``batch_size`` points) at a time with
    ``jax.lax.map``, so memory does not grow with ``len(alphas)``. With a
    :func:`filter_normalized_direction` this is Li et al.'s 1-D plot; with the
    difference of two solutions it is a linear interpolation between them.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, with the batch closed over; a
        static (Python) argument.
      params: a tree of floating-point arrays, the centre of the slice.
      direction: a tree with the structure and leaf shapes of ``params``.
      alphas: the step sizes, a 1-D array.
      batch_size: evaluate this many points at once (vectorised), an
        ``int >= 1``; None means one at a time.

    Returns:
      The float32 losses, shape ``(len(alphas),)``.

    Examples:
      >>> import jax.numpy as jnp, samx
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)
      >>> params, d = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([1.0, 1.0])}
      >>> samx.diagnostics.loss_slice_1d(loss, params, d, jnp.array([-1.0, 0.0, 1.0]))
      Array([1., 1., 5.], dtype=float32)

    References:
      Li et al., `Visualizing the Loss Landscape of Neural Nets
      <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018

      Jo, Lim, Lee, `Asynchronous Sharpness-Aware Minimization For Fast and
      Accurate Deep Learning <https://arxiv.org/abs/2503.11147>`_, 2025
      (Figure 5: the landscapes of SGD and SAM solutions)
    """
    fn = "samx.diagnostics.loss_slice_1d"
    _check_slice_args(fn, loss_fn, params, batch_size)
    _checks.check_like_params(fn, "`direction`", direction, params)
    _check_1d(fn, "alphas", alphas)
    f = _scalar_loss(fn, loss_fn)
    d = _f32(direction)

    def at(a: jax.Array) -> jax.Array:
        return f(_perturb.add_perturbation(params, _scale(a, d)))

    return jax.lax.map(at, jnp.asarray(alphas, jnp.float32), batch_size=batch_size)


def loss_surface_2d(
    loss_fn: Any,
    params: Any,
    d1: Any,
    d2: Any,
    alphas: Any,
    betas: Any,
    *,
    batch_size: int | None = None,
) -> jax.Array:
    """The losses on a plane: ``loss_fn(params + a * d1 + b * d2)`` on a grid.

    Entry ``[i, j]`` is the loss at ``alphas[i]`` along ``d1`` and ``betas[j]``
    along ``d2``. The points are formed in float32 and cast to each leaf's
    dtype, and evaluated one (or ``batch_size``) at a time with
    ``jax.lax.map``. With two :func:`filter_normalized_direction` s this is
    Li et al.'s contour plot, the one the AsyncSAM paper draws (Figure 5) to
    compare the SGD and SAM solutions.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, with the batch closed over; a
        static (Python) argument.
      params: a tree of floating-point arrays, the centre of the plane.
      d1: the first direction, a tree with the structure and leaf shapes of
        ``params``.
      d2: the second direction, likewise.
      alphas: the steps along ``d1``, a 1-D array.
      betas: the steps along ``d2``, a 1-D array.
      batch_size: evaluate this many points at once (vectorised), an
        ``int >= 1``; None means one at a time.

    Returns:
      The float32 losses, shape ``(len(alphas), len(betas))``.

    Examples:
      >>> import jax.numpy as jnp, samx
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)
      >>> params = {"w": jnp.array([1.0, 0.0])}
      >>> d1, d2 = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}
      >>> samx.diagnostics.loss_surface_2d(
      ...     loss, params, d1, d2, jnp.array([-1.0, 0.0]), jnp.array([0.0, 2.0]))
      Array([[0., 4.],
             [1., 5.]], dtype=float32)

    References:
      Li et al., `Visualizing the Loss Landscape of Neural Nets
      <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018

      Jo, Lim, Lee, `Asynchronous Sharpness-Aware Minimization For Fast and
      Accurate Deep Learning <https://arxiv.org/abs/2503.11147>`_, 2025
      (Figure 5: the landscapes of SGD and SAM solutions)
    """
    fn = "samx.diagnostics.loss_surface_2d"
    _check_slice_args(fn, loss_fn, params, batch_size)
    _checks.check_like_params(fn, "`d1`", d1, params)
    _checks.check_like_params(fn, "`d2`", d2, params)
    _check_1d(fn, "alphas", alphas)
    _check_1d(fn, "betas", betas)
    f = _scalar_loss(fn, loss_fn)
    d1, d2 = _f32(d1), _f32(d2)
    a, b = jnp.meshgrid(
        jnp.asarray(alphas, jnp.float32), jnp.asarray(betas, jnp.float32), indexing="ij"
    )

    def at(ab: jax.Array) -> jax.Array:
        e = _axpy(ab[0], d1, _scale(ab[1], d2))
        return f(_perturb.add_perturbation(params, e))

    points = jnp.stack([a.ravel(), b.ravel()], axis=1)
    return jax.lax.map(at, points, batch_size=batch_size).reshape(a.shape)


def _check_slice_args(fn: str, loss_fn: Any, params: Any, batch_size: Any) -> None:
    _check_loss_fn(fn, loss_fn)
    _check_params(fn, params)
    if batch_size is not None:
        _check_count(fn, "batch_size", batch_size, 1)
