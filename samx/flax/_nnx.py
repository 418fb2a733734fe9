"""Flax NNX: gradients and a train step for samx transforms and nnx.Optimizer."""

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from samx import _chain, _plan
from samx._nonfinite import all_finite
from samx.flax import _common
from samx.runtime import _watch


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def pure_loss(
    fn: str, loss_fn: Callable[..., Any], graphdef: Any, wrt: Any, has_aux: bool
) -> Callable[[nnx.State, nnx.State, Any], tuple[jax.Array, tuple[Any, nnx.State]]]:
    """``loss(params, rest, batch) -> (loss, (aux, new_rest))`` on pure states.

    Merges the pure parameter state and the pure rest (everything ``wrt`` does
    not select) with ``graphdef`` into a fresh model, calls ``loss_fn`` on it
    and splits off the rest it leaves behind (the start's if a floating leaf of
    it is not finite). The model is built from arrays inside the trace, so its
    Variables may be updated there (no ``TraceContextError``).
    """

    def loss(params: nnx.State, rest: nnx.State, batch: Any) -> Any:
        model = nnx.merge(graphdef, params, rest)
        value, aux = _common.split_output(fn, loss_fn(model, batch), has_aux)
        _, _, new_rest = nnx.split(model, wrt, ...)
        return value, (aux, _common.finite_or(nnx.as_pure(new_rest), rest))

    return loss


class PrevBatch(nnx.Variable):
    """The previous step's batch, kept as ``optimizer.prev_batch``."""


def _previous(
    fn: str, plan: _plan.EvaluationPlan, optimizer: Any, batch: Any, prev_batch: Any
) -> Any:
    """The batch for the plan's ``"previous"`` role: given, kept, or ``batch``.

    A kept batch must have ``batch``'s leading size (:func:`_plan.check_batch_size`).
    """
    if prev_batch is not None or not plan.uses(_plan.PREVIOUS):
        return prev_batch
    kept = getattr(optimizer, "prev_batch", None)
    if not isinstance(kept, PrevBatch):
        return batch
    size = _common.check_batch(fn, "batch", batch)
    _plan.check_batch_size(fn, size, _plan.leading_size(kept.get_value()))
    return kept.get_value()


def _keep(plan: _plan.EvaluationPlan, optimizer: Any, batch: Any) -> None:
    """Records ``batch`` on the optimizer as the next step's previous batch."""
    if not plan.uses(_plan.PREVIOUS):
        return
    kept = getattr(optimizer, "prev_batch", None)
    batch = _plan.owned(batch)  # called eagerly: not the caller's buffer
    if isinstance(kept, PrevBatch):
        kept.set_value(batch)
    else:
        optimizer.prev_batch = PrevBatch(batch)


def _opt_state_and_wrt(fn: str, optimizer: Any) -> tuple[Any, Any]:
    if isinstance(optimizer, nnx.Optimizer):
        return optimizer.opt_state, optimizer.wrt
    if optimizer is None or isinstance(optimizer, nnx.Module):
        raise TypeError(
            f"`{fn}(optimizer=...)` must be an `nnx.Optimizer` or an optimizer"
            f" state, got {'None' if optimizer is None else type(optimizer).__name__}."
        )
    if isinstance(optimizer, optax.GradientTransformation) or callable(
        getattr(optimizer, "update", None)
    ):
        raise TypeError(
            f"`{fn}(optimizer=...)` must be an `nnx.Optimizer` or an optimizer"
            f" state, got the transform {type(optimizer).__name__}: pass"
            " `nnx.Optimizer(model, tx, wrt=nnx.Param)` or `tx.init(params)`."
        )
    return optimizer, nnx.Param


