"""Gradient accumulation: a function of a batch, averaged over micro-batches."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from samx import _checks


def _split(num_microbatches: int, batch: Any) -> Any:
    """Every leaf of ``batch`` as ``(k, n // k, ...)``, strided; checks sizes."""
    k = num_microbatches
    leaves, _ = jax.tree_util.tree_flatten_with_path(batch)
    if not leaves:
        raise ValueError(
            "samx.microbatched: `batch` has no array leaves to split into"
            f" {k} micro-batches."
        )
    sizes = {}
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path) or "the batch"
        if not hasattr(leaf, "shape") and not isinstance(leaf, (int, float, complex)):
            raise TypeError(
                f"samx.microbatched: every leaf of `batch` must be an array, but"
                f" leaf {name} is a {type(leaf).__name__}."
            )
        if np.ndim(leaf) == 0:
            raise ValueError(
                f"samx.microbatched: every leaf of `batch` is split along axis 0,"
                f" but leaf {name} is a scalar."
            )
        sizes[name] = np.shape(leaf)[0]
    (first, n), *rest = sizes.items()
    for name, size in rest:
        if size != n:
            raise ValueError(
                "samx.microbatched: every leaf of `batch` must have the same"
                f" leading (batch) size, but leaf {first} has {n} and leaf {name}"
                f" has {size}."
            )
    if n % k:
        raise ValueError(
            f"samx.microbatched: the batch size {n} is not divisible by"
            f" num_microbatches={k}."
        )
    # Strided: micro-batch j holds rows j, j + k, j + 2k, ... A batch sharded
    # along axis 0 then gives micro-batches sharded the same way (the split
    # axis stays the sharded one), with no gather and no explicit-sharding
    # error; contiguous blocks would put whole micro-batches on few devices.
    return jax.tree.map(
        lambda x: jnp.swapaxes(jnp.reshape(x, (n // k, k, *np.shape(x)[1:])), 0, 1),
        batch,
    )


def microbatched(
    fn: Callable[[Any, Any], Any], num_microbatches: int
) -> Callable[[Any, Any], Any]:
    r"""``fn`` averaged over micro-batches: gradient accumulation.

    ``microbatched(fn, k)(params, batch)`` splits every leaf of ``batch`` along
    axis 0 into ``k`` equal micro-batches, evaluates ``fn(params, mb)`` on each
    in a ``lax.scan``, and returns the mean of the results::

      out = mean over j of fn(params, batch[j::k])   # on every leaf of batch

    The split is strided (micro-batch ``j`` holds rows ``j, j + k, ...``), so
    that a batch sharded along axis 0 over devices (data parallelism) gives
    micro-batches sharded over the same devices, with no gather; a mean-reduced
    result does not depend on which rows go together.

    The sum is accumulated in float32 (or wider, for float64 outputs) and cast
    back to the dtypes of ``fn``'s output, so bfloat16 gradients are not summed
    in bfloat16. Only one micro-batch's intermediate values (activations) are
    live at a time: memory is that of a batch of ``n / k``.

    With ``fn = jax.grad(loss)`` and a loss that is a *mean* over the examples,
    the result is the gradient on the whole batch (up to rounding), so any samx
    transform, or any optax optimizer, runs over ``k`` micro-batches as it
    would on the large batch::

      g = samx.microbatched(jax.grad(loss), k)
      updates, state = tx.update(
          g(params, batch), state, params, grad_fn=lambda p, i: g(p, batch))

    ``fn`` may return any tree of floating arrays: ``jax.value_and_grad(loss)``
    gives the mean loss and the mean gradient. With a loss that is a *sum* over
    the examples, multiply the result by ``k``.

    Notes:

    - The SAM perturbation is then the large-batch one: the ascent direction is
      the gradient of the whole batch, and every micro-batch's descent gradient
      is taken at the same perturbed point. This is not m-sharpness (Foret et
      al., one perturbation per micro-batch of ``m`` examples), which is a
      different method.
    - Model state updated by the forward pass (BatchNorm statistics) is out of
      scope: ``fn`` returns only what is averaged.
    - ``num_microbatches = 1`` calls ``fn`` once on the whole batch.

    Args:
      fn: a function ``fn(params, batch)`` that returns a tree of floating
        arrays, e.g. ``jax.grad(loss)``.
      num_microbatches: the number of micro-batches ``k``, an int ``>= 1``
        that divides the batch size (the leading size of every leaf of
        ``batch``; all leaves must have the same one).

    Returns:
      A function ``(params, batch) -> tree``, with the output structure and
      dtypes of ``fn``. It is pure and can be traced by ``jax.jit``; the
      checks on ``batch`` run at trace time, on shapes only.

    Examples:
      >>> import jax, jax.numpy as jnp, samx
      >>> def loss(params, batch):
      ...     return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
      >>> batch = {"x": jnp.arange(24.0).reshape(8, 3) / 10, "y": jnp.ones(8)}
      >>> params = {"w": jnp.zeros(3)}
      >>> grad = samx.microbatched(jax.grad(loss), 4)  # 4 micro-batches of 2
      >>> grad(params, batch)["w"].round(4)
      Array([-2.1, -2.3, -2.5], dtype=float32)
      >>> jax.grad(loss)(params, batch)["w"].round(4)
      Array([-2.1, -2.3, -2.5], dtype=float32)

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (m-sharpness:
      Section 4.1 and Appendix C.3)
    """
    k = num_microbatches
    if not _checks.is_int(k) or k < 1:
        raise ValueError(
            f"`samx.microbatched(num_microbatches=...)` must be an int >= 1, got {k!r}."
        )
    if not callable(fn):
        raise TypeError(
            "`samx.microbatched(fn=...)` must be a function `fn(params, batch)`"
            f" (e.g. `jax.grad(loss)`), got {type(fn).__name__}."
        )
    k = int(k)

    @functools.wraps(fn)
    def accumulated(params: Any, batch: Any) -> Any:
        micro = _split(k, batch)
        if k == 1:
            return fn(params, batch)
        out = jax.eval_shape(
            lambda p, m: fn(p, jax.tree.map(lambda x: x[0], m)), params, micro
        )
        for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                where = f" leaf {jax.tree_util.keystr(path)}" if path else ""
                raise TypeError(
                    "samx.microbatched: `fn` must return floating arrays to"
                    f" average, but its output{where} has dtype {leaf.dtype}."
                )

        def acc_dtype(leaf):
            return jnp.promote_types(leaf.dtype, jnp.float32)

        def body(total, mb):
            value = fn(params, mb)
            total = jax.tree.map(
                lambda t, v: t + jnp.asarray(v).astype(t.dtype), total, value
            )
            return total, None

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, acc_dtype(s)), out)
        total, _ = lax.scan(body, zeros, micro)
        return jax.tree.map(lambda t, s: (t / k).astype(s.dtype), total, out)

    return accumulated
