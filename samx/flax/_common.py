"""What the NNX and linen helpers share: the passes of one step.

A *pass* is ``pass_fn(params, batch) -> (loss, (aux, new_model_state))``: the
loss at ``params`` on ``batch`` with the model state of the start of the step,
and the model state that the forward pass would leave behind. The helpers
build one ``pass_fn`` per step, then :func:`step_grads` runs the passes that
the method needs and keeps the new model state of the descent pass only.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from samx import _checks, _plan

PassFn = Callable[[Any, Any], tuple[jax.Array, tuple[Any, Any]]]

_MISSING = object()


def _trace_state() -> Any:
    """The current JAX trace, as Flax NNX compares it for Variable updates."""
    return jax.extend.core.get_opaque_trace_state(convention="nnx")


def check_loss_fn(fn: str, loss_fn: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(
            f"`{fn}(loss_fn=...)` must be callable, got {type(loss_fn).__name__}."
        )


check_flag = _checks.check_flag


def own_copy(batch: Any) -> Any:
    """A copy of ``batch`` on the device, sharing no buffer with it: what a
    state that a step donates may keep of a batch also passed to that step."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), batch)


def check_ascent_batch_size(fn: str, value: Any) -> None:
    """Checks a static ``ascent_batch_size``: None or an int ``>= 1``."""
    if value is not None and (not _checks.is_int(value) or value < 1):
        raise ValueError(
            f"`{fn}(ascent_batch_size=...)` must be an int >= 1 or None, got {value!r}."
        )


