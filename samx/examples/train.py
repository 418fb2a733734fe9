"""Methods, jitted train steps and a training loop shared by the CLI and benchmarks.

A :class:`Method` is a transform and the options of its loop; which batch
each of its gradients sees comes from the transform's evaluation plan
(:func:`samx.evaluation_plan`), the same rules the runtime and the Flax
helpers follow. A train step carries ``(params, opt_state, prev_batch)``:
AsyncSAM and SAMPa evaluate their perturbed gradient on the previous step's
batch (the current one at the first step).
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import samx
from samx import _plan
from samx.examples import models

Loss = Callable[[Any, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class Method:
    """An optimizer of the comparison.

    Attributes:
      name: the key used on the command line.
      label: a human-readable name.
      wrap: builds the transform from the base optimizer.
      sequential_grads: gradients that must run one after the other per step,
        given a device for each gradient (AsyncSAM's and SAMPa's two
        gradients are independent; on one device they still take turns).
      ascent_fraction: AsyncSAM's ascent batch as a fraction of the batch.
      pairing: ``"paired"`` or ``"unpaired"`` (:func:`samx.evaluation_plan`).
      fused: compute the independent gradients of a step (SAMPa's) in one
        ``vmap``-ed call.
      convention: the plan's method for a transform samx does not recognise
        from its state (``"sam"`` for ``optax.contrib.sam`` in opaque mode).
      ascent_subset: SAM whose ascent (``updates``) sees only the first ``b'``
        examples (``ascent_fraction``) and whose descent sees all ``b``: a
        comparator without staleness (``benchmarks/frontier.py``).
      every: SAM's step every ``every``-th step (from step 0), a plain step of
        its base in between: a comparator (``benchmarks/frontier.py``).
    """

    name: str
    label: str
    wrap: Callable[[optax.GradientTransformation], optax.GradientTransformation]
    sequential_grads: int
    ascent_fraction: float = 1.0
    pairing: str = "paired"
    fused: bool = False
    convention: str | None = None
    ascent_subset: bool = False
    every: int = 1

    def plan(self, opt_state: Any) -> _plan.EvaluationPlan:
        """The evaluation plan of this method's transform."""
        return samx.evaluation_plan(
            opt_state, pairing=self.pairing, method=self.convention
        )

    def ascent_batch_size(self, batch_size: int) -> int:
        """AsyncSAM's ascent batch ``b'`` for a batch of ``batch_size``."""
        return max(1, int(batch_size * self.ascent_fraction))


# Radii for the main job (MLP on digits, lr 0.01, 60 epochs, 40% label noise),
# picked by a sweep over 3 seeds: SAM rho in {0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 1.0}
# gave 0.80 to 0.91 test accuracy up to 0.6 and collapsed at 1.0; 0.3 stays well
# inside the stable range, and AsyncSAM and SAMPa use it too. ASAM rho in
# {1, 2}: 2.
SAM_RHO = 0.3
ASAM_RHO = 2.0
SAMPA_LAM = 0.2


def _optax_sam(base, rho):
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    return optax.contrib.sam(base, adversary, sync_period=2, opaque_mode=True)


def _async_sam(base):
    return samx.async_sam(base, rho=SAM_RHO)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("sgd", "SGD", lambda base: base, 1),
        Method(
            "optax_sam",
            "optax.contrib.sam",
            lambda base: _optax_sam(base, SAM_RHO),
            2,
            convention="sam",
        ),
        Method("sam", "SAM", lambda base: samx.sam(base, rho=SAM_RHO), 2),
        Method(
            "asam",
            "ASAM",
            lambda base: samx.sam(base, rho=ASAM_RHO, adaptive=True),
            2,
        ),
        Method("async_sam", "AsyncSAM (b/4)", _async_sam, 1, ascent_fraction=0.25),
        Method("async_sam_b", "AsyncSAM (b)", _async_sam, 1),
        Method(
            "sampa0",
            "SAMPa-0",
            lambda base: samx.sampa(base, rho=SAM_RHO, lam=0.0),
            1,
        ),
        Method(
            "sampa",
            f"SAMPa-{SAMPA_LAM}",
            lambda base: samx.sampa(base, rho=SAM_RHO, lam=SAMPA_LAM),
            1,
        ),
    ]
}

