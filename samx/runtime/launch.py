"""Several local processes under ``jax.distributed``: the role torchrun plays.

``python -m samx.runtime.launch -n 2 --cpu-devices 2 train.py args...`` starts
two copies of ``train.py``; each calls :func:`initialize` before any JAX work
and then runs as one process of a multi-controller JAX program. The launcher
reserves a coordinator port on 127.0.0.1 for the whole run (rank 0's
coordinator binds it there, on loopback only), streams every process's output
line by line prefixed by its rank, keeps the last lines of each, stops every
process when one fails (or when the run outlives a timeout, if given one), names
the rank that failed first, and leaves no process behind. It is for one machine (tests,
recipes, debugging); on a cluster, use the cluster's launcher and
``jax.distributed.initialize()``'s own detection.

Neither ``import samx`` nor ``import samx.runtime`` loads this module.
"""

import argparse
import atexit
import collections
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

# The environment the launcher hands each process.
COORDINATOR = "SAMX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "SAMX_NUM_PROCESSES"
PROCESS_ID = "SAMX_PROCESS_ID"
CPU_DEVICES = "SAMX_NUM_CPU_DEVICES"
LAUNCHER_PID = "SAMX_LAUNCHER_PID"
JOINED = "SAMX_LAUNCH_JOINED_DIR"  # initialize() marks its rank there

__all__ = ("LaunchError", "initialize", "launch")


class LaunchError(RuntimeError):
    """A launched process failed, or the run timed out; every process was stopped.

    Attributes:
      returncodes: each rank's exit status (negative: killed by that signal).
      outputs: each rank's last output lines (stdout and stderr together; as
        many as :func:`launch`'s ``keep_lines``).
      timed_out: whether the run outlived its timeout.
      failed: the rank named as the cause: one that never reached
        :func:`initialize` while others waited there for it, else the rank
        that exited with a non-zero status first; None on a timeout.
    """

    def __init__(self, message, returncodes, outputs, timed_out, failed):
        super().__init__(message)
        self.returncodes = returncodes
        self.outputs = outputs
        self.timed_out = timed_out
        self.failed = failed


