"""Flax NNX on the two-device runtime: :class:`Trainer`."""

import inspect
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from samx import _plan, runtime
from samx.flax import _common, _nnx


class Trainer:
    r"""Trains an NNX model with a samx transform, its two gradients on two devices.

    ``trainer = Trainer(model, tx, loss_fn)``, then ``metrics =
    trainer.step(batch)`` in the loop and ``trainer.model`` to evaluate. It
    drives :class:`samx.runtime.Trainer` (``has_state=True``), so placement
    and the batch each gradient sees follow the transform's evaluation plan
    (:func:`samx.evaluation_plan`): AsyncSAM's ascent on ``ascent_device``
    (the host CPU by default) while ``descent_device`` computes the descent on
    the previous batch, which the Trainer keeps; SAMPa's two gradients on two
    devices; SAM and plain optax transforms on the descent device. A step
    only dispatches work and returns at once; the metrics stay on the device.

    The model is split once into its parameters (the variables ``wrt``
    selects) and the rest (BatchNorm statistics, RNG counts and keys), both
    kept as pure ``nnx.State`` of arrays in :attr:`state`; every pass merges
    them into a fresh model inside its jit, whose variables it may then update
    (a model merged outside the jit would raise Flax's ``TraceContextError``).
    The model passed in is not updated: read :attr:`model`.

    **Donation.** A step donates the state's arrays to its jitted update (one
    copy of the parameters and optimizer state on the device, not two; see
    :class:`samx.runtime.Trainer`): a state read from :attr:`state`, and a
    model read from :attr:`model`, are valid until the next step. Save or copy
    (``jax.tree.map(jnp.copy, trainer.state)``) what must outlive it, or pass
    ``donate=False``.

    **Model state.** Every pass of a step starts from the model state of the
    start of the step, in the mode the model was in when the Trainer was made
    (training mode, usually). Only the descent pass keeps its new state (for
    SAMPa the pass at the perturbed point), as in the one-device helpers
    (:func:`samx.flax.nnx_train_step`); a non-finite floating statistic leaves
    the state as it was. So BatchNorm statistics come from the descent pass,
    and RNG streams advance once per step: a stream's draw is its key folded
    with its count, and every pass starts from the counts of the start of the
    step, so all the passes of a step draw the same keys (``nnx.Dropout``
    drops the same units wherever their batches have the same shape), and the
    counts move on by the descent pass's draws (one per step for one
    ``nnx.Dropout``).

    **Checkpoints.** :attr:`state` is a :class:`samx.runtime.TrainerState`, a
    pytree for orbax; :meth:`abstract_state` is its restore target, built from
    shapes (no arrays are allocated), and ``trainer.state = restored``
    continues the run bit-exactly. For a restart the Trainer may be built on
    an abstract model, ``nnx.eval_shape(lambda: Model(...))``: it has no state
    until one is assigned.

    Args:
      model: the ``nnx.Module``, in the mode it trains in (or its
        ``nnx.eval_shape``, to restore into).
      tx: the transform, e.g. ``samx.async_sam(optax.sgd(0.1), rho=0.05)``.
      loss_fn: ``loss_fn(model, batch) -> loss``, a scalar, or ``(loss, aux)``
        with ``has_aux``: the loss the one-device helpers take.
      wrt: the ``nnx`` filter of the trained variables; default ``nnx.Param``.
      descent_device: as for :class:`samx.runtime.Trainer`: a device, a name
        such as ``"gpu"`` or ``"cpu:0"``, or a ``jax.sharding.Mesh`` (data
        parallel along its first axis); default ``jax.devices()[0]``.
      ascent_device: as for :class:`samx.runtime.Trainer`; default AsyncSAM's
        ascent on ``jax.devices("cpu")[0]``, SAMPa's second gradient on a
        second accelerator if there is one.
      ascent_batch_size: AsyncSAM's ascent batch ``b'``, the first ``b'``
        examples of each batch; default the whole batch.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``; the descent
        pass's ``aux`` is then ``metrics["aux"]``.
      pairing: ``"paired"`` (default) or ``"unpaired"`` (see
        :func:`samx.evaluation_plan`).
      batch_axis: with a mesh, the mesh axis the batch is split along; default
        the mesh's first axis (as for :class:`samx.runtime.Trainer`).
      sampa_vmap: SAMPa on one device: its two gradients in one ``vmap``-ed
        call or not; default as for :class:`samx.runtime.Trainer`.
      donate: whether a step donates the state (default True; see above).

    Attributes:
      state: the :class:`samx.runtime.TrainerState` (see :attr:`state`).
      model: the current model (see :attr:`model`).
      plan: the transform's :class:`samx.EvaluationPlan`, an attribute: the
        Trainer owns its state (the runtime Trainer, given states by its
        caller, has the method ``plan(opt_state)``; ``runtime.plan()`` is
        this one).
      runtime: the :class:`samx.runtime.Trainer` that runs the steps.
      graphdef: the model's ``nnx.GraphDef``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, optax, samx, samx.flax
      >>> from flax import nnx
      >>> rngs = nnx.Rngs(0, dropout=1)
      >>> model = nnx.Sequential(
      ...     nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs),
      ...     nnx.Dropout(0.5, rngs=rngs), nnx.Linear(4, 1, rngs=rngs))
      >>> def loss_fn(model, batch):
      ...     return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
      >>> cpu = jax.devices("cpu")  # the tests have several CPU devices
      >>> trainer = samx.flax.Trainer(
      ...     model, samx.async_sam(optax.sgd(0.1), rho=0.05), loss_fn,
      ...     descent_device=cpu[0], ascent_device=cpu[-1], ascent_batch_size=4)
      >>> batch = {"x": np.ones((8, 3), np.float32), "y": np.zeros((8, 1), np.float32)}
      >>> for _ in range(3):
      ...     metrics = trainer.step(batch)  # returns before the devices finish
      >>> int(trainer.state.step), float(metrics["loss"]) < 1.0
      (3, True)
      >>> int(trainer.model.layers[2].rngs.count[...])  # one draw per step
      3

    References:
      Jo, Lim, Lee, `Asynchronous Sharpness-Aware Minimization For Fast and
      Accurate Deep Learning <https://arxiv.org/abs/2503.11147>`_, 2025

      Flax, `Save and load checkpoints
      <https://flax.readthedocs.io/en/latest/guides/checkpointing.html>`_
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: Any,
        loss_fn: Callable[..., Any],
        *,
        wrt: Any = nnx.Param,
        descent_device: Any = None,
        ascent_device: Any = None,
        ascent_batch_size: int | None = None,
        has_aux: bool = False,
        pairing: str = "paired",
        batch_axis: str | None = None,
        sampa_vmap: bool | None = None,
        donate: bool = True,
    ):
        fn = "samx.flax.Trainer"
        check_model(fn, model)
        _common.check_loss_fn(fn, loss_fn)
        check_signature(fn, loss_fn)
        _common.check_flag(fn, "has_aux", has_aux)
        self.graphdef, params, rest = split_model(fn, model, wrt)
        self.wrt = wrt
        self.has_aux = has_aux
        self.runtime = runtime.Trainer(
            tx,
            runtime_loss(f"{fn}.step", loss_fn, self.graphdef, wrt, has_aux),
            descent_device=descent_device,
            ascent_device=ascent_device,
            ascent_batch_size=ascent_batch_size,
            has_state=True,
            pairing=pairing,
            batch_axis=batch_axis,
            sampa_vmap=sampa_vmap,
            donate=donate,
        )
        self._state: runtime.TrainerState | None = None
        if is_abstract(fn, params, rest):  # checks the arguments, allocates nothing
            fresh = self.runtime._init(params, rest, abstract=True)
        else:
            fresh = self._state = self.runtime.init(params, rest)
        self._fresh = jax.tree.map(_abstract, fresh)  # what a state must look like
        self.plan = self.runtime.plan(fresh.opt_state)

    @property
    def state(self) -> runtime.TrainerState:
        """The training state, a pytree: save it with orbax, or assign one.

        ``params`` and ``model_state`` are pure ``nnx.State`` (the ``wrt``
        variables and the rest); ``prev_batch`` is the previous batch where the
        method's plan uses it. Assigning a state (e.g. restored into
        :meth:`abstract_state`) continues from it.
        """
        if self._state is None:
            raise ValueError(
                "samx.flax.Trainer: this Trainer was built on an abstract model"
                " (`nnx.eval_shape`) and has no state yet: assign one, e.g."
                " `trainer.state = checkpointer.restore(path,"
                " trainer.abstract_state(batch))`."
            )
        return self._state

    @state.setter
    def state(self, value: runtime.TrainerState) -> None:
        if not isinstance(value, runtime.TrainerState):
            raise TypeError(
                "`samx.flax.Trainer.state` must be a `samx.runtime.TrainerState`,"
                f" e.g. restored into `trainer.abstract_state(batch)`, got"
                f" {type(value).__name__}."
            )
        value = value._replace(
            params=nnx.as_pure(value.params), model_state=nnx.as_pure(value.model_state)
        )
        for name in ("step", "params", "opt_state", "model_state"):
            if _shapes(getattr(value, name)) != _shapes(getattr(self._fresh, name)):
                raise ValueError(
                    f"`samx.flax.Trainer.state`: its `{name}` does not have the"
                    " tree structure, shapes and dtypes of this Trainer's; was it"
                    " saved from another model, `wrt` or transform?"
                )
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(value)):
            raise ValueError(
                "`samx.flax.Trainer.state` must hold arrays, got an abstract state"
                " (`jax.ShapeDtypeStruct` leaves): restore a checkpoint into it,"
                " e.g. `checkpointer.restore(path, trainer.abstract_state(batch))`."
            )
        old = self._state
        if (
            old is not None
            and old.prev_batch is not None
            and value.prev_batch is not None
            and _shapes(value.prev_batch) != _shapes(old.prev_batch)
        ):
            raise ValueError(
                "`samx.flax.Trainer.state`: its `prev_batch` does not have the"
                " tree structure, shapes and dtypes of the batches this Trainer"
                " trains on; was it saved from a run on other batches?"
            )
        # deleted (donated) arrays, another transform or pairing, another
        # device or mesh: a clear error now, not at the next step
        self.runtime.check_state(value, "`samx.flax.Trainer.state`")
        self._state = value
        # A new run: its first step sets the batch size and dtypes.
        self.runtime._batch_size = self.runtime._batch_dtypes = None

    @property
    def model(self) -> nnx.Module:
        """The current model: a new module merged from :attr:`state`.

        For evaluation (``trainer.model.eval()``); it shares the state's
        arrays, waits for no device, and changing it (its mode, its values)
        does not change the Trainer.
        """
        state = self.state
        return nnx.merge(self.graphdef, state.params, state.model_state)

    def step(self, batch: Any) -> dict[str, jax.Array]:
        """One training step; returns at once, before the devices finish.

        Args:
          batch: a pytree of arrays (NumPy or JAX) with a common leading size:
            the size of the first batch (since the Trainer was made or
            :attr:`state` assigned); another raises a ``ValueError``, as in
            every samx loop: drop or pad the last, smaller batch of an epoch.

        Returns:
          ``metrics``, on the devices: ``"loss"`` and ``"grad_norm"`` of the
          descent pass, ``"ascent_grad_norm"`` for AsyncSAM and SAMPa (on the
          ascent device), ``"aux"`` with ``has_aux``.
        """
        fn = "samx.flax.Trainer.step"
        _plan.check_batch(fn, "batch", batch)
        state, metrics = self.runtime._step(fn, self.state, batch)
        if self.has_aux:
            model_state, aux = state.model_state
            state = state._replace(model_state=model_state)
            metrics = {**metrics, "aux": aux}
        self._state = state
        return metrics

    def abstract_state(self, batch: Any = None) -> runtime.TrainerState:
        """The restore target of :attr:`state`: shapes, dtypes and placement.

        From the model's shapes (see :func:`samx.runtime.abstract_state`):
        allocates nothing and needs no second model.

        Args:
          batch: a batch of the training shapes (any values); required for
            AsyncSAM and SAMPa (paired), whose state holds the previous batch.
            To restore such a state saved before its first step, replace
            ``prev_batch`` of the result with None.

        Returns:
          A :class:`samx.runtime.TrainerState` of ``jax.ShapeDtypeStruct``
          with shardings, for ``orbax``'s ``restore``.
        """
        fresh = self._fresh
        return runtime.abstract_state(
            self.runtime, fresh.params, fresh.model_state, batch=batch
        )


def runtime_loss(
    fn: str, loss_fn: Callable[..., Any], graphdef: Any, wrt: Any, has_aux: bool
) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """``loss_fn(model, batch)`` as the runtime's ``loss(params, rest, batch)``.

    ``-> (loss, new_rest)``, or ``(loss, (new_rest, aux))`` with ``has_aux``:
    the loss with state (``has_state=True``) of :class:`samx.runtime.Trainer`
    and :func:`samx.runtime.calibrate_ascent_batch`, on the pure states that
    :func:`split_model` gives.
    """
    pure = _nnx.pure_loss(fn, loss_fn, graphdef, wrt, has_aux)

    def loss(params: Any, rest: Any, batch: Any) -> Any:
        value, (aux, new_rest) = pure(params, rest, batch)
        return value, ((new_rest, aux) if has_aux else new_rest)

    return loss


def check_model(fn: str, model: Any) -> None:
    """A clear error for a model that is not an ``nnx.Module`` (linen: a hint)."""
    if not isinstance(model, nnx.Module):
        hint = (
            " For a linen model, use `samx.runtime.Trainer(tx, loss_fn,"
            " has_state=True)` with its `batch_stats` as the model state."
            if hasattr(model, "apply") and hasattr(model, "init")
            else ""
        )
        raise TypeError(
            f"`{fn}(model=...)` must be an `nnx.Module`, got"
            f" {type(model).__name__}.{hint}"
        )


def check_signature(fn: str, loss_fn: Callable[..., Any]) -> None:
    """A clear error for a loss that cannot be called as ``loss_fn(model, batch)``."""
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # a builtin: no signature to check
        return
    try:
        signature.bind(None, None)
    except TypeError as e:
        raise TypeError(
            f"`{fn}(loss_fn=...)` must be callable as `loss_fn(model, batch)`, the"
            f" loss of the samx.flax helpers; its signature is {signature} ({e})."
            " A loss of `(params, model_state, batch)` is for samx.runtime's"
            " Trainer and calibrate_ascent_batch, with `has_state=True`."
        ) from None


def split_model(fn: str, model: nnx.Module, wrt: Any) -> tuple[Any, Any, Any]:
    """``(graphdef, params, rest)``, both states pure; a clear error for ``wrt``."""
    try:
        graphdef, params, rest = nnx.split(model, wrt, ...)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"`{fn}(wrt=...)` must be an nnx filter, e.g. `nnx.Param`, got"
            f" {wrt!r} ({e})."
        ) from None
    if not jax.tree.leaves(params):
        raise ValueError(
            f"`{fn}(wrt=...)` selects no variable of the model, got {wrt!r}: the"
            " gradient would be empty (the default is `nnx.Param`)."
        )
    return graphdef, nnx.as_pure(params), nnx.as_pure(rest)


def is_abstract(fn: str, params: Any, rest: Any) -> bool:
    """Whether the model is abstract (``nnx.eval_shape``): all leaves or none."""
    leaves = jax.tree.leaves((params, rest))
    abstract = [isinstance(x, jax.ShapeDtypeStruct) for x in leaves]
    if any(abstract) and not all(abstract):
        raise ValueError(
            f"`{fn}(model=...)` mixes arrays and `jax.ShapeDtypeStruct`s: pass a"
            " model, or its `nnx.eval_shape` to restore a checkpoint into."
        )
    return all(abstract)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _shapes(tree: Any) -> Any:
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