# Not in the main job's comparison: AsyncSAM with the ascent of the previous
# batch perturbing the descent on the current one (the paper's literal
# reading; benchmarks/accuracy.py), AsyncSAM with the paper's radius at b/4
# (benchmarks/accuracy.py), and SAMPa's gradients in one vmap-ed call (the
# same trajectory as "sampa"; benchmarks/step_time.py).
VARIANTS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "async_sam_unpaired",
            "AsyncSAM (b/4), unpaired",
            _async_sam,
            1,
            ascent_fraction=0.25,
            pairing="unpaired",
        ),
        Method(
            "async_sam_unscaled",
            "AsyncSAM (b/4), rho unscaled",
            lambda base: samx.async_sam(base, rho=SAM_RHO, rho_scaling="none"),
            1,
            ascent_fraction=0.25,
        ),
        Method(
            "async_sam_b_unpaired",
            "AsyncSAM (b), unpaired",
            _async_sam,
            1,
            pairing="unpaired",
        ),
        Method(
            "sampa_fused",
            f"SAMPa-{SAMPA_LAM} (vmap)",
            lambda base: samx.sampa(base, rho=SAM_RHO, lam=SAMPA_LAM),
            1,
            fused=True,
        ),
    ]
}


# Every method by name: the comparison's and the variants.
ALL: dict[str, Method] = {**METHODS, **VARIANTS}


def base_optimizer(
    learning_rate: float, total_steps: int, weight_decay: float = 5e-4
) -> optax.GradientTransformation:
    """SGD with momentum 0.9, coupled weight decay and a cosine schedule."""
    schedule = optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(schedule, momentum=0.9),
    )


def make_step(method: Method, loss: Loss, tx: optax.GradientTransformation):
    """The train step ``(params, opt_state, prev_batch), batch -> (carry, None)``.

    It computes exactly the gradients the method's plan asks for, each on the
    batch the plan gives it, and nothing more (no extra forward pass for a
    loss value), so that step times compare the methods' own costs. Not
    jitted: jit it, or scan it over batches.
    """
    grad = jax.grad(loss)

    def step(carry, batch):
        plan = method.plan(carry[1])
        if method.every > 1:
            return _every(plan, method.every, full_step, plain_step)(carry, batch)
        return full_step(carry, batch)

    def plain_step(carry, batch):
        """A step of the base alone: SAM fed the gradient at ``params`` twice."""
        params, opt_state, _ = carry
        g = grad(params, batch)
        updates, opt_state = tx.update(g, opt_state, params, grad_fn=lambda p, i: g)
        return (optax.apply_updates(params, updates), opt_state, batch), None

    def full_step(carry, batch):
        params, opt_state, prev_batch = carry
        plan = method.plan(opt_state)
        size = jax.tree.leaves(batch)[0].shape[0]
        ascent = method.ascent_batch_size(size)
        batches = _plan.select_batches(
            plan, batch, prev_batch, ascent_batch_size=ascent
        )
        if method.ascent_subset:
            batches[None] = _plan.ascent_subset(batch, ascent)
        if method.fused:  # the independent gradients in one vmap-ed call
            points = _plan.evaluation_points(plan, tx, params, opt_state)
            grads = _plan.stacked_call(grad, points, batches)

            def gradient(e, point):
                return grads[e.index]
        else:

            def gradient(e, point):
                return grad(point, batches[e.index])

        updates, opt_state = _plan.plan_update(
            plan,
            tx,
            params,
            opt_state,
            gradient,
            **_plan.update_args(plan, size, ascent),
        )
        params = optax.apply_updates(params, updates)
        return (params, opt_state, batch), None

    return step


def _every(plan, every, full_step, plain_step):
    """``full_step`` at the steps ``count % every == 0``, else ``plain_step``."""
    if plan.method != "sam":
        raise ValueError(f"`Method(every=...)` is for samx.sam, got {plan.method!r}.")

    def step(carry, batch):
        count = carry[1].count  # SAMState's, before this step
        return jax.lax.cond(count % every == 0, full_step, plain_step, carry, batch)

    return step


def classification_loss(params, batch, apply=models.mlp):
    """Cross-entropy of ``apply`` (the MLP) on ``batch = {"x": ..., "y": ...}``."""
    return models.cross_entropy(apply(params, batch["x"]), batch["y"])


def accuracy(params, x, y) -> jax.Array:
    return jnp.mean(jnp.argmax(models.mlp(params, x), axis=-1) == y)


