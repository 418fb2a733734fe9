"""AsyncSAM's system-aware ascent batch: time both devices, pick b'."""

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from samx import _checks
from samx._plan import ascent_subset, check_batch
from samx.runtime import _devices
from samx.runtime._trainer import value_and_grad


class AscentBatchCalibration(NamedTuple):
    """What :func:`calibrate_ascent_batch` measured and chose.

    Attributes:
      batch_size: the descent batch b.
      ascent_batch_size: the chosen b' (a power of two, ``1 <= b' <= b``).
      fast_seconds_per_example: ``descent_seconds / b``.
      slow_seconds_per_example: the slow device's time per example at the
        chosen b', ``ascent_seconds[b'] / b'``. (Earlier versions timed the
        whole batch on the slow device and scaled this per-example time
        linearly; per-example times are not constant, so b' is now timed
        directly: see ``ascent_seconds``.)
      fast_device: the descent device.
      slow_device: the ascent device.
      descent_seconds: the gradient on the b examples on the fast device,
        median over the repeats.
      ascent_seconds: ``{b': seconds}``, the gradient on the first b'
        examples on the slow device, median over the repeats, for every
        candidate b' that was timed.
      transfer_seconds: the parameters from the fast device to the slow one
        plus a gradient (the parameters' shapes and dtypes) back, each the
        median over the repeats, summed: what every AsyncSAM step moves
        besides its two gradients. 0 when the two devices are one.
      hides: whether the chosen b' hides behind the descent, ``ascent_seconds[
        b'] + transfer_seconds <= descent_seconds``. False when even b' = 1
        does not: then every step on two devices is slower than SGD.
    """

    batch_size: int
    ascent_batch_size: int
    fast_seconds_per_example: float
    slow_seconds_per_example: float
    fast_device: jax.Device
    slow_device: jax.Device
    descent_seconds: float
    ascent_seconds: dict[int, float]
    transfer_seconds: float
    hides: bool


