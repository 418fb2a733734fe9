"""Several real processes: the Trainer under jax.distributed, kill and resume.

Each test starts 2 processes x 2 CPU devices (gloo collectives over
127.0.0.1) with ``samx.runtime.launch`` running tests/_distributed_worker.py,
and compares what they wrote with a one-process reference computed here, on
one device, on the global batches. Every launch has a timeout, after which
every process is stopped and the test fails with the processes' output.
"""

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from _testing import (
    async_sam_reference,
    batch_norm_loss,
    dropout_model,
    flax_loss,
    m_sharpness_reference,
    mlp_loss,
    pure_step,
)

import samx
from samx.runtime.launch import LaunchError, launch

WORKER = str(pathlib.Path(__file__).with_name("_distributed_worker.py"))
PROCESSES, CPU_DEVICES = 2, 2
BATCH, STEPS = 16, 6  # global batch: 8 examples per process, 4 per device
TIMEOUT = 180  # s, per launch; each takes far less on an idle 2-core machine


def _problem(steps, sizes=(8, 16, 4)):
    """_testing's MLP problem, drawn with NumPy (no compilation here)."""
    rng = np.random.default_rng(0)
    params = {
        f"layer{i}": {
            "w": (rng.normal(size=(m, n)) / np.sqrt(m)).astype(np.float32),
            "b": np.zeros(n, np.float32),
        }
        for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    }
    batches = [
        {
            "x": rng.normal(size=(BATCH, sizes[0])).astype(np.float32),
            "y": rng.normal(size=(BATCH, sizes[-1])).astype(np.float32),
        }
        for _ in range(steps)
    ]
    return params, mlp_loss, batches


def _write(path, params, batches):
    leaves = {f"{k}/{n}": x for k, layer in params.items() for n, x in layer.items()}
    stacked = {k: np.stack([b[k] for b in batches]) for k in ("x", "y")}
    np.savez(path, **leaves, **stacked)


def _launch(tmp_path, *argv, on_output=None):
    """2 processes x 2 CPU devices running ``python *argv``; then checks that
    none of them is left (also when the launch fails)."""
    pids = set()

    def watch(rank, line, process):
        pids.add(process.pid)
        if on_output is not None:
            on_output(rank, line, process)

    try:
        return launch(
            list(map(str, argv)),
            PROCESSES,
            cpu_devices=CPU_DEVICES,
            timeout=TIMEOUT,
            cwd=str(tmp_path),
            echo=False,
            grace=1,  # JAX catches SIGTERM (a preemption notice): SIGKILL soon
            on_output=watch,
        )
    finally:
        assert len(pids) == PROCESSES
        _assert_gone(pids)


def _read(out, case, rank):
    with np.load(out / f"{case}_rank{rank}.npz") as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def _pids(outputs):
    return [int(re.search(r"^pid (\d+)$", "\n".join(o), re.M)[1]) for o in outputs]


def _assert_gone(pids, wait=5.0):
    """Every process in ``pids`` has exited (a zombie that init has not reaped
    yet counts as gone: it no longer runs)."""

    def running(pid):
        try:
            stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rpartition(")")[2].split()[0] != "Z"

    end = time.monotonic() + wait
    while any(map(running, pids)) and time.monotonic() < end:
        time.sleep(0.05)
    left = [pid for pid in pids if running(pid)]
    for pid in left:  # the test fails, but leaves nothing running either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


# --- the Trainer and make_data_parallel_step on a mesh over two processes --------


@pytest.fixture(scope="module")
def equality_run(tmp_path_factory):
    """One launch that runs every case; ``(outputs dir, outputs, problem)``."""
    tmp = tmp_path_factory.mktemp("equality")
    params, loss, batches = _problem(STEPS)
    _write(tmp / "problem.npz", params, batches)
    outputs = _launch(tmp, WORKER, tmp / "problem.npz", tmp)
    return tmp, outputs, (params, loss, batches)


