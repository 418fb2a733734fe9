"""Argument checks shared by the samx transforms.

Every check raises where the mistake is made and names the argument in the
caller's own terms, e.g. ``samx.sam(rho=...)``. Checks on values that are
traced (for example hyperparameters injected by ``optax.inject_hyperparams``
inside ``jax.jit``) are skipped: they cannot be read without a host
synchronisation.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def check_base(fn: str, base: Any) -> optax.GradientTransformationExtraArgs:
    """Checks that ``base`` is an optax transform; returns it with extra args."""
    if callable(getattr(base, "init", None)) and callable(
        getattr(base, "update", None)
    ):
        return optax.with_extra_args_support(base)
    hint = ""
    if callable(base):
        name = getattr(base, "__qualname__", repr(base))
        hint = (
            f" It is a callable ({name}): did you pass the factory instead of"
            " the transform it returns, e.g. `optax.sgd` instead of"
            " `optax.sgd(0.1)`?"
        )
    raise TypeError(
        f"`{fn}(base=...)` must be an optax transform with `init` and `update`"
        f" (e.g. `optax.sgd(0.1, momentum=0.9)`), got {type(base).__name__}." + hint
    )


def check_scalar(
    fn: str,
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    high: float | None = None,
    allow_schedule: bool = True,
) -> None:
    """Checks a scalar hyperparameter: finite and in ``[low, high]``.

    Schedules (callables of the step count) are accepted when
    ``allow_schedule``; their values are traced when evaluated, so they are not
    checked, and neither are traced values.
    """
    if callable(value):
        if allow_schedule:
            return
        raise TypeError(f"`{fn}({name}=...)` must be a number, got a callable.")
    if isinstance(value, jax.core.Tracer):
        return
    array = (
        np.asarray(value)
        if isinstance(value, (int, float, np.generic, np.ndarray, jax.Array))
        else None
    )
    if array is None or not (
        jnp.issubdtype(array.dtype, jnp.floating)
        or jnp.issubdtype(array.dtype, jnp.integer)
    ):
        raise TypeError(
            f"`{fn}({name}=...)` must be a number, a scalar array"
            f"{' or a schedule' if allow_schedule else ''}, got"
            f" {type(value).__name__}."
        )
    if array.ndim != 0:
        raise TypeError(
            f"`{fn}({name}=...)` must be a scalar, got an array of shape {array.shape}."
        )
    v = float(array)
    interval = f"[{low}, {'inf' if high is None else high}]"
    if not np.isfinite(v) or v < low or (high is not None and v > high):
        raise ValueError(
            f"`{fn}({name}=...)` must be finite and in {interval}, got {v}."
        )


def check_perturbation_args(
    fn: str,
    *,
    rho: Any,
    eps: Any,
    adaptive: bool = False,
    eta: Any = 0.01,
    mask: Any = None,
) -> None:
    """Checks the arguments shared by the transforms that perturb the params."""
    check_scalar(fn, "rho", rho)
    check_scalar(fn, "eta", eta, allow_schedule=False)
    check_scalar(fn, "eps", eps, allow_schedule=False)
    if mask is not None and not adaptive:
        raise ValueError(
            f"`{fn}(mask=...)` selects the leaves that ASAM scales and needs"
            " `adaptive=True`."
        )


def check_like_params(
    fn: str, what: str, tree: Any, params: Any, ref: str = "`params`"
) -> None:
    """Checks that ``tree`` has the tree structure and leaf shapes of ``params``.

    Runs at trace time on static information only, so it costs nothing in a
    compiled step. The error names the first leaf path that differs.
    """
    tree_leaves, tree_def = jax.tree_util.tree_flatten_with_path(tree)
    param_leaves, param_def = jax.tree_util.tree_flatten_with_path(params)
    if tree_def != param_def:
        tree_paths = [jax.tree_util.keystr(p) for p, _ in tree_leaves]
        param_paths = [jax.tree_util.keystr(p) for p, _ in param_leaves]
        for i in range(max(len(tree_paths), len(param_paths))):
            got = tree_paths[i] if i < len(tree_paths) else "<nothing>"
            want = param_paths[i] if i < len(param_paths) else "<nothing>"
            if got != want:
                break
        else:  # same paths, different node types (e.g. a tuple for a list)
            got, want = str(tree_def), str(param_def)
        raise ValueError(
            f"{fn}: {what} does not have the tree structure of {ref}: its"
            f" leaf {got} stands where {ref} has {want}."
        )
    for (path, leaf), (_, param) in zip(tree_leaves, param_leaves, strict=True):
        if np.shape(leaf) != np.shape(param):
            raise ValueError(
                f"{fn}: {what} leaf {jax.tree_util.keystr(path)} has shape"
                f" {np.shape(leaf)}, but {ref} has shape {np.shape(param)}."
            )


def require_params(fn: str, params: Any) -> None:
    if params is None:
        raise ValueError(
            f"{fn}: `update` needs the current `params` (the transform"
            " evaluates the gradient at a perturbation of them), got None."
        )


def require_grad_fn(fn: str, grad_fn: Callable | None) -> Callable:
    """Returns ``grad_fn`` or raises an error that says how to pass it."""
    if grad_fn is None:
        raise ValueError(
            f"{fn}: `update` needs the keyword argument `grad_fn`, a function"
            " `grad_fn(params, i)` that returns the loss gradient at `params`"
            " (the same convention as `optax.contrib.sam(..., opaque_mode=True)`),"
            " e.g. `tx.update(grads, state, params, grad_fn=lambda p, i:"
            " jax.grad(loss)(p, batch))`. Through `optax.chain` or"
            " `nnx.Optimizer.update`, pass it as an extra keyword argument."
        )
    if not callable(grad_fn):
        raise TypeError(
            f"{fn}: `grad_fn` must be callable as `grad_fn(params, i)`,"
            f" got {type(grad_fn).__name__}."
        )
    return grad_fn