def _reserve_port() -> socket.socket:
    """A socket bound to a free port of 127.0.0.1 with ``SO_REUSEPORT``, not
    listening: while it is open, no other program can bind that port (nor can
    the kernel hand it to another ``bind(("127.0.0.1", 0))``), but rank 0's
    coordinator can: gRPC binds with ``SO_REUSEPORT`` too, and only its
    socket listens, so it alone accepts the connections."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
    except BaseException:
        s.close()
        raise
    return s


def _check_int(fn: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{fn}({name}=...)` must be an int >= 1, got {value!r}.")


def _check_seconds(fn: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(
            f"`{fn}({name}=...)` must be a number of seconds > 0, got {value!r}."
        )


def launch(
    argv: Sequence[str | os.PathLike],
    num_processes: int = 2,
    *,
    timeout: float | None = None,
    cpu_devices: int | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    echo: bool = True,
    grace: float = 5.0,
    on_output: Callable[[int, str, subprocess.Popen], Any] | None = None,
    keep_lines: int | None = 1000,
) -> list[list[str]]:
    """Runs ``python *argv`` as ``num_processes`` processes of one JAX program.

    Each process gets its rank and the coordinator's address in its
    environment, which :func:`initialize` reads. The coordinator's port is
    reserved on 127.0.0.1 for the whole run: no other program, and no other
    launch, can take it before rank 0's coordinator binds it (on 127.0.0.1
    only). The processes run in their own process groups; when one exits with
    a non-zero status, or ``timeout`` seconds pass, every process group is sent
    SIGTERM, then SIGKILL after ``grace`` seconds, and all are waited for
    before this function raises.

    Output is read line by line, one thread per rank: each echoed line is one
    whole line of one rank, and only the last ``keep_lines`` lines of each rank
    are kept (for the return value and the failure report), so that a long
    run's output does not grow the launcher's memory.

    Args:
      argv: the arguments after ``python``: a script and its arguments
        (``["train.py", "--steps", "10"]``), or ``["-m", "module", ...]`` or
        ``["-c", "code"]``; run with this interpreter, ``sys.executable``.
      num_processes: how many processes.
      timeout: seconds the whole run may take (start-up included) before every
        process is stopped: a hung collective then fails instead of hanging.
        None (the default): no limit, for training runs of any length.
      cpu_devices: run on the CPU backend (``JAX_PLATFORMS=cpu``) with this many
        devices per process; None leaves the platform to JAX.
      env: extra environment variables for every process.
      cwd: the processes' working directory; default this one's.
      echo: print each output line as it comes, as ``[rank] line``.
      grace: seconds between SIGTERM and SIGKILL when stopping the processes
        (JAX catches SIGTERM as a preemption notice and goes on).
      on_output: called as ``on_output(rank, line, process)`` for each output
        line, from a reader thread, with that rank's ``subprocess.Popen``:
        e.g. to watch the run, or to kill one process at a given point.
      keep_lines: how many of each rank's last output lines to keep; None
        keeps them all (memory grows with the output).

    Returns:
      Each rank's last ``keep_lines`` output lines, when every process exited
      with status 0.

    Raises:
      LaunchError: when a process failed or the run timed out, after every
        process was stopped; the message names the rank that failed first (or
        one that never reached :func:`initialize` while the others waited for
        it there) and every rank's exit status, and quotes the end of its
        output.

    Examples:
      >>> from samx.runtime.launch import launch
      >>> code = "import os; print('rank', os.environ['SAMX_PROCESS_ID'])"
      >>> outputs = launch(["-c", code], 2, timeout=60, echo=False)
      >>> outputs
      [['rank 0'], ['rank 1']]

    References:
      PyTorch, `torchrun (Elastic Launch)
      <https://pytorch.org/docs/stable/elastic/run.html>`_

      JAX, `Multi-process environments
      <https://docs.jax.dev/en/latest/multi_process.html>`_
    """
    fn = "samx.runtime.launch.launch"
    if isinstance(argv, (str, os.PathLike)) or not (
        isinstance(argv, Sequence)
        and argv
        and all(isinstance(a, (str, os.PathLike)) for a in argv)
    ):
        raise TypeError(
            f"`{fn}(argv=...)` must be a non-empty list of strings (or paths), the"
            " arguments after `python`, e.g. ['train.py', '--steps', '10'], got"
            f" {argv!r}."
        )
    argv = [os.fspath(a) for a in argv]
    _check_int(fn, "num_processes", num_processes)
    if cpu_devices is not None:
        _check_int(fn, "cpu_devices", cpu_devices)
    if timeout is not None:
        _check_seconds(fn, "timeout", timeout)
    _check_seconds(fn, "grace", grace)
    if keep_lines is not None:
        _check_int(fn, "keep_lines", keep_lines)
    if on_output is not None and not callable(on_output):
        raise TypeError(
            f"`{fn}(on_output=...)` must be callable as `on_output(rank, line,"
            f" process)` or None, got {type(on_output).__name__}."
        )
    if env is not None and not (
        isinstance(env, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise TypeError(f"`{fn}(env=...)` must be a dict of strings, got {env!r}.")
    outputs = [collections.deque(maxlen=keep_lines) for _ in range(num_processes)]
    procs: list[subprocess.Popen] = []
    threads = []
    errors: list[Exception] = []  # raised by on_output
    exits: queue.Queue = queue.Queue()  # (rank, status), in the order they exit
    echo_lock = threading.Lock()
    start = time.monotonic()
    with _reserve_port() as port, tempfile.TemporaryDirectory() as joined:
        base = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        base[COORDINATOR] = f"127.0.0.1:{port.getsockname()[1]}"
        base[NUM_PROCESSES] = str(num_processes)
        base[LAUNCHER_PID] = str(os.getpid())
        base[JOINED] = joined
        if cpu_devices is not None:
            base[CPU_DEVICES] = str(cpu_devices)
            base["JAX_PLATFORMS"] = "cpu"
        try:
            for rank in range(num_processes):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, *argv],
                        env={**base, PROCESS_ID: str(rank)},
                        cwd=cwd,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                        errors="replace",
                        start_new_session=True,  # its own process group
                    )
                )
                for target, args in (
                    (_waiter, (procs[-1], rank, exits)),
                    (
                        _stream,
                        (
                            procs[-1],
                            rank,
                            outputs[rank],
                            echo_lock if echo else None,
                            on_output,
                            errors,
                            exits,
                        ),
                    ),
                ):
                    threads.append(threading.Thread(target=target, args=args))
                    threads[-1].daemon = True
                    threads[-1].start()
            deadline = None if timeout is None else start + timeout
            failed, timed_out = _wait(procs, deadline, errors, exits)
        finally:
            _stop(procs, grace)
            for thread in threads:
                thread.join(timeout=5)
        marks = os.listdir(joined)
        reached = {int(r) for r in marks if r.isdigit()}
        joined_ok = {int(r[: -len(".done")]) for r in marks if r.endswith(".done")}
    outputs = [list(o) for o in outputs]
    if errors:
        raise RuntimeError(f"{fn}: `on_output` raised; stopped every process.") from (
            errors[0]
        )
    codes = [p.returncode for p in procs]
    if failed is None and not timed_out:
        return outputs
    elapsed = time.monotonic() - start
    # Ranks that never reached initialize() while others waited for them there
    # (and failed when initialize() timed out, or are still waiting).
    waiting = reached - joined_ok
    missing = [r for r in range(num_processes) if r not in reached] if waiting else []
    if timed_out:
        what = (
            f"timed out after {elapsed:.0f} s (`timeout={timeout}`): a hung"
            " collective, or a process waiting for one that never came?"
        )
        if missing:
            never = ", ".join(map(str, missing))
            what += f" Never reached `initialize()`: rank {never}."
        shown = range(num_processes)
    else:
        if missing and failed in waiting:
            first = failed
            failed = missing[0]
            what = (
                f"rank {failed} never reached `initialize()`"
                f" ({_status(codes[failed])}),"
                f" where the others waited for it; rank {first} exited with"
                f" {_status(codes[first])} after {elapsed:.0f} s"
            )
            shown = [failed, first]
        else:
            what = (
                f"rank {failed} exited with {_status(codes[failed])} after"
                f" {elapsed:.0f} s"
            )
            shown = [failed]
    tails = "".join(
        f"\n--- last lines of rank {r} ({_status(codes[r])}):\n"
        + "\n".join(outputs[r][-20:])
        for r in shown
    )
    raise LaunchError(
        f"{fn}({argv!r}, {num_processes}): {what}; stopped every process"
        f" ({', '.join(f'rank {r}: {_status(c)}' for r, c in enumerate(codes))})."
        + tails,
        codes,
        outputs,
        timed_out,
        failed,
    )


def _waiter(proc, rank, exits):
    """Puts ``(rank, status)`` in ``exits`` as soon as ``proc`` exits."""
    exits.put((rank, proc.wait()))


def _stream(proc, rank, lines, lock, on_output, errors, exits):
    """Reads ``proc``'s output line by line; echoes each whole line under
    ``lock`` (when echoing), keeps the last ones in ``lines``."""
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        if lock is not None:
            with lock:  # one write of the whole line, then flush
                sys.stdout.write(f"[{rank}] {line}\n")
                sys.stdout.flush()
        if on_output is not None:
            try:
                on_output(rank, line, proc)
            except Exception as e:  # stop the run; keep reading the pipe
                errors.append(e)
                exits.put((None, None))  # wake _wait
                on_output = None


def _wait(procs, deadline, errors, exits):
    """``(first failed rank or None, timed out)``, once all exit, one fails, or
    late; the first failure by time, as the waiter threads report them."""
    done = 0
    while not errors:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return None, True
        try:
            rank, code = exits.get(timeout=left)
        except queue.Empty:
            return None, True
        if rank is None:  # on_output raised
            break
        if code != 0:
            return rank, False
        done += 1
        if done == len(procs):
            return None, False
    return None, False


def _stop(procs, grace):
    """SIGTERM, then SIGKILL, to every process group; waits for every process."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:  # the whole group: also what the process started
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < end:
            if all(p.poll() is not None for p in procs):
                break
            time.sleep(0.05)
    for p in procs:
        p.wait()


