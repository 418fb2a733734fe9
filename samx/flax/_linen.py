"""Flax linen: a TrainState with batch_stats, gradients and a train step."""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from flax import struct
from flax.core import unfreeze
from flax.training import train_state

from samx import _chain, _checks, _plan
from samx._nonfinite import all_finite
from samx.flax import _common
from samx.runtime import _watch


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` with a ``batch_stats`` field.

    As in the Flax ImageNet example. ``TrainState.create(apply_fn=...,
    params=..., tx=..., batch_stats=...)``; ``batch_stats`` defaults to ``{}``
    for a model without BatchNorm.

    Attributes:
      batch_stats: the model's ``"batch_stats"`` collection.
      prev_batch: the previous step's batch, which :func:`linen_train_step`
        keeps where the method evaluates a gradient on it (AsyncSAM and SAMPa,
        paired; see :func:`samx.evaluation_plan`); None before the first step
        and for the other methods. It is part of the state, so a checkpoint
        holds it: to restore a state saved after a step, build the target with
        ``.replace(prev_batch=batch)`` for a batch of the training shapes.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, samx, samx.flax
      >>> import flax.linen as nn
      >>> model = nn.BatchNorm(use_running_average=False)
      >>> variables = model.init(jax.random.key(0), jnp.ones((2, 3)))
      >>> state = samx.flax.TrainState.create(
      ...     apply_fn=model.apply, params=variables["params"],
      ...     batch_stats=variables["batch_stats"], tx=samx.sam(optax.sgd(0.1)))
      >>> print(state.batch_stats["mean"])
      [0. 0. 0.]

    References:
      The Flax ImageNet example, ``examples/imagenet/train.py`` in
      `google/flax <https://github.com/google/flax>`_.
    """

    batch_stats: Any = struct.field(default_factory=dict)
    prev_batch: Any = None

    @classmethod
    def create(cls, *, apply_fn: Any, params: Any, tx: Any, **kwargs: Any) -> Any:
        """``TrainState.create``, with ``tx`` and ``params`` checked first."""
        fn = "samx.flax.TrainState.create"
        _checks.check_base(fn, tx, "tx")
        if params is None:
            raise ValueError(
                f"`{fn}(params=...)` must be the model's parameters, a tree of"
                " arrays, got None."
            )
        _checks.require_params(fn, params, "create")
        state = super().create(apply_fn=apply_fn, params=params, tx=tx, **kwargs)
        _chain.warn_transforms_before(fn, state.opt_state)
        return state


def _check_state(fn: str, state: Any) -> None:
    missing = [
        name
        for name in ("tx", "params", "opt_state", "step")
        if not hasattr(state, name)
    ]
    if missing or not hasattr(state, "replace"):
        raise TypeError(
            f"`{fn}(state=...)` must be a flax `TrainState` (e.g."
            f" `samx.flax.TrainState`), got {type(state).__name__}."
        )


def apply_gradients(state: Any, grads: Any, **extra_args: Any) -> Any:
    r"""``state.apply_gradients(grads=grads)`` that forwards extra arguments.

    Flax's ``TrainState.apply_gradients`` calls ``tx.update(grads, opt_state,
    params)`` and has no way to pass ``grad_fn``; this one calls
    ``tx.update(grads, opt_state, params, **extra_args)``, then applies the
    updates and increments ``step``. Other fields (``batch_stats``) are left
    as they are: set them with ``.replace``.

    Args:
      state: a flax ``TrainState`` (or a subclass such as
        :class:`samx.flax.TrainState`).
      grads: the ``updates`` argument of ``tx.update``, like ``state.params``.
      **extra_args: passed to ``tx.update``, e.g. ``grad_fn=``.

    Returns:
      The new state.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, samx, samx.flax
      >>> def loss(params, x):
      ...     return jnp.sum((params["w"] - x) ** 2)
      >>> state = samx.flax.TrainState.create(
      ...     apply_fn=None, params={"w": jnp.zeros(2)},
      ...     tx=samx.sam(optax.sgd(0.1), rho=0.05))
      >>> x = jnp.ones(2)
      >>> state = samx.flax.apply_gradients(
      ...     state, jax.grad(loss)(state.params, x),
      ...     grad_fn=lambda p, i: jax.grad(loss)(p, x))
      >>> print(state.params["w"].round(2))
      [0.21 0.21]
      >>> int(state.step)
      1

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
    """
    fn = "samx.flax.apply_gradients"
    _check_state(fn, state)
    if isinstance(grads, Mapping) and train_state.OVERWRITE_WITH_GRADIENT in grads:
        raise NotImplementedError(
            f"{fn}: Flax's `{train_state.OVERWRITE_WITH_GRADIENT}` parameters are"
            " not supported; use `state.apply_gradients` for them."
        )
    _checks.check_like_params(fn, "`grads`", grads, state.params, "`state.params`")
    updates, opt_state = state.tx.update(
        grads, state.opt_state, state.params, **extra_args
    )
    return state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
    )


def linen_grads(
    loss_fn: Callable[..., Any],
    state: Any,
    batch: Any,
    *,
    has_aux: bool = False,
    prev_batch: Any = None,
    ascent_batch: Any = None,
    ascent_batch_size: int | None = None,
    pairing: str = "paired",
) -> tuple[Any, _common.DescentGradFn]:
    r"""The gradients and ``grad_fn`` that :func:`apply_gradients` needs (linen).

    ``loss_fn(params, batch_stats, batch)`` returns ``(loss, new_batch_stats)``
    (with ``has_aux``: ``(loss, (new_batch_stats, aux))``), where
    ``new_batch_stats`` is the ``"batch_stats"`` collection that
    ``apply(..., mutable=["batch_stats"])`` returns, as in the Flax ImageNet
    example. Returns ``(grads, grad_fn)`` for ``apply_gradients(state, grads,
    grad_fn=grad_fn)``, after which ``grad_fn.model_state`` holds the new
    ``batch_stats`` and ``grad_fn.loss`` the loss, both from the descent pass
    only. Which pass is which follows the method found in ``state.opt_state``
    as in :func:`samx.flax.nnx_grads`: the pass at ``grad_fn(_, 0)`` for SAM,
    AsyncSAM and SAMPa (on ``prev_batch`` for AsyncSAM and SAMPa, paired), the
    pass that produced
    ``grads`` for a plain optax transform. Every pass starts from
    ``state.batch_stats``; the other passes' statistics are dropped.

    Call this and :func:`apply_gradients` in the same trace (one ``jax.jit``).
    A wrapper that calls ``tx.update`` under ``lax.cond`` cannot carry the
    statistics out and raises a ``RuntimeError``; ``optax.MultiSteps`` and
    ``optax.apply_if_finite`` around a samx transform raise a ``ValueError``
    first, naming ``samx.microbatched`` and ``samx.skip_nonfinite``.

    Args:
      loss_fn: ``loss_fn(params, batch_stats, batch) -> (loss,
        new_batch_stats)``, the loss a scalar; or ``(loss, (new_batch_stats,
        aux))`` with ``has_aux``.
      state: a :class:`samx.flax.TrainState` (a flax ``TrainState`` with a
        ``batch_stats`` field).
      batch: a pytree of arrays with a leading batch axis.
      has_aux: whether ``loss_fn`` also returns ``aux``.
      prev_batch: AsyncSAM and SAMPa (paired): the previous step's batch, for
        ``grad_fn(_, 0)``; ``batch`` itself at the first step.
      ascent_batch: AsyncSAM only: a separate ascent batch.
      ascent_batch_size: AsyncSAM only: the first ``b'`` examples of ``batch``.
      pairing: ``"paired"`` (default) or ``"unpaired"``: whether AsyncSAM's
        and SAMPa's perturbed gradient sees the examples its perturbation came
        from, the previous batch (see :func:`samx.evaluation_plan`).

    Returns:
      ``(grads, grad_fn)``: ``grads`` like ``state.params`` (zeros for SAMPa)
      and a :class:`samx.flax.DescentGradFn`.

    Examples:
      >>> import jax.numpy as jnp, optax, samx, samx.flax
      >>> import flax.linen as nn
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(False)])
      >>> x, y = jnp.arange(6.0).reshape(2, 3), jnp.ones((2, 4))
      >>> variables = model.init(jax.random.key(0), x)
      >>> state = samx.flax.TrainState.create(
      ...     apply_fn=model.apply, params=variables["params"],
      ...     batch_stats=variables["batch_stats"],
      ...     tx=samx.sam(optax.sgd(0.1)))
      >>> def loss_fn(params, batch_stats, batch):
      ...     out, updates = model.apply(
      ...         {"params": params, "batch_stats": batch_stats}, batch["x"],
      ...         mutable=["batch_stats"])
      ...     return jnp.mean((out - batch["y"]) ** 2), updates["batch_stats"]
      >>> batch = {"x": x, "y": y}
      >>> grads, grad_fn = samx.flax.linen_grads(loss_fn, state, batch)
      >>> state = samx.flax.apply_gradients(state, grads, grad_fn=grad_fn)
      >>> state = state.replace(batch_stats=grad_fn.model_state)
      >>> print(f"{float(grad_fn.loss):.4f}")
      2.0713

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
    """
    return _grads(
        "samx.flax.linen_grads",
        loss_fn,
        state,
        batch,
        has_aux=has_aux,
        prev_batch=prev_batch,
        ascent_batch=ascent_batch,
        ascent_batch_size=ascent_batch_size,
        pairing=pairing,
    )


def _grads(
    fn: str,
    loss_fn: Callable[..., Any],
    state: Any,
    batch: Any,
    *,
    has_aux: bool,
    prev_batch: Any,
    ascent_batch: Any,
    ascent_batch_size: int | None,
    pairing: str,
) -> tuple[Any, _common.DescentGradFn]:
    """:func:`linen_grads`, its errors named after ``fn``, the function called."""
    _common.check_loss_fn(fn, loss_fn)
    _common.check_flag(fn, "has_aux", has_aux)
    _plan.check_pairing(fn, pairing)
    _check_state(fn, state)
    if not hasattr(state, "batch_stats"):
        raise TypeError(
            f"`{fn}(state=...)` needs a `batch_stats` field: use"
            " `samx.flax.TrainState` (with `batch_stats={}` for a model without"
            " BatchNorm)."
        )
    plan = _plan.evaluation_plan(state.opt_state, pairing=pairing)
    start_stats = state.batch_stats

    def pass_fn(params: Any, batch: Any) -> Any:
        out = loss_fn(params, start_stats, batch)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            want = "(loss, (new_batch_stats, aux))"
            if not has_aux:
                want = "(loss, new_batch_stats)"
            raise ValueError(
                f"{fn}: `loss_fn` must return `{want}`, got {_common.describe(out)}."
            )
        loss, rest = out
        if has_aux:
            if not (isinstance(rest, (tuple, list)) and len(rest) == 2):
                raise ValueError(
                    f"{fn}: with `has_aux=True`, `loss_fn` must return"
                    " `(loss, (new_batch_stats, aux))`."
                )
            new_stats, aux = rest
        else:
            new_stats, aux = rest, None
        _common.check_scalar_loss(fn, loss, has_aux)
        new_stats = _check_stats(fn, new_stats, start_stats)
        return loss, (aux, _common.finite_or(new_stats, start_stats))

    return _common.step_grads(
        fn,
        plan,
        pass_fn,
        state.params,
        batch,
        has_aux=has_aux,
        ascent_batch=ascent_batch,
        ascent_batch_size=ascent_batch_size,
        prev_batch=prev_batch,
        on_descent=None,
    )


def _check_stats(fn: str, new_stats: Any, stats: Any) -> Any:
    """Checks ``new_stats`` against ``stats``; returns it with their tree type."""
    if (
        isinstance(new_stats, Mapping)
        and "batch_stats" in new_stats
        and not (isinstance(stats, Mapping) and "batch_stats" in stats)
    ):
        raise ValueError(
            f"{fn}: `loss_fn` returned the whole mutable-collections dict; return"
            " its `['batch_stats']` entry as `new_batch_stats`."
        )
    _checks.check_like_params(
        fn,
        "the `new_batch_stats` returned by `loss_fn`",
        unfreeze(new_stats),
        unfreeze(stats),
        "`state.batch_stats`",
    )
    # The same tree type as the state's (dict or FrozenDict): no recompilation.
    return jax.tree.unflatten(jax.tree.structure(stats), jax.tree.leaves(new_stats))


def linen_train_step(
    state: Any,
    batch: Any,
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    prev_batch: Any = None,
    ascent_batch: Any = None,
    ascent_batch_size: int | None = None,
    pairing: str = "paired",
) -> tuple[Any, dict[str, Any]]:
    r"""One training step of a linen model with any samx or optax transform.

    :func:`linen_grads`, then :func:`apply_gradients`, then ``batch_stats``
    from the descent pass. ``grad_fn`` goes to ``tx.update`` only for the samx
    methods, so any optax transform works. Wrap it in ``jax.jit`` (with
    ``loss_fn`` static) or use :func:`make_linen_train_step`.

    **The previous batch.** AsyncSAM and SAMPa (paired) evaluate their descent
    pass on the previous step's batch. A :class:`samx.flax.TrainState` keeps
    it, in its ``prev_batch`` field (None before the first step, which uses
    ``batch`` itself): the batch travels with the state it belongs to. The
    first step turns None into a batch, so a jitted step traces twice; the
    step of :func:`make_linen_train_step` fills it before compiling. A state
    without that field needs ``prev_batch=`` at every step, which otherwise
    overrides the kept one for one step. A batch whose leading size differs
    from the kept one's raises a ``ValueError``: every batch of a run has one
    size, in every samx loop (drop or pad the last, smaller batch of an epoch;
    :doc:`/pairing`).

    Args:
      state: a :class:`samx.flax.TrainState`.
      batch: a pytree of arrays with a leading batch axis.
      loss_fn: ``loss_fn(params, batch_stats, batch) -> (loss,
        new_batch_stats)``; see :func:`linen_grads`.
      has_aux: whether ``loss_fn`` returns ``(loss, (new_batch_stats, aux))``.
      prev_batch: AsyncSAM and SAMPa (paired): the previous step's batch for
        this step, instead of ``state.prev_batch``.
      ascent_batch: AsyncSAM only: a separate ascent batch.
      ascent_batch_size: AsyncSAM only: the first ``b'`` examples of ``batch``.
      pairing: ``"paired"`` (default) or ``"unpaired"``: whether AsyncSAM's
        and SAMPa's perturbed gradient sees the examples its perturbation came
        from, the previous batch (see :func:`samx.evaluation_plan`).

    Returns:
      ``(state, metrics)``: the new state and ``{"loss": ...}`` with the descent
      pass's loss (and ``"aux"`` with ``has_aux``), left on the device.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, samx, samx.flax
      >>> import flax.linen as nn
      >>> model = nn.Dense(1)
      >>> batch = {"x": jnp.eye(4, 3), "y": jnp.ones((4, 1))}
      >>> state = samx.flax.TrainState.create(
      ...     apply_fn=model.apply,
      ...     params=model.init(jax.random.key(0), batch["x"])["params"],
      ...     tx=samx.sam(optax.sgd(0.1)))
      >>> def loss_fn(params, batch_stats, batch):
      ...     out = model.apply({"params": params}, batch["x"])
      ...     return jnp.mean((out - batch["y"]) ** 2), batch_stats
      >>> step = jax.jit(samx.flax.linen_train_step, static_argnames="loss_fn")
      >>> for _ in range(3):
      ...     state, metrics = step(state, batch, loss_fn)
      >>> print(f"{float(metrics['loss']):.4f}")
      0.9589

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
    """
    fn = "samx.flax.linen_train_step"
    _plan.check_pairing(fn, pairing)
    _check_state(fn, state)
    plan = _plan.evaluation_plan(state.opt_state, pairing=pairing)
    keeps = plan.uses(_plan.PREVIOUS) and hasattr(state, "prev_batch")
    if keeps and prev_batch is None:
        if state.prev_batch is None:
            prev_batch = batch
        else:  # the kept batch: one size per run
            size = _common.check_batch(fn, "batch", batch)
            _plan.check_batch_size(fn, size, _plan.leading_size(state.prev_batch))
            prev_batch = state.prev_batch
    grads, grad_fn = _grads(
        fn,
        loss_fn,
        state,
        batch,
        has_aux=has_aux,
        prev_batch=prev_batch,
        ascent_batch=ascent_batch,
        ascent_batch_size=ascent_batch_size,
        pairing=pairing,
    )
    if plan.grad_fn:
        state = apply_gradients(state, grads, grad_fn=grad_fn)
    else:  # a plain optax transform, which may not take extra arguments
        state = apply_gradients(state, grads)
    state = state.replace(batch_stats=grad_fn.model_state)
    if keeps:  # called eagerly: not the caller's buffer
        state = state.replace(prev_batch=_plan.owned(batch))
    metrics = {"loss": grad_fn.loss}
    if has_aux:
        metrics["aux"] = grad_fn.aux
    return state, metrics


def make_linen_train_step(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    ascent_batch_size: int | None = None,
    pairing: str = "paired",
    donate: bool = False,
) -> Callable[..., tuple[Any, dict[str, Any]]]:
    r"""A ``jax.jit``-compiled :func:`linen_train_step` for ``loss_fn``.

    Args:
      loss_fn: ``loss_fn(params, batch_stats, batch) -> (loss,
        new_batch_stats)``; see :func:`linen_grads`.
      has_aux: whether ``loss_fn`` returns ``(loss, (new_batch_stats, aux))``.
      ascent_batch_size: AsyncSAM only: the first ``b'`` examples of each batch
        are the ascent batch.
      pairing: ``"paired"`` (default) or ``"unpaired"``: whether AsyncSAM's
        and SAMPa's perturbed gradient sees the examples its perturbation came
        from, the previous batch (see :func:`samx.evaluation_plan`).
      donate: whether the step donates the ``state`` it is given to its
        jitted update (default False): the devices then hold one copy of the
        parameters and optimizer state, not two, and the given ``state`` is
        invalid after the step (its arrays are deleted, including the
        ``params`` it was created from); keep the one the step returns, and
        copy what you keep of an older one (``jax.tree.map(jnp.copy, ...)``).

    Returns:
      ``step(state, batch, prev_batch=None, ascent_batch=None) -> (state,
      metrics)``, compiled once (and once more per whether ``prev_batch`` /
      ``ascent_batch`` are given). Every ``batch`` must have the leading size
      of the first one it was given, for every method; another raises a
      ``ValueError``, as in every samx loop: drop or pad the last, smaller
      batch of an epoch (:doc:`/pairing`). For AsyncSAM and SAMPa (paired) a
      :class:`samx.flax.TrainState` keeps the previous batch, in
      ``state.prev_batch`` (see :func:`linen_train_step`): pass the current
      batch only. Besides that size, the step holds no state of its own.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, samx, samx.flax
      >>> import flax.linen as nn
      >>> model = nn.Dense(1)
      >>> batch = {"x": jnp.eye(4, 3), "y": jnp.ones((4, 1))}
      >>> state = samx.flax.TrainState.create(
      ...     apply_fn=model.apply,
      ...     params=model.init(jax.random.key(0), batch["x"])["params"],
      ...     tx=samx.sampa(optax.sgd(0.1)))
      >>> def loss_fn(params, batch_stats, batch):
      ...     out = model.apply({"params": params}, batch["x"])
      ...     return jnp.mean((out - batch["y"]) ** 2), batch_stats
      >>> step = samx.flax.make_linen_train_step(loss_fn)
      >>> for _ in range(3):  # grad_fn(_, 0): state.prev_batch
      ...     state, metrics = step(state, batch)
      >>> print(f"{float(metrics['loss']):.4f}")
      1.0982
      >>> state.prev_batch["x"].shape
      (4, 3)

    References:
      Xie, Pethick, Cevher, `SAMPa: Sharpness-aware Minimization Parallelized
      <https://arxiv.org/abs/2410.10683>`_, NeurIPS 2024
    """
    fn = "samx.flax.make_linen_train_step"
    _common.check_loss_fn(fn, loss_fn)
    _common.check_flag(fn, "has_aux", has_aux)
    _common.check_ascent_batch_size(fn, ascent_batch_size)
    _plan.check_pairing(fn, pairing)
    _common.check_flag(fn, "donate", donate)
    step = functools.partial(
        linen_train_step,
        loss_fn=loss_fn,
        has_aux=has_aux,
        ascent_batch_size=ascent_batch_size,
        pairing=pairing,
    )

    @functools.partial(jax.jit, donate_argnums=(0,) if donate else ())
    def jitted(
        state: Any, batch: Any, prev_batch: Any = None, ascent_batch: Any = None
    ) -> tuple[Any, dict[str, Any], jax.Array]:
        state, metrics = step(
            state, batch, prev_batch=prev_batch, ascent_batch=ascent_batch
        )
        return state, metrics, all_finite(state.params)

    watch = _watch.NonfiniteWatch()

    sizes: list = []  # the first batch's leading size and dtypes
    fn_step = "samx.flax.make_linen_train_step's step"

    def train_step(state: Any, batch: Any, *args, **kwargs) -> Any:
        # Named as the step's other errors are: the step is linen_train_step's.
        size = _common.check_batch("samx.flax.linen_train_step", "batch", batch)
        _plan.check_batch_size(
            "samx.flax.linen_train_step", size, sizes[0] if sizes else None
        )
        dtypes = _plan.batch_dtypes(batch)
        _plan.check_batch_dtypes(
            "samx.flax.linen_train_step", dtypes, sizes[1] if sizes else None
        )
        args, kwargs = _plan.owned((args, kwargs))  # the caller's buffers are free
        batch = _plan.owned(batch)
        state = _with_prev_batch(state, batch, pairing)
        state, metrics, finite = jitted(state, batch, *args, **kwargs)
        sizes[:] = [size, dtypes]
        watch.see(fn_step, finite, getattr(state, "opt_state", None))
        return state, metrics

    return train_step


def _with_prev_batch(state: Any, batch: Any, pairing: str) -> Any:
    """``state.replace(prev_batch=batch)`` before a first step that keeps one.

    Outside the jit, so that the step sees one tree structure and compiles
    once (``B_{-1} := B_0``).
    """
    if not (
        hasattr(state, "prev_batch")
        and state.prev_batch is None
        and hasattr(state, "opt_state")
        and hasattr(state, "replace")
    ):
        return state
    _common.check_batch("samx.flax.linen_train_step", "batch", batch)
    if _plan.evaluation_plan(state.opt_state, pairing=pairing).uses(_plan.PREVIOUS):
        # Its own arrays: the step may donate the state, not the batch.
        return state.replace(prev_batch=_common.own_copy(batch))
    return state
