"""Where a transform will evaluate its gradients, without evaluating any."""

from typing import Any

import optax

from samx import _checks, _plan


def grad_fn_points(
    tx: optax.GradientTransformationExtraArgs,
    updates: Any,
    opt_state: Any,
    params: Any,
    **extra_args: Any,
) -> dict[int, Any]:
    """The points at which ``tx.update`` calls ``grad_fn``, keyed by index.

    Runs ``tx.update`` with a ``grad_fn`` that records its argument and returns
    zeros, so no gradient is computed (under ``jit`` the rest of the update is
    dead code). Valid for transforms whose evaluation points do not depend on
    the gradients ``grad_fn`` returns: AsyncSAM (index 0) and SAMPa (0 and 1);
    not SAM, whose single point depends on ``updates`` but not on ``grad_fn``
    either. This is how the runtime places each gradient on its device.

    Args:
      tx: the transform.
      updates: what ``tx.update`` takes as ``updates`` (``None`` for SAMPa).
      opt_state: its state.
      params: the parameters.
      **extra_args: forwarded to ``tx.update``.

    Returns:
      ``{i: point}`` for each ``grad_fn(point, i)`` call.

    Examples:
      >>> import jax.numpy as jnp, optax, samx
      >>> from samx.runtime import grad_fn_points
      >>> tx = samx.sampa(optax.sgd(0.1), rho=0.1, lam=0.2)
      >>> points = grad_fn_points(tx, None, tx.init(jnp.ones(2)), jnp.ones(2))
      >>> sorted(points)
      [0, 1]

    References:
      Xie, Pethick, Cevher, `SAMPa: Sharpness-aware Minimization Parallelized
      <https://arxiv.org/abs/2410.10683>`_, NeurIPS 2024
    """
    fn = "samx.runtime.grad_fn_points"
    tx = _checks.check_base(fn, tx, name="tx")
    if "grad_fn" in extra_args:
        raise TypeError(
            f"`{fn}` passes its own `grad_fn` (one that records the points);"
            " do not pass `grad_fn=...` among its extra arguments."
        )
    return _plan.grad_fn_points(tx, updates, opt_state, params, **extra_args)