def _ascent_first(batch, b):
    """The global batch with each process's first ``b`` examples first: the
    one-process batch whose first P*b examples are the processes' ascent."""
    local = BATCH // PROCESSES
    order = [r * local + i for i in range(b) for r in range(PROCESSES)]
    order = sorted(order) + [i for i in range(BATCH) if i not in order]
    return jax.tree.map(lambda x: x[np.array(order)], batch)


def _one_process(case, params, loss, batches):
    """The final parameters of ``case``, on one device, on the global batches."""
    sgd = optax.sgd(0.1, momentum=0.9)
    if case == "m_sharpness":
        return m_sharpness_reference(params, loss, batches, 0.05, n=4)[-1]
    if case.startswith("async_sam"):  # calibrated: b' = 2, process 1's choice
        b = 2 if case in ("async_sam_small", "async_sam_calibrated") else BATCH // 2
        return async_sam_reference(
            sgd,
            params,
            loss,
            [_ascent_first(x, b) for x in batches],
            rho=0.05,
            ascent=PROCESSES * b,
            pairing="paired",
        )[-1]
    tx, method = {
        "sam": (samx.sam(sgd, rho=0.05), "sam"),
        "sampa": (samx.sampa(optax.adam(1e-2), rho=0.1, lam=0.2), "sampa"),
        "plain": (optax.adam(1e-2), "plain"),
    }[case]
    step = jax.jit(pure_step(tx, method, loss, None))
    state, prev = tx.init(params), batches[0]
    for batch in batches:
        params, state = step(params, state, prev, batch)
        prev = batch
    return params


CASES = ["sam", "async_sam", "async_sam_small", "sampa", "plain", "m_sharpness"]


@pytest.mark.parametrize("case", [*CASES, "async_sam_calibrated"])
def test_two_processes_equal_one_process(equality_run, case):
    out, outputs, (params, loss, batches) = equality_run
    expected = jax.tree.leaves(_one_process(case, params, loss, batches))
    for rank in range(PROCESSES):
        got = _read(out, case, rank)
        for x, y in zip(got, expected, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=case)
    for rank in range(PROCESSES):
        if case.startswith("async_sam"):  # each process's ascent on its own CPU
            assert f"{case} ascent on process {rank}" in outputs[rank]
        if case != "m_sharpness":
            assert f"{case} compilations after the first step: 0" in outputs[rank]


def test_two_processes_bad_input_raises_a_clear_error(equality_run):
    _, outputs, _ = equality_run
    expected = {
        "sampa with an ascent device": r"Trainer\(ascent_device=CpuDevice\(id=\d+\)\)`:"
        r" on a mesh that spans several processes, sampa's gradient 1 sees the"
        r" current global batch.*leave `ascent_device` None",
        "a different ascent batch per process": r"Trainer\(ascent_batch_size=[23]\)`"
        r" differs between the processes",
        "a global batch": r"Trainer.step\(batch=\.\.\.\)`: on a mesh that spans"
        r" several processes, pass this process's part of the batch",
        **{
            f"unequal batches, {fn}": rf"`{re.escape(name)}\(batch=\.\.\.\)`: the"
            r" processes' parts of the batch differ in size \(process 0: 8, process"
            r" 1: 4 examples; this is process \d\).*every process must pass the same"
            r" number of examples"
            for fn, name in (
                ("Trainer", "samx.runtime.Trainer.step"),
                ("make_data_parallel_step", "make_data_parallel_step(...)"),
                ("samx.flax.Trainer", "samx.flax.Trainer.step"),
            )
        },
    }
    for rank in range(PROCESSES):
        for name, match in expected.items():
            (line,) = [x for x in outputs[rank] if x.startswith(name + ":")]
            assert re.search(f"^{name}: ValueError: .*{match}", line), line


def test_two_processes_agree_on_the_calibrated_ascent_batch(equality_run):
    # calibrate_ascent_batch(fast_device=mesh), its clock made up per process:
    # alone, process 0 would take b' = 8 and process 1 b' = 2; both take 2,
    # and the run at it equals the one-process run at b' = 2
    # (test_two_processes_equal_one_process[async_sam_calibrated]).
    _, outputs, _ = equality_run
    for rank, alone in enumerate((8, 2)):
        assert f"calibration: alone b' = {alone}, agreed b' = 2" in outputs[rank]


