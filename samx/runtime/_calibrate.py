"""AsyncSAM's system-aware ascent batch: time both devices, pick b'."""

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from samx import _checks
from samx._plan import ascent_subset, check_batch
from samx.runtime import _devices, _processes
from samx.runtime._common import check_batch_divides, check_mesh, value_and_grad

_FN = "samx.runtime.calibrate_ascent_batch"


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
      fast_device: the descent device, or the ``jax.sharding.Mesh`` whose
        sharded descent was timed.
      slow_device: the ascent device (this process's).
      descent_seconds: the gradient on the b examples on the fast device
        (on a mesh: on the batch split along its batch axis, under several
        processes the global batch of the processes' b examples each),
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
        does not: then every step on two devices is slower than SGD. Under
        several processes, whether it hides on every process.
    """

    batch_size: int
    ascent_batch_size: int
    fast_seconds_per_example: float
    slow_seconds_per_example: float
    fast_device: jax.Device | Mesh
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
    device = _one_device(c.fast_device)
    local = jax.local_devices(backend=device.platform)
    fast = f"{device.platform}:{local.index(device)}"
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


def _one_device(fast: Any) -> jax.Device:
    """``fast`` if a device; on a mesh, this process's first device of it."""
    if not isinstance(fast, Mesh):
        return fast
    return next(d for d in fast.devices.flat if d.process_index == jax.process_index())


def _agree(chosen: int, hides: bool) -> tuple[int, bool]:
    """Under several processes, the b' every process takes: the smallest of
    the processes' choices (each step waits for the slowest process's
    ascent), and whether it hides on every process."""
    if jax.process_count() == 1:
        return chosen, hides
    # A host synchronisation with every process, once per calibration (a
    # one-off measurement before training, which blocks the host anyway).
    every = _processes.allgather([chosen, hides])
    return int(every[:, 0].min()), bool(every[:, 1].all())


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
    batch_axis: str | None = None,
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

    **Data parallel, several processes.** ``fast_device`` may be the
    ``jax.sharding.Mesh`` the Trainer trains on (``Trainer(descent_device=
    mesh)``): the descent timed is then the sharded one, on ``batch`` split
    along ``batch_axis`` with the parameters replicated, and the transfers
    are timed between the slow device and this process's first device of the
    mesh. Under ``jax.distributed`` every process calls this function (it
    talks to the others), with its own part of the global batch as ``batch``,
    as it passes to ``Trainer.step``; b' counts examples of that part, and
    each process times its own host's ascent. The processes then agree: each
    gets the smallest b' that any of them chose (a step waits for the slowest
    process's ascent), with ``hides`` True only if it hides on every one, so
    that every process builds its Trainer with the same b'. The times
    returned are this process's own (b' timed here too when another process
    chose it), and the warning comes from the processes where even b' = 1
    does not hide.

    The paper's rule, ``b' = b * t_fast / t_slow`` from per-example times,
    assumes that a gradient's time scales with its batch; it does not (fixed
    per-step work does not shrink: on a 2-core CPU a gradient on b/4 examples
    took 46% of the time of one on b), so it chose too large a b'.

    Args:
      loss_fn: as for :class:`samx.runtime.Trainer`.
      params: the parameters.
      batch: a batch of the size the training uses.
      fast_device: the descent device, or a ``jax.sharding.Mesh`` (its
        sharded descent, see above); default ``jax.local_devices()[0]``.
      slow_device: the ascent device; default this process's first CPU device,
        ``jax.local_devices(backend="cpu")[0]``.
      model_state: the model state, with ``has_state=True``.
      has_state: as for :class:`samx.runtime.Trainer`.
      repeats: timed runs per measurement, ``>= 1``.
      batch_axis: with a mesh, the mesh axis the batch is split along;
        default the mesh's first axis (as for :class:`samx.runtime.Trainer`).

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
    if isinstance(fast_device, Mesh):
        axis = fast_device.axis_names[0] if batch_axis is None else batch_axis
        fast = check_mesh(_FN, "fast_device", fast_device, axis)
    elif batch_axis is not None:
        raise ValueError(
            f"`{_FN}(batch_axis=...)` needs `fast_device` to be a"
            f" `jax.sharding.Mesh`, got {fast_device!r}."
        )
    else:
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
    if isinstance(fast, Mesh):
        size = check_batch_divides(_FN, batch, fast, axis)
    else:
        size = check_batch(_FN, "batch", batch)
    grad = jax.jit(lambda p, ms, b: value_and_grad(loss_fn, has_state)(p, ms, b)[2])

    def seconds(device, examples):
        args = jax.device_put((params, model_state, examples), device)
        return _median_seconds(grad, args, repeats)

    if isinstance(fast, Mesh):
        descent = _median_seconds(
            grad, _on_mesh(params, model_state, batch, fast, axis), repeats
        )
    else:
        descent = seconds(fast, batch)
    transfer = _transfer_seconds(params, _one_device(fast), slow, repeats)
    ascent: dict[int, float] = {}
    # Bisection over the exponents: 2**lo hides behind the descent (or lo is
    # -1), 2**hi does not (or exceeds b).
    lo, hi = -1, size.bit_length()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ascent[1 << mid] = seconds(slow, ascent_subset(batch, 1 << mid))
        fits = ascent[1 << mid] + transfer <= descent
        lo, hi = (mid, hi) if fits else (lo, mid)
    chosen = 1 << max(lo, 0)  # 1 when even one example is slower: timed too
    local_hides = lo >= 0
    chosen, hides = _agree(chosen, local_hides)
    if chosen not in ascent:  # another process's, smaller: timed here too
        ascent[chosen] = seconds(slow, ascent_subset(batch, chosen))
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
        hides=hides,
    )
    if not local_hides:
        _warn_no_hiding(calibration)
    return calibration


def _on_mesh(params: Any, model_state: Any, batch: Any, mesh: Mesh, axis: str):
    """``(params, model_state, batch)`` as a Trainer on ``mesh`` places them:
    the state replicated, the batch (this process's part) split on ``axis``."""
    placed = _processes.replicate((params, model_state), NamedSharding(mesh, P()))
    return (*placed, _processes.put_batch(_FN, batch, NamedSharding(mesh, P(axis))))
