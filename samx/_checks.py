"""Argument checks shared by the samx transforms.

Every check raises where the mistake is made and names the argument in the
caller's own terms, e.g. ``samx.sam(rho=...)``. Checks on values that are
traced (for example hyperparameters injected by ``optax.inject_hyperparams``
inside ``jax.jit``) are skipped: they cannot be read without a host
synchronisation.
"""

import functools
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def check_base(
    fn: str, base: Any, name: str = "base"
) -> optax.GradientTransformationExtraArgs:
    """Checks that ``base`` is an optax transform; returns it with extra args."""
    if callable(getattr(base, "init", None)) and callable(
        getattr(base, "update", None)
    ):
        return optax.with_extra_args_support(base)
    hint = ""
    if callable(base):
        qualname = getattr(base, "__qualname__", repr(base))
        hint = (
            f" It is a callable ({qualname}): did you pass the factory instead of"
            " the transform it returns, e.g. `optax.sgd` instead of"
            " `optax.sgd(0.1)`?"
        )
    raise TypeError(
        f"`{fn}({name}=...)` must be an optax transform with `init` and `update`"
        f" (e.g. `optax.sgd(0.1, momentum=0.9)`), got {type(base).__name__}." + hint
    )


# The step counts at which a schedule is evaluated when a transform is built.
SCHEDULE_CHECK_COUNTS = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


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
    ``allow_schedule``, and checked at the counts ``SCHEDULE_CHECK_COUNTS``
    (0, 1, 10, ..., 1e6): evaluated once each, when the transform is built.
    Inside a jitted step the values are traced and not checked, and neither
    are traced values passed in (e.g. by ``optax.inject_hyperparams``).
    """
    if callable(value):
        if not allow_schedule:
            raise TypeError(f"`{fn}({name}=...)` must be a number, got a callable.")
        _check_schedule(fn, name, value, low=low, high=high)
        return
    _check_value(fn, name, value, low=low, high=high, allow_schedule=allow_schedule)


def _check_value(
    fn: str,
    name: str,
    value: Any,
    *,
    low: float,
    high: float | None,
    allow_schedule: bool = True,
    step: int | None = None,
) -> None:
    """``value`` (a schedule's at ``step``, when given) is a finite scalar in range."""
    if isinstance(value, jax.core.Tracer):
        return
    what = f"`{fn}({name}=...)`"
    if step is not None:
        what = f"The schedule `{fn}({name}=...)` at step {step}"
    array = (
        np.asarray(value)
        if isinstance(value, (int, float, np.generic, np.ndarray, jax.Array))
        else None
    )
    if array is None or not (
        jnp.issubdtype(array.dtype, jnp.floating)
        or jnp.issubdtype(array.dtype, jnp.integer)
    ):
        accepted = " or a schedule" if allow_schedule and step is None else ""
        raise TypeError(
            f"{what} must be a number, a scalar array{accepted}, got"
            f" {type(value).__name__}."
        )
    if array.ndim != 0:
        raise TypeError(
            f"{what} must be a scalar, got an array of shape {array.shape}."
        )
    v = float(array)
    interval = f"[{low}, {'inf' if high is None else high}]"
    if not np.isfinite(v) or v < low or (high is not None and v > high):
        hint = ""
        if step is not None:
            hint = (
                " Schedules are checked when the transform is built, at steps"
                " 0, 1, 10, ..., 1e6, and not inside a jitted step: keep the"
                " value in range at every step, e.g. with `optax.linear_schedule`"
                " (which holds its last value) or `jnp.clip`."
            )
        got = f"{v:.6g}" if step is not None else f"{v}"  # a float32 schedule
        raise ValueError(f"{what} must be finite and in {interval}, got {got}." + hint)


def _check_schedule(
    fn: str, name: str, schedule: Callable, *, low: float, high: float | None
) -> None:
    """Evaluates ``schedule`` at ``SCHEDULE_CHECK_COUNTS`` and checks each value."""
    with jax.ensure_compile_time_eval():
        for step in SCHEDULE_CHECK_COUNTS:
            try:
                value = schedule(jnp.asarray(step, jnp.int32))
            except Exception as e:
                raise TypeError(
                    f"`{fn}({name}=...)` is callable, so it is taken as a schedule"
                    " of the step count, but calling it with the int32 step count"
                    f" {step} failed: {type(e).__name__}: {e}"
                ) from e
            _check_value(fn, name, value, low=low, high=high, step=step)


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, and not a bool (which is an int in Python)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_flag(fn: str, name: str, value: Any) -> None:
    """Checks that ``value``, the argument ``name`` of ``fn``, is a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"`{fn}({name}=...)` must be True or False, got"
            f" {type(value).__name__} {value!r}."
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
    check_flag(fn, "adaptive", adaptive)
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
        hint = ""
        if (
            isinstance(tree, tuple)
            and len(tree) == 2
            and jax.tree.structure(tree[1]) == param_def
        ):
            hint = (
                " It looks like a `(loss, grads)` pair, as `jax.value_and_grad`"
                " returns: pass the gradient only."
            )
        raise ValueError(
            f"{fn}: {what} does not have the tree structure of {ref}: its"
            f" leaf {got} stands where {ref} has {want}." + hint
        )
    for (path, leaf), (_, param) in zip(tree_leaves, param_leaves, strict=True):
        where = jax.tree_util.keystr(path)
        param_dtype = _array_dtype(fn, ref, where, param)
        leaf_dtype = _array_dtype(fn, what, where, leaf)
        if np.shape(leaf) != np.shape(param):
            raise ValueError(
                f"{fn}: {what} leaf {where} has shape"
                f" {np.shape(leaf)}, but {ref} has shape {np.shape(param)}."
            )
        if (
            jnp.issubdtype(param_dtype, jnp.floating)
            and not jnp.issubdtype(leaf_dtype, jnp.floating)
        ) or (
            jnp.issubdtype(param_dtype, jnp.complexfloating)
            and not jnp.issubdtype(leaf_dtype, jnp.inexact)
        ):
            raise TypeError(
                f"{fn}: {what} leaf {where} has dtype {leaf_dtype}, but {ref}"
                f" has {param_dtype}: a gradient of floating-point parameters"
                " must be floating-point too."
            )


def _array_dtype(fn: str, what: str, where: str, leaf: Any) -> Any:
    """The dtype of an array-like leaf; a clear error for anything else."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None and isinstance(leaf, (bool, int, float, complex)):
        dtype = np.result_type(leaf)
    try:
        ok = dtype is not None and (
            jnp.issubdtype(dtype, jnp.number)  # bfloat16, float8, int4 too
            or jnp.issubdtype(dtype, jnp.bool_)
            or jnp.issubdtype(dtype, jax.dtypes.extended)  # e.g. PRNG keys
            or dtype == jax.dtypes.float0  # the gradient of an integer leaf
        )
    except TypeError:  # not a dtype at all
        ok = False
    if not ok:
        raise TypeError(
            f"{fn}: {what} leaf {where} must be an array (or a number), got"
            f" {type(leaf).__name__}"
            + (f" of dtype {dtype}." if dtype is not None else ".")
        )
    return dtype


def require_params(fn: str, params: Any, method: str = "update") -> None:
    """Checks that ``params`` is given and is a tree of arrays.

    ``method`` is the transform's method that received it, ``"init"`` or
    ``"update"``; the error names it.
    """
    if params is None:
        why = (
            " (the transform evaluates the gradient at a perturbation of them)"
            if method == "update"
            else ""
        )
        raise ValueError(
            f"{fn}: `{method}` needs the current `params`{why}, a tree of"
            " arrays, got None."
        )
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        _array_dtype(fn, "`params`", jax.tree_util.keystr(path), leaf)


def check_state(fn: str, state: Any, state_type: type) -> None:
    """Checks that ``update`` got the state its transform's ``init`` returns."""
    if not isinstance(state, state_type):
        raise TypeError(
            f"{fn}: `update` needs the state that this transform's `init`"
            f" returned (a `samx.{state_type.__name__}`), got"
            f" {type(state).__name__}. Was it the state of another transform?"
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
    try:
        signature = inspect.signature(grad_fn)
    except (TypeError, ValueError):  # e.g. a builtin without a signature
        return grad_fn
    try:
        signature.bind(None, 0)
    except TypeError:
        name = getattr(grad_fn, "__qualname__", type(grad_fn).__name__)
        raise TypeError(
            f"{fn}: `grad_fn` is called as `grad_fn(params, i)`, with the"
            f" index `i` of the gradient asked for, but `{name}{signature}`"
            " does not take two positional arguments. Wrap a gradient of the"
            " parameters alone as `grad_fn=lambda p, i: grad(p)`."
        ) from None
    return grad_fn


@functools.cache
def _wrong_wrappers() -> dict[types.CodeType, str]:
    """The code of the optax wrappers whose ``update`` misuses a samx transform.

    Looked up on first use (no work at import): ``optax.MultiSteps.update`` and
    the ``update`` nested in ``optax.apply_if_finite``.
    """
    codes = {optax.MultiSteps.update.__code__: "optax.MultiSteps"}
    for const in optax.apply_if_finite.__code__.co_consts:
        if isinstance(const, types.CodeType) and const.co_name == "update":
            codes[const] = "optax.apply_if_finite"
    return codes


# The same wrappers by their state: its type, the field that holds the inner
# state, and the wrapper's name (for the loops, which see the whole state).
WRONG_WRAPPER_STATES = {
    optax.MultiStepsState: ("inner_opt_state", "optax.MultiSteps"),
    optax.ApplyIfFiniteState: ("inner_state", "optax.apply_if_finite"),
}

_WRAPPER_HINTS = {
    "optax.MultiSteps": (
        "it hands `update` the mean of the k micro-batch gradients (the ascent)"
        " but the `grad_fn` of the last micro-batch only (the descent), so the"
        " step is neither large-batch nor micro-batch SAM. Accumulate inside the"
        " gradient instead: `g = samx.microbatched(jax.grad(loss), k)`, then"
        " `tx.update(g(params, batch), state, params, grad_fn=lambda p, i:"
        " g(p, batch))` on the whole batch (docs: Scaling out)."
    ),
    "optax.apply_if_finite": (
        "it checks only the gradient passed to `update`, not the gradients"
        " samx computes itself (at the perturbed point, or the descent batch"
        " that AsyncSAM and SAMPa take from the previous step, so a bad batch"
        " returns one step later), and the parameters can become NaN while it"
        " counts skips. Use `samx.skip_nonfinite(tx)`, which checks what comes"
        " out of the step (docs: Non-finite gradients)."
    ),
}


def reject_wrong_wrappers(fn: str) -> None:
    """Raises if ``fn``'s ``update`` runs inside a wrapper known to misuse it.

    Walks the Python stack at trace time (free in a compiled step) for the
    ``update`` of ``optax.MultiSteps`` or ``optax.apply_if_finite``, at any
    depth (through ``optax.chain``, ``samx.skip_nonfinite``, a Trainer, ...).
    """
    codes = _wrong_wrappers()
    frame = sys._getframe(1)
    while frame is not None:
        wrapper = codes.get(frame.f_code)
        if wrapper is not None:
            raise wrong_wrapper_error(fn, wrapper)
        frame = frame.f_back


def wrong_wrapper_error(fn: str, wrapper: str) -> ValueError:
    """The error for ``fn`` inside ``wrapper`` (``"optax.MultiSteps"``, ...)."""
    return ValueError(f"{fn} cannot run inside `{wrapper}`: " + _WRAPPER_HINTS[wrapper])