def _median_seconds(fn: Callable, args: tuple, repeats: int) -> float:
    """The median wall time of ``fn(*args)`` over ``repeats`` runs, after one."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))  # a one-off timing, not a train step
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _transfer_seconds(params: Any, fast: Any, slow: Any, repeats: int) -> float:
    """The parameters fast -> slow plus a gradient like them slow -> fast.

    What an AsyncSAM step moves between its devices besides computing; 0 when
    the two devices are one.
    """
    if fast == slow:
        return 0.0
    return _put_seconds(params, fast, slow, repeats) + _put_seconds(
        params, slow, fast, repeats
    )


def _put_seconds(tree: Any, source: Any, target: Any, repeats: int) -> float:
    """The median time of a fresh ``jax.device_put`` of ``tree`` from
    ``source`` to ``target``, over ``repeats`` after one."""
    on_source = jax.block_until_ready(jax.device_put(tree, source))
    jax.block_until_ready(jax.device_put(on_source, target))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jax.device_put(on_source, target))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _warn_no_hiding(calibration: "AscentBatchCalibration") -> None:
    """The warning when even b' = 1 does not hide behind the descent."""
    c = calibration
    ms = lambda s: f"{s * 1e3:.3g} ms"  # noqa: E731
    local = jax.local_devices(backend=c.fast_device.platform)
    fast = f"{c.fast_device.platform}:{local.index(c.fast_device)}"
    warnings.warn(
        "calibrate_ascent_batch: even b' = 1 does not hide behind the descent."
        f" The ascent of one example on {c.slow_device} takes"
        f" {ms(c.ascent_seconds[1])}, and the transfers (the parameters there,"
        f" the gradient back) {ms(c.transfer_seconds)}, while the descent of"
        f" {c.batch_size} examples on {c.fast_device} takes"
        f" {ms(c.descent_seconds)}: AsyncSAM with its ascent on"
        f" {c.slow_device} makes every step slower than SGD. Alternatives: the"
        f" ascent on the accelerator itself (`Trainer(...,"
        f" ascent_device={fast!r})`) at a b' from the frontier, e.g."
        " b/4 or b/16 (docs: Cost and accuracy); or SAMPa, its two gradients"
        " fused on the accelerator. `hides` is False.",
        UserWarning,
        stacklevel=3,
    )


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

    Times the gradient of ``loss_fn`` on the whole ``batch`` (b examples) on
    the fast device, the descent; the transfers every AsyncSAM step makes
    (the parameters to the slow device, a gradient like them back); then the
    gradient on the first b' examples on the slow device for candidate b'
    (powers of two, ``1 <= b' <= b``, so that the ascent compiles for one
    size), and chooses the largest b' whose ascent plus transfers takes no
    longer than the descent. If none does, b' is 1, ``hides`` is False and a
    ``UserWarning`` gives the times and the alternatives (the ascent on the
    accelerator itself at a b' from the frontier, or SAMPa). The candidates are
    searched by bisection, which assumes that a larger b' does not take less
    time: 3 or 4 slow-device compilations for b = 128, not one per
    candidate. Each timing is the median of ``repeats`` runs after a first,
    compiling run. This is a one-off measurement before training; it blocks
    the host, unlike a train step.

    The paper's rule, ``b' = b * t_fast / t_slow`` from per-example times,
    assumes that a gradient's time scales with its batch; it does not (fixed
    per-step work does not shrink: on a 2-core CPU a gradient on b/4 examples
    took 46% of the time of one on b), so it chose too large a b'.

    Args:
      loss_fn: as for :class:`samx.runtime.Trainer`.
      params: the parameters.
      batch: a batch of the size the training uses.
      fast_device: the descent device; default ``jax.local_devices()[0]``.
      slow_device: the ascent device; default this process's first CPU device,
        ``jax.local_devices(backend="cpu")[0]``.
      model_state: the model state, with ``has_state=True``.
      has_state: as for :class:`samx.runtime.Trainer`.
      repeats: timed runs per measurement, ``>= 1``.

    Returns:
      An :class:`AscentBatchCalibration` with every time it measured; pass it
      as ``Trainer(ascent_batch_size=...)``, which takes its b' and checks its
      devices and batch size.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> from samx.runtime import calibrate_ascent_batch
      >>> def loss_fn(params, batch):
      ...     return jnp.mean((batch["x"] @ params - batch["y"]) ** 2)
      >>> batch = {"x": np.ones((64, 3), np.float32), "y": np.ones(64, np.float32)}
      >>> c = calibrate_ascent_batch(loss_fn, jnp.zeros(3), batch, repeats=3)
      >>> c.batch_size, 1 <= c.ascent_batch_size <= 64
      (64, True)
      >>> c.ascent_batch_size in c.ascent_seconds
      True

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

    def seconds(device, examples):
        args = jax.device_put((params, model_state, examples), device)
        return _median_seconds(grad, args, repeats)

    descent = seconds(fast, batch)
    transfer = _transfer_seconds(params, fast, slow, repeats)
    ascent: dict[int, float] = {}
    # Bisection over the exponents: 2**lo hides behind the descent (or lo is
    # -1), 2**hi does not (or exceeds b).
    lo, hi = -1, size.bit_length()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ascent[1 << mid] = seconds(slow, ascent_subset(batch, 1 << mid))
        hides = ascent[1 << mid] + transfer <= descent
        lo, hi = (mid, hi) if hides else (lo, mid)
    chosen = 1 << max(lo, 0)  # 1 when even one example is slower: timed too
    calibration = AscentBatchCalibration(
        batch_size=size,
        ascent_batch_size=chosen,
        fast_seconds_per_example=descent / size,
        slow_seconds_per_example=ascent[chosen] / chosen,
        fast_device=fast,
        slow_device=slow,
        descent_seconds=descent,
        ascent_seconds=dict(sorted(ascent.items())),
        transfer_seconds=transfer,
        hides=lo >= 0,
    )
    if not calibration.hides:
        _warn_no_hiding(calibration)
    return calibration