def _flax_sam_reference(batches, steps):
    """samx.sam on _testing's dropout model, on one device, without samx.flax:
    both passes of a step draw the dropout keys of its start; the parameters
    and the dropout count after ``steps`` steps."""
    from flax import nnx

    graphdef, params, rest = nnx.split(dropout_model(), nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)  # arrays, for the jit
    tx = samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)

    def loss(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        return flax_loss(model, batch), nnx.as_pure(
            nnx.state(model, nnx.Not(nnx.Param))
        )

    @jax.jit
    def step(params, opt_state, rest, batch):
        grad = jax.grad(lambda p: loss(p, rest, batch)[0])
        updates, opt_state = tx.update(
            grad(params), opt_state, params, grad_fn=lambda p, i: grad(p)
        )
        new_rest = loss(params, rest, batch)[1]  # the counts moved on
        return optax.apply_updates(params, updates), opt_state, new_rest

    opt_state = tx.init(params)
    for batch in batches[:steps]:
        params, opt_state, rest = step(params, opt_state, rest, batch)
    count = nnx.merge(graphdef, params, rest).layers[2].rngs.count[...]
    return jax.tree.leaves(params), int(count)


def test_flax_trainer_with_dropout_on_two_processes(equality_run):
    # samx.flax.Trainer on a mesh over both processes, for an NNX model with
    # an RNG stream (nnx.Dropout; for SAM, its parameters and keys committed
    # to one of the process's devices): SAM ends at the one-device run's
    # parameters, AsyncSAM (its ascent on each process's CPU: each process's
    # local batch, so no one-device run to match) at the same parameters on
    # both processes, finite and trained; the stream drew once per step.
    out, outputs, (_, _, batches) = equality_run
    expected, count = _flax_sam_reference(batches, STEPS)
    start, _ = _flax_sam_reference(batches, 0)
    assert count == STEPS
    for case in ("flax_sam", "flax_async_sam"):
        got = [_read(out, case, rank) for rank in range(PROCESSES)]
        for rank in range(PROCESSES):
            assert f"{case} dropout count: {STEPS}" in outputs[rank]
            for x, y in zip(got[rank], got[0], strict=True):
                np.testing.assert_array_equal(x, y, err_msg=case)
        if case == "flax_sam":
            for x, y in zip(got[0], expected, strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
        assert all(np.isfinite(x).all() for x in got[0])
        moved = [np.abs(x - y).max() for x, y in zip(got[0], start, strict=True)]
        assert max(moved) > 1e-3, case


def test_async_sam_with_batch_norm_differs_from_one_process(equality_run):
    # docs/multihost.md: with BatchNorm, each process's ascent normalises with
    # its own local batch's statistics. The run is the same on both processes
    # and equals the one-process AsyncSAM whose ascent gradient is the mean of
    # the gradients on each process's half of the batch, not the one-process
    # AsyncSAM on the whole batch (b' = b).
    out, _, (params, _, batches) = equality_run
    got = [_read(out, "async_sam_batchnorm", rank) for rank in range(PROCESSES)]
    for x, y in zip(*got, strict=True):
        np.testing.assert_array_equal(x, y)
    loss = lambda p, b: batch_norm_loss(p, np.float32(0), b)[0]  # noqa: E731
    grad, local = jax.grad(loss), BATCH // PROCESSES

    def per_process(p, batch):  # the mean of the halves' gradients
        halves = jax.tree.map(lambda x: x.reshape(PROCESSES, local, -1), batch)
        grads = jax.vmap(grad, in_axes=(None, 0))(p, halves)
        return jax.tree.map(lambda g: g.mean(0), grads)

    common = dict(rho=0.05, ascent=BATCH, pairing="paired")
    sgd = optax.sgd(0.1, momentum=0.9)
    split = async_sam_reference(
        sgd, params, loss, batches, ascent_grad=per_process, **common
    )[-1]
    whole = async_sam_reference(sgd, params, loss, batches, **common)[-1]
    for x, y in zip(got[0], jax.tree.leaves(split), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    gap = max(
        np.abs(x - y).max() for x, y in zip(got[0], jax.tree.leaves(whole), strict=True)
    )
    assert gap > 1e-4, gap


# --- fault tolerance: SIGKILL one worker, resume both from the checkpoint ----------


def _recipe(path):
    """docs/multihost.md's training script, written to ``path``, and its command."""
    page = (
        pathlib.Path(__file__).resolve().parents[1] / "docs" / "multihost.md"
    ).read_text()
    (code,) = [
        block
        for block in re.findall(r"```python\n(.*?)```", page, re.S)
        if "initialize()" in block
    ]
    path.write_text(code)
    (command,) = re.findall(r"```bash\n(python -m samx\.runtime\.launch .*)\n```", page)
    return command


def _run_command(command, cwd):
    """The page's shell command, here: each rank's output lines."""
    argv = shlex.split(command)
    assert argv[0] == "python"
    out = subprocess.run(
        [sys.executable, *argv[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    return [[x[4:] for x in lines if x.startswith(f"[{r}] ")] for r in range(PROCESSES)]


def _lines(outputs, prefix):
    """Each rank's first output line that starts with ``prefix`` (or None)."""
    return [next((x for x in o if x.startswith(prefix)), None) for o in outputs]


def test_the_recipe_killed_and_resumed_ends_bit_identical(tmp_path):
    # Uninterrupted, with the page's command (its directory made ours) ...
    command = _recipe(tmp_path / "train.py")
    assert " train.py /tmp/run 12" in command, command
    straight = _run_command(command.replace("/tmp/run", str(tmp_path / "a")), tmp_path)
    assert _lines(straight, "resuming") == ["resuming at step 0"] * PROCESSES
    # ... then killed and resumed, with the Python API.
    script = tmp_path / "train.py"

    def kill_rank_1(rank, line, process):
        if rank == 1 and line.startswith("step 8:"):
            process.kill()  # SIGKILL, from outside

    with pytest.raises(LaunchError, match=r"rank 1 exited with signal SIGKILL") as e:
        _launch(tmp_path, script, tmp_path / "run", 12, on_output=kill_rank_1)
    assert e.value.returncodes[1] == -9 and e.value.returncodes[0] != 0, e.value
    assert _lines(e.value.outputs, "final") == [None] * PROCESSES
    resumed = _launch(tmp_path, script, tmp_path / "run", 12)
    # Checkpoints at steps 3, 6, 9, 12: both resume at the same one, the last
    # that both had completed (orbax's save of step 6 may have been in flight).
    (start,) = set(_lines(resumed, "resuming"))
    assert start in {f"resuming at step {k}" for k in (3, 6, 9)}, start
    final = _lines(straight, "final w")
    assert final[0] is not None and len(set(final)) == 1  # same on both processes
    assert _lines(resumed, "final w") == final  # the bytes: bit for bit


# --- the launcher: failures and timeouts stop every process -----------------------


def test_launcher_stops_every_process_when_one_fails(tmp_path):
    # Rank 1 fails once every rank has said its pid (files as a barrier: under
    # load, a rank may start after the failure otherwise).
    code = (
        "import os, pathlib, sys, time\n"
        "print('pid', os.getpid(), flush=True)\n"
        f"here = pathlib.Path({str(tmp_path)!r})\n"
        "(here / os.environ['SAMX_PROCESS_ID']).touch()\n"
        "if os.environ['SAMX_PROCESS_ID'] == '1':\n"
        "    while len(list(here.iterdir())) < 3: time.sleep(0.05)\n"
        "    sys.exit(3)\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(LaunchError, match=r"rank 1 exited with exit status 3") as e:
        launch(["-c", code], 3, timeout=60, echo=False)
    assert e.value.returncodes[1] == 3 and e.value.failed == 1
    assert not e.value.timed_out
    assert all(c < 0 for r, c in enumerate(e.value.returncodes) if r != 1)
    _assert_gone(_pids(e.value.outputs))


def test_launcher_stops_every_process_when_on_output_raises():
    code = "import os, time\nprint('pid', os.getpid(), flush=True)\ntime.sleep(600)\n"
    pids = []

    def broken(rank, line, process):
        pids.append(process.pid)
        raise KeyError("a bug in the hook")

    with pytest.raises(RuntimeError, match=r"`on_output` raised") as e:
        launch(["-c", code], 2, timeout=60, echo=False, on_output=broken)
    assert isinstance(e.value.__cause__, KeyError)
    _assert_gone(pids)


def test_launcher_times_out_and_stops_the_grandchildren_too():
    # Each process starts a child of its own, which must go too.
    code = (
        "import os, subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print('pid', c.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(LaunchError, match=r"timed out after .*hung collective") as e:
        launch(["-c", code], 2, timeout=3, echo=False, grace=1)
    assert e.value.timed_out
    _assert_gone(_pids(e.value.outputs))


def _collective(rank_1):
    """A program where rank 0 waits in an all-reduce and rank 1 runs ``rank_1``."""
    return (
        "import os, time\n"
        "from samx.runtime.launch import initialize\n"
        "rank, n = initialize()\n"
        "print('pid', os.getpid(), flush=True)\n"
        "import jax, jax.numpy as jnp, numpy as np\n"
        "from jax.sharding import Mesh, NamedSharding, PartitionSpec as P\n"
        "mesh = Mesh(np.array(jax.devices()), ('data',))\n"
        "x = jax.make_array_from_process_local_data(\n"
        "    NamedSharding(mesh, P('data')), np.ones(2, np.float32))\n"
        f"if rank == 1: {rank_1}\n"
        "print('entering the collective', flush=True)\n"
        "jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)"
        ".block_until_ready()\n"
    )


def test_hung_collective_fails_with_a_clear_message():
    # Rank 1 never joins the collective that rank 0 waits in.
    code = _collective("time.sleep(600)")
    with pytest.raises(LaunchError, match=r"timed out .*hung collective") as e:
        launch(["-c", code], 2, cpu_devices=2, timeout=12, echo=False, grace=1)
    assert "entering the collective" in e.value.outputs[0]
    _assert_gone(_pids(e.value.outputs))


def test_an_exception_in_one_process_stops_the_run_at_once():
    # Not after jax.distributed's shutdown barrier (minutes), nor at the timeout.
    code = _collective("raise ValueError('bad input on rank 1')")
    with pytest.raises(
        LaunchError,
        match=r"(?s)rank 1 exited with exit status 1 after \d+ s.*bad input",
    ) as e:
        launch(["-c", code], 2, cpu_devices=2, timeout=120, echo=False, grace=1)
    assert not e.value.timed_out
    _assert_gone(_pids(e.value.outputs))


def test_processes_end_when_their_launcher_dies():
    # E.g. CI killing pytest: the processes notice and end themselves.
    child = (
        "import os, time\n"
        "from samx.runtime.launch import initialize\n"
        "initialize()\n"
        "print('ready', os.getpid(), flush=True)\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from samx.runtime.launch import launch;"
            " launch(['-c', sys.argv[1]], 2, cpu_devices=1, timeout=300)",
            child,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pids = []
        for line in launcher.stdout:
            if re.match(r"\[\d\] ready \d+$", line):
                pids.append(int(line.split()[-1]))
            if len(pids) == PROCESSES:
                break
        launcher.kill()
    finally:
        launcher.kill()
        launcher.wait()
    assert len(pids) == PROCESSES
    _assert_gone(pids)


def test_the_command_line_launcher(tmp_path):
    script = tmp_path / "hello.py"
    script.write_text(
        "import os, sys\n"
        "print('argv', sys.argv[1:], 'rank', os.environ['SAMX_PROCESS_ID'])\n"
        "if os.environ['SAMX_PROCESS_ID'] == '1': sys.exit(5)\n"
        "import time; time.sleep(600)\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "samx.runtime.launch", "-n", "2", "--timeout", "60"]
        + [str(script), "a", "--b"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "[1] argv ['a', '--b'] rank 1" in out.stdout
    assert out.returncode == 5, out.stderr  # rank 1's, not rank 0's (SIGTERM)
    assert "rank 1 exited with exit status 5" in out.stderr