def _status(code):
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def initialize(*, timeout: int = 120) -> tuple[int, int]:
    """``jax.distributed.initialize`` from the environment :func:`launch` sets.

    Call it first thing in a launched program, before any JAX computation. It
    sets the CPU device count the launcher asks for, the CPU collectives to
    gloo (cross-process collectives on the CPU backend), and joins the
    coordinator, which rank 0 starts on the launcher's reserved port of
    127.0.0.1 (``coordinator_bind_address``: loopback only, not every
    interface). It tells the launcher that this rank reached it, so that a
    failure there names the rank the others waited for. A watchdog thread ends
    the process when the launcher dies, so that no process outlives it; an
    uncaught exception ends it at once (with status 1, after its traceback and
    the program's ``atexit`` handlers, e.g. an orbax async save's finalisation)
    rather than in ``jax.distributed``'s shutdown, which would wait for the
    other processes. An ``atexit`` handler that itself waits for the other
    processes delays that end until its own timeout.

    Args:
      timeout: seconds to wait for every process to join.

    Returns:
      ``(process_id, num_processes)``.

    Raises:
      RuntimeError: outside a process started by :func:`launch`.

    Examples:
      >>> from samx.runtime.launch import launch
      >>> code = (
      ...     "from samx.runtime.launch import initialize\\n"
      ...     "rank, n = initialize()\\n"
      ...     "import jax\\n"
      ...     "print(rank, n, jax.device_count(), jax.local_device_count())"
      ... )
      >>> launch(["-c", code], 2, cpu_devices=2, timeout=120, echo=False)
      [['0 2 4 2'], ['1 2 4 2']]

    References:
      JAX, `Multi-process environments
      <https://docs.jax.dev/en/latest/multi_process.html>`_
    """
    fn = "samx.runtime.launch.initialize"
    _check_int(fn, "timeout", timeout)
    missing = [
        k for k in (COORDINATOR, NUM_PROCESSES, PROCESS_ID) if k not in os.environ
    ]
    if missing:
        raise RuntimeError(
            f"`{fn}()` reads {', '.join(missing)} from the environment, which"
            " `samx.runtime.launch` sets: start this program with `python -m"
            " samx.runtime.launch -n N program.py` (or on a cluster, call"
            " `jax.distributed.initialize()` instead)."
        )
    import jax  # not at import time: the launcher itself needs no JAX

    if os.environ.get(CPU_DEVICES):
        jax.config.update("jax_num_cpu_devices", int(os.environ[CPU_DEVICES]))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    rank, n = int(os.environ[PROCESS_ID]), int(os.environ[NUM_PROCESSES])
    if os.environ.get(LAUNCHER_PID):
        threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    sys.excepthook = _exit_at_once(sys.excepthook)
    joined = os.environ.get(JOINED)
    _mark(joined, str(rank))
    jax.distributed.initialize(
        os.environ[COORDINATOR],
        num_processes=n,
        process_id=rank,
        initialization_timeout=timeout,
        # The launcher's address is 127.0.0.1: listen there, not on [::].
        coordinator_bind_address=os.environ[COORDINATOR],
    )
    _mark(joined, f"{rank}.done")
    return rank, n


