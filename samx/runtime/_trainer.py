"""The two-device train step: one algorithm, its two gradients on two devices.

The Trainer drives the same pure transform a single-device loop would use. It
never re-implements the algorithm: each jitted piece calls ``tx.update`` with a
``grad_fn`` that either records what it is asked for (the evaluation points)
or hands back gradients that were computed elsewhere. Inputs are committed to
their device with an explicit ``jax.device_put``, so each jit runs there, and
JAX's asynchronous dispatch lets the two devices work at the same time. The
descent side may be a whole ``jax.sharding.Mesh`` (data parallel): the batch is
then split along one mesh axis and the state replicated.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from samx import _async_sam, _checks, _sam, _sampa
from samx._perturb import f32_global_norm
from samx.runtime import _devices
from samx.runtime._points import grad_fn_points

_KINDS = {
    _sam.SAMState: "sam",
    _async_sam.AsyncSAMState: "async_sam",
    _sampa.SAMPaState: "sampa",
}


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


def check_batch_divides(where: str, batch: Any, mesh: Mesh, axis: str) -> int:
    """The batch size, if the mesh's ``axis`` divides it; a clear error if not."""
    size = _batch_size(batch)
    n = mesh.shape[axis]
    if size % n:
        raise ValueError(
            f"{where}: the batch size {size} is not divisible by the {n} devices"
            f" of the mesh axis {axis!r}; use a batch size that is a multiple of"
            f" {n}."
        )
    return size


