"""What each device did in each step of a :class:`samx.runtime.Trainer`, measured.

The Trainer's step only dispatches work and returns at once; the devices
finish later. :func:`record` measures around it, without changing it:

- the host time just before each ``trainer.step`` call (the dispatch);
- for each watched output of the step, a watcher thread that calls
  ``block_until_ready()`` on it and records ``time.perf_counter()`` when it
  returns, i.e. when that output is complete.

Only these completion times are measured. Each segment's *start* is inferred:
the later of the step's dispatch and the previous completion on the same
device, so a segment can include time the device spent waiting (for a
transfer, or for the host) as well as computing. The watchers add a little
latency of their own (a thread wake-up, well under a millisecond on an idle
machine). The host loop itself never blocks.

The watched outputs (see :func:`default_watches`), for AsyncSAM and SAMPa:

- ``metrics["ascent_grad_norm"]``: computed in the same jit as the second
  gradient, on the ascent device: the *ascent gradient* is done;
- ``metrics["loss"]``: computed with the descent gradient, on the descent
  device: the *descent gradient* is done;
- ``state.params``: the *update* on the descent device is done (it needs the
  ascent gradient moved over, so it waits for both).
"""

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax

Watch = Callable[[Any, dict], list[tuple[str, str, Any]]]


class Segment(NamedTuple):
    """One piece of work of one step on one device.

    Attributes:
      step: the step index (0 for the first recorded step).
      device: the row: the device that produced the output, e.g. ``"cpu:1"``.
      label: what was computed, e.g. ``"ascent gradient"``.
      start: the inferred start, seconds since the first dispatch.
      end: the measured completion, seconds since the first dispatch.
    """

    step: int
    device: str
    label: str
    start: float
    end: float


class Timeline(NamedTuple):
    """What :func:`record` measured.

    Attributes:
      segments: one :class:`Segment` per watched output and step.
      dispatches: the host time of each ``trainer.step`` call, seconds since
        the first one.
      returns: when each ``trainer.step`` call returned to the host.
    """

    segments: list[Segment]
    dispatches: list[float]
    returns: list[float]


def _device_name(x: Any) -> str:
    (device,) = jax.tree.leaves(x)[0].devices()
    return f"{device.platform}:{device.id}"


def default_watches(state: Any, metrics: dict) -> list[tuple[str, str, Any]]:
    """``(device, label, array)`` for the outputs watched in each step.

    The ascent gradient (when the step has one), the descent gradient and the
    update, in that order; the device is read from each array. The update is
    ``metrics["grad_norm"]``, an output of the jitted update that makes the
    new state, not the state itself: the next step donates the state, and a
    watcher still waiting on it would find its arrays deleted.
    """
    watches = []
    if "ascent_grad_norm" in metrics:
        x = metrics["ascent_grad_norm"]
        watches.append((_device_name(x), "ascent gradient", x))
    update = metrics["grad_norm"]
    for label, x in (("descent gradient", metrics["loss"]), ("update", update)):
        watches.append((_device_name(x), label, x))
    return watches


def record(
    trainer: Any,
    state: Any,
    batches: Iterable[Any],
    *,
    watches: Watch = default_watches,
) -> tuple[Any, Timeline]:
    """Runs ``trainer.step`` over ``batches`` and times what each device did.

    Warm up first (one step, then ``jax.block_until_ready``), so that the
    recorded steps do not include compilation.

    Args:
      trainer: a :class:`samx.runtime.Trainer`.
      state: its state.
      batches: the batches, one step each.
      watches: ``watches(state, metrics) -> [(device, label, array), ...]``,
        the outputs to wait for in each step, in the order they finish on each
        device; default :func:`default_watches`. Not the state's arrays: the
        next step donates them (see :class:`samx.runtime.Trainer`).

    Returns:
      ``(state, timeline)``: the state after the last step (complete) and a
      :class:`Timeline`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax, samx
      >>> from samx.runtime import Trainer
      >>> def loss_fn(params, batch):
      ...     return jnp.mean((batch["x"] @ params - batch["y"]) ** 2)
      >>> trainer = Trainer(samx.async_sam(optax.sgd(0.1)), loss_fn)
      >>> batch = {"x": np.ones((8, 3), np.float32), "y": np.ones(8, np.float32)}
      >>> state, timeline = record(trainer, trainer.init(jnp.zeros(3)), [batch] * 3)
      >>> len(timeline.segments), int(state.step)
      (9, 3)
      >>> all(s.start <= s.end for s in timeline.segments)
      True
    """
    done: list[tuple[int, int, str, str, float]] = []
    lock = threading.Lock()
    threads = []

    def watch(step, order, device, label, x):
        jax.block_until_ready(x)
        end = time.perf_counter()
        with lock:
            done.append((step, order, device, label, end))

    dispatches, returns = [], []
    for step, batch in enumerate(batches):
        dispatches.append(time.perf_counter())
        state, metrics = trainer.step(state, batch)
        returns.append(time.perf_counter())
        for order, (device, label, x) in enumerate(watches(state, metrics)):
            thread = threading.Thread(
                target=watch, args=(step, order, device, label, x), daemon=True
            )
            thread.start()
            threads.append(thread)
    for thread in threads:
        thread.join()
    if not dispatches:
        return state, Timeline([], [], [])

    origin = dispatches[0]
    segments = []
    last_end: dict[str, float] = {}
    for step, _, device, label, end in sorted(done, key=lambda d: (d[0], d[1])):
        start = max(dispatches[step], last_end.get(device, dispatches[step]))
        start = min(start, end)  # a watcher may see an output done before a later one
        last_end[device] = max(end, last_end.get(device, end))
        segments.append(Segment(step, device, label, start - origin, end - origin))
    return state, Timeline(
        segments,
        [t - origin for t in dispatches],
        [t - origin for t in returns],
    )


_COLORS = {
    "ascent gradient": "tab:orange",
    "descent gradient": "tab:blue",
    "update": "tab:green",
}


def plot(timeline: Timeline, ax: Any = None, title: str = "") -> Any:
    """A Gantt chart of ``timeline``: one row per device, one bar per segment.

    Bars are labelled with their step; dashed lines mark the dispatches.
    Needs matplotlib. Returns the axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 2.6))
    rows = sorted({s.device for s in timeline.segments})
    ms = 1e3
    for row, device in enumerate(rows):
        for s in (s for s in timeline.segments if s.device == device):
            width = (s.end - s.start) * ms
            ax.broken_barh(
                [(s.start * ms, width)],
                (row - 0.35, 0.7),
                facecolors=_COLORS.get(s.label, "tab:gray"),
                edgecolor="white",
            )
            ax.text(
                s.start * ms + width / 2,
                row,
                str(s.step),
                ha="center",
                va="center",
                fontsize=7,
                color="white",
            )
    for t in timeline.dispatches:
        ax.axvline(t * ms, color="black", lw=0.6, ls="--", alpha=0.5)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("ms since the first dispatch (dashed: a step dispatched)")
    order = list(_COLORS)
    labels = sorted(
        {s.label for s in timeline.segments},
        key=lambda k: (order.index(k) if k in order else len(order), k),
    )
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=_COLORS.get(k, "tab:gray")) for k in labels
    ]
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    ax.set_title(title)
    return ax
