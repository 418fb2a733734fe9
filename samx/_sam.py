"""SAM and ASAM: sharpness-aware minimization as an optax transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from samx import _checks, _perturb


class SAMState(NamedTuple):
    """State of :func:`samx.sam`.

    Attributes:
      count: the number of steps taken, an int32 scalar; ``rho`` schedules are
        evaluated at it.
      base_state: the state of the wrapped base optimizer.
    """

    count: jax.Array
    base_state: optax.OptState


def sam(
    base: optax.GradientTransformation,
    rho: optax.ScalarOrSchedule = 0.05,
    *,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    mask: _perturb.Mask | None = None,
    eps: float | jax.Array = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-aware minimization (SAM), or ASAM with ``adaptive=True``.

    Each step perturbs the parameters along the normalised gradient and feeds
    the gradient at the perturbed point to ``base``, which sees the clean
    parameters::

      g = updates                                   # the gradient at params
      e = rho * g / (||g|| + eps)                   # global norm, float32 or f64
      d = grad_fn(params + e, 0)                    # same batch as g
      updates, base_state = base.update(d, base_state, params)

    ``update(updates, state, params, *, grad_fn, **extra_args)`` takes
    ``grad_fn(params, i)`` keyword-only, with the signature of
    ``optax.contrib.sam``'s opaque mode; it is called once per step, with
    ``i = 0``. Extra arguments other than ``grad_fn`` are forwarded to ``base``
    (which ignores those it does not know).

    **ASAM** (``adaptive=True``) is the formula of the official ASAM code:
    ``T = |x| + eta`` elementwise, ``e = rho * T**2 * g / (||T * g|| + eps)``,
    with ``T`` applied to the leaves that ``mask`` selects and ``T = 1``
    elsewhere. The official code scales every parameter whose PyTorch name
    contains "weight": all but the biases, the BatchNorm and LayerNorm scales
    included. ``mask=samx.all_but_biases`` is that rule, by path name; with
    ``eps=1e-16`` (the official code's) it reproduces that code to float64
    rounding. The default mask selects the leaves with ``ndim >= 2``, the
    weight matrices and kernels: the same leaves on models without
    normalisation layers, but the (1-D) normalisation scales get ``T = 1``. It
    stays the default because it needs no naming convention (it works on any
    pytree, e.g. a tuple ``(w, b)``) and keeps existing runs unchanged. Two
    other "adaptive" formulas circulate and are *not* this one: ``T = |x|`` on
    every leaf (``davda54/sam``), and ``e = rho * |x| * g / ||g||``
    (big_vision's GSAM). ASAM's ``rho`` is typically about 10x SAM's (0.5 to
    2.0).

    **Composition.** ``samx.sam(optax.chain(optax.clip_by_global_norm(c),
    base))`` clips the descent gradient ``d``, which is usually what is meant.
    ``optax.chain(optax.clip_by_global_norm(c), samx.sam(base))`` clips only
    the ascent gradient ``g``; the normalisation then undoes the clipping, so
    the step equals unclipped SAM. Likewise, weight decay inside ``base`` (e.g.
    ``optax.adamw``) acts on the descent step only and is not part of the ascent
    direction, unlike an L2 term in the loss.

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

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`. Its state is a
      :class:`samx.SAMState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, samx
      >>> def loss(params, batch):
      ...     return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
      >>> batch = {"x": jnp.eye(3), "y": jnp.ones(3)}
      >>> params = {"w": jnp.zeros(3)}
      >>> tx = samx.sam(optax.sgd(0.1), rho=0.05)
      >>> state = tx.init(params)
      >>> grads = jax.grad(loss)(params, batch)
      >>> updates, state = tx.update(
      ...     grads, state, params,
      ...     grad_fn=lambda p, i: jax.grad(loss)(p, batch))
      >>> params = optax.apply_updates(params, updates)
      >>> params["w"].round(4)
      Array([0.0686, 0.0686, 0.0686], dtype=float32)

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021

      Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
      Scale-Invariant Learning of Deep Neural Networks
      <https://arxiv.org/abs/2102.11600>`_, 2021
    """
    fn = "samx.sam"
    base = _checks.check_base(fn, base)
    _checks.check_perturbation_args(
        fn, rho=rho, eps=eps, adaptive=adaptive, eta=eta, mask=mask
    )

    def init_fn(params: optax.Params) -> SAMState:
        _checks.require_params(fn, params, "init")
        return SAMState(count=jnp.zeros((), jnp.int32), base_state=base.init(params))

    def update_fn(
        updates: optax.Updates,
        state: SAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: Callable[[optax.Params, int], optax.Updates] | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SAMState]:
        _checks.reject_wrong_wrappers(fn)
        _checks.check_state(fn, state, SAMState)
        _checks.require_params(fn, params)
        grad_fn = _checks.require_grad_fn(fn, grad_fn)
        _checks.check_like_params(fn, "`updates`", updates, params)
        perturbed = _perturb.perturbed_params(
            fn,
            params,
            updates,
            rho,
            state.count,
            eps=eps,
            adaptive=adaptive,
            eta=eta,
            mask=mask,
        )
        descent = grad_fn(perturbed, 0)
        _checks.check_like_params(fn, "the result of `grad_fn`", descent, params)
        updates, base_state = base.update(
            descent, state.base_state, params, **extra_args
        )
        return updates, SAMState(
            count=_perturb.increment(state.count), base_state=base_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
