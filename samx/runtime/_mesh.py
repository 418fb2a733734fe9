"""Data parallel on a mesh: the batch sharded, and SAM's m-sharpness.

The transforms need nothing to run data parallel: jit a step over a batch
sharded with ``NamedSharding(mesh, P("data"))`` and XLA averages the gradients
(the global norm of a sharded tree is the true global norm). This module adds
the one variant that is not the global step: m-sharpness, where each device
perturbs along the gradient of its own shard of the batch.
"""

from collections.abc import Callable
from typing import Any

import jax
import optax
from jax import lax
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from samx import _checks, _plan
from samx._perturb import f32_global_norm
from samx._plan import evaluation_plan
from samx.runtime import _watch
from samx.runtime._common import check_batch_divides, check_mesh, value_and_grad
from samx.runtime._processes import agree_batch_size, put_batch


def replicated(mesh: Mesh) -> NamedSharding:
    """``NamedSharding(mesh, P())``: a whole copy on every device of ``mesh``.

    Where data-parallel training keeps the parameters and the optimizer state.

    Args:
      mesh: a ``jax.sharding.Mesh`` (or ``AbstractMesh``).

    Returns:
      A ``jax.sharding.NamedSharding``.

    Examples:
      >>> import jax
      >>> from samx.runtime import replicated
      >>> tuple(replicated(jax.sharding.Mesh(jax.devices(), ("data",))).spec)
      ()

    References:
      JAX, `Distributed arrays and automatic parallelization
      <https://docs.jax.dev/en/latest/notebooks/Distributed_arrays_and_automatic_parallelization.html>`_
    """
    _check_any_mesh("samx.runtime.replicated", mesh)
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """``NamedSharding(mesh, P(axis))``: a batch's leading axis split on ``axis``.

    Where data-parallel training puts each batch: every device holds
    ``batch_size / mesh.shape[axis]`` examples.

    Args:
      mesh: a ``jax.sharding.Mesh`` (or ``AbstractMesh``).
      axis: the mesh axis to split the batch along, or a tuple of axes.

    Returns:
      A ``jax.sharding.NamedSharding``.

    Examples:
      >>> import jax
      >>> from samx.runtime import batch_sharding
      >>> tuple(batch_sharding(jax.sharding.Mesh(jax.devices(), ("data",))).spec)
      ('data',)

    References:
      JAX, `Distributed arrays and automatic parallelization
      <https://docs.jax.dev/en/latest/notebooks/Distributed_arrays_and_automatic_parallelization.html>`_
    """
    fn = "samx.runtime.batch_sharding"
    _check_any_mesh(fn, mesh)
    names = axis if isinstance(axis, tuple) else (axis,)
    if not names or any(
        not isinstance(n, str) or n not in mesh.axis_names for n in names
    ):
        raise ValueError(
            f"`{fn}(axis=...)` must name an axis of the mesh (or a tuple of"
            f" them), one of {mesh.axis_names}, got {axis!r}."
        )
    return NamedSharding(mesh, P(axis))


def _check_any_mesh(fn: str, mesh: Any) -> None:
    if not isinstance(mesh, (Mesh, AbstractMesh)):
        raise TypeError(
            f"`{fn}(mesh=...)` must be a `jax.sharding.Mesh`, e.g."
            f" `Mesh(jax.devices(), ('data',))`, got {type(mesh).__name__}."
        )


