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

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from samx import _chain, _checks, _plan
from samx._plan import method_of as method_of
from samx.runtime import _devices, _processes, _watch
from samx.runtime._common import (
    check_batch_divides,
    check_mesh,
    check_same_shapes,
    value_and_grad,
)
from samx.runtime._pieces import Pieces


class TrainerState(NamedTuple):
    """State of a :class:`Trainer`; a pytree, so it can be checkpointed.

    Attributes:
      step: the number of steps taken, an int32 scalar on the descent device.
      params: the parameters, on the descent device (replicated on a mesh).
      opt_state: the transform's state, on the descent device (replicated).
      model_state: the model's non-trainable state (e.g. BatchNorm
        statistics), or None for a loss without state (replicated).
      prev_batch: the previous step's batch, for the methods whose evaluation
        plan uses it (AsyncSAM and SAMPa, paired), on the descent device (split
        along the batch axis on a mesh); None before the first step, and for
        the other methods.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any
    prev_batch: Any


def _calibration_of(value: Any) -> tuple[Any, Any]:
    """``(b', calibration)`` from ``Trainer(ascent_batch_size=value)``: an int
    (or None, or anything, checked next) and no calibration, or what
    :func:`calibrate_ascent_batch` returned and the calibration itself. Warns,
    once, here, if the calibration's b' does not hide behind the descent."""
    from samx.runtime._calibrate import AscentBatchCalibration  # imports this

    if not isinstance(value, AscentBatchCalibration):
        return value, None
    if not value.hides:
        warnings.warn(
            "samx.runtime.Trainer: its calibration says that even b' ="
            f" {value.ascent_batch_size} does not hide behind the descent"
            " (`hides` is False: the ascent of one example and the transfers"
            f" took {value.ascent_seconds[value.ascent_batch_size] * 1e3:.3g}"
            f" + {value.transfer_seconds * 1e3:.3g} ms, the descent"
            f" {value.descent_seconds * 1e3:.3g} ms), so every step on two"
            " devices will be slower than SGD. The calibration's own warning"
            " gives the alternatives.",
            UserWarning,
            stacklevel=3,
        )
    return value.ascent_batch_size, value


class Trainer(Pieces):
    """Trains with a samx transform, its two gradients placed on two devices.

    ``state = trainer.init(params)`` then ``state, metrics =
    trainer.step(state, batch)``. The step never blocks the host: it only
    dispatches jitted computations and explicit ``device_put`` transfers
    between the two devices; metrics stay on device (read them every N steps).

    Which batch each gradient sees and where it runs is the transform's
    evaluation plan (:func:`samx.evaluation_plan`, found from ``tx``'s state):

    - ``samx.async_sam``: the ascent gradient of step t, on the first
      ``ascent_batch_size`` examples of the batch, on ``ascent_device``; at the
      same time, on ``descent_device``, the descent gradient at the point
      perturbed by the previous step's ascent gradient, on the previous step's
      batch (paired: the examples that ascent gradient came from; the current
      batch at the first step); the ascent gradient then moves to the descent
      device, where the update is applied.
    - ``samx.sampa``: ``grad_fn(., 0)`` (on the previous step's batch, the
      current one at the first step) on ``descent_device`` and
      ``grad_fn(., 1)`` (on the current batch) on ``ascent_device``; with a
      single device, both in one jit (see ``sampa_vmap``).
    - ``samx.sam``, whose descent point needs the fresh ascent gradient, and any
      other optax transform: everything on ``descent_device``.

    The Trainer keeps the previous batch (``TrainerState.prev_batch``) where
    the plan needs it, so the loop passes the current batch only.

    **Your batch buffers are yours again when** :meth:`step` **returns.** The
    step copies each NumPy leaf of the batch on the host before any device
    sees it (``jax.device_put`` may alias a NumPy array on the CPU backend,
    and the step's computations read their inputs after it returns), so a
    loader may refill one preallocated buffer for every batch, at once,
    without waiting for the devices. The copy is one host ``memcpy`` of the
    batch (``benchmarks/runtime_overhead.py``, "no batch copy"); JAX arrays
    are immutable and taken as they are. A batch you ``jax.device_put``
    yourself from a buffer you refill is the exception: on the CPU backend
    that array may alias the buffer, so put a copy (``jnp.array(buffer)``).
    Do not write to a buffer while :meth:`step` is running on another
    thread.

    **The state given to a step is used up.** :meth:`step` donates the
    state's arrays (``params``, ``opt_state``, ``model_state``, ``step``) to
    its jitted update, so that the devices hold one copy of the parameters
    and the optimizer state, not two: after ``state, metrics =
    trainer.step(state, batch)`` the old ``state`` is invalid (its arrays are
    deleted; stepping it again raises a ``ValueError``). Copy a state you
    want to keep (``jax.tree.map(jnp.copy, state)``, or save it) before
    stepping it, or build the Trainer with ``donate=False``. The batch
    passed in and the kept ``prev_batch`` are never donated. Peak bytes with
    and without donation: ``benchmarks/memory.py``.

    **One batch size.** Every batch has the leading size of the first batch
    after :meth:`init`, for every method: a batch of another size raises a
    ``ValueError`` (a step of another size would compile again, and AsyncSAM
    and SAMPa pair each descent with the previous batch). Drop the last,
    smaller batch of an epoch (``drop_remainder=True``, ``drop_last=True``) or
    pad it; every samx loop follows this rule (:doc:`/pairing`). Likewise
    one dtype per leaf: under ``jax_enable_x64`` a float64 batch among
    float32 ones raises a ``ValueError`` (it would compile the step again).

    **Data parallel.** ``descent_device`` may be a ``jax.sharding.Mesh``: each
    batch is then split along ``batch_axis`` (``NamedSharding(mesh,
    P(batch_axis))``) and ``params``, ``opt_state`` and ``model_state`` are
    replicated on the mesh (``NamedSharding(mesh, P())``); XLA averages the
    gradients over the mesh, so the trajectory is the one-device trajectory.
    AsyncSAM's ascent still runs on the single ``ascent_device``, and its
    gradient is then replicated onto the mesh; SAMPa's two gradients both run
    on the mesh unless ``ascent_device`` is given. The batch size must be a
    multiple of the mesh's ``batch_axis`` size.

    **Several processes** (``jax.distributed``, one mesh over every process's
    devices). Every process runs the same loop and passes its own part of each
    global batch to :meth:`step` (NumPy arrays; the global batch is their
    concatenation in process order, made with
    ``jax.make_array_from_process_local_data``), every part of the same size
    (the processes compare their sizes once, at the first step of a run, and
    each raises a ``ValueError`` naming them if they differ), and the same
    initial parameters and model state to :meth:`init` (host values or arrays
    on this process's devices, RNG keys included), which replicates them on
    the mesh. The trajectory is the one-process trajectory on the global
    batch, except AsyncSAM's with a loss that couples the examples of a batch
    (below). AsyncSAM's ascent runs on each process's own host CPU
    (``ascent_device``, default this process's first CPU device) over the
    first ``ascent_batch_size`` examples *of its local batch*, and the descent
    step averages the processes' ascent gradients, each on its own
    ``ascent_batch_size`` examples (with P processes, P x
    ``ascent_batch_size`` examples together: the whole global batch when
    ``ascent_batch_size`` is None or the local batch size), and every process
    must use the same ``ascent_batch_size``. That mean is the one-process
    ascent gradient on those examples when the loss is a mean of per-example
    losses; with BatchNorm in training mode (statistics over the batch), each
    process's ascent normalises with its own local examples' statistics, so
    the trajectory differs from the one-process one (and is the same on every
    process). ``metrics["ascent_grad_norm"]`` is then the norm of this
    process's own ascent gradient. SAMPa runs both gradients on the mesh (no
    ``ascent_device``); the previous batch it keeps is a global array of which
    each process holds its own part.

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
        ``jax.local_devices()[0]``.
      ascent_device: where the second gradient runs, a single device of this
        process. Default: for AsyncSAM ``jax.local_devices(backend="cpu")[0]``
        (the host CPU); for SAMPa a second accelerator
        when there is one and ``descent_device`` is not a mesh, else the
        descent device (both gradients fused).
      ascent_batch_size: AsyncSAM's ascent batch b' (the first b' examples of
        each batch that :meth:`step` is given: under ``jax.distributed``, of
        each process's local batch); default the whole batch. Or what
        :func:`samx.runtime.calibrate_ascent_batch` returned: its b', checked
        against this Trainer's devices (when built; on a mesh, calibrate
        with ``fast_device=mesh``, and under ``jax.distributed`` every
        process gets the same b' from it) and batch size (at each step), with
        one warning when it is built if its ``hides`` is False.
        Kept as ``trainer.calibration`` (None otherwise).
      has_state: whether ``loss_fn`` takes and returns a model state.
      sampa_vmap: SAMPa on one device: compute its two gradients in one
        ``vmap``-ed call (True) or as two gradients in one jit (False). Default:
        ``vmap`` when the descent device is an accelerator; on a CPU two
        gradients, which measured faster there (``vmap`` took 1.22x the time of
        the plain single-jit step on a 2-core CPU,
        ``benchmarks/runtime_overhead.py``).
      batch_axis: with a mesh, the mesh axis the batch is split along; default
        the mesh's first axis.
      pairing: ``"paired"`` (default): AsyncSAM's and SAMPa's perturbed
        gradient sees the examples its perturbation came from; ``"unpaired"``:
        it sees the current batch (see :func:`samx.evaluation_plan`).
      donate: whether :meth:`step` donates the state it is given (default
        True; see above).

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
        pairing: str = "paired",
        donate: bool = True,
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
        ascent_batch_size, self.calibration = _calibration_of(ascent_batch_size)
        if ascent_batch_size is not None and (
            not _checks.is_int(ascent_batch_size) or ascent_batch_size < 1
        ):
            raise ValueError(
                "`Trainer(ascent_batch_size=...)` must be an int >= 1, None or"
                " what `samx.runtime.calibrate_ascent_batch` returned, got"
                f" {ascent_batch_size!r}."
            )
        _checks.check_flag("Trainer", "has_state", has_state)
        _checks.check_flag("Trainer", "donate", donate)
        self.donate = bool(donate)
        _plan.check_pairing("Trainer", pairing)
        if sampa_vmap is not None and not isinstance(sampa_vmap, (bool, np.bool_)):
            raise TypeError(
                "`Trainer(sampa_vmap=...)` must be True, False or None, got"
                f" {type(sampa_vmap).__name__} {sampa_vmap!r}."
            )
        self.tx = optax.with_extra_args_support(tx)
        self._watch = _watch.NonfiniteWatch()
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
                jax.local_devices()[0]
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
        self._check_calibration_devices(self._ascent_arg)
        # A mesh over several processes: each feeds its part of the batch, and
        # AsyncSAM's ascent gradients, one per process, are averaged.
        self._multiprocess = self.mesh is not None and self.mesh.is_multi_process
        self._compiled: dict[Any, Callable] = {}
        self._batch_size: int | None = None  # the run's, set by its first step
        self._batch_dtypes: tuple | None = None  # likewise
        self.pairing = pairing
        self._plan: _plan.EvaluationPlan | None = None
        self._last_step: Any = None  # `step` of the state the last step returned
        self.sampa_vmap = platform != "cpu" if sampa_vmap is None else sampa_vmap

    def _check_calibration_devices(self, ascent: Any) -> None:
        """The calibration passed as ``ascent_batch_size`` timed this Trainer's
        devices: its descent device, and ``ascent`` (None: not known yet)."""
        c = self.calibration
        if c is None:
            return
        pairs = (("descent_device", "fast_device", self.descent_device, c.fast_device),)
        if ascent is not None:
            pairs += (("ascent_device", "slow_device", ascent, c.slow_device),)
        for arg, timed_arg, device, timed in pairs:
            if device != timed:
                raise ValueError(
                    f"`Trainer(ascent_batch_size=calibration)` timed {timed} as"
                    f" the {arg.split('_')[0]} device (`{timed_arg}`), but this"
                    f" Trainer's `{arg}` is {device}: calibrate with"
                    " `calibrate_ascent_batch(..., fast_device=..., slow_device=...)`"
                    " set to the devices the Trainer trains on."
                )

    # -- placement ---------------------------------------------------------------

    def plan(self, opt_state: Any = None) -> _plan.EvaluationPlan:
        """The transform's evaluation plan (see :func:`samx.evaluation_plan`).

        Found from ``opt_state`` (each call); the first one found (by
        :meth:`init`) is this Trainer's, and a state whose plan differs (e.g.
        another transform's, restored) raises a ``ValueError``. With no
        argument, this Trainer's plan (an error before :meth:`init`).
        """
        if opt_state is None:
            if self._plan is None:
                raise ValueError(
                    "`samx.runtime.Trainer.plan()`: no plan yet; call `init`"
                    " first, or pass an optimizer state."
                )
            return self._plan
        plan = _plan.evaluation_plan(opt_state, pairing=self.pairing)
        if self._plan is None:
            self._plan = plan
        elif plan != self._plan:
            raise ValueError(
                f"samx.runtime.Trainer: this optimizer state is {plan.method}'s"
                f" ({plan.pairing}), but this Trainer trains {self._plan.method}"
                f" ({self._plan.pairing}): was it saved with another transform?"
                " Build a Trainer with that transform."
            )
        return self._plan

    def method(self, opt_state: Any) -> str:
        """The transform's method (see :func:`method_of`), found once."""
        return self.plan(opt_state).method

    def ascent_device_for(self, plan: _plan.EvaluationPlan) -> jax.Device | Mesh:
        """Where the evaluations of ``plan``'s ascent role run."""
        if self._ascent_arg is not None:
            return self._ascent_arg
        if plan.ascent_placement == "host":
            return jax.local_devices(backend="cpu")[0]
        if plan.ascent_placement == "peer" and self.mesh is None:
            return _devices.second_accelerator() or self.descent_device
        return self.descent_device

    def _put(self, tree, device):
        return jax.device_put(tree, device)

    def _check_batch(self, fn: str, batch: Any, name: str = "batch") -> int:
        """The size of ``batch`` (this process's part); a clear error if bad."""
        if self.mesh is None:
            return _plan.check_batch(fn, name, batch)
        return check_batch_divides(fn, batch, self.mesh, self.batch_axis, name)

    def _put_batch(self, fn: str, batch: Any) -> Any:
        """``batch`` where the descent side reads it (split on a mesh)."""
        return _processes.put_batch(fn, batch, self._batch_place)

    def _check_processes(self, plan: _plan.EvaluationPlan) -> None:
        """On a mesh over several processes: only a local ascent leaves the mesh."""
        ascent = self.ascent_device_for(plan)
        if not plan.parallel or ascent == self.descent_device:
            return
        for e in plan.on(_plan.ASCENT_DEVICE):
            if e.batch != _plan.ASCENT:
                raise ValueError(
                    f"`Trainer(ascent_device={self._ascent_arg!r})`: on a mesh that"
                    f" spans several processes, {plan.method}'s gradient {e.index}"
                    f" sees the {e.batch} global batch, which no single device"
                    " holds; leave `ascent_device` None (both gradients on the"
                    " mesh)."
                )
        from jax.experimental import multihost_utils

        try:  # once, at init: the averaged ascent gradient needs equal shares
            multihost_utils.assert_equal(np.int32(self.ascent_batch_size or 0))
        except AssertionError:
            raise ValueError(
                f"`Trainer(ascent_batch_size={self.ascent_batch_size})` differs"
                " between the processes; every process must use the same."
            ) from None

    # -- public API --------------------------------------------------------------

    def init(self, params: Any, model_state: Any = None) -> TrainerState:
        """The initial state, on the descent device."""
        return self._init(params, model_state, abstract=False)

    def _init(self, params: Any, model_state: Any, *, abstract: bool) -> TrainerState:
        """:meth:`init`, or (``abstract``) its shapes without allocating it (for
        restore targets); the same checks either way, outside any trace. A new
        run: its first step sets the batch size and dtypes."""
        self._batch_size = self._batch_dtypes = None
        if params is not None:  # None: the transform's own init says so
            _checks.require_params("samx.runtime.Trainer", params, "init")
        if abstract:
            state = jax.eval_shape(self._fresh_state, params, model_state)
        else:
            state = self._fresh_state(params, model_state)
        self._check_plan(self.plan(state.opt_state))
        return state

    def _check_plan(self, plan: _plan.EvaluationPlan) -> None:
        """Whether this Trainer's options fit ``plan`` (not under a trace:
        under jax.distributed it talks to the other processes)."""
        if self.ascent_batch_size is not None and not plan.uses(_plan.ASCENT):
            raise ValueError(
                "`Trainer(ascent_batch_size=...)` is AsyncSAM's ascent batch;"
                f" this transform is {plan.method!r}."
            )
        if plan.uses(_plan.ASCENT):
            self._check_calibration_devices(self.ascent_device_for(plan))
        if self._multiprocess:
            self._check_processes(plan)

    def _fresh_state(self, params: Any, model_state: Any) -> TrainerState:
        """The initial state without the checks of :meth:`init` (traceable,
        e.g. by ``jax.eval_shape`` in :func:`samx.runtime.abstract_state`)."""
        if self.has_state and model_state is None:
            raise ValueError(
                "`Trainer(has_state=True)` needs `init(params, model_state)`."
            )
        params = self._put_state(params, copy=False)
        opt_state = jax.jit(self.tx.init)(params)
        _chain.warn_transforms_before("samx.runtime.Trainer", opt_state)
        state = TrainerState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=opt_state,
            model_state=model_state,
            prev_batch=None,
        )
        # Commit every leaf (jit leaves outputs that ignore its inputs
        # uncommitted), so that the first step compiles what the others reuse;
        # copied (no aliasing), so that the first step, which donates the
        # state, never deletes the caller's `params` or `model_state`.
        return self._put_state(state)

    def _put_state(self, tree: Any, copy: bool = True) -> Any:
        """``tree`` where the state lives (replicated on a mesh), a copy.

        ``copy=False``: an alias where ``jax.device_put`` allows one. On a mesh
        over several processes always a copy, through
        :func:`_processes.replicate`: ``jax.device_put`` there refuses values
        committed to this process's devices and RNG key arrays.
        """
        if self._multiprocess:
            return _processes.replicate(tree, self._state_place)
        may_alias = False if copy else None  # None: JAX decides
        return jax.device_put(tree, self._state_place, may_alias=may_alias)

    def step(self, state: TrainerState, batch: Any) -> tuple[TrainerState, dict]:
        """One training step; returns at once, before the devices finish.

        Args:
          state: from :meth:`init` or the previous step.
          batch: a pytree of arrays (NumPy or JAX) with a common leading size
            (on a mesh, a multiple of the size of its batch axis): the size of
            the first batch after :meth:`init` (another raises a
            ``ValueError``: drop or pad the last, smaller batch of an epoch).

        Returns:
          ``(state, metrics)``: ``metrics["loss"]`` and ``metrics["grad_norm"]``
          of the descent pass, on the descent device; AsyncSAM and SAMPa add
          ``metrics["ascent_grad_norm"]``, on the ascent device.
        """
        return self._step("samx.runtime.Trainer.step", state, batch)

    def _step(self, fn: str, state: TrainerState, batch: Any) -> tuple:
        """:meth:`step`, its errors named after ``fn``, the function called."""
        if not isinstance(state, TrainerState):
            raise TypeError(
                f"`{fn}(state=...)` must be the TrainerState from `init` or"
                f" the previous step, got {type(state).__name__}."
            )
        size = self._check_batch(fn, batch)
        if self._multiprocess:  # a global array: say so, not that its size differs
            _processes.check_local(fn, batch)
            if self._batch_size is None:  # once per run: the processes agree
                _processes.agree_batch_size(fn, size)
        _plan.check_batch_size(fn, size, self._batch_size)
        dtypes = _plan.batch_dtypes(batch)
        _plan.check_batch_dtypes(fn, dtypes, self._batch_dtypes)
        if self.calibration is not None and size != self.calibration.batch_size:
            raise ValueError(
                f"`{fn}(batch=...)` has {size} examples, but"
                " `Trainer(ascent_batch_size=calibration)` chose b' ="
                f" {self.ascent_batch_size} for batches of"
                f" {self.calibration.batch_size}: calibrate on a batch of the"
                " size the training uses."
            )
        if state.step is self._last_step:  # the state this Trainer returned
            plan = self._plan
        else:  # another (a restored one, or one already donated): check it
            plan = self.check_state(state, f"`{fn}(state=...)`")
        if plan.uses(_plan.ASCENT) and (self.ascent_batch_size or 0) > size:
            raise ValueError(
                f"`Trainer(ascent_batch_size={self.ascent_batch_size})` is larger"
                f" than the batch ({size})."
            )
        # tx.update's arguments that only the loop knows (AsyncSAM's b'/b):
        # bound into the jitted pieces that call it, one jit per value.
        args = _plan.update_args(plan, size, self.ascent_batch_size)
        batch = _plan.owned(batch)  # the caller may refill its buffers now
        batch_d = self._put_batch(fn, batch)
        prev = state.prev_batch
        if prev is not None:
            check_same_shapes(fn, plan, prev, batch_d, size)
        # The previous batch travels apart from the state: None at the first
        # step (B_{-1} := B_0) must not retrace.
        prev = batch_d if prev is None else prev
        state = state._replace(prev_batch=None)
        ascent_device = self.ascent_device_for(plan)
        if plan.parallel and ascent_device != self.descent_device:
            state, metrics = self._step_two_devices(
                plan, state, prev, batch, batch_d, ascent_device, args
            )
        elif plan.parallel and plan.updates is None and self.sampa_vmap:
            vmapped = self._one_jit(
                "vmap", self._vmapped, update_args=args, donate=True
            )
            state, metrics = vmapped(state, prev, batch_d)
        else:
            fused = self._one_jit("fused", self._fused, update_args=args, donate=True)
            state, metrics = fused(state, prev, batch_d)
        if plan.uses(_plan.PREVIOUS):
            state = state._replace(prev_batch=batch_d)
        self._last_step = state.step
        self._batch_size, self._batch_dtypes = size, dtypes
        self._watch.see(fn, metrics["grad_norm"], state.opt_state, stacklevel=4)
        return state, metrics

    def check_state(
        self, state: TrainerState, what: str = "`samx.runtime.Trainer.step(state=...)`"
    ) -> _plan.EvaluationPlan:
        """Checks that ``state`` fits this Trainer; returns its plan.

        From what the host knows (no device is waited for): its arrays are
        not deleted (donated by a step), its transform's plan is this
        Trainer's (method and pairing), and its arrays lie where this
        Trainer keeps them. :meth:`step` runs it on any state but the one it
        last returned. Not checked (the state does not record it): the
        ``ascent_batch_size`` of the run that saved it.
        """
        leaves = jax.tree.leaves(state)
        if any(isinstance(x, jax.Array) and x.is_deleted() for x in leaves):
            raise ValueError(
                f"{what}: this state's arrays were deleted: a step"
                " donates the state it is given, so after `state, metrics ="
                " trainer.step(state, batch)` the old state is invalid. Step"
                " the state the last step returned; copy one to keep it"
                " (`jax.tree.map(jnp.copy, state)`), or build the Trainer with"
                " `donate=False`."
            )
        plan = self.plan(state.opt_state)
        if state.prev_batch is not None and not plan.uses(_plan.PREVIOUS):
            raise ValueError(
                f"{what} holds a previous batch, which this"
                f" Trainer's {plan.method} ({plan.pairing}) does not use: was it"
                " saved with another `pairing` or transform?"
            )
        state_place = self._state_place
        if isinstance(state_place, jax.Device):
            state_place = jax.sharding.SingleDeviceSharding(state_place)
        batch_place = self._batch_place
        if isinstance(batch_place, jax.Device):
            batch_place = jax.sharding.SingleDeviceSharding(batch_place)
        for name, place in (
            ("step", state_place),
            ("params", state_place),
            ("opt_state", state_place),
            ("model_state", state_place),
            ("prev_batch", batch_place),
        ):
            for x in jax.tree.leaves(getattr(state, name)):
                if isinstance(x, jax.Array) and x.sharding.device_set != (
                    place.device_set
                ):
                    raise ValueError(
                        f"{what}: its `{name}` lies on"
                        f" {sorted(x.sharding.device_set, key=str)}, but this"
                        f" Trainer keeps it on {sorted(place.device_set, key=str)}:"
                        " restore it into `samx.runtime.abstract_state(trainer,"
                        " ...)`, or `jax.device_put` it there."
                    )
        return plan