def nnx_grads(
    loss_fn: Callable[..., Any],
    model: nnx.Module,
    optimizer: nnx.Optimizer | optax.OptState,
    batch: Any,
    *,
    has_aux: bool = False,
    prev_batch: Any = None,
    ascent_batch: Any = None,
    ascent_batch_size: int | None = None,
    pairing: str = "paired",
) -> tuple[nnx.State, _common.DescentGradFn]:
    r"""The gradients and ``grad_fn`` that ``optimizer.update`` needs, for NNX.

    Runs the passes that come before ``tx.update`` and returns
    ``(grads, grad_fn)`` for ``optimizer.update(model, grads,
    grad_fn=grad_fn)``. The method is found in the optimizer's state
    (:func:`samx.runtime.method_of`):

    - ``samx.sam``: ``grads`` at the current parameters on ``batch``;
      ``grad_fn(_, 0)`` on ``batch`` is the descent pass.
    - ``samx.async_sam``: ``grads`` on the ascent batch (``ascent_batch``, or
      the first ``ascent_batch_size`` examples of ``batch``, or ``batch``);
      ``grad_fn(_, 0)``, the descent pass, on ``prev_batch``: the previous
      step's batch, whose first examples gave the ascent gradient that
      perturbs it (paired).
    - ``samx.sampa``: ``grads`` is zeros (SAMPa does not use it);
      ``grad_fn(_, 0)``, the descent pass, runs on ``prev_batch`` (the
      previous step's batch, which gave the stored gradient, as in the
      official code) and ``grad_fn(_, 1)`` on ``batch``.
    - any other optax transform (``"plain"``): ``grads`` at the current
      parameters on ``batch``, which is the descent pass; ``grad_fn`` is not
      needed (pass it only to transforms that accept extra arguments).

    For AsyncSAM and SAMPa, ``prev_batch`` is required (``batch`` itself at the
    first step); with ``pairing="unpaired"`` the descent pass runs on ``batch``
    instead and ``prev_batch`` is not taken (:func:`samx.evaluation_plan`).

    **BatchNorm rule.** Every pass starts from the model state (everything
    that ``optimizer.wrt`` does not select: BatchNorm statistics, RNG counts)
    of the start of the step and runs in the same mode; only the descent pass
    keeps its new state. ``grad_fn(_, 0)`` writes it into ``model`` while the
    optimizer runs (for a plain transform this function writes it). The
    passes share the RNG state of the start of the step, so dropout masks are
    the same in all of them.

    ``grad_fn`` works on the pure parameter ``nnx.State`` that
    ``nnx.Optimizer.update`` passes to ``tx.update``; it merges it with the
    model's graph to call ``loss_fn`` (Flax issue #4545). Call this function
    and ``optimizer.update`` in the same trace (e.g. one ``nnx.jit``). A
    wrapper that calls ``tx.update`` under ``lax.cond`` cannot carry the
    descent state out and raises a ``RuntimeError``; ``optax.MultiSteps`` and
    ``optax.apply_if_finite`` around a samx transform raise a ``ValueError``
    first, naming ``samx.microbatched`` and ``samx.skip_nonfinite``.

    Args:
      loss_fn: ``loss_fn(model, batch) -> loss``, a scalar, or ``(loss, aux)``
        with ``has_aux``. It runs the model in training mode.
      model: the ``nnx.Module``.
      optimizer: the ``nnx.Optimizer`` (its ``wrt`` selects the parameters), or
        the optax state of the transform (then the parameters are the
        ``nnx.Param`` variables).
      batch: a pytree of arrays with a leading batch axis.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      prev_batch: AsyncSAM and SAMPa (paired): the previous step's batch, for
        ``grad_fn(_, 0)``.
      ascent_batch: AsyncSAM only: a separate ascent batch.
      ascent_batch_size: AsyncSAM only: take the first ``b'`` examples of
        ``batch`` as the ascent batch. Not with ``ascent_batch``.
      pairing: ``"paired"`` (default) or ``"unpaired"``: whether AsyncSAM's
        and SAMPa's perturbed gradient sees the examples its perturbation came
        from, the previous batch (see :func:`samx.evaluation_plan`).

    Returns:
      ``(grads, grad_fn)``: ``grads``, an ``nnx.State`` of the parameters like
      ``nnx.grad``'s, and a :class:`samx.flax.DescentGradFn`; after the update,
      ``grad_fn.loss`` (and ``grad_fn.aux``) hold the descent pass's loss.

    Examples:
      >>> import jax.numpy as jnp, optax, samx, samx.flax
      >>> from flax import nnx
      >>> model = nnx.Sequential(
      ...     nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
      ...     nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> optimizer = nnx.Optimizer(
      ...     model, samx.sam(optax.sgd(0.1)), wrt=nnx.Param)
      >>> def loss_fn(model, batch):
      ...     return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
      >>> batch = {"x": jnp.arange(6.0).reshape(2, 3), "y": jnp.ones((2, 4))}
      >>> grads, grad_fn = samx.flax.nnx_grads(loss_fn, model, optimizer, batch)
      >>> _ = optimizer.update(model, grads, grad_fn=grad_fn)
      >>> print(f"{float(grad_fn.loss):.4f}")
      2.0713
      >>> print(model.layers[1].mean[...].round(3))  # from the descent pass only
      [ 0.03  -0.037 -0.023 -0.024]

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021

      Flax issue `#4545 <https://github.com/google/flax/issues/4545>`_: the
      ``grad_fn`` of ``nnx.Optimizer.update`` receives the pure parameter state,
      not the model.
    """
    return _grads(
        "samx.flax.nnx_grads",
        loss_fn,
        model,
        optimizer,
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
    model: nnx.Module,
    optimizer: nnx.Optimizer | optax.OptState,
    batch: Any,
    *,
    has_aux: bool,
    prev_batch: Any,
    ascent_batch: Any,
    ascent_batch_size: int | None,
    pairing: str,
) -> tuple[nnx.State, _common.DescentGradFn]:
    """:func:`nnx_grads`, its errors named after ``fn``, the function called."""
    _common.check_loss_fn(fn, loss_fn)
    _common.check_flag(fn, "has_aux", has_aux)
    _plan.check_pairing(fn, pairing)
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"`{fn}(model=...)` must be an `nnx.Module`, got {type(model).__name__}."
        )
    opt_state, wrt = _opt_state_and_wrt(fn, optimizer)
    _chain.warn_transforms_before(fn, opt_state)  # at trace time, once
    plan = _plan.evaluation_plan(opt_state, pairing=pairing)
    graphdef, wrt_state, rest = nnx.split(model, wrt, ...)
    start_rest = nnx.as_pure(rest)
    pure = pure_loss(fn, loss_fn, graphdef, wrt, has_aux)

    def pass_fn(params: nnx.State, batch: Any) -> Any:
        return pure(params, start_rest, batch)

    def on_descent(new_rest: nnx.State) -> None:
        nnx.update(model, new_rest)

    pure_grads, grad_fn = _common.step_grads(
        fn,
        plan,
        pass_fn,
        nnx.as_pure(wrt_state),
        batch,
        has_aux=has_aux,
        ascent_batch=ascent_batch,
        ascent_batch_size=ascent_batch_size,
        prev_batch=prev_batch,
        on_descent=on_descent,
    )
    grads = jax.tree.map(
        lambda v, g: v.replace(g), wrt_state, pure_grads, is_leaf=_is_variable
    )
    return grads, grad_fn