class TrainerState(NamedTuple):
    """State of a :class:`Trainer`; a pytree, so it can be checkpointed.

    Attributes:
      step: the number of steps taken, an int32 scalar on the descent device.
      params: the parameters, on the descent device (replicated on a mesh).
      opt_state: the transform's state, on the descent device (replicated).
      model_state: the model's non-trainable state (e.g. BatchNorm
        statistics), or None for a loss without state (replicated).
      prev_batch: SAMPa only: the previous step's batch, on the descent device
        (split along the batch axis on a mesh; None before the first step, and
        for the other methods).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any
    prev_batch: Any


def method_of(opt_state: Any) -> str:
    """``"sam"``, ``"async_sam"``, ``"sampa"`` or ``"plain"``, from the state.

    Finds the samx state inside ``optax.chain``, ``inject_hyperparams`` and the
    like, so the Trainer (and ``samx.flax``) need no tag on the transform.

    Args:
      opt_state: an optimizer state, ``tx.init(params)``.

    Returns:
      The method's name; ``"plain"`` for a state without a samx transform.

    Raises:
      ValueError: if the state nests more than one samx transform.

    Examples:
      >>> import jax.numpy as jnp, optax, samx
      >>> from samx.runtime import method_of
      >>> tx = optax.chain(optax.clip(1.0), samx.sampa(optax.sgd(0.1)))
      >>> method_of(tx.init(jnp.zeros(3))), method_of(optax.adam(1e-3).init(1.0))
      ('sampa', 'plain')

    References:
      Xie, Pethick, Cevher, `SAMPa: Sharpness-aware Minimization Parallelized
      <https://arxiv.org/abs/2410.10683>`_, NeurIPS 2024
    """
    if isinstance(opt_state, optax.GradientTransformation):
        raise TypeError(
            "`method_of(opt_state=...)` takes the optimizer state,"
            " `tx.init(params)`, not the transform itself."
        )
    found = {
        _KINDS[type(x)]
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: type(x) in _KINDS)
        if type(x) in _KINDS
    }
    if len(found) > 1:
        raise ValueError(
            "samx.runtime.Trainer drives one sharpness-aware transform per"
            f" optimizer; this one nests {sorted(found)}."
        )
    return found.pop() if found else "plain"


class Trainer:
    """Trains with a samx transform, its two gradients placed on two devices.

    ``state = trainer.init(params)`` then ``state, metrics =
    trainer.step(state, batch)``. The step never blocks the host: it only
    dispatches jitted computations and explicit ``device_put`` transfers
    between the two devices; metrics stay on device (read them every N steps).

    What runs where, per transform (found in ``tx``'s state):

    - ``samx.async_sam``: the ascent gradient of step t, on the first
      ``ascent_batch_size`` examples of the batch, on ``ascent_device``; at the
      same time the descent gradient at the perturbed point on
      ``descent_device``; the ascent gradient then moves to the descent device,
      where the update is applied.
    - ``samx.sampa``: ``grad_fn(., 0)`` (on the previous step's batch, the
      current one at the first step) on ``descent_device`` and
      ``grad_fn(., 1)`` (on the current batch) on ``ascent_device``; with a
      single device, both in one jit (see ``sampa_vmap``).
    - ``samx.sam``, whose descent point needs the fresh ascent gradient, and any
      other optax transform: everything on ``descent_device``.

    **Data parallel.** ``descent_device`` may be a ``jax.sharding.Mesh``: each
    batch is then split along ``batch_axis`` (``NamedSharding(mesh,
    P(batch_axis))``) and ``params``, ``opt_state`` and ``model_state`` are
    replicated on the mesh (``NamedSharding(mesh, P())``); XLA averages the
    gradients over the mesh, so the trajectory is the one-device trajectory.
    AsyncSAM's ascent still runs on the single ``ascent_device``, and its
    gradient is then replicated onto the mesh; SAMPa's two gradients both run
    on the mesh unless ``ascent_device`` is given. The batch size must be a
    multiple of the mesh's ``batch_axis`` size.

    Args:
      tx: the transform, e.g. ``samx.async_sam(optax.sgd(0.1), rho=0.05)``,
        alone or inside an ``optax.chain``.
      loss_fn: ``loss_fn(params, batch) -> scalar``, or with
        ``has_state=True``, ``loss_fn(params, model_state, batch) -> (scalar,
        new_model_state)``. ``batch`` is a pytree of arrays with a leading batch
        axis. The new model state is taken from the descent pass only (for
        SAMPa the pass at the perturbed point); the other pass's is dropped.
      descent_device: a ``jax.Device``, a name such as ``"gpu"``, ``"cpu:1"``,
        or a ``jax.sharding.Mesh`` (data parallel, see above); default
        ``jax.devices()[0]``.
      ascent_device: where the second gradient runs, a single device. Default:
        for AsyncSAM ``jax.devices("cpu")[0]``; for SAMPa a second accelerator
        when there is one and ``descent_device`` is not a mesh, else the
        descent device (both gradients fused).
      ascent_batch_size: AsyncSAM's ascent batch b' (the first b' examples of
        each batch); default the whole batch. See
        :func:`samx.runtime.calibrate_ascent_batch`.
      has_state: whether ``loss_fn`` takes and returns a model state.
      sampa_vmap: SAMPa on one device: compute its two gradients in one
        ``vmap``-ed call (True) or as two gradients in one jit (False). Default:
        ``vmap`` when the descent device is an accelerator; on a CPU two
        gradients, which measured faster there (``vmap`` took 1.22x the time of
        the plain single-jit step on a 2-core CPU,
        ``benchmarks/runtime_overhead.py``).
      batch_axis: with a mesh, the mesh axis the batch is split along; default
        the mesh's first axis.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, optax, samx
      >>> from samx.runtime import Trainer
      >>> def loss_fn(params, batch):
      ...     return jnp.mean((batch["x"] @ params - batch["y"]) ** 2)
      >>> trainer = Trainer(samx.async_sam(optax.sgd(0.1), rho=0.05), loss_fn,
      ...                   ascent_batch_size=4)
      >>> state = trainer.init(jnp.zeros(3))
      >>> batch = {"x": np.ones((8, 3), np.float32), "y": np.ones(8, np.float32)}
      >>> for _ in range(3):
      ...     state, metrics = trainer.step(state, batch)
      >>> int(state.step), float(metrics["loss"]) < 1.0
      (3, True)

    References:
      Jo, Lim, Lee, `Asynchronous Sharpness-Aware Minimization For Fast and
      Accurate Deep Learning <https://arxiv.org/abs/2503.11147>`_, 2025

      Xie, Pethick, Cevher, `SAMPa: Sharpness-aware Minimization Parallelized
      <https://arxiv.org/abs/2410.10683>`_, NeurIPS 2024
    """

    def __init__(
        self,
        tx: optax.GradientTransformation,
        loss_fn: Callable[..., Any],
        *,
        descent_device: Any = None,
        ascent_device: Any = None,
        ascent_batch_size: int | None = None,
        has_state: bool = False,
        sampa_vmap: bool | None = None,
        batch_axis: str | None = None,
    ):
        if not (
            callable(getattr(tx, "init", None))
            and callable(getattr(tx, "update", None))
        ):
            raise TypeError(
                "`Trainer(tx=...)` must be an optax transform, e.g."
                f" `samx.async_sam(optax.sgd(0.1))`, got {type(tx).__name__}."
            )
        if not callable(loss_fn):
            raise TypeError(
                "`Trainer(loss_fn=...)` must be callable as `loss_fn(params, batch)`"
                f" (or `loss_fn(params, model_state, batch)`), got"
                f" {type(loss_fn).__name__}."
            )
        if ascent_batch_size is not None and (
            not _checks.is_int(ascent_batch_size) or ascent_batch_size < 1
        ):
            raise ValueError(
                "`Trainer(ascent_batch_size=...)` must be an int >= 1 or None,"
                f" got {ascent_batch_size!r}."
            )
        _checks.check_flag("Trainer", "has_state", has_state)
        if sampa_vmap is not None and not isinstance(sampa_vmap, (bool, np.bool_)):
            raise TypeError(
                "`Trainer(sampa_vmap=...)` must be True, False or None, got"
                f" {type(sampa_vmap).__name__} {sampa_vmap!r}."
            )
        self.tx = optax.with_extra_args_support(tx)
        self.loss_fn = loss_fn
        self._value_and_grad = value_and_grad(loss_fn, has_state)
        self.has_state = has_state
        self.ascent_batch_size = (
            None if ascent_batch_size is None else int(ascent_batch_size)
        )
        self.mesh: Mesh | None = None
        self.batch_axis = batch_axis
        if isinstance(descent_device, Mesh):
            self.batch_axis = (
                descent_device.axis_names[0] if batch_axis is None else batch_axis
            )
            self.mesh = check_mesh(
                "Trainer", "descent_device", descent_device, self.batch_axis
            )
            self.descent_device = descent_device
            self._state_place = NamedSharding(self.mesh, P())
            self._batch_place = NamedSharding(self.mesh, P(self.batch_axis))
            platform = self.mesh.devices.flat[0].platform
        else:
            if batch_axis is not None:
                raise ValueError(
                    "`Trainer(batch_axis=...)` needs `descent_device` to be a"
                    f" `jax.sharding.Mesh`, got {descent_device!r}."
                )
            self.descent_device = (
                jax.devices()[0]
                if descent_device is None
                else _devices.resolve("descent_device", descent_device)
            )
            self._state_place = self._batch_place = self.descent_device
            platform = self.descent_device.platform
        self._ascent_arg = (
            None
            if ascent_device is None
            else _devices.resolve("ascent_device", ascent_device)
        )
        self._compiled: dict[str, Callable] = {}
        self._method: str | None = None
        self.sampa_vmap = platform != "cpu" if sampa_vmap is None else sampa_vmap

    # -- placement ---------------------------------------------------------------

    def method(self, opt_state: Any) -> str:
        """The transform's method (see :func:`method_of`), found once."""
        if self._method is None:
            self._method = method_of(opt_state)
        return self._method

    def ascent_device_for(self, method: str) -> jax.Device | Mesh:
        """Where the second gradient of ``method`` runs (see the class doc)."""
        if self._ascent_arg is not None:
            return self._ascent_arg
        if method == "async_sam":
            return jax.devices("cpu")[0]
        if method == "sampa" and self.mesh is None:
            return _devices.second_accelerator() or self.descent_device
        return self.descent_device

    def _put(self, tree, device):
        return jax.device_put(tree, device)

    # -- public API --------------------------------------------------------------

    def init(self, params: Any, model_state: Any = None) -> TrainerState:
        """The initial state, on the descent device."""
        if self.has_state and model_state is None:
            raise ValueError(
                "`Trainer(has_state=True)` needs `init(params, model_state)`."
            )
        if params is not None:  # None: the transform's own init says so
            _checks.require_params("samx.runtime.Trainer", params, "init")
        params = self._put(params, self._state_place)
        opt_state = jax.jit(self.tx.init)(params)
        method = self.method(opt_state)
        if self.ascent_batch_size is not None and method != "async_sam":
            raise ValueError(
                "`Trainer(ascent_batch_size=...)` is AsyncSAM's ascent batch;"
                f" this transform is {method!r}."
            )
        state = TrainerState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=opt_state,
            model_state=model_state,
            prev_batch=None,
        )
        # Commit every leaf (jit leaves outputs that ignore its inputs
        # uncommitted), so that the first step compiles what the others reuse.
        return self._put(state, self._state_place)

    def step(self, state: TrainerState, batch: Any) -> tuple[TrainerState, dict]:
        """One training step; returns at once, before the devices finish.

        Args:
          state: from :meth:`init` or the previous step.
          batch: a pytree of arrays (NumPy or JAX) with a common leading size
            (on a mesh, a multiple of the size of its batch axis).

        Returns:
          ``(state, metrics)``: ``metrics["loss"]`` and ``metrics["grad_norm"]``
          of the descent pass, on the descent device; AsyncSAM and SAMPa add
          ``metrics["ascent_grad_norm"]``, on the ascent device.
        """
        if not isinstance(state, TrainerState):
            raise TypeError(
                "`Trainer.step(state=...)` must be the TrainerState from `init` or"
                f" the previous step, got {type(state).__name__}."
            )
        if self.mesh is None:
            size = _batch_size(batch)
        else:
            size = check_batch_divides(
                "`Trainer.step(batch=...)`", batch, self.mesh, self.batch_axis
            )
        method = self.method(state.opt_state)
        batch_d = self._put(batch, self._batch_place)
        if method == "sampa":
            prev = batch_d if state.prev_batch is None else state.prev_batch
            # prev_batch travels separately: None at step 0 must not retrace.
            state, metrics = self._step_sampa(
                state._replace(prev_batch=None), prev, batch_d
            )
            return state._replace(prev_batch=batch_d), metrics
        if method == "async_sam":
            return self._step_async(state, batch, batch_d, size)
        return self._one_jit("single", self._single_step)(state, batch_d)

    # -- jitted pieces -----------------------------------------------------------

    def _one_jit(self, name, fn, on_descent=True):
        """``jax.jit(fn)``, once; on a mesh, the descent side's outputs replicated."""
        if name not in self._compiled:
            if self.mesh is not None and on_descent:
                self._compiled[name] = jax.jit(fn, out_shardings=self._state_place)
            else:
                self._compiled[name] = jax.jit(fn)
        return self._compiled[name]

    def _recorder(self, model_state, batches, captured):
        """A ``grad_fn`` that records each call's (loss, model state, grads)."""

        def grad_fn(p, i):
            captured[i] = self._value_and_grad(p, model_state, batches[i])
            return captured[i][2]

        return grad_fn

    def _single_step(self, state, batch):
        """SAM and plain transforms: the whole step on the descent device."""
        captured = {}
        grad_fn = self._recorder(state.model_state, (batch,), captured)
        loss, ms, grads = self._value_and_grad(state.params, state.model_state, batch)
        updates, opt_state = self.tx.update(
            grads, state.opt_state, state.params, grad_fn=grad_fn
        )
        if captured:  # SAM: the descent pass is the one at the perturbed point
            loss, ms, grads = captured[0]
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": f32_global_norm(grads)}
        return state._replace(
            step=state.step + 1, params=params, opt_state=opt_state, model_state=ms
        ), metrics

    def _step_async(self, state, batch, batch_d, size):
        ascent_device = self.ascent_device_for("async_sam")
        b = size if self.ascent_batch_size is None else self.ascent_batch_size
        if b > size:
            raise ValueError(
                f"`Trainer(ascent_batch_size={b})` is larger than the batch ({size})."
            )
        if ascent_device == self.descent_device:
            return self._one_jit("async_fused", self._async_fused)(state, batch_d)
        small = self._put(jax.tree.map(lambda x: x[:b], batch), ascent_device)
        params_a = self._put(state.params, ascent_device)
        ms_a = self._put(state.model_state, ascent_device)
        ascent, ascent_norm = self._one_jit(
            "ascent", self._ascent_grad, on_descent=False
        )(params_a, ms_a, small)
        descent, loss, ms = self._one_jit("async_descent", self._async_descent)(
            state, batch_d
        )
        ascent_d = self._put(ascent, self._state_place)
        state, grad_norm = self._one_jit("apply", self._apply)(
            state, ascent_d, (descent,), ms
        )
        return state, {
            "loss": loss,
            "grad_norm": grad_norm,
            "ascent_grad_norm": ascent_norm,
        }

    def _ascent_grad(self, params, model_state, batch):
        _, _, grads = self._value_and_grad(params, model_state, batch)
        return grads, f32_global_norm(grads)

    def _async_descent(self, state, batch):
        """AsyncSAM's descent gradient; the point depends on the state only."""
        captured = {}
        grad_fn = self._recorder(state.model_state, (batch,), captured)
        zeros = jax.tree.map(jnp.zeros_like, state.params)  # a_t is not needed here
        self.tx.update(zeros, state.opt_state, state.params, grad_fn=grad_fn)
        loss, ms, grads = captured[0]
        return grads, loss, ms

    def _async_fused(self, state, batch):
        """AsyncSAM on one device: the pure step in one jit."""
        b = self.ascent_batch_size
        small = batch if b is None else jax.tree.map(lambda x: x[:b], batch)
        ascent, ascent_norm = self._ascent_grad(state.params, state.model_state, small)
        descent, loss, ms = self._async_descent(state, batch)
        state, grad_norm = self._apply(state, ascent, (descent,), ms)
        return state, {
            "loss": loss,
            "grad_norm": grad_norm,
            "ascent_grad_norm": ascent_norm,
        }

    def _apply(self, state, updates, grads, model_state):
        """``tx.update`` with the gradients already computed, then the step."""
        new_updates, opt_state = self.tx.update(
            updates, state.opt_state, state.params, grad_fn=lambda p, i: grads[i]
        )
        params = optax.apply_updates(state.params, new_updates)
        return state._replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            model_state=model_state,
        ), f32_global_norm(grads[0])

    def _step_sampa(self, state, prev, batch_d):
        ascent_device = self.ascent_device_for("sampa")
        if ascent_device == self.descent_device:
            if self.sampa_vmap:
                return self._one_jit("sampa_vmap", self._sampa_vmap)(
                    state, prev, batch_d
                )
            return self._one_jit("sampa_fused", self._sampa_fused)(state, prev, batch_d)
        perturbed, aux_point = self._one_jit("points", self._sampa_points)(state)
        batch_a = self._put(batch_d, ascent_device)
        aux_point = self._put(aux_point, ascent_device)
        ms_a = self._put(state.model_state, ascent_device)
        aux_grad, aux_norm = self._one_jit(
            "ascent", self._ascent_grad, on_descent=False
        )(aux_point, ms_a, batch_a)
        loss, ms, grad = self._one_jit("sampa_descent", self._value_and_grad)(
            perturbed, state.model_state, prev
        )
        aux_grad = self._put(aux_grad, self._state_place)
        state, grad_norm = self._one_jit("apply", self._apply)(
            state, None, (grad, aux_grad), ms
        )
        return state, {
            "loss": loss,
            "grad_norm": grad_norm,
            "ascent_grad_norm": aux_norm,
        }

    def _sampa_points(self, state):
        """The two points SAMPa evaluates at, as ``tx.update`` asks for them."""
        points = grad_fn_points(self.tx, None, state.opt_state, state.params)
        return points[0], points[1]

    def _sampa_fused(self, state, prev, batch):
        """SAMPa on one device: the pure step, both gradients in one jit."""
        captured = {}
        grad_fn = self._recorder(state.model_state, (prev, batch), captured)
        updates, opt_state = self.tx.update(
            None, state.opt_state, state.params, grad_fn=grad_fn
        )
        (loss, ms, grad), aux_grad = captured[0], captured[1][2]
        new_state = state._replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            model_state=ms,
        )
        metrics = {
            "loss": loss,
            "grad_norm": f32_global_norm(grad),
            "ascent_grad_norm": f32_global_norm(aux_grad),
        }
        return new_state, metrics

    def _sampa_vmap(self, state, prev, batch):
        """SAMPa on one device: both gradients in one ``vmap``-ed call."""
        perturbed, aux_point = self._sampa_points(state)
        stack = lambda a, b: jnp.stack([a, b])  # noqa: E731
        points = jax.tree.map(stack, perturbed, aux_point)
        batches = jax.tree.map(stack, prev, batch)
        loss, ms, grads = jax.vmap(self._value_and_grad, in_axes=(0, None, 0))(
            points, state.model_state, batches
        )
        grad = jax.tree.map(lambda g: g[0], grads)
        aux_grad = jax.tree.map(lambda g: g[1], grads)
        ms = jax.tree.map(lambda m: m[0], ms)  # the pass at the perturbed point
        state, grad_norm = self._apply(state, None, (grad, aux_grad), ms)
        metrics = {
            "loss": loss[0],
            "grad_norm": grad_norm,
            "ascent_grad_norm": f32_global_norm(aux_grad),
        }
        return state, metrics


def _batch_size(batch: Any) -> int:
    """The common leading size of ``batch``'s leaves; a clear error otherwise."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError("`batch` has no arrays.")
    sizes = {}
    for path, x in leaves:
        if not hasattr(x, "shape") and not isinstance(x, (bool, int, float, complex)):
            raise TypeError(
                f"`batch` leaf {jax.tree_util.keystr(path)} must be an array, got"
                f" {type(x).__name__}."
            )
        shape = jnp.shape(x)
        if not shape:
            raise ValueError(
                f"`batch` leaf {jax.tree_util.keystr(path)} is a scalar; every leaf"
                " needs a leading batch axis."
            )
        sizes.setdefault(shape[0], jax.tree_util.keystr(path))
    if len(sizes) > 1:
        described = ", ".join(f"{p or 'the batch'}: {n}" for n, p in sizes.items())
        raise ValueError(
            f"`batch` leaves have different leading (batch) sizes: {described}."
        )
    return next(iter(sizes))
