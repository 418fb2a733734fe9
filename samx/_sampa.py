"""SAMPa: SAM with its two gradients parallelized, as an optax transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from samx import _checks, _perturb


class SAMPaState(NamedTuple):
    """State of :func:`samx.sampa`.

    Attributes:
      count: the number of steps taken, an int32 scalar; ``rho`` and ``lam``
        schedules are evaluated at it.
      base_state: the state of the wrapped base optimizer.
      aux_grad: the gradient at the auxiliary point, ``g_t = grad f(y_t)``, a
        tree like the parameters with their dtypes; zeros before the first
        step.
    """

    count: jax.Array
    base_state: optax.OptState
    aux_grad: optax.Updates


def sampa(
    base: optax.GradientTransformation,
    rho: optax.ScalarOrSchedule = 0.1,
    lam: optax.ScalarOrSchedule = 0.2,
    *,
    eps: float | jax.Array = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    r"""SAMPa-lambda: sharpness-aware minimization with parallel gradients.

    The state carries ``g``, the gradient at an auxiliary point ``y``. Both
    gradients of a step depend only on the parameters and on ``g``, so they
    can be evaluated at the same time::

      x_pert = params + rho * g / (||g|| + eps)     # global norm, float32 or f64
      y = params + base.update(g, base_state, params)[0]  # a dry run
      G = grad_fn(x_pert, 0)
      g = grad_fn(y, 1)                             # stored for the next step
      d = (1 - lam) * G + lam * g                   # in float32 or f64
      updates, base_state = base.update(d, base_state, params)

    ``y`` is where ``base`` would step if it were fed ``g``: the state that dry
    run returns is thrown away. For plain SGD it is the paper's
    ``y = x - lr * g``; for SGD with momentum and coupled weight decay it is
    the official code's. Before the first step ``g`` is zero, so
    ``x_pert = params``, and ``y = params`` (whatever the dry run of ``base``
    would give, e.g. with weight decay).

    ``update(updates, state, params, *, grad_fn, **extra_args)`` computes both
    its gradients through ``grad_fn(params, i)`` (keyword-only, the signature
    of ``optax.contrib.sam``'s opaque mode), so the ``updates`` argument is
    **not used**: pass the gradient if it is at hand, or anything else (e.g.
    ``None``). For the same reason a transform chained *before* ``sampa``
    (e.g. ``optax.clip_by_global_norm``) has no effect; wrap ``base`` instead.
    Extra arguments other than ``grad_fn`` are forwarded to both calls of
    ``base`` (which ignores those it does not know). The stored gradient is
    cast to each parameter's dtype.

    **Non-finite auxiliary gradients.** Entries of ``g = grad_fn(y, 1)`` that
    are NaN or infinite are left out of this step's descent (there,
    ``d = (1 - lam) * G``). At the next step, a stored ``g`` with a NaN or an
    infinity (also one that overflows the parameters' dtype) gives no
    perturbation (``x_pert = params``), and the entries of the auxiliary point
    that its dry run leaves non-finite take the parameters' values (``y = x``
    there, as at the first step); that step stores a fresh ``g``: one bad
    auxiliary point costs one unperturbed step instead of poisoning every later
    step. The checks reuse the perturbation's norm or are elementwise, fused
    into work done anyway (no extra pass over the tree, no host
    synchronisation). A non-finite ``G = grad_fn(x_pert, 0)`` still gives
    non-finite updates: wrap the transform in :func:`samx.skip_nonfinite` to
    skip such steps.

    **Batches.** As in the official code, ``grad_fn(p, 0)`` should evaluate on
    the batch that produced the stored gradient ``g``, the previous step's
    batch, and ``grad_fn(p, 1)`` on the current batch; the paper reports that
    evaluating the perturbed gradient on the batch of the perturbation
    direction is slightly better. Passing the current batch for both is the
    simpler variant.

    **lam = 0** is SAMPa-0: the descent uses only the perturbed gradient, and
    ``g`` is still computed and stored. samx carries ``g`` explicitly; the
    official code recovers it from the sum of the two gradients, which divides
    by ``lam`` and silently turns SAMPa-0 into SGD.

    Args:
      base: the optax transform that makes the descent step, e.g.
        ``optax.sgd(0.1, momentum=0.9)``.
      rho: the perturbation radius, ``>= 0``: a float, a scalar array or an
        optax schedule of the step count (checked at steps 0, 1, 10, ...,
        1e6 when the transform is built). A value out of range inside a
        jitted step (a schedule elsewhere, or one set through
        ``optax.inject_hyperparams``) makes the step's updates NaN, which
        ``samx.skip_nonfinite`` skips and samx's loops warn about.
      lam: the weight of the auxiliary gradient in the descent direction, in
        ``[0, 1]``: a float, a scalar array or an optax schedule of the step
        count, checked as ``rho`` is. The paper uses 0.2 for vision and 0.1
        for BERT.
      eps: added to the gradient norm, ``>= 0``, so that a zero gradient gives a
        zero perturbation rather than NaN.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`. Its state is a
      :class:`samx.SAMPaState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, samx
      >>> def loss(params, batch):
      ...     return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
      >>> batches = [{"x": jnp.eye(3), "y": y * jnp.ones(3)} for y in (1.0, 2.0)]
      >>> params = {"w": jnp.zeros(3)}
      >>> tx = samx.sampa(optax.sgd(0.1), rho=0.1, lam=0.2)
      >>> state = tx.init(params)
      >>> for t, batch in enumerate(batches):
      ...     prev = batches[max(t - 1, 0)]
      ...     grad_fn = lambda p, i: jax.grad(loss)(p, prev if i == 0 else batch)
      ...     updates, state = tx.update(None, state, params, grad_fn=grad_fn)
      ...     params = optax.apply_updates(params, updates)
      >>> params["w"].round(4)
      Array([0.1444, 0.1444, 0.1444], dtype=float32)

    References:
      Xie, Pethick, Cevher, `SAMPa: Sharpness-aware Minimization Parallelized
      <https://arxiv.org/abs/2410.10683>`_, NeurIPS 2024
    """
    fn = "samx.sampa"
    base = _checks.check_base(fn, base)
    _checks.check_perturbation_args(fn, rho=rho, eps=eps)
    _checks.check_scalar(fn, "lam", lam, high=1.0)

    def init_fn(params: optax.Params) -> SAMPaState:
        _checks.require_params(fn, params, "init")
        return SAMPaState(
            count=jnp.zeros((), jnp.int32),
            base_state=base.init(params),
            aux_grad=optax.tree.zeros_like(params),
        )

    def update_fn(
        updates: optax.Updates,
        state: SAMPaState,
        params: optax.Params | None = None,
        *,
        grad_fn: Callable[[optax.Params, int], optax.Updates] | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SAMPaState]:
        del updates  # both gradients come from grad_fn
        _checks.reject_wrong_wrappers(fn)
        _checks.check_state(fn, state, SAMPaState)
        _checks.require_params(fn, params)
        grad_fn = _checks.require_grad_fn(fn, grad_fn)
        g = state.aux_grad
        perturbed = _perturb.perturbed_params(fn, params, g, rho, state.count, eps=eps)
        dry_run, _ = base.update(g, state.base_state, params, **extra_args)
        # y_1 = x_0; and y = x in the entries where the dry run is not finite.
        first = state.count == 0
        aux_point = jax.tree.map(
            lambda p, y: jnp.where(first | ~jnp.isfinite(y), p, y),
            params,
            optax.apply_updates(params, dry_run),
        )
        perturbed_grad = grad_fn(perturbed, 0)
        _checks.check_like_params(
            fn, "the result of `grad_fn(_, 0)`", perturbed_grad, params
        )
        aux_grad = grad_fn(aux_point, 1)
        _checks.check_like_params(fn, "the result of `grad_fn(_, 1)`", aux_grad, params)
        dtype = _perturb.compute_dtype(params)  # float32, or float64 for float64
        lam_t = _perturb.hparam_value(lam, state.count, dtype, high=1.0)

        def mix(a, b):  # non-finite entries of g_{t+1} are left out of d
            b = jnp.asarray(b, dtype)
            b = jnp.where(jnp.isfinite(b), b, 0)
            d = (1 - lam_t) * jnp.asarray(a, dtype) + lam_t * b
            return d.astype(jnp.result_type(a))

        descent = jax.tree.map(mix, perturbed_grad, aux_grad)
        updates, base_state = base.update(
            descent, state.base_state, params, **extra_args
        )
        return updates, SAMPaState(
            count=_perturb.increment(state.count),
            base_state=base_state,
            aux_grad=jax.tree.map(
                lambda a, p: jnp.asarray(a).astype(jnp.result_type(p)),
                aux_grad,
                params,
            ),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
