"""What the runtime's loops share: the loss's gradient and the batch checks.

The Trainer, ``make_data_parallel_step`` and ``calibrate_ascent_batch`` all
evaluate ``loss_fn`` through :func:`value_and_grad`, and check a mesh and the
batches they put on it the same way.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from samx import _plan
from samx.runtime import _processes


def value_and_grad(loss_fn: Callable[..., Any], has_state: bool) -> Callable:
    """``(params, model_state, batch) -> (loss, new_model_state, grads)``.

    Wraps a stateless ``loss_fn(params, batch)`` to that form; checks at trace
    time that the loss is a scalar.
    """

    def loss(params, model_state, batch):
        if has_state:
            out = loss_fn(params, model_state, batch)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(
                    "With `has_state=True`, `loss_fn(params, model_state, batch)`"
                    " must return `(loss, new_model_state)`."
                )
        else:
            out = (loss_fn(params, batch), model_state)
        if jnp.shape(out[0]) != ():
            raise ValueError(
                "`loss_fn` must return a scalar loss (averaged over the batch),"
                f" got an array of shape {jnp.shape(out[0])}."
            )
        return out

    def fn(params, model_state, batch):
        (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(
            params, model_state, batch
        )
        return value, new_state, grads

    return fn


def check_mesh(fn: str, arg: str, mesh: Any, axis: str) -> Mesh:
    """``mesh`` if it is a ``jax.sharding.Mesh`` with an axis named ``axis``."""
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`{fn}({arg}=...)` must be a `jax.sharding.Mesh`, got"
            f" {type(mesh).__name__}."
        )
    if axis not in mesh.axis_names:
        raise ValueError(
            f"`{fn}`: the batch axis {axis!r} is not an axis of the mesh, whose"
            f" axes are {mesh.axis_names}."
        )
    return mesh


def check_batch_divides(
    fn: str, batch: Any, mesh: Mesh, axis: str, name: str = "batch"
) -> int:
    """The batch size, if the mesh's ``axis`` divides it; a clear error if not.

    On a mesh that spans several processes, ``batch`` is this process's part
    and must divide among this process's positions along ``axis``.
    """
    size = _plan.check_batch(fn, name, batch)
    if mesh.is_multi_process:
        n = _processes.local_rows(mesh, axis)
        what = f"process-local batch size {size}", f"this process's {n}"
    else:
        n = mesh.shape[axis]
        what = f"batch size {size}", f"the {n}"
    if size % n:
        raise ValueError(
            f"`{fn}({name}=...)`: the {what[0]} is not divisible by {what[1]}"
            f" devices of the mesh axis {axis!r}; use a batch size that is a"
            f" multiple of {n}."
        )
    return size


def check_same_shapes(fn: str, plan: Any, prev: Any, batch: Any, size: int) -> None:
    """A clear error when a batch does not have the kept previous batch's shapes."""
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)  # noqa: E731
    if jax.tree.structure(prev) == jax.tree.structure(batch) and shapes(prev) == shapes(
        batch
    ):
        return
    _plan.check_batch_size(fn, size, _plan.leading_size(prev))
    raise ValueError(
        f"`{fn}(batch=...)`: its leaves' shapes or structure differ from the"
        f" previous batch's. {plan.method} evaluates its descent on the previous"
        " step's batch, which the Trainer keeps, so every batch must have the"
        " same shapes."
    )