@dataclasses.dataclass
class RunResult:
    """What one training run measured.

    Attributes:
      method: the method's name.
      seed: the seed.
      test_accuracy: the final test accuracy.
      train_seconds: wall time of the training steps (compilation excluded).
      steps: the number of steps.
      curve: (seconds, test accuracy) after each epoch.
    """

    method: str
    seed: int
    test_accuracy: float
    train_seconds: float
    steps: int
    curve: list[tuple[float, float]]


class CompiledRun(NamedTuple):
    """A training run, compiled and not started (:func:`compile_run`).

    Attributes:
      carry: ``(params, opt_state, prev_batch)`` before the first step.
      run_epoch: ``run_epoch(carry, order) -> (carry, None)``, one epoch: a
        compiled ``lax.scan`` over the batches of the permutation ``order``.
      evaluate: ``evaluate(params) -> test accuracy``, compiled.
      orders: one permutation of the training examples per epoch.
      steps_per_epoch: the number of steps of an epoch.
    """

    carry: Any
    run_epoch: Callable[[Any, Any], Any]
    evaluate: Callable[[Any], jax.Array]
    orders: list[np.ndarray]
    steps_per_epoch: int


def compile_run(
    method: Method,
    data,
    *,
    seed: int,
    epochs: int,
    batch_size: int = 64,
    hidden: tuple[int, ...] = (128, 128),
    learning_rate: float = 0.01,
) -> CompiledRun:
    """The MLP on ``data`` (a :class:`samx.examples.data.Dataset`), compiled.

    Every method sees the same initialisation and batch order for a seed; the
    number of classes is read from the labels. An epoch is ``n // batch_size``
    batches: the last ``n % batch_size`` examples of its order are dropped, so
    that every batch has one size, as every samx loop requires.
    """
    n = data.x_train.shape[0]
    steps_per_epoch = n // batch_size
    classes = int(max(data.y_train.max(), data.y_test.max())) + 1
    key = jax.random.key(seed)
    params = models.init_mlp(key, (data.x_train.shape[1], *hidden, classes))
    tx = method.wrap(base_optimizer(learning_rate, epochs * steps_per_epoch))
    step = make_step(method, classification_loss, tx)
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    def epoch(carry, order):
        idx = order[: steps_per_epoch * batch_size].reshape(steps_per_epoch, -1)
        batches = {"x": x_train[idx], "y": y_train[idx]}
        return jax.lax.scan(step, carry, batches)

    rng = np.random.default_rng(seed)
    orders = [rng.permutation(n) for _ in range(epochs)]
    first = {"x": x_train[orders[0][:batch_size]], "y": y_train[orders[0][:batch_size]]}
    carry = (params, tx.init(params), first)
    run_epoch = jax.jit(epoch).lower(carry, orders[0]).compile()
    test_accuracy = jax.jit(accuracy).lower(params, x_test, y_test).compile()
    return CompiledRun(
        carry=carry,
        run_epoch=run_epoch,
        evaluate=lambda p: test_accuracy(p, x_test, y_test),
        orders=orders,
        steps_per_epoch=steps_per_epoch,
    )


def train_classifier(
    method: Method,
    data,
    *,
    on_epoch: Callable[[], None] | None = None,
    **settings: Any,
) -> RunResult:
    """Trains the MLP on ``data`` (a :class:`samx.examples.data.Dataset`).

    Every method sees the same initialisation and batch order for a seed. An
    epoch is one jitted ``lax.scan`` over its batches; it is compiled before
    the clock starts. ``settings`` are :func:`compile_run`'s keyword
    arguments (``seed`` and ``epochs``, then ``batch_size``, ``hidden`` and
    ``learning_rate``); ``on_epoch()`` is called after each epoch.
    """
    run = compile_run(method, data, **settings)
    return train_compiled(method.name, settings["seed"], run, on_epoch=on_epoch)


def train_compiled(
    name: str,
    seed: int,
    run: CompiledRun,
    on_epoch: Callable[[], None] | None = None,
) -> RunResult:
    """Trains a :func:`compile_run` run from its start, every epoch timed."""
    carry, seconds, curve = run.carry, 0.0, []
    for order in run.orders:
        start = time.perf_counter()
        carry, _ = run.run_epoch(carry, order)
        jax.block_until_ready(carry)
        seconds += time.perf_counter() - start
        curve.append((seconds, float(run.evaluate(carry[0]))))
        if on_epoch is not None:
            on_epoch()
    return RunResult(
        method=name,
        seed=seed,
        test_accuracy=curve[-1][1],
        train_seconds=seconds,
        steps=len(run.orders) * run.steps_per_epoch,
        curve=curve,
    )
