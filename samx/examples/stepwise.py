"""Step-by-step training loops, fed host (NumPy) batches, one dispatch per step.

The main job's loop on a CPU (:func:`samx.examples.train.train_classifier`)
runs a whole epoch in one jitted ``lax.scan``, every gradient on one device.
On a machine with an accelerator the methods run step by step through
:class:`samx.runtime.Trainer` instead, so that AsyncSAM's ascent runs on the
host CPU beside the accelerator's descent, as it would in practice. This
module holds those loops, for the main job and the benchmarks:

- a :class:`Stepper` over the Trainer (:func:`trainer_stepper`) or over the
  pure transform's step in one jit (:func:`pure_stepper`), each naming where
  each gradient of a step runs (read from the transform's evaluation plan);
- :func:`fit`, which trains and times a stepper over the main job's batches;
- :func:`train_stepwise`, the main job's MLP through it.
"""

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from samx import _plan
from samx.examples import models
from samx.examples.data import Dataset
from samx.examples.train import (
    Method,
    RunResult,
    accuracy,
    base_optimizer,
    classification_loss,
    make_step,
)


class Gradient(NamedTuple):
    """Where one gradient evaluation of a step runs, and on what.

    Attributes:
      evaluation: ``"updates"`` or ``"grad_fn(., i)"`` (see
        :class:`samx.Evaluation`).
      batch: its batch role: ``"current"``, ``"previous"`` or ``"ascent"``.
      examples: the number of examples it sees.
      device: the device that runs it, e.g. ``"gpu:0"``.
    """

    evaluation: str
    batch: str
    examples: int
    device: str


class Stepper(NamedTuple):
    """A training loop's pieces, one call per step.

    Attributes:
      init: ``init(first_batch) -> state``.
      step: ``step(state, batch) -> state``; ``batch`` is a pytree of NumPy
        arrays; returns before the devices finish.
      params: ``params(state)``, the parameters.
      model_state: ``model_state(state)``, the model state (None without one).
      gradients: a :class:`Gradient` for each gradient of a step.
    """

    init: Callable[[Any], Any]
    step: Callable[[Any, Any], Any]
    params: Callable[[Any], Any]
    model_state: Callable[[Any], Any]
    gradients: tuple[Gradient, ...]


def device_name(device: jax.Device) -> str:
    """``"platform:id"``, e.g. ``"gpu:0"``."""
    return f"{device.platform}:{device.id}"


def plan_gradients(
    plan: _plan.EvaluationPlan,
    batch_size: int,
    ascent_batch_size: int | None,
    descent: Any,
    ascent: Any,
) -> tuple[Gradient, ...]:
    """A :class:`Gradient` for each evaluation of ``plan``, from its roles."""
    devices = {_plan.DESCENT_DEVICE: descent, _plan.ASCENT_DEVICE: ascent}
    return tuple(
        Gradient(
            "updates" if e.index is None else f"grad_fn(., {e.index})",
            e.batch,
            ascent_batch_size or batch_size if e.batch == _plan.ASCENT else batch_size,
            device_name(devices[e.device]),
        )
        for e in plan.evaluations
    )


def describe(gradients: tuple[Gradient, ...]) -> str:
    """One line: each gradient's batch role, examples and device."""
    return " + ".join(f"{g.batch}[{g.examples}]@{g.device}" for g in gradients)


def _plan_of(method: Method, tx: optax.GradientTransformation, params: Any):
    return method.plan(jax.eval_shape(tx.init, params))


def trainer_stepper(
    method: Method,
    tx: optax.GradientTransformation,
    loss: Callable[..., Any],
    params: Any,
    *,
    batch_size: int,
    model_state: Any = None,
    descent_device: Any = None,
    ascent_device: Any = None,
    sampa_vmap: bool | None = None,
) -> Stepper:
    """``method`` through :class:`samx.runtime.Trainer`.

    AsyncSAM's ascent batch is ``method.ascent_batch_size(batch_size)``; the
    pairing is the method's; ``method.fused`` asks for SAMPa's ``vmap``.
    ``ascent_device`` None is the plan's default placement (AsyncSAM's ascent
    on the host CPU). ``loss`` takes a model state when ``model_state`` is not
    None. Raises ValueError for a transform whose state samx does not
    recognise (``optax.contrib.sam``): use :func:`pure_stepper`.
    """
    from samx.runtime import Trainer

    if method.convention is not None:
        raise ValueError(
            f"{method.label} is not a samx transform: the Trainer finds the"
            " method in the state, so it cannot drive it; use pure_stepper."
        )
    plan = _plan_of(method, tx, params)
    ascent = method.ascent_batch_size(batch_size) if plan.uses(_plan.ASCENT) else None
    trainer = Trainer(
        tx,
        loss,
        descent_device=descent_device,
        ascent_device=ascent_device,
        ascent_batch_size=ascent,
        has_state=model_state is not None,
        sampa_vmap=True if method.fused else sampa_vmap,
        pairing=method.pairing,
    )
    return Stepper(
        init=lambda first: trainer.init(params, model_state),
        step=lambda state, batch: trainer.step(state, batch)[0],
        params=lambda state: state.params,
        model_state=lambda state: state.model_state,
        gradients=plan_gradients(
            plan,
            batch_size,
            ascent,
            trainer.descent_device,
            trainer.ascent_device_for(plan),
        ),
    )


