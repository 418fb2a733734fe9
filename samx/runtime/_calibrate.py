"""AsyncSAM's system-aware ascent batch: time both devices, pick b'."""

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from samx import _checks
from samx._plan import check_batch
from samx.runtime import _devices
from samx.runtime._trainer import value_and_grad


class AscentBatchCalibration(NamedTuple):
    """What :func:`calibrate_ascent_batch` measured and chose.

    Attributes:
      batch_size: the descent batch b.
      ascent_batch_size: the chosen b' (a power of two, ``1 <= b' <= b``).
      fast_seconds_per_example: the gradient time per example on the fast
        (descent) device, median over the repeats, at batch b.
      slow_seconds_per_example: the same on the slow (ascent) device.
      fast_device: the descent device.
      slow_device: the ascent device.
    """

    batch_size: int
    ascent_batch_size: int
    fast_seconds_per_example: float
    slow_seconds_per_example: float
    fast_device: jax.Device
    slow_device: jax.Device


def calibrate_ascent_batch(
    loss_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    *,
    fast_device: Any = None,
    slow_device: Any = None,
    model_state: Any = None,
    has_state: bool = False,
    repeats: int = 10,
) -> AscentBatchCalibration:
    """Chooses AsyncSAM's ascent batch so that the ascent hides behind the descent.

    Times the gradient of ``loss_fn`` on ``batch`` on both devices (each
    compiled and run once before timing; the median of ``repeats`` runs), and
    takes ``b' = b * t_fast / t_slow`` with ``t`` the time per example, rounded
    down to a power of two (at least 1, at most b) so that the ascent compiles
    for one size. This is a one-off measurement before training; it blocks the
    host, unlike a train step.

    Args:
      loss_fn: as for :class:`samx.runtime.Trainer`.
      params: the parameters.
      batch: a batch of the size the training uses.
      fast_device: the descent device; default ``jax.local_devices()[0]``.
      slow_device: the ascent device; default this process's first CPU device,
        ``jax.local_devices(backend="cpu")[0]``.
      model_state: the model state, with ``has_state=True``.
      has_state: as for :class:`samx.runtime.Trainer`.
      repeats: timed runs per device, ``>= 1``.

    Returns:
      An :class:`AscentBatchCalibration`; pass its ``ascent_batch_size`` to
      ``Trainer(ascent_batch_size=...)``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> from samx.runtime import calibrate_ascent_batch
      >>> def loss_fn(params, batch):
      ...     return jnp.mean((batch["x"] @ params - batch["y"]) ** 2)
      >>> batch = {"x": np.ones((64, 3), np.float32), "y": np.ones(64, np.float32)}
      >>> c = calibrate_ascent_batch(loss_fn, jnp.zeros(3), batch, repeats=3)
      >>> c.batch_size, 1 <= c.ascent_batch_size <= 64
      (64, True)

    References:
      Jo, Lim, Lee, `Asynchronous Sharpness-Aware Minimization For Fast and
      Accurate Deep Learning <https://arxiv.org/abs/2503.11147>`_, 2025
    """
    if not callable(loss_fn):
        raise TypeError(
            f"`calibrate_ascent_batch(loss_fn=...)` must be callable, got"
            f" {type(loss_fn).__name__}."
        )
    if not _checks.is_int(repeats) or repeats < 1:
        raise ValueError(
            "`calibrate_ascent_batch(repeats=...)` must be an int >= 1,"
            f" got {repeats!r}."
        )
    if params is None:
        raise ValueError(
            "`calibrate_ascent_batch(params=...)` must be the parameters, a tree"
            " of arrays, got None."
        )
    if has_state and model_state is None:
        raise ValueError(
            "`calibrate_ascent_batch(has_state=True)` needs"
            " `model_state=...`, the model state `loss_fn` takes."
        )
    fast = (
        jax.local_devices()[0]
        if fast_device is None
        else _devices.resolve("fast_device", fast_device)
    )
    slow = (
        jax.local_devices(backend="cpu")[0]
        if slow_device is None
        else _devices.resolve("slow_device", slow_device)
    )
    size = check_batch("samx.runtime.calibrate_ascent_batch", "batch", batch)
    grad = jax.jit(lambda p, ms, b: value_and_grad(loss_fn, has_state)(p, ms, b)[2])

    def seconds_per_example(device):
        args = jax.device_put((params, model_state, batch), device)
        jax.block_until_ready(grad(*args))  # compile and warm up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(grad(*args))  # a one-off timing, not a train step
            times.append(time.perf_counter() - start)
        return statistics.median(times) / size

    t_fast, t_slow = seconds_per_example(fast), seconds_per_example(slow)
    target = max(1, min(size, int(size * t_fast / t_slow)))
    chosen = 1 << (target.bit_length() - 1)  # the largest power of two <= target
    return AscentBatchCalibration(
        batch_size=size,
        ascent_batch_size=chosen,
        fast_seconds_per_example=t_fast,
        slow_seconds_per_example=t_slow,
        fast_device=fast,
        slow_device=slow,
    )