def nnx_train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    batch: Any,
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    prev_batch: Any = None,
    ascent_batch: Any = None,
    ascent_batch_size: int | None = None,
    pairing: str = "paired",
) -> dict[str, Any]:
    r"""One training step of an NNX model with any samx or optax transform.

    :func:`nnx_grads` then ``optimizer.update``: the model's parameters and
    optimizer state are updated in place, and its other state (BatchNorm
    statistics, RNG counts) is the descent pass's. Wrap it in ``nnx.jit`` (or
    use :func:`make_nnx_train_step`); ``grad_fn`` is passed to the optimizer
    only for the samx methods, so any optax transform works.

    **The previous batch.** AsyncSAM and SAMPa (paired) evaluate their descent
    pass on the previous step's batch. The step keeps it on the optimizer it
    updates, as ``optimizer.prev_batch`` (an ``nnx.Variable``, absent before
    the first step, which uses ``batch`` itself): the batch belongs to that
    optimizer's run, so a copy made with ``nnx.clone`` (e.g. to compile before
    a timed run) keeps its own, and ``nnx.state(optimizer)`` checkpoints it
    (``nnx.state(optimizer, nnx.OptState)`` leaves it out; a target to restore
    it into needs ``optimizer.prev_batch`` too, as after one step). Its first
    call adds the variable, so a jitted step traces twice; the step of
    :func:`make_nnx_train_step` adds it before compiling. ``prev_batch=``
    overrides it for one step. A batch whose leading size differs from the
    kept one's raises a ``ValueError``: every batch of a run has one size, in
    every samx loop (drop or pad the last, smaller batch of an epoch;
    :doc:`/pairing`).

    Args:
      model: the ``nnx.Module``.
      optimizer: its ``nnx.Optimizer``.
      batch: a pytree of arrays with a leading batch axis.
      loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, aux)``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      prev_batch: AsyncSAM and SAMPa (paired): the previous step's batch for
        this step, instead of the one the optimizer keeps.
      ascent_batch: AsyncSAM only: a separate ascent batch.
      ascent_batch_size: AsyncSAM only: the first ``b'`` examples of ``batch``.
      pairing: ``"paired"`` (default) or ``"unpaired"``: whether AsyncSAM's
        and SAMPa's perturbed gradient sees the examples its perturbation came
        from, the previous batch (see :func:`samx.evaluation_plan`).

    Returns:
      A dict ``{"loss": ...}`` with the descent pass's loss (and ``"aux"`` with
      ``has_aux``), left on the device.

    Examples:
      >>> import jax.numpy as jnp, optax, samx, samx.flax
      >>> from flax import nnx
      >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(
      ...     model, samx.async_sam(optax.sgd(0.1)), wrt=nnx.Param)
      >>> def loss_fn(model, batch):
      ...     return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
      >>> batch = {"x": jnp.eye(4, 3), "y": jnp.ones((4, 1))}
      >>> step = nnx.jit(samx.flax.nnx_train_step, static_argnames=(
      ...     "loss_fn", "ascent_batch_size"))
      >>> for _ in range(3):  # the descent pass: the batch the optimizer kept
      ...     metrics = step(model, optimizer, batch, loss_fn, ascent_batch_size=2)
      >>> print(f"{float(metrics['loss']):.4f}")
      0.6554
      >>> optimizer.prev_batch.get_value()["x"].shape
      (4, 3)

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021

      Flax issue `#4545 <https://github.com/google/flax/issues/4545>`_
    """
    fn = "samx.flax.nnx_train_step"
    if not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(
            f"`{fn}(optimizer=...)` must be an `nnx.Optimizer`, got"
            f" {type(optimizer).__name__}; with a bare optax state, use"
            " `samx.flax.nnx_grads`."
        )
    _plan.check_pairing(fn, pairing)
    plan = _plan.evaluation_plan(optimizer.opt_state, pairing=pairing)
    grads, grad_fn = _grads(
        fn,
        loss_fn,
        model,
        optimizer,
        batch,
        has_aux=has_aux,
        prev_batch=_previous(fn, plan, optimizer, batch, prev_batch),
        ascent_batch=ascent_batch,
        ascent_batch_size=ascent_batch_size,
        pairing=pairing,
    )
    extra = {"grad_fn": grad_fn} if plan.grad_fn else {}
    if isinstance(optimizer, nnx.ModelAndOptimizer):  # deprecated: holds the model
        optimizer.update(grads, **extra)
    else:
        optimizer.update(model, grads, **extra)
    _keep(plan, optimizer, batch)
    metrics = {"loss": grad_fn.loss}
    if has_aux:
        metrics["aux"] = grad_fn.aux
    return metrics