def pure_stepper(
    method: Method,
    tx: optax.GradientTransformation,
    loss: Callable[[Any, Any], Any],
    params: Any,
    *,
    batch_size: int,
    device: Any = None,
) -> Stepper:
    """``method``'s pure step (:func:`samx.examples.train.make_step`) in one jit.

    Every gradient on ``device`` (default ``jax.devices()[0]``); each batch is
    put there with ``jax.device_put``, as the Trainer does. The state is the
    step's carry ``(params, opt_state, prev_batch)``.
    """
    device = jax.devices()[0] if device is None else device
    step_fn = jax.jit(make_step(method, loss, tx))
    plan = _plan_of(method, tx, params)
    return Stepper(
        init=lambda first: jax.device_put((params, tx.init(params), first), device),
        step=lambda carry, batch: step_fn(carry, jax.device_put(batch, device))[0],
        params=lambda carry: carry[0],
        model_state=lambda carry: None,
        gradients=plan_gradients(
            plan, batch_size, method.ascent_batch_size(batch_size), device, device
        ),
    )


def fit(
    stepper: Stepper,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    evaluate: Callable[[Any], Any],
    on_epoch: Callable[[], None] | None = None,
) -> tuple[Any, list[tuple[float, float]], float, int]:
    """Trains ``stepper`` on ``data``; the clock times the steps only.

    The batches are the main job's (:func:`samx.examples.train.train_classifier`
    with the same ``seed``): a permutation per epoch, cut into
    ``len(data.x_train) // batch_size`` batches, fed as NumPy arrays. Two
    steps and an evaluation on a throwaway state compile everything before the
    clock starts; each epoch ends with one wait for the devices.

    Args:
      stepper: the loop.
      data: a :class:`samx.examples.data.Dataset`.
      epochs: passes over the training set.
      batch_size: the batch size.
      seed: seeds the batch order.
      evaluate: ``evaluate(state) -> test accuracy`` (a scalar), after each
        epoch, off the clock.
      on_epoch: called after each epoch.

    Returns:
      ``(state, curve, seconds, steps)``: the final state, ``(seconds, test
      accuracy)`` after each epoch, the training wall time and the number of
      steps.
    """
    n = data.x_train.shape[0]
    per_epoch = n // batch_size
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(n) for _ in range(epochs)]
    first = {
        "x": data.x_train[orders[0][:batch_size]],
        "y": data.y_train[orders[0][:batch_size]],
    }
    warm = stepper.init(first)
    for _ in range(2):  # the first step and the ones after it
        warm = stepper.step(warm, first)
    jax.block_until_ready(evaluate(jax.block_until_ready(warm)))
    state = stepper.init(first)
    seconds, curve = 0.0, []
    for order in orders:
        idx = order[: per_epoch * batch_size].reshape(per_epoch, batch_size)
        xs, ys = data.x_train[idx], data.y_train[idx]
        start = time.perf_counter()
        for i in range(per_epoch):
            state = stepper.step(state, {"x": xs[i], "y": ys[i]})
        jax.block_until_ready(state)
        seconds += time.perf_counter() - start
        curve.append((seconds, float(evaluate(state))))
        if on_epoch is not None:
            on_epoch()
    return state, curve, seconds, epochs * per_epoch


def train_stepwise(
    method: Method,
    data: Dataset,
    *,
    seed: int,
    epochs: int,
    batch_size: int = 64,
    hidden: tuple[int, ...] = (128, 128),
    learning_rate: float = 0.01,
    host_ascent: bool = True,
    on_epoch: Callable[[], None] | None = None,
) -> RunResult:
    """The main job's MLP run, step by step through the Trainer.

    The same model, optimizer, initialisation and batches as
    :func:`samx.examples.train.train_classifier`; the descent on
    ``jax.devices()[0]``, AsyncSAM's ascent on the host CPU
    (``jax.devices("cpu")[0]``) unless ``host_ascent`` is False (then on the
    descent device, in one jit with the descent). ``optax.contrib.sam``, which
    the Trainer cannot drive, runs its pure step in one jit per batch.
    """
    steps = epochs * (data.x_train.shape[0] // batch_size)
    params = models.init_mlp(jax.random.key(seed), (data.x_train.shape[1], *hidden, 10))
    tx = method.wrap(base_optimizer(learning_rate, steps))
    device = jax.devices()[0]
    if method.convention is None:
        stepper = trainer_stepper(
            method,
            tx,
            classification_loss,
            params,
            batch_size=batch_size,
            descent_device=device,
            ascent_device=None if host_ascent else device,
        )
    else:
        stepper = pure_stepper(
            method, tx, classification_loss, params, batch_size=batch_size
        )
    x_test, y_test = jax.device_put((data.x_test, data.y_test), device)
    test_accuracy = jax.jit(accuracy)
    _, curve, seconds, steps = fit(
        stepper,
        data,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        evaluate=lambda state: test_accuracy(stepper.params(state), x_test, y_test),
        on_epoch=on_epoch,
    )
    return RunResult(
        method=method.name,
        seed=seed,
        test_accuracy=curve[-1][1],
        train_seconds=seconds,
        steps=steps,
        curve=curve,
    )
