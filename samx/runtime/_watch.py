"""A warning when training goes non-finite, without waiting on the device."""

import warnings
from typing import Any

import jax
import numpy as np

from samx._nonfinite import SkipNonfiniteState


def _skips(opt_state: Any) -> bool:
    """Whether ``samx.skip_nonfinite`` guards the transform of ``opt_state``."""
    is_skip = lambda x: isinstance(x, SkipNonfiniteState)  # noqa: E731
    return any(is_skip(x) for x in jax.tree.leaves(opt_state, is_leaf=is_skip))


class NonfiniteWatch:
    """Warns once when a step has made the parameters non-finite.

    Without ``samx.skip_nonfinite``, a step whose descent gradient is not
    finite makes the parameters NaN, and the loss need not show it: ReLU and
    max-pooling can turn NaN weights into a finite, chance-level loss. A loop
    calls :meth:`see` after each step with a device scalar: the step's descent
    gradient norm, or whether its new parameters are finite. Only a value that
    is already computed (``is_ready``) is read, so no step waits on the
    device; the newest value waits until it is. Steps in between are not read,
    which loses nothing for the case this is for: parameters once NaN stay
    NaN, and a ``rho`` injected out of range stays so.
    """

    def __init__(self):
        self._pending: jax.Array | None = None
        self._done = False

    def see(
        self, fn: str, grad_norm: jax.Array, opt_state: Any, *, stacklevel: int = 3
    ) -> None:
        """Takes a step's descent gradient norm; warns once if one was NaN.

        Args:
          fn: the function called, named in the warning, e.g.
            ``"samx.runtime.Trainer.step"``.
          grad_norm: the step's descent gradient norm, a device scalar; or a
            bool scalar, False when the step's new parameters are not finite.
          opt_state: the step's new optimizer state (whether it is guarded by
            ``samx.skip_nonfinite``, which makes the warning moot).
          stacklevel: of the warning: 3 points at the caller of the function
            that called this one.
        """
        if self._done:
            return
        pending = self._pending
        if pending is not None:
            local = pending.addressable_data(0)  # the same on every device
            if not local.is_ready():
                return
            value = np.asarray(local)
            if not (value if value.dtype == bool else np.isfinite(value)):
                self._done = True
                self._pending = None
                if not _skips(opt_state):
                    warnings.warn(_message(fn), RuntimeWarning, stacklevel=stacklevel)
                return
        self._pending = grad_norm


def _message(fn: str) -> str:
    return (
        f"{fn}: a step made the parameters non-finite (NaN or inf), though"
        " the loss may still look normal (ReLU and max-pooling can hide NaN weights). A"
        " batch with a NaN or an inf, an overflow (float16, bfloat16), or a"
        " `rho` or `lam` set out of range at run time (through"
        " `optax.inject_hyperparams`, where samx cannot check it without"
        " waiting on the device) cause it. Wrap the transform in"
        " `samx.skip_nonfinite(...)` to skip such steps (docs: Non-finite"
        " gradients)."
    )
