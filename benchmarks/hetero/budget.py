"""The budget: each part's share, the stop at the end, the record saved as it grows."""

import contextlib
import json
import os
import signal
import time
from typing import Any

# Each part should end by this fraction of --budget-s; a part that starts
# later than its share is skipped, and the run stops at the whole budget.
SHARES = {
    "calibration": 0.10,
    "step_time": 0.50,
    "timeline": 0.55,
    "time_to_accuracy": 0.70,
    "sweep": 0.95,
}
MIN_ROUNDS = 3


class Stop(BaseException):
    """The budget ran out, or the run was interrupted.

    A ``BaseException``, like ``KeyboardInterrupt``: library code that catches
    ``Exception`` (jax's compilation cache does) must not swallow it.
    """


class Run:
    """The budget, the progress log and the record, saved after every part."""

    def __init__(self, args, slug):
        self.start = time.perf_counter()
        self.budget = args.budget_s
        self.path = os.path.join(args.out, f"{slug}.json")
        self.record: dict[str, Any] = {"complete": False, "parts": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self, part: str) -> float:
        """Seconds left in ``part``'s share of the budget."""
        return SHARES[part] * self.budget - self.elapsed()

    def log(self, message: str) -> None:
        cpu = time.process_time()
        print(f"[{self.elapsed():6.1f}s, cpu {cpu:6.1f}s] {message}", flush=True)

    def save(self) -> None:
        self.record["elapsed_s"] = round(self.elapsed(), 2)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.record, f, indent=2)
        os.replace(tmp, self.path)  # a reader never sees half a file

    def part(self, name: str, value: Any) -> None:
        self.record["parts"][name] = value
        self.save()


@contextlib.contextmanager
def stop_at(seconds: float):
    """Raises :class:`Stop` in the main thread after ``seconds``, on SIGTERM.

    A signal is handled when Python code runs, so a compilation in progress
    finishes first; the alarm repeats every 5 s until the caller cancels it
    (``signal.setitimer(signal.ITIMER_REAL, 0)``).
    """

    def handler(signum, frame):
        raise Stop("budget" if signum == signal.SIGALRM else "terminated")

    old = {s: signal.signal(s, handler) for s in (signal.SIGALRM, signal.SIGTERM)}
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3), 5.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in old.items():
            signal.signal(s, h)