def make_data_parallel_step(
    tx: optax.GradientTransformation,
    loss_fn: Callable[[Any, Any], Any],
    mesh: Mesh,
    *,
    axis: str = "data",
    m_sharpness: bool = False,
) -> Callable[[Any, Any, Any], tuple[Any, Any, dict]]:
    r"""A jitted data-parallel train step on ``mesh``, optionally m-sharpness.

    ``params, opt_state, metrics = step(params, opt_state, batch)``. The batch
    is put on ``NamedSharding(mesh, P(axis))`` (its leading axis split over the
    mesh's ``axis``); ``metrics["loss"]`` and ``metrics["grad_norm"]`` are the
    loss and gradient norm of the descent pass (for SAM, at the perturbed
    point), averaged over the batch, on the mesh.

    - ``m_sharpness=False``: the ordinary (global) step, one jit; XLA averages
      the gradients over the mesh. ``params`` and ``opt_state`` keep the
      shardings they come with (replicated, or e.g. a weight sharded along a
      "model" axis): the outputs are pinned to them.
    - ``m_sharpness=True``: SAM's m-sharpness with ``m`` the per-device batch,
      through ``jax.shard_map``. Each device ``k`` perturbs along the gradient
      of its own shard, ``e_k = rho * g_k / ||g_k||``, takes the gradient of
      its shard at ``params + e_k``, and the base optimizer gets the average
      ``d = mean_k grad L_k(params + e_k)``::

        updates = g_k                          # local, not averaged
        grad_fn = lambda p, i: lax.pmean(grad L_k(p), axis)

      so ``params`` and ``opt_state`` stay identical on every device (they are
      replicated in and out; the replication is checked by ``shard_map``).
      This is exact for ``samx.sam`` (ASAM included) only: AsyncSAM and SAMPa
      store a gradient in their state, which would become per-device.

    On a mesh that spans several processes (``jax.distributed``), each
    process passes its own part of the global batch (the global batch is their
    concatenation in process order) and the same ``params`` and
    ``opt_state``; m-sharpness then perturbs per device across all processes.

    Supported transforms: ``samx.sam`` and plain optax transforms (global
    step; m-sharpness for ``samx.sam`` only). For ``samx.async_sam`` and
    ``samx.sampa`` on a mesh, use ``Trainer(descent_device=mesh)``. The loss
    has no model state here (BatchNorm statistics would need their own
    averaging); use the Trainer for a loss with state.

    Args:
      tx: the transform, e.g. ``samx.sam(optax.sgd(0.1), rho=0.05)``.
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean over ``batch``.
      mesh: a ``jax.sharding.Mesh``.
      axis: the mesh axis the batch is split along.
      m_sharpness: perturb per device (see above).

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, metrics)``.
      Every batch must have the leading size of the first one, as in every
      samx loop (with m-sharpness, ``m`` is the per-device share of it): drop
      or pad the last, smaller batch of an epoch.

    Raises:
      ValueError: at the call, when the batch size is not a multiple of the
        mesh's ``axis`` size or differs from the first batch's, or the
        transform is not supported.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, optax, samx
      >>> from jax.sharding import Mesh
      >>> from samx.runtime import make_data_parallel_step, replicated
      >>> mesh = Mesh(jax.devices(), ("data",))
      >>> def loss_fn(params, batch):
      ...     return jnp.mean((batch["x"] @ params - batch["y"]) ** 2)
      >>> tx = samx.sam(optax.sgd(0.1), rho=0.05)
      >>> step = make_data_parallel_step(tx, loss_fn, mesh, m_sharpness=True)
      >>> params = jax.device_put(jnp.zeros(3), replicated(mesh))
      >>> opt_state = jax.device_put(tx.init(params), replicated(mesh))
      >>> batch = {"x": np.ones((8, 3), np.float32), "y": np.ones(8, np.float32)}
      >>> for _ in range(3):
      ...     params, opt_state, metrics = step(params, opt_state, batch)
      >>> float(metrics["loss"]) < 1.0, params.sharding == replicated(mesh)
      (True, True)

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (m-sharpness:
      section 4.1)

      Andriushchenko, Flammarion, `Towards Understanding Sharpness-Aware
      Minimization <https://arxiv.org/abs/2206.06232>`_, ICML 2022
    """
    fn = "samx.runtime.make_data_parallel_step"
    if not (
        callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))
    ):
        raise TypeError(
            f"`{fn}(tx=...)` must be an optax transform, e.g."
            f" `samx.sam(optax.sgd(0.1))`, got {type(tx).__name__}."
        )
    if not callable(loss_fn):
        raise TypeError(
            f"`{fn}(loss_fn=...)` must be callable as `loss_fn(params, batch)`,"
            f" got {type(loss_fn).__name__}."
        )
    if not isinstance(m_sharpness, bool):
        raise TypeError(f"`{fn}(m_sharpness=...)` must be a bool, got {m_sharpness!r}.")
    mesh = check_mesh(fn, "mesh", mesh, axis)
    tx = optax.with_extra_args_support(tx)
    vg = value_and_grad(loss_fn, has_state=False)
    in_batch = batch_sharding(mesh, axis)
    every = replicated(mesh)

    def body(params, opt_state, batch, local):
        # ``local``: inside shard_map, where each device sees its own shard.
        reduce = (lambda x: lax.pmean(x, axis)) if local else (lambda x: x)
        captured = {}

        def grad_fn(p, i):
            loss, _, grads = vg(p, None, batch)  # p already varies per device
            captured[i] = (reduce(loss), reduce(grads))
            return captured[i][1]

        # The local gradient: differentiate at a per-device copy of params (at
        # the replicated params themselves, shard_map would sum the gradient).
        at = lax.pcast(params, axis, to="varying") if local else params
        loss, _, grads = vg(at, None, batch)
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        if captured:  # SAM: the descent pass is the one at the perturbed point
            loss, grads = captured[0]
        else:
            loss, grads = reduce(loss), reduce(grads)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": f32_global_norm(grads)}

    if m_sharpness:
        sharded = jax.shard_map(
            lambda p, s, b: body(p, s, b, local=True),
            mesh=mesh,
            in_specs=(P(), P(), P(axis)),
            out_specs=(P(), P(), P()),
        )
        jitted = jax.jit(sharded, out_shardings=every)
    compiled: dict[Any, Callable] = {}
    devices = set(mesh.devices.flat)

    def on_mesh(x):
        sharding = getattr(x, "sharding", None)
        if sharding is not None and sharding.device_set == devices:
            return sharding
        return every

    checked: list[str] = []
    sizes: list = []  # the first batch's leading size and dtypes

    def step(params, opt_state, batch):
        _checks.require_params(fn, params, "step")
        size = check_batch_divides("make_data_parallel_step(...)", batch, mesh, axis)
        if not sizes and mesh.is_multi_process:  # once: the processes agree
            agree_batch_size("make_data_parallel_step(...)", size)
        _plan.check_batch_size(
            "make_data_parallel_step(...)", size, sizes[0] if sizes else None
        )
        dtypes = _plan.batch_dtypes(batch)
        _plan.check_batch_dtypes(
            "make_data_parallel_step(...)", dtypes, sizes[1] if sizes else None
        )
        sizes[:] = [size, dtypes]
        if not checked:
            plan = evaluation_plan(opt_state)
            method = plan.method
            # m-sharpness perturbs each shard along its own fresh gradient.
            if m_sharpness and plan.perturbation != "fresh":
                raise ValueError(
                    f"`{fn}(m_sharpness=True)` is defined for samx.sam (and ASAM)"
                    f" only, got a {method!r} transform: AsyncSAM and SAMPa store a"
                    " gradient in their state, which would differ per device."
                )
            if plan.parallel:  # a stored gradient: the Trainer places its halves
                raise ValueError(
                    f"`{fn}` runs samx.sam and plain optax transforms, got"
                    f" {method!r}: on a mesh, use"
                    " `samx.runtime.Trainer(tx, loss_fn, descent_device=mesh)`."
                )
            checked.append(method)
        batch = put_batch(fn, _plan.owned(batch), in_batch)
        if m_sharpness:
            params, opt_state = jax.device_put((params, opt_state), every)
            return watched(jitted(params, opt_state, batch))
        # Keep the shardings the state comes with (state that is not on this
        # mesh yet is replicated), and pin the outputs to them.
        out = jax.tree.map(on_mesh, (params, opt_state))
        params, opt_state = jax.device_put((params, opt_state), out)
        key = (jax.tree.structure(out), tuple(jax.tree.leaves(out)))
        if key not in compiled:
            compiled[key] = jax.jit(
                lambda p, s, b: body(p, s, b, local=False),
                out_shardings=(*out, every),
            )
        return watched(compiled[key](params, opt_state, batch))

    watch = _watch.NonfiniteWatch()

    def watched(out):
        watch.see(fn + "'s step", out[2]["grad_norm"], out[1], stacklevel=4)
        return out

    return step