def make_nnx_train_step(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    ascent_batch_size: int | None = None,
    pairing: str = "paired",
    donate: bool = False,
) -> Callable[..., dict[str, Any]]:
    r"""An ``nnx.jit``-compiled :func:`nnx_train_step` for ``loss_fn``.

    Args:
      loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, aux)``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      ascent_batch_size: AsyncSAM only: the first ``b'`` examples of each batch
        are the ascent batch.
      pairing: ``"paired"`` (default) or ``"unpaired"``: whether AsyncSAM's
        and SAMPa's perturbed gradient sees the examples its perturbation came
        from, the previous batch (see :func:`samx.evaluation_plan`).
      donate: whether the step donates the model's and the optimizer's
        arrays to its jitted update (default False): the devices then hold
        one copy of the parameters and optimizer state, not two, as
        :class:`samx.flax.Trainer` does by default. The model and optimizer
        are updated in place, but any other holder of their arrays loses
        them at the first step: ``nnx.clone`` copies share the arrays (so do
        not compile the step on clones with ``donate=True``), as do states
        taken out with ``nnx.state(model)`` and kept aside. Hence opt-in.

    Returns:
      ``step(model, optimizer, batch, prev_batch=None, ascent_batch=None) ->
      metrics``, compiled once (and once more per whether ``prev_batch`` /
      ``ascent_batch`` are given). Every ``batch`` must have the leading size
      of the first one it was given, for every method; another raises a
      ``ValueError``, as in every samx loop: drop or pad the last, smaller
      batch of an epoch (:doc:`/pairing`). For AsyncSAM and SAMPa (paired) the
      optimizer keeps the previous batch, as ``optimizer.prev_batch`` (see
      :func:`nnx_train_step`): pass the current batch only. Besides that
      size, the step holds no state of its own, so it may be compiled on
      copies of the model and optimizer (``nnx.clone``) before the real run.

    Examples:
      >>> import jax.numpy as jnp, optax, samx, samx.flax
      >>> from flax import nnx
      >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(
      ...     model, samx.sampa(optax.sgd(0.1)), wrt=nnx.Param)
      >>> step = samx.flax.make_nnx_train_step(
      ...     lambda model, b: jnp.mean((model(b["x"]) - b["y"]) ** 2))
      >>> batches = [{"x": jnp.eye(4, 3), "y": y * jnp.ones((4, 1))}
      ...            for y in (1.0, 2.0, 1.0)]
      >>> for batch in batches:  # grad_fn(_, 0): the previous batch, kept
      ...     metrics = step(model, optimizer, batch)
      >>> print(f"{float(metrics['loss']):.4f}")
      3.0410

    References:
      Xie, Pethick, Cevher, `SAMPa: Sharpness-aware Minimization Parallelized
      <https://arxiv.org/abs/2410.10683>`_, NeurIPS 2024
    """
    fn = "samx.flax.make_nnx_train_step"
    _common.check_loss_fn(fn, loss_fn)
    _common.check_flag(fn, "has_aux", has_aux)
    _common.check_ascent_batch_size(fn, ascent_batch_size)
    _plan.check_pairing(fn, pairing)
    _common.check_flag(fn, "donate", donate)

    @nnx.jit(donate_argnums=(0, 1) if donate else None)
    def jitted(
        model: nnx.Module,
        optimizer: nnx.Optimizer,
        batch: Any,
        prev_batch: Any = None,
        ascent_batch: Any = None,
    ) -> tuple[dict[str, Any], jax.Array]:
        metrics = nnx_train_step(
            model,
            optimizer,
            batch,
            loss_fn,
            has_aux=has_aux,
            prev_batch=prev_batch,
            ascent_batch=ascent_batch,
            ascent_batch_size=ascent_batch_size,
            pairing=pairing,
        )
        return metrics, all_finite(nnx.state(model, nnx.Param))

    watch = _watch.NonfiniteWatch()

    sizes: list = []  # the first batch's leading size and dtypes
    fn_step = "samx.flax.make_nnx_train_step's step"

    def step(model: Any, optimizer: Any, batch: Any, *args, **kwargs) -> Any:
        # Named as the step's other errors are: the step is nnx_train_step's.
        size = _common.check_batch("samx.flax.nnx_train_step", "batch", batch)
        _plan.check_batch_size(
            "samx.flax.nnx_train_step", size, sizes[0] if sizes else None
        )
        dtypes = _plan.batch_dtypes(batch)
        _plan.check_batch_dtypes(
            "samx.flax.nnx_train_step", dtypes, sizes[1] if sizes else None
        )
        args, kwargs = _plan.owned((args, kwargs))  # the caller's buffers are free
        batch = _plan.owned(batch)
        _add_prev_batch(optimizer, batch, pairing)
        metrics, finite = jitted(model, optimizer, batch, *args, **kwargs)
        sizes[:] = [size, dtypes]
        watch.see(fn_step, finite, getattr(optimizer, "opt_state", None))
        return metrics

    return step


def _add_prev_batch(optimizer: Any, batch: Any, pairing: str) -> None:
    """``optimizer.prev_batch = batch`` before a first step that keeps one.

    Outside the jit, so that the step sees one graph structure and compiles
    once (``B_{-1} := B_0``).
    """
    if not isinstance(optimizer, nnx.Optimizer) or isinstance(
        getattr(optimizer, "prev_batch", None), PrevBatch
    ):
        return
    _common.check_batch("samx.flax.nnx_train_step", "batch", batch)
    if _plan.evaluation_plan(optimizer.opt_state, pairing=pairing).uses(_plan.PREVIOUS):
        # Its own arrays: the step may donate the optimizer, not the batch.
        optimizer.prev_batch = PrevBatch(_common.own_copy(batch))
