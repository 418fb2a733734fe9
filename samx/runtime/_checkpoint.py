"""Checkpoints: the abstract target a saved Trainer state restores into."""

from typing import Any

import jax

from samx import _plan
from samx.runtime._trainer import Trainer, TrainerState


def abstract_state(
    trainer: Trainer, params: Any, model_state: Any = None, *, batch: Any = None
) -> TrainerState:
    """The shapes, dtypes and placement of ``trainer``'s state, to restore into.

    A checkpoint library such as orbax restores into a target tree of
    ``jax.ShapeDtypeStruct`` with shardings. ``trainer.init(params)`` gives
    almost that target, with one difference: the state of a method that
    evaluates a gradient on the previous batch (AsyncSAM and SAMPa, paired)
    holds that batch (``TrainerState.prev_batch``), which is None in a fresh
    state and a batch in any state saved after a step. This function builds
    the fresh state, puts ``batch`` where :meth:`Trainer.step` puts a batch
    (for those methods; the others keep None), and returns every leaf as a
    ``jax.ShapeDtypeStruct`` with the sharding of the live state: committed to
    the descent device, or on a mesh replicated (the batch split along its
    batch axis). The restored state then continues without a recompilation.

    It allocates nothing (the fresh state is traced with ``jax.eval_shape``),
    so ``params`` and ``model_state`` may be abstract: ``jax.ShapeDtypeStruct``
    leaves, e.g. from ``jax.eval_shape`` or Flax's ``nnx.eval_shape``.

    Args:
      trainer: the :class:`Trainer` that will continue from the checkpoint.
      params: parameters of the model's shapes and dtypes (a fresh
        initialisation, or its ``jax.ShapeDtypeStruct``), as for
        :meth:`Trainer.init`.
      model_state: the model's state, as for :meth:`Trainer.init`
        (required with ``has_state=True``).
      batch: a batch of the shapes the training loop feeds (any values; under
        ``jax.distributed``, this process's part, as :meth:`Trainer.step`
        takes it);
        required for AsyncSAM and SAMPa (paired), ignored for the other
        methods. To restore such a state saved before its first step, replace
        ``prev_batch`` of the result with None.

    Returns:
      A :class:`TrainerState` whose leaves are ``jax.ShapeDtypeStruct`` with
      shardings.

    Examples:
      >>> import tempfile, jax.numpy as jnp, numpy as np, optax, samx
      >>> import orbax.checkpoint as ocp
      >>> from samx.runtime import Trainer, abstract_state
      >>> def loss_fn(params, batch):
      ...     return jnp.mean((batch["x"] @ params - batch["y"]) ** 2)
      >>> batch = {"x": np.ones((8, 3), np.float32), "y": np.ones(8, np.float32)}
      >>> trainer = Trainer(samx.sampa(optax.sgd(0.1)), loss_fn)
      >>> state, _ = trainer.step(trainer.init(jnp.zeros(3)), batch)
      >>> path = tempfile.mkdtemp() + "/step1"
      >>> with ocp.StandardCheckpointer() as ckptr:
      ...     ckptr.save(path, state)
      ...     ckptr.wait_until_finished()
      ...     target = abstract_state(trainer, jnp.zeros(3), batch=batch)
      ...     restored = ckptr.restore(path, target)
      >>> int(restored.step), restored.prev_batch["x"].shape
      (1, (8, 3))

    References:
      Orbax, `Checkpointing PyTrees of arrays
      <https://orbax.readthedocs.io/en/latest/guides/checkpoint/checkpointing_pytrees.html>`_
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(
            "`abstract_state(trainer=...)` must be a `samx.runtime.Trainer`, got"
            f" {type(trainer).__name__}."
        )
    # The fresh state's shapes, without allocating it (params may be abstract).
    state = trainer._init(params, model_state, abstract=True)
    plan = trainer.plan(state.opt_state)
    prev_batch = None
    if plan.uses(_plan.PREVIOUS):
        if batch is None:
            raise ValueError(
                "`abstract_state(batch=...)` is required for"
                f" {plan.method}, whose state holds the previous batch: pass a"
                " batch of the shapes the training loop feeds."
            )
        fn = "samx.runtime.abstract_state"
        trainer._check_batch(fn, batch)
        # Placed as Trainer.step places it (this process's part of it, under
        # jax.distributed): one batch, allocated to read its global shape.
        prev_batch = jax.tree.map(_abstract, trainer._put_batch(fn, batch))
    state = _placed(state, trainer._state_place)
    return state._replace(prev_batch=prev_batch)


def _abstract(x: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _placed(tree: Any, place: Any) -> Any:
    """``tree``'s leaves as ``jax.ShapeDtypeStruct`` with the sharding ``place``."""
    if isinstance(place, jax.Device):
        place = jax.sharding.SingleDeviceSharding(place)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place), tree
    )
