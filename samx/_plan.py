"""The evaluation plan: which batch each gradient of a step sees, and where.

A samx step evaluates the loss gradient once or twice. Which examples each
evaluation sees, which device role runs it and whose model state is kept are
the loop's business, not the transform's, and they matter as much as the
update rule: a perturbation computed from other examples than the loss it
perturbs loses most of SAM's gain. This module is the one place where those
rules are written. The Trainer, the Flax helpers and the example loops read
them from here::

  plan = evaluation_plan(opt_state)                 # the method, from the state
  batches = select_batches(plan, batch, prev_batch, ascent_batch_size=b_)
  updates, opt_state = plan_update(
      plan, tx, params, opt_state, lambda ev, p: grad(p, batches[ev.index]))

With ``pairing="paired"`` (the default) every perturbation is computed on the
examples of the descent it perturbs:

============  ========================  ===============================
method        ``updates`` (at ``x_t``)  ``grad_fn(., i)``
============  ========================  ===============================
plain         B_t (descent, kept)
sam           B_t                       0: B_t (descent, kept)
async_sam     B_t[:b'] (ascent device)  0: B_{t-1} (descent, kept)
sampa         not used                  0: B_{t-1} (descent, kept);
                                        1: B_t (ascent device)
============  ========================  ===============================

AsyncSAM's ascent gradient of step t is stored and perturbs the descent of
step t+1, which runs on B_t: the descent lags one batch behind the ascent
(``B_{-1} := B_0``). SAMPa's stored gradient ``g_t`` comes from B_{t-1}, and
its perturbed gradient is evaluated there, as in the official code.
``pairing="unpaired"`` evaluates the descent on B_t instead (for AsyncSAM the
paper's literal reading, "random samples at the previous iteration"; for SAMPa
the simpler loop that passes the current batch twice).
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samx import _async_sam, _checks, _sam, _sampa

# Batch roles.
CURRENT = "current"  # B_t
PREVIOUS = "previous"  # B_{t-1}; B_0 at the first step
ASCENT = "ascent"  # the first b' examples of B_t, or a separate ascent batch

# Device roles.
DESCENT_DEVICE = "descent"
ASCENT_DEVICE = "ascent"

PAIRINGS = ("paired", "unpaired")

_STATES = {
    _sam.SAMState: "sam",
    _async_sam.AsyncSAMState: "async_sam",
    _sampa.SAMPaState: "sampa",
}


class Evaluation(NamedTuple):
    """One loss-gradient evaluation of a step.

    Attributes:
      index: None for the gradient at the current parameters that is passed to
        ``tx.update`` as ``updates``; ``i`` for ``grad_fn(., i)``.
      batch: the examples it sees: ``"current"`` (the step's batch B_t),
        ``"previous"`` (B_{t-1}; B_0 at the first step) or ``"ascent"`` (the
        first ``b'`` examples of B_t, or a separate ascent batch).
      device: the device role that runs it, ``"descent"`` or ``"ascent"``.
      keeps_state: whether the model state this pass leaves behind (BatchNorm
        statistics) is kept: the descent pass. Exactly one per plan.
    """

    index: int | None
    batch: str
    device: str
    keeps_state: bool


class EvaluationPlan(NamedTuple):
    """The gradient evaluations of one step of a method, as data.

    Attributes:
      method: ``"plain"``, ``"sam"``, ``"async_sam"`` or ``"sampa"``.
      pairing: ``"paired"`` or ``"unpaired"`` (see
        :func:`samx.evaluation_plan`).
      perturbation: where the perturbation comes from: ``"none"`` (a plain
        optax transform), ``"fresh"`` (this step's ``updates``, so the
        evaluations run one after the other: SAM) or ``"stored"`` (a gradient
        carried in the state, so the evaluations are independent and may run
        at the same time: AsyncSAM, SAMPa).
      evaluations: the :class:`samx.Evaluation` of the step.
      ascent_placement: the default device of the ``"ascent"`` role:
        ``"host"`` (the host CPU, beside the accelerator: AsyncSAM's small
        ascent), ``"peer"`` (a second accelerator, else the descent device:
        SAMPa's two equal halves) or None (no ascent role).
    """

    method: str
    pairing: str
    perturbation: str
    evaluations: tuple[Evaluation, ...]
    ascent_placement: str | None

    @property
    def parallel(self) -> bool:
        """Whether the evaluations are independent (may run at the same time)."""
        return self.perturbation == "stored"

    @property
    def updates(self) -> Evaluation | None:
        """The evaluation passed as ``updates``; None if the method ignores it."""
        return next((e for e in self.evaluations if e.index is None), None)

    @property
    def grad_fn(self) -> dict[int, Evaluation]:
        """The ``grad_fn(., i)`` evaluations, by index (empty for plain)."""
        return {e.index: e for e in self.evaluations if e.index is not None}

    @property
    def descent(self) -> Evaluation:
        """The descent pass: the one whose model state is kept."""
        return next(e for e in self.evaluations if e.keeps_state)

    def uses(self, batch: str) -> bool:
        """Whether an evaluation sees the batch role ``batch``."""
        return any(e.batch == batch for e in self.evaluations)

    def on(self, device: str) -> tuple[Evaluation, ...]:
        """The evaluations that the device role ``device`` runs."""
        return tuple(e for e in self.evaluations if e.device == device)


def method_of(opt_state: Any) -> str:
    """``"sam"``, ``"async_sam"``, ``"sampa"`` or ``"plain"``, from the state.

    Finds the samx state inside ``optax.chain``, ``inject_hyperparams`` and the
    like, so the loops need no tag on the transform.

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
        _STATES[type(x)]
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: type(x) in _STATES)
        if type(x) in _STATES
    }
    if len(found) > 1:
        raise ValueError(
            "samx drives one sharpness-aware transform per optimizer; this"
            f" state nests {sorted(found)}."
        )
    method = found.pop() if found else "plain"
    if method != "plain":
        _reject_wrong_wrappers(opt_state, method)
    return method


def _reject_wrong_wrappers(opt_state: Any, method: str) -> None:
    """Raises if the samx state sits inside a wrapper that misuses it.

    The transform itself raises the same error when its ``update`` is traced
    inside such a wrapper; found here from the state, a loop raises it before
    the wrapper's own code fails on what samx's loops pass it.
    """
    states = _checks.WRONG_WRAPPER_STATES
    wrapped = jax.tree.leaves(opt_state, is_leaf=lambda x: type(x) in states)
    for x in wrapped:
        field, wrapper = states.get(type(x), (None, None))
        if field is not None and method_of(getattr(x, field)) != "plain":
            raise _checks.wrong_wrapper_error(f"samx.{method}", wrapper)


def _e(index, batch, device=DESCENT_DEVICE, keeps_state=False) -> Evaluation:
    return Evaluation(index, batch, device, keeps_state)


def _plans(pairing: str) -> dict[str, tuple]:
    """``method: (perturbation, evaluations, ascent_placement)``."""
    perturbed = PREVIOUS if pairing == "paired" else CURRENT
    return {
        "plain": ("none", (_e(None, CURRENT, keeps_state=True),), None),
        "sam": (
            "fresh",
            (_e(None, CURRENT), _e(0, CURRENT, keeps_state=True)),
            None,
        ),
        "async_sam": (
            "stored",
            (_e(None, ASCENT, ASCENT_DEVICE), _e(0, perturbed, keeps_state=True)),
            "host",
        ),
        "sampa": (
            "stored",
            (_e(0, perturbed, keeps_state=True), _e(1, CURRENT, ASCENT_DEVICE)),
            "peer",
        ),
    }


def evaluation_plan(
    opt_state: Any, *, pairing: str = "paired", method: str | None = None
) -> EvaluationPlan:
    r"""Which batch each gradient of a step sees, which device runs it.

    The method is found in the optimizer state (also inside ``optax.chain``
    and ``optax.inject_hyperparams``). Its evaluations, with ``pairing =
    "paired"``, where ``B_t`` is the step's batch and ``b'`` AsyncSAM's ascent
    batch size:

    - plain optax transform: ``updates`` on ``B_t``.
    - ``samx.sam``: ``updates`` and ``grad_fn(., 0)`` on ``B_t``.
    - ``samx.async_sam``: ``updates`` (the ascent gradient ``a_t``) on
      ``B_t[:b']``, on the ascent device; ``grad_fn(., 0)`` (the descent, at
      ``x_t + rho N(a_{t-1})``) on ``B_{t-1}``, the batch ``a_{t-1}`` came
      from. The descent lags one batch behind the ascent; ``B_{-1} := B_0``,
      and the first step is a plain base step.
    - ``samx.sampa``: ``grad_fn(., 0)`` (at ``x_t + rho N(g_t)``) on
      ``B_{t-1}``, the batch ``g_t`` came from, as the official code does;
      ``grad_fn(., 1)`` (the auxiliary gradient, at ``y_{t+1}``) on ``B_t``, on
      the ascent device.

    ``pairing = "unpaired"`` evaluates ``grad_fn(., 0)`` of AsyncSAM and SAMPa
    on ``B_t`` instead: the perturbation then comes from other examples than
    the loss it perturbs. On digits with 40% label noise (5 seeds) it cost
    AsyncSAM most of SAM's gain (``benchmarks/accuracy.py``). SAM and plain
    transforms see one batch per step; ``pairing`` does not change them.

    Args:
      opt_state: the optimizer state, ``tx.init(params)``.
      pairing: ``"paired"`` or ``"unpaired"``.
      method: the method, instead of the one found in the state: for a
        transform of another library that follows one of these conventions,
        e.g. ``"sam"`` for ``optax.contrib.sam(..., opaque_mode=True)``.

    Returns:
      A :class:`samx.EvaluationPlan`.

    Examples:
      >>> import jax.numpy as jnp, optax, samx
      >>> tx = samx.async_sam(optax.sgd(0.1), rho=0.05)
      >>> plan = samx.evaluation_plan(tx.init(jnp.zeros(3)))
      >>> for e in plan.evaluations:
      ...     print(e.index, e.batch, e.device, e.keeps_state)
      None ascent ascent False
      0 previous descent True

    References:
      Jo, Lim, Lee, `Asynchronous Sharpness-Aware Minimization For Fast and
      Accurate Deep Learning <https://arxiv.org/abs/2503.11147>`_, 2025

      Xie, Pethick, Cevher, `SAMPa: Sharpness-aware Minimization Parallelized
      <https://arxiv.org/abs/2410.10683>`_, NeurIPS 2024
    """
    fn = "samx.evaluation_plan"
    check_pairing(fn, pairing)
    plans = _plans(pairing)
    if method is None:
        method = method_of(opt_state)
    elif method not in plans:
        raise ValueError(
            f"`{fn}(method=...)` must be None (found from the state) or one of"
            f" {', '.join(map(repr, plans))}, got {method!r}."
        )
    perturbation, evaluations, placement = plans[method]
    return EvaluationPlan(method, pairing, perturbation, evaluations, placement)


def check_pairing(fn: str, pairing: Any) -> None:
    """Checks a ``pairing`` argument."""
    if not isinstance(pairing, str) or pairing not in PAIRINGS:
        raise ValueError(
            f"`{fn}(pairing=...)` must be 'paired' (the perturbation comes from"
            " the examples of the descent it perturbs) or 'unpaired', got"
            f" {pairing!r}."
        )


def ascent_subset(batch: Any, size: int | None) -> Any:
    """The first ``size`` examples of ``batch`` (all of it when None)."""
    if size is None:
        return batch
    return jax.tree.map(lambda x: x[:size], batch)


def select_batches(
    plan: EvaluationPlan,
    batch: Any,
    prev_batch: Any = None,
    *,
    ascent_batch_size: int | None = None,
    ascent_batch: Any = None,
) -> dict[int | None, Any]:
    """The batch of each evaluation of ``plan``, keyed by its index.

    ``prev_batch`` None stands for the first step (``B_{-1} := B_0``: the
    current batch). The ascent role takes ``ascent_batch`` when given, else the
    first ``ascent_batch_size`` examples of ``batch`` (all of it when None).
    """
    roles = {
        CURRENT: batch,
        PREVIOUS: batch if prev_batch is None else prev_batch,
    }
    if plan.uses(ASCENT):
        roles[ASCENT] = (
            ascent_batch
            if ascent_batch is not None
            else ascent_subset(batch, ascent_batch_size)
        )
    return {e.index: roles[e.batch] for e in plan.evaluations}


def leading_size(tree: Any) -> int:
    """The leading (batch) size of the first leaf of ``tree``."""
    return int(jnp.shape(jax.tree.leaves(tree)[0])[0])


def update_args(
    plan: EvaluationPlan, batch_size: int, ascent_batch_size: int | None
) -> dict[str, float]:
    """The keyword arguments of ``tx.update`` that only the loop knows.

    A plan with an ascent batch (AsyncSAM) gets ``ascent_fraction = b'/b``,
    the share of the descent batch that ``updates`` was computed on, which
    sets the radius of the next perturbation (``rho / sqrt(b'/b)``, see
    :func:`samx.async_sam`). Other plans get nothing.

    Args:
      plan: the step's plan.
      batch_size: ``b``, the leading size of the step's batch.
      ascent_batch_size: ``b'``; None for the whole batch.

    Returns:
      ``{"ascent_fraction": b'/b}`` or ``{}``: Python numbers, static under
      ``jit``.
    """
    if not plan.uses(ASCENT):
        return {}
    size = batch_size if ascent_batch_size is None else ascent_batch_size
    return {"ascent_fraction": size / batch_size}


def grad_fn_points(
    tx: Any, updates: Any, opt_state: Any, params: Any, **extra_args: Any
) -> dict[int, Any]:
    """The points at which ``tx.update`` calls ``grad_fn``, keyed by index.

    Records them from ``tx.update`` with a ``grad_fn`` that returns zeros, so
    no gradient is computed (under ``jit`` the rest of the update is dead
    code). See :func:`samx.runtime.grad_fn_points`.
    """
    points: dict[int, Any] = {}

    def record(p, i):
        points[i] = p
        return jax.tree.map(jnp.zeros_like, p)

    tx.update(updates, opt_state, params, grad_fn=record, **extra_args)
    return points


def evaluation_points(
    plan: EvaluationPlan, tx: Any, params: Any, opt_state: Any
) -> dict[int | None, Any]:
    """The point of each evaluation of a parallel plan, keyed by its index.

    ``updates`` is evaluated at ``params``, the others where ``tx.update``
    asks for them. Valid when the points do not depend on the gradients
    (``plan.parallel``).
    """
    if plan.updates is None:
        return grad_fn_points(tx, None, opt_state, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    return {None: params, **grad_fn_points(tx, zeros, opt_state, params)}


def plan_update(
    plan: EvaluationPlan,
    tx: Any,
    params: Any,
    opt_state: Any,
    gradient: Callable[[Evaluation, Any], Any],
    **extra_args: Any,
) -> tuple[Any, Any]:
    """``tx.update`` with each gradient from ``gradient(evaluation, point)``.

    ``gradient`` either computes the gradient at ``point`` on the evaluation's
    batch, or returns one computed elsewhere (on another device, or in one
    ``vmap``-ed call). SAMPa, which ignores ``updates``, gets None. A plain
    optax transform gets ``grad_fn`` too, which ``with_extra_args_support``
    drops.
    """
    updates = None if plan.updates is None else gradient(plan.updates, params)
    evaluations = plan.grad_fn
    return optax.with_extra_args_support(tx).update(
        updates,
        opt_state,
        params,
        grad_fn=lambda p, i: gradient(evaluations[i], p),
        **extra_args,
    )


def stacked_call(
    fn: Callable[..., Any],
    points: Mapping[int | None, Any],
    batches: Mapping[int | None, Any],
    *args: Any,
) -> dict[int | None, Any]:
    """``fn(point, *args, batch)`` for every evaluation, in one ``vmap``-ed call.

    The points (and the batches) are stacked on a new leading axis, which
    needs batches of one shape; ``args`` are shared. Returns each evaluation's
    output, keyed like ``points``.
    """
    keys = list(points)
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    p = jax.tree.map(stack, *[points[k] for k in keys])
    b = jax.tree.map(stack, *[batches[k] for k in keys])
    in_axes = (0, *([None] * len(args)), 0)
    out = jax.vmap(fn, in_axes=in_axes)(p, *args, b)
    return {k: jax.tree.map(lambda x, j=j: x[j], out) for j, k in enumerate(keys)}


def check_batch(fn: str, name: str, batch: Any) -> int:
    """The common leading (batch) size of ``batch``'s leaves; a clear error if none.

    ``fn`` and ``name`` name the function and the argument in the caller's
    terms, e.g. ``check_batch("samx.runtime.Trainer.step", "batch", batch)``.
    """
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError(
            f"`{fn}({name}=...)` must be a pytree of arrays with a leading batch"
            " axis, got a tree with no leaves."
        )
    size = first = None
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path) or "the batch"
        if not hasattr(leaf, "shape") and not isinstance(
            leaf, (bool, int, float, complex)
        ):
            raise TypeError(
                f"`{fn}({name}=...)` must be a pytree of arrays; {where} is a"
                f" {type(leaf).__name__}."
            )
        shape = jnp.shape(leaf)
        if not shape:
            if any(isinstance(k, jax.tree_util.SequenceKey) for k in path):
                raise TypeError(
                    f"`{fn}({name}=...)` must be a pytree of arrays; {where} is a"
                    " Python number inside a list or tuple: was a leaf given as a"
                    " nested list? Convert it with `np.asarray(...)`."
                )
            raise ValueError(
                f"`{fn}({name}=...)` must have a leading batch axis on every leaf;"
                f" {where} is a scalar."
            )
        if size is None:
            size, first = shape[0], where
        elif shape[0] != size:
            raise ValueError(
                f"`{fn}({name}=...)`: every leaf must have the same leading batch"
                f" size; {first} has {size}, {where} has {shape[0]}."
            )
    return int(size)


def batch_dtypes(batch: Any) -> tuple:
    """The dtype JAX computes each leaf of ``batch`` in, with its path.

    Canonical dtypes: a float64 NumPy array counts as float32 unless
    ``jax_enable_x64`` is on, as it does in a jit's cache key.
    """
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    return tuple((jax.tree_util.keystr(path), jnp.result_type(x)) for path, x in leaves)


def check_batch_dtypes(fn: str, dtypes: tuple, expected: tuple | None) -> None:
    """Every batch of a run has the first batch's dtypes; a clear error if not.

    A rule of every loop that compiles a step, as :func:`check_batch_size` is:
    a leaf of another dtype (a float64 batch among float32 ones under
    ``jax_enable_x64``) compiles every jitted piece of the step again, and
    again at every change back. ``dtypes`` from :func:`batch_dtypes`;
    ``expected`` None: the first batch. Batches of other structures are left
    to the loops' other checks.
    """
    if expected is None or len(dtypes) != len(expected):
        return
    for (where, got), (other, want) in zip(dtypes, expected, strict=True):
        if where == other and got != want:
            raise ValueError(
                f"`{fn}(batch=...)`: {where or 'the batch'} is {got}, but this"
                f" run's batches have {want} there. Every batch must have the"
                " dtypes of the first (another dtype compiles the step again,"
                f" at every change): cast it, e.g. `x.astype(np.{want})`."
            )


def owned(batch: Any) -> Any:
    """``batch`` with every host array copied: a batch a loop may keep.

    The rule of every loop that takes a batch from its caller and hands it to
    JAX (the Trainers, the compiled steps of ``samx.flax``,
    ``make_data_parallel_step``). On the CPU backend, ``jax.device_put`` and
    a jit's argument transfer may alias a NumPy array instead of copying it,
    and a dispatched computation reads its arguments when it runs, after the
    call has returned. A loader that refills one buffer for every batch would
    then change the previous batch a loop keeps (AsyncSAM's and SAMPa's
    descent batch), or the batch of a step still running. With this copy the
    caller may refill its buffers as soon as the step call returns.

    JAX arrays (immutable), tracers and Python or NumPy scalars are kept as
    they are; any other leaf (a NumPy array, or another host array that NumPy
    reads) is copied into a new NumPy array. The copy is one host ``memcpy``
    of the batch per step (measured in ``benchmarks/runtime_overhead.py``);
    a loop given JAX arrays copies nothing.
    """

    def own(x):
        if isinstance(x, (jax.Array, bool, int, float, complex, np.generic)):
            return x
        return np.array(x, copy=True)

    return jax.tree.map(own, batch)


def check_batch_size(fn: str, size: int, expected: int | None) -> None:
    """Every batch of a run has the first batch's leading size; a clear error if not.

    The one rule of every loop that compiles a step or keeps a batch (the
    Trainers, the compiled steps of ``samx.flax`` and
    ``make_data_parallel_step``, the steps that keep the previous batch): a
    batch of another size would compile the step again, and AsyncSAM and
    SAMPa pair each descent with the previous step's batch (AsyncSAM's ``b'``
    and ``b'/b`` set for the first size). ``expected`` None: the first batch.

    Args:
      fn: the function called, e.g. ``"samx.runtime.Trainer.step"``.
      size: the leading size of the batch it was given.
      expected: the leading size of the run's batches so far.

    Raises:
      ValueError: naming both sizes and the fix: drop the last, smaller batch
        of an epoch, or pad it.
    """
    if expected is None or size == expected:
        return
    raise ValueError(
        f"`{fn}(batch=...)` has {size} examples, but this run's batches have"
        f" {expected}: every batch must have the same size. Drop the last,"
        " smaller batch of an epoch (`drop_remainder=True` in tf.data or grain,"
        f" `drop_last=True` in a PyTorch DataLoader) or pad it to {expected}"
        " examples. A batch of another size would compile the step again, and"
        " AsyncSAM and SAMPa pair each descent with the previous step's batch"
        " (AsyncSAM's ascent batch b' was set for the first size)."
    )