def _mark(directory, name):
    """Tells the launcher (through a file in ``directory``) how far this rank got."""
    if directory:
        try:
            open(os.path.join(directory, name), "w").close()
        except OSError:  # the launcher's directory is gone: it is gone too
            pass


def _exit_at_once(excepthook):
    """``excepthook``, then the ``atexit`` handlers, then exit: without JAX's
    own exit handler, whose ``jax.distributed`` shutdown barrier would wait for
    the other processes, so that the launcher sees the failure now and stops
    them."""

    def hook(*exc_info):
        excepthook(*exc_info)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            _skip_jax_exit_handlers()
            atexit._run_exitfuncs()  # the program's: what interpreter exit runs
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(1)

    return hook


def _skip_jax_exit_handlers():
    """Unregisters JAX's exit handlers that wait for the other processes
    (``jax.distributed``'s shutdown barrier) or for pending computations."""
    try:
        from jax._src import api, dispatch
    except ImportError:
        return
    for module, name in ((api, "clean_up"), (dispatch, "wait_for_tokens")):
        handler = getattr(module, name, None)
        if handler is not None:
            atexit.unregister(handler)


def _exit_with(parent):
    """Ends this process once ``parent`` (the launcher) is gone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(70)


def main(args: Sequence[str] | None = None) -> int:
    """``python -m samx.runtime.launch -n N [options] program.py [args...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m samx.runtime.launch",
        description="Run a JAX program as N local processes under jax.distributed;"
        " the program calls samx.runtime.launch.initialize() first.",
    )
    parser.add_argument("-n", "--num-processes", type=int, default=2)
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="run on the CPU backend with this many devices per process",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds the whole run may take; default: no limit",
    )
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="program.py [args...]")
    ns = parser.parse_args(args)
    if not ns.argv:
        parser.error("give the program to run, e.g. train.py")
    try:
        launch(
            ns.argv,
            ns.num_processes,
            timeout=ns.timeout,
            cpu_devices=ns.cpu_devices,
            keep_lines=20,  # echoed as they come; kept for the failure report
        )
    except LaunchError as e:
        print(e, file=sys.stderr)
        if e.timed_out:
            return 124
        code = e.returncodes[e.failed]
        if code == 0:  # exited early, before initialize(), but with status 0
            return 1
        return 128 - code if code < 0 else code  # a signal, as a shell reports it
    return 0


if __name__ == "__main__":
    sys.exit(main())
