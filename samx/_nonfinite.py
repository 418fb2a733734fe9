"""Non-finite gradients: detection, and a wrapper that skips the bad steps."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from samx import _checks, _perturb
from samx._async_sam import AsyncSAMState
from samx._sampa import SAMPaState


def all_finite(tree: Any) -> jax.Array:
    """A bool scalar: whether every floating entry of ``tree`` is finite.

    Leaves that are not floating point (step counters, keys) are skipped. The
    result stays on the device: no host synchronisation.
    """
    flags = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.logical_and.reduce(jnp.stack(flags)) if flags else jnp.array(True)


def without_stored_gradients(state: Any) -> Any:
    """``state`` with the stored gradients of AsyncSAM and SAMPa left out.

    Those two transforms neutralise a non-finite stored gradient themselves at
    the next step (it gives no perturbation), so a step that stores one need
    not be skipped. Found at any depth (in a chain, under
    ``optax.inject_hyperparams``, ...).
    """

    def strip(s):
        if isinstance(s, AsyncSAMState):
            return s._replace(ascent_grad=None)
        if isinstance(s, SAMPaState):
            return s._replace(aux_grad=None)
        return s

    return jax.tree.map(strip, state, is_leaf=_stores_gradient)


def _stores_gradient(s: Any) -> bool:
    return isinstance(s, (AsyncSAMState, SAMPaState))


def with_new_stored_gradients(old: Any, new: Any) -> Any:
    """``old`` with the stored gradients of AsyncSAM and SAMPa taken from ``new``.

    The state a skipped step keeps: everything as before the step but the
    gradient it stores for the next one (AsyncSAM's ``ascent_grad`` and
    ``ascent_fraction``, SAMPa's ``aux_grad``), which was computed at the
    parameters the skip leaves unchanged, on the step's current batch. Found
    at any depth, as in :func:`without_stored_gradients`.
    """

    def take(o, n):
        if isinstance(o, AsyncSAMState):
            return o._replace(
                ascent_grad=n.ascent_grad, ascent_fraction=n.ascent_fraction
            )
        if isinstance(o, SAMPaState):
            return o._replace(aux_grad=n.aux_grad)
        return o

    return jax.tree.map(take, old, new, is_leaf=_stores_gradient)


class SkipNonfiniteState(NamedTuple):
    """State of :func:`samx.skip_nonfinite`.

    Attributes:
      inner_state: the state of the wrapped transform; left as it was by a
        skipped step.
      notfinite_count: the number of consecutive skipped steps, an int32
        scalar; 0 after a good step.
      total_notfinite: the number of skipped steps since ``init``, an int32
        scalar (saturating at the int32 maximum).
    """

    inner_state: optax.OptState
    notfinite_count: jax.Array
    total_notfinite: jax.Array


def skip_nonfinite(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips a step whose *output* updates or new state are not finite.

    Runs ``inner.update`` every step, then checks its result: if the updates it
    returns, or the new inner state (but the stored gradients, see below), hold
    a NaN or an infinity, the step returns zero updates and keeps the *old*
    inner state but for the gradient it stores for the next step (see
    below), and the counters go up::

      new_updates, new_inner = inner.update(updates, inner_state, params, ...)
      ok = all_finite(new_updates) and all_finite(new_inner - stored grads)
      updates = new_updates if ok else zeros
      inner_state = new_inner if ok else inner_state + new stored grads

    The selection is made with ``jnp.where`` on one flag, not ``lax.cond``: the
    inner update (and so ``grad_fn``) runs at the caller's trace level, so the
    gradient functions that record or capture values (e.g. a forward pass that
    also returns model statistics) behave as without the wrapper, and nothing
    waits on the host. The cost is one reduction over the updates and the state
    per step; a skipped step still costs a full step.

    **Compared with** ``optax.apply_if_finite`` (which samx rejects, see
    below): that wrapper checks the *input* updates only, and skips through
    ``lax.cond``. For the samx transforms the input is not the whole story:
    SAM's descent gradient ``grad_fn(params + e, 0)`` is evaluated at a
    perturbed point and can be non-finite (e.g. a bfloat16 overflow there)
    while the input gradient is finite, and SAMPa does not read its input at
    all. ``skip_nonfinite`` checks what the step produces, so it catches both.
    It has no ``max_consecutive_errors``: it never applies a non-finite update;
    watch ``notfinite_count`` to stop a run that keeps failing.

    **Stored gradients are not checked.** The gradient that AsyncSAM stores
    for the next step (``AsyncSAMState.ascent_grad``) and SAMPa's auxiliary
    gradient (``SAMPaState.aux_grad``), wherever they sit in ``inner``'s state,
    are left out of the check: a step whose updates are finite is applied, and
    its new state kept, even when the gradient it stores is not finite. Those
    transforms neutralise such a gradient themselves: the next step has no
    perturbation (a plain step of the base optimizer) and stores a fresh one.
    Skipping instead would throw away a good descent step and perturb the next
    step along a gradient two steps old.

    **A skipped step stores its own gradient.** AsyncSAM's ascent gradient
    (with its ``ascent_fraction``) and SAMPa's auxiliary gradient of a skipped
    step are kept: they were computed at the parameters the skip leaves
    unchanged, on the step's current batch, which every samx loop keeps as
    the next step's previous batch. So the next descent is perturbed along a
    gradient of the very examples it sees, as on every other step (paired),
    and a step that failed on its previous batch is not retried on it (the
    same parameters, perturbation and batch would fail again, forever).
    Keeping the old stored gradient instead would perturb the next descent
    along a batch it never sees.

    **Not** ``optax.apply_if_finite``: a samx transform inside it raises a
    ``ValueError`` when traced. In the paired loop of AsyncSAM and SAMPa a bad
    batch returns as the descent batch one step later, where that wrapper does
    not look, and the parameters became NaN while it counted skips.

    The extra keyword arguments of ``update`` (``grad_fn``, ...) are forwarded
    to ``inner``.

    Args:
      inner: the transform to guard, e.g. ``samx.sam(optax.sgd(0.1))``, or a
        chain that contains one.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`. Its state is a
      :class:`samx.SkipNonfiniteState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, samx
      >>> params = jnp.array([1.0, 2.0])
      >>> tx = samx.skip_nonfinite(samx.sam(optax.sgd(0.1), rho=0.05))
      >>> state = tx.init(params)
      >>> bad = lambda p, i: jnp.array([jnp.nan, 0.0])  # NaN at the perturbed point
      >>> updates, state = tx.update(params, state, params, grad_fn=bad)
      >>> print(updates, state.notfinite_count, state.total_notfinite)
      [0. 0.] 1 1
      >>> good = lambda p, i: jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(params, state, params, grad_fn=good)
      >>> print(updates, state.notfinite_count, state.total_notfinite)
      [-0.1  0.2] 0 1

    References:
      ``optax.apply_if_finite``, the input-checking counterpart, in `Optax
      <https://optax.readthedocs.io/en/latest/api/optimizer_wrappers.html>`_
    """
    if not (
        callable(getattr(inner, "init", None))
        and callable(getattr(inner, "update", None))
    ):
        raise TypeError(
            "`samx.skip_nonfinite(inner=...)` must be an optax transform with"
            " `init` and `update` (e.g. `samx.sam(optax.sgd(0.1))`), got"
            f" {type(inner).__name__}."
        )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> SkipNonfiniteState:
        return SkipNonfiniteState(
            inner_state=inner.init(params),
            notfinite_count=jnp.zeros((), jnp.int32),
            total_notfinite=jnp.zeros((), jnp.int32),
        )

    def update_fn(
        updates: optax.Updates,
        state: SkipNonfiniteState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SkipNonfiniteState]:
        _checks.check_state("samx.skip_nonfinite", state, SkipNonfiniteState)
        new_updates, new_inner = inner.update(
            updates, state.inner_state, params, **extra_args
        )
        ok = jnp.logical_and(
            all_finite(new_updates), all_finite(without_stored_gradients(new_inner))
        )
        new_updates = jax.tree.map(
            lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates
        )
        kept = with_new_stored_gradients(state.inner_state, new_inner)
        new_inner = jax.tree.map(
            lambda new, old: jnp.where(ok, new, old), new_inner, kept
        )
        return new_updates, SkipNonfiniteState(
            inner_state=new_inner,
            notfinite_count=jnp.where(
                ok,
                jnp.zeros((), jnp.int32),
                _perturb.increment(state.notfinite_count),
            ),
            total_notfinite=jnp.where(
                ok, state.total_notfinite, _perturb.increment(state.total_notfinite)
            ),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