def describe(x: Any) -> str:
    """What ``x`` is, for an error message: ``tuple``, or an array's shape."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"an array of shape {tuple(x.shape)}"
    return type(x).__name__


check_batch = _plan.check_batch


def check_plan_args(
    fn: str,
    plan: _plan.EvaluationPlan,
    *,
    ascent_batch: Any,
    ascent_batch_size: Any,
    prev_batch: Any,
) -> None:
    """Checks that the optional batches fit the plan of the optimizer's method.

    The batches themselves are checked afterwards, and a missing ``prev_batch``
    last (:func:`require_prev_batch`).
    """
    if prev_batch is not None and not plan.uses(_plan.PREVIOUS):
        raise ValueError(
            f"`{fn}(prev_batch=...)` is the previous step's batch, but the"
            f" optimizer's transform ({plan.method!r}, pairing={plan.pairing!r})"
            " evaluates no gradient on it."
        )
    for name, value in (
        ("ascent_batch", ascent_batch),
        ("ascent_batch_size", ascent_batch_size),
    ):
        if value is not None and not plan.uses(_plan.ASCENT):
            raise ValueError(
                f"`{fn}({name}=...)` sets AsyncSAM's ascent batch, but the"
                f" optimizer's transform is {plan.method!r}, not samx.async_sam."
            )
    if ascent_batch is not None and ascent_batch_size is not None:
        raise ValueError(
            f"`{fn}`: pass `ascent_batch` or `ascent_batch_size`, not both."
        )


def require_prev_batch(fn: str, plan: _plan.EvaluationPlan, prev_batch: Any) -> None:
    """A clear error when the plan needs the previous batch and it is missing."""
    if prev_batch is None and plan.uses(_plan.PREVIOUS):
        raise ValueError(
            f"`{fn}(prev_batch=...)` is required: samx.{plan.method}"
            " (pairing='paired') evaluates its perturbed gradient on the"
            " previous step's batch, the examples its perturbation came from."
            " Pass the previous batch (the current batch itself at the first"
            " step), or pairing='unpaired' to use the current batch. The train"
            " steps keep it themselves: `samx.flax.nnx_train_step` on the"
            " `nnx.Optimizer`, `samx.flax.linen_train_step` in a"
            " `samx.flax.TrainState`."
        )


def check_ascent_subset(fn: str, size: int, ascent_batch_size: Any) -> None:
    """Checks ``ascent_batch_size`` against the batch size."""
    if ascent_batch_size is not None and (
        not _checks.is_int(ascent_batch_size) or not 1 <= ascent_batch_size <= size
    ):
        raise ValueError(
            f"`{fn}(ascent_batch_size=...)` must be an int in [1, {size}] (the"
            f" batch size), got {ascent_batch_size!r}."
        )


def split_output(fn: str, out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
    """``(loss, aux)`` from what ``loss_fn`` returned; checks the loss."""
    if has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError(
                f"{fn}: with `has_aux=True`, `loss_fn` must return a pair"
                f" `(loss, aux)`, got {describe(out)}."
            )
        loss, aux = out
    else:
        loss, aux = out, None
    check_scalar_loss(fn, loss, has_aux)
    return loss, aux


def check_scalar_loss(fn: str, loss: Any, has_aux: bool) -> None:
    if isinstance(loss, (tuple, list)):
        hint = "" if has_aux else " (did you mean `has_aux=True`?)"
        raise ValueError(
            f"{fn}: `loss_fn` must return a scalar loss, got a"
            f" {type(loss).__name__}{hint}."
        )
    shape = np.shape(loss)
    if shape != ():
        raise ValueError(
            f"{fn}: `loss_fn` must return a scalar loss, got an array of shape"
            f" {shape} (reduce it, e.g. with `.mean()`)."
        )
    if not jnp.issubdtype(jnp.result_type(loss), jnp.inexact):
        raise TypeError(
            f"{fn}: `loss_fn` must return a floating-point loss, got dtype"
            f" {jnp.result_type(loss)}."
        )


def finite_or(new_state: Any, old_state: Any) -> Any:
    """``new_state``, or ``old_state``'s floating leaves if any of them is not finite.

    One flag over all the floating-point leaves (BatchNorm statistics), selected
    with ``jnp.where``: a batch whose forward pass gives NaN or infinite
    statistics leaves them as they were, instead of poisoning every later step.
    Other leaves (RNG counts) take their new values.
    """
    floating = [
        x
        for x in jax.tree.leaves(new_state)
        if jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ]
    if not floating:
        return new_state
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floating]))

    def pick(new: Any, old: Any) -> Any:
        if jnp.issubdtype(jnp.result_type(new), jnp.floating):
            return jnp.where(ok, new, old)
        return new

    return jax.tree.map(pick, new_state, old_state)


class DescentGradFn:
    """``grad_fn(params, i)`` for samx transforms; keeps the descent pass's state.

    Made by :func:`samx.flax.nnx_grads` and :func:`samx.flax.linen_grads`; pass
    it to the optimizer as ``grad_fn=``. Each call returns the loss gradient at
    ``params`` on the batch of evaluation ``i`` in the method's evaluation plan
    (:func:`samx.evaluation_plan`: for AsyncSAM's and SAMPa's ``i = 0``, the
    previous batch; otherwise the current batch), always starting from the
    model state of the start of the step. Only the descent pass (``i = 0``)
    keeps what the forward pass did to the model state (BatchNorm statistics,
    RNG counts): it records it here, and the NNX helper also writes it into
    the model. For a plain optax transform, which makes no ``grad_fn`` call,
    the pass that produced ``grads`` is the descent pass and was recorded when
    this object was made.

    Attributes:
      value: the descent pass's ``loss_fn`` output, ``loss`` or ``(loss, aux)``
        as ``has_aux`` says; available once the optimizer has called
        ``grad_fn(_, 0)``.
      loss: the descent pass's loss.
      aux: the descent pass's auxiliary output (None without ``has_aux``).
      model_state: the model state after the descent pass (the NNX non-Param
        state as a pure ``nnx.State``, or linen's ``batch_stats``).
      method: the method found in the optimizer state: ``"sam"``,
        ``"async_sam"``, ``"sampa"`` or ``"plain"``.
      plan: its :class:`samx.EvaluationPlan`.
      ascent_fraction: AsyncSAM's ``b'/b``, which :func:`samx.async_sam`
        reads from its ``grad_fn`` (its perturbation radius depends on it);
        absent for the other methods.
    """

    def __init__(
        self,
        fn: str,
        plan: _plan.EvaluationPlan,
        pass_fn: PassFn,
        batches: dict[int | None, Any],
        has_aux: bool,
        on_descent: Callable[[Any], None] | None,
        update_args: dict[str, float] | None = None,
    ):
        self._fn = fn
        self.plan = plan
        self.method = plan.method
        self._pass_fn = pass_fn
        self._batches = batches
        self._has_aux = has_aux
        self._on_descent = on_descent
        self._trace = _trace_state()
        self._loss: Any = _MISSING
        self._aux: Any = None
        self._model_state: Any = _MISSING
        for name, value in (update_args or {}).items():
            setattr(self, name, value)

    def __call__(self, params: Any, i: int) -> Any:
        return self.evaluate(self.plan.grad_fn[i], params)

    def evaluate(self, evaluation: _plan.Evaluation, params: Any) -> Any:
        """The gradient of one evaluation of the plan; records the descent pass."""
        (loss, (aux, new_state)), grads = jax.value_and_grad(
            self._pass_fn, has_aux=True
        )(params, self._batches[evaluation.index])
        if evaluation.keeps_state:
            self.record(loss, aux, new_state)
        return grads

    def record(self, loss: Any, aux: Any, new_state: Any) -> None:
        """Keeps the descent pass's outputs (and hands the state to the model)."""
        if _trace_state() != self._trace:
            raise RuntimeError(
                f"{self._fn}: the optimizer called `grad_fn(_, 0)` (the descent"
                " pass) inside a JAX transform of its own, such as `lax.cond` in"
                " `optax.MultiSteps` or `optax.apply_if_finite`, so its new model"
                " state (e.g. BatchNorm statistics) cannot be carried out of it."
                " Such wrappers are not supported by the samx.flax helpers: use the"
                " samx transform directly (accumulate gradients in the loss"
                " instead), or write the step by hand with a pure `grad_fn`."
            )
        self._loss, self._aux, self._model_state = loss, aux, new_state
        if self._on_descent is not None:
            self._on_descent(new_state)

    def _require(self, name: str) -> None:
        if self._loss is _MISSING:
            raise RuntimeError(
                f"{self._fn}: `grad_fn.{name}` is the descent pass's and is"
                " available only after the optimizer has called `grad_fn(_, 0)`:"
                " read it after `optimizer.update(model, grads, grad_fn=grad_fn)`"
                " (NNX) or `samx.flax.apply_gradients(state, grads,"
                " grad_fn=grad_fn)` (linen)."
            )

    @property
    def loss(self) -> jax.Array:
        self._require("loss")
        return self._loss

    @property
    def aux(self) -> Any:
        self._require("aux")
        return self._aux

    @property
    def value(self) -> Any:
        self._require("value")
        return (self._loss, self._aux) if self._has_aux else self._loss

    @property
    def model_state(self) -> Any:
        self._require("model_state")
        return self._model_state


def step_grads(
    fn: str,
    plan: _plan.EvaluationPlan,
    pass_fn: PassFn,
    params: Any,
    batch: Any,
    *,
    has_aux: bool,
    ascent_batch: Any,
    ascent_batch_size: Any,
    prev_batch: Any,
    on_descent: Callable[[Any], None] | None,
) -> tuple[Any, DescentGradFn]:
    """Runs the passes before ``tx.update``; returns ``(updates, grad_fn)``.

    ``updates`` is what the method takes as its first argument: the gradient at
    ``params`` on the batch the plan gives it (AsyncSAM's ascent batch), or
    zeros where the method does not use it (SAMPa).
    """
    check_plan_args(
        fn,
        plan,
        ascent_batch=ascent_batch,
        ascent_batch_size=ascent_batch_size,
        prev_batch=prev_batch,
    )
    size = check_batch(fn, "batch", batch)
    if prev_batch is not None:
        check_batch(fn, "prev_batch", prev_batch)
    if ascent_batch is not None:
        check_batch(fn, "ascent_batch", ascent_batch)
    check_ascent_subset(fn, size, ascent_batch_size)
    require_prev_batch(fn, plan, prev_batch)
    batches = _plan.select_batches(
        plan,
        batch,
        prev_batch,
        ascent_batch_size=ascent_batch_size,
        ascent_batch=ascent_batch,
    )
    ascent_size = None if plan.updates is None else batches[plan.updates.index]
    update_args = _plan.update_args(
        plan, size, None if ascent_size is None else _plan.leading_size(ascent_size)
    )
    grad_fn = DescentGradFn(
        fn, plan, pass_fn, batches, has_aux, on_descent, update_args
    )
    if plan.updates is None:
        return jax.tree.map(jnp.zeros_like, params), grad_fn
    return grad_fn.evaluate(plan.updates, params), grad_fn
