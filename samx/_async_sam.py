"""AsyncSAM: SAM with a one-step-stale ascent gradient, as an optax transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from samx import _checks, _perturb


class AsyncSAMState(NamedTuple):
    """State of :func:`samx.async_sam`.

    Attributes:
      count: the number of steps taken, an int32 scalar; ``rho`` schedules are
        evaluated at it.
      base_state: the state of the wrapped base optimizer.
      ascent_grad: the ascent gradient of the previous step, ``a_{t-1}``, a
        tree like the parameters with their dtypes; zeros before the first
        step.
      ascent_fraction: ``b'/b`` of the batch ``ascent_grad`` came from, a
        float32 scalar (1 before the first step); with ``rho_scaling="sqrt"``
        the next perturbation's radius is ``rho / sqrt(ascent_fraction)``.
    """

    count: jax.Array
    base_state: optax.OptState
    ascent_grad: optax.Updates
    ascent_fraction: jax.Array


RHO_SCALINGS = ("sqrt", "none")


def async_sam(
    base: optax.GradientTransformation,
    rho: optax.ScalarOrSchedule = 0.05,
    *,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    mask: _perturb.Mask | None = None,
    eps: float | jax.Array = 1e-12,
    rho_scaling: str = "sqrt",
) -> optax.GradientTransformationExtraArgs:
    r"""Asynchronous SAM: perturb along the previous step's ascent gradient.

    SAM's two gradients are sequential: the descent gradient is evaluated at a
    point that needs the ascent gradient of the same step. AsyncSAM perturbs
    along the ascent gradient of the *previous* step instead (staleness
    ``tau = 1``, as the paper fixes it), so the two gradients of a step are
    independent and can run at the same time, on different devices::

      a = updates                                   # ascent gradient at params
      e = rho * a_prev / (||a_prev|| + eps)         # global norm, float32 or f64
      d = grad_fn(params + e, 0)                    # does not depend on a
      updates, base_state = base.update(d, base_state, params)
      a_prev = a                                    # stored for the next step

    Before the first step ``a_prev`` is zero, so ``e = 0`` and the first step
    is a plain step of ``base``.

    ``updates`` is the ascent gradient ``a`` at ``params``. It may be computed
    on a smaller batch than the descent gradient: the paper picks the ascent
    batch size ``b'`` "in a system-aware manner", ``b' = b * t_fast / t_slow``
    (the per-example gradient times on the fast and the slow device), so that
    the ascent on the slow device hides behind the descent on the fast one.
    ``grad_fn(params, 0)`` returns the descent gradient, on the full batch.

    **A small ascent batch gets a larger radius** (``rho_scaling="sqrt"``,
    the default). The gradient of ``b'`` examples is the batch gradient plus
    noise whose norm grows like ``1/sqrt(b')``; normalised, its component
    along the batch gradient shrinks, and so does SAM's effect. samx
    perturbs by ``rho / sqrt(b'/b)`` instead of ``rho``::

      e = rho / sqrt(ascent_fraction) * a_prev / (||a_prev|| + eps)

    where ``ascent_fraction = b'/b`` is the fraction of the batch that
    ``a_prev`` came from, passed to ``update`` by samx's loops (the Trainer,
    the Flax helpers) and stored with ``a_prev``. With ``rho`` set to SAM's
    own best radius this kept 98% or more of SAM's gain over SGD down to
    ``b' = b/16`` on two datasets at 20-40% label noise, where the paper's rule
    kept 49% to 89% of it at ``b/4`` (``benchmarks/frontier.py``,
    :doc:`/frontier`); at ``b' = 1`` the scaled radius was too large: keep
    ``b' >= 2``. At ``b' = b`` nothing changes; ``rho_scaling="none"`` is the
    paper's rule at every ``b'``.

    ``update(updates, state, params, *, grad_fn, ascent_fraction=None,
    **extra_args)`` takes ``grad_fn(params, i)`` keyword-only, with the
    signature of ``optax.contrib.sam``'s opaque mode; it is called once per
    step, with ``i = 0``. ``ascent_fraction`` is ``b'/b`` for ``updates``; when
    None it is read from ``grad_fn.ascent_fraction`` (the ``grad_fn`` of
    :func:`samx.flax.nnx_grads` carries it) and is otherwise 1, so a loop of
    your own with ``b' < b`` passes it. Extra arguments other than these are
    forwarded to ``base`` (which ignores those it does not know). The stored
    ascent gradient is cast to each parameter's dtype.

    **Non-finite ascent gradients.** A stored gradient with a NaN or an
    infinity in any entry (after the cast: also one that overflows the
    parameters' dtype) gives a zero perturbation at the next step, a plain
    step of ``base``, and is replaced by that step's fresh ascent gradient: one
    bad ascent batch costs one unperturbed step, never the run. The check
    reuses the perturbation's norm (no extra pass over the tree, no host
    synchronisation). The current step is not affected: its descent does not
    use ``a``. To skip steps whose descent gradient is not finite, wrap the
    transform in :func:`samx.skip_nonfinite`.

    **ASAM** (``adaptive=True``) scales the perturbation as
    :func:`samx.sam` does, ``T = |x| + eta`` with ``x`` the current
    parameters, applied to the leaves that ``mask`` selects.

    Args:
      base: the optax transform that makes the descent step, e.g.
        ``optax.sgd(0.1, momentum=0.9)``.
      rho: the perturbation radius, ``>= 0``: a float, a scalar array or an
        optax schedule of the step count (checked at steps 0, 1, 10, ...,
        1e6 when the transform is built). A value out of range inside a
        jitted step (a schedule elsewhere, or one set through
        ``optax.inject_hyperparams``) makes the step's updates NaN, which
        ``samx.skip_nonfinite`` skips and samx's loops warn about.
        ``rho = 0`` gives exactly the trajectory of ``base``, in float64 too.
      adaptive: use ASAM's scale-invariant perturbation.
      eta: ASAM's offset in ``T = |x| + eta``, ``>= 0``; used only when
        ``adaptive``.
      mask: which leaves ASAM scales by ``T``: a tree of bools with the
        structure of the parameters, or a function of the parameters that
        returns one. Only with ``adaptive=True``. Default: the leaves with
        ``ndim >= 2``; :func:`samx.all_but_biases` is the official code's
        rule. With ``optax.inject_hyperparams``, list a callable mask in
        ``static_args``.
      eps: added to the gradient norm, ``>= 0``, so that a zero gradient gives a
        zero perturbation rather than NaN.
      rho_scaling: ``"sqrt"`` (the radius is ``rho / sqrt(b'/b)``) or
        ``"none"`` (``rho`` at every ``b'``, the paper's rule).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`. Its state is a
      :class:`samx.AsyncSAMState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, samx
      >>> def loss(params, batch):
      ...     return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
      >>> batch = {"x": jnp.eye(4), "y": jnp.ones(4)}
      >>> small = {"x": batch["x"][:2], "y": batch["y"][:2]}  # the ascent batch
      >>> params = {"w": jnp.zeros(4)}
      >>> tx = samx.async_sam(optax.sgd(0.1), rho=0.05)
      >>> state = tx.init(params)
      >>> for _ in range(2):
      ...     grads = jax.grad(loss)(params, small)
      ...     updates, state = tx.update(
      ...         grads, state, params,
      ...         grad_fn=lambda p, i: jax.grad(loss)(p, batch),
      ...         ascent_fraction=2 / 4)  # b'/b: the radius is rho * sqrt(2)
      ...     params = optax.apply_updates(params, updates)
      >>> [round(float(w), 4) for w in params["w"]]
      [0.1, 0.1, 0.0975, 0.0975]

    References:
      Jo, Lim, Lee, `Asynchronous Sharpness-Aware Minimization For Fast and
      Accurate Deep Learning <https://arxiv.org/abs/2503.11147>`_, 2025
    """
    fn = "samx.async_sam"
    base = _checks.check_base(fn, base)
    _checks.check_perturbation_args(
        fn, rho=rho, eps=eps, adaptive=adaptive, eta=eta, mask=mask
    )
    if not isinstance(rho_scaling, str) or rho_scaling not in RHO_SCALINGS:
        raise ValueError(
            f"`{fn}(rho_scaling=...)` must be 'sqrt' (the radius grows as"
            " rho / sqrt(b'/b) for an ascent batch of b' of the b examples) or"
            f" 'none', got {rho_scaling!r}."
        )

    def init_fn(params: optax.Params) -> AsyncSAMState:
        _checks.require_params(fn, params, "init")
        return AsyncSAMState(
            count=jnp.zeros((), jnp.int32),
            base_state=base.init(params),
            ascent_grad=optax.tree.zeros_like(params),
            ascent_fraction=jnp.ones((), jnp.float32),
        )

    def update_fn(
        updates: optax.Updates,
        state: AsyncSAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: Callable[[optax.Params, int], optax.Updates] | None = None,
        ascent_fraction: float | jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, AsyncSAMState]:
        _checks.reject_wrong_wrappers(fn)
        _checks.check_state(fn, state, AsyncSAMState)
        _checks.require_params(fn, params)
        grad_fn = _checks.require_grad_fn(fn, grad_fn)
        _checks.check_like_params(fn, "`updates`", updates, params)
        if ascent_fraction is None:
            ascent_fraction = getattr(grad_fn, "ascent_fraction", 1.0)
        check_ascent_fraction(f"{fn}(...).update", ascent_fraction)
        scale = 1.0
        if rho_scaling == "sqrt":
            scale = jax.lax.rsqrt(state.ascent_fraction)
        perturbed = _perturb.perturbed_params(
            fn,
            params,
            state.ascent_grad,
            rho,
            state.count,
            eps=eps,
            adaptive=adaptive,
            eta=eta,
            mask=mask,
            scale=scale,
        )
        descent = grad_fn(perturbed, 0)
        _checks.check_like_params(fn, "the result of `grad_fn`", descent, params)
        ascent_grad = jax.tree.map(
            lambda a, p: jnp.asarray(a).astype(jnp.result_type(p)), updates, params
        )
        updates, base_state = base.update(
            descent, state.base_state, params, **extra_args
        )
        return updates, AsyncSAMState(
            count=_perturb.increment(state.count),
            base_state=base_state,
            ascent_grad=ascent_grad,
            ascent_fraction=jnp.asarray(ascent_fraction, jnp.float32),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_ascent_fraction(fn: str, value: Any) -> None:
    """Checks ``ascent_fraction``: a finite number ``> 0`` (not when traced)."""
    _checks.check_scalar(fn, "ascent_fraction", value, allow_schedule=False)
    if not isinstance(value, jax.core.Tracer) and not float(value) > 0:
        raise ValueError(
            f"`{fn}(ascent_fraction=...)` is b'/b, the fraction of the descent"
            f" batch that the ascent gradient `updates` came from: a number > 0"
            f" (at most 1 when the ascent batch is part of it), got {value}."
        )
