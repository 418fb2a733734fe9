"""samx.runtime.launch for long runs: its coordinator's port and address, no
default timeout, whole and bounded output, the rank named on a failure, and
atexit handlers run after an uncaught exception (issue 23, items 4-5).

The other launcher tests (failures, timeouts, nothing left behind) are in
tests/test_distributed.py.
"""

import inspect
import json
import re
import subprocess
import sys

import pytest

import samx.runtime.launch as launcher
from samx.runtime.launch import LaunchError, launch

TIMEOUT = 120  # s, per launch: each takes seconds on an idle 2-core machine


def test_the_coordinator_port_is_held_for_the_run_and_bound_to_loopback():
    # Before rank 0 starts the coordinator, nothing else can bind its port
    # (with the launcher's old probe-and-close, anything could); the
    # coordinator then listens on 127.0.0.1 only, not on every interface.
    code = (
        "import os, pathlib, socket\n"
        "port = int(os.environ['SAMX_COORDINATOR_ADDRESS'].rsplit(':', 1)[1])\n"
        "rank = int(os.environ['SAMX_PROCESS_ID'])\n"
        "if rank == 0:\n"
        "    for host in ('127.0.0.1', '0.0.0.0'):\n"
        "        with socket.socket() as s:\n"
        "            try:\n"
        "                s.bind((host, port))\n"
        "                print('bound', host, flush=True)\n"
        "            except OSError:\n"
        "                print('in use', host, flush=True)\n"
        "from samx.runtime.launch import initialize\n"
        "initialize()\n"
        "if rank == 0:\n"
        "    for name in ('tcp', 'tcp6'):\n"
        "        rows = pathlib.Path('/proc/net', name).read_text().split('\\n')\n"
        "        for row in rows[1:]:\n"
        "            f = row.split()\n"
        "            if f and f[3] == '0A' and int(f[1].split(':')[1], 16) == port:\n"
        "                print('listening', f[1].split(':')[0], flush=True)\n"
        "print('joined', flush=True)\n"
    )
    outputs = launch(["-c", code], 2, cpu_devices=1, timeout=TIMEOUT, echo=False)
    assert outputs[0][:2] == ["in use 127.0.0.1", "in use 0.0.0.0"], outputs
    listening = [x for x in outputs[0] if x.startswith("listening")]
    # 127.0.0.1, in /proc/net/tcp or (v4-mapped, ::ffff:127.0.0.1) tcp6
    loopback = {"listening 0100007F", "listening 0000000000000000FFFF00000100007F"}
    assert listening and set(listening) <= loopback, outputs
    assert all("joined" in o for o in outputs), outputs


def test_two_reservations_never_share_a_port():
    held = [launcher._reserve_port() for _ in range(50)]
    try:
        ports = [s.getsockname()[1] for s in held]
        assert len(set(ports)) == len(ports)
    finally:
        for s in held:
            s.close()


def test_no_default_timeout_in_the_api_or_on_the_command_line(monkeypatch):
    assert inspect.signature(launch).parameters["timeout"].default is None
    assert launch(["-c", "print('hi')"], 1, echo=False) == [["hi"]]
    seen = {}

    def fake(argv, n, **kwargs):
        seen.update(kwargs)
        return [[]] * n

    monkeypatch.setattr(launcher, "launch", fake)
    assert launcher.main(["-n", "2", "train.py"]) == 0
    assert seen["timeout"] is None
    assert launcher.main(["-n", "2", "--timeout", "7", "train.py"]) == 0
    assert seen["timeout"] == 7.0


def test_echoed_lines_are_whole_and_the_kept_output_is_bounded(tmp_path):
    # Two ranks print 20000 lines each while the launcher's threads switch as
    # often as they can: every echoed line is one whole line of one rank.
    lines, kept = 20000, 100
    driver = (
        "import json, sys\n"
        "sys.setswitchinterval(1e-6)\n"
        "from samx.runtime.launch import launch\n"
        "code = \"import os\\nr = os.environ['SAMX_PROCESS_ID']\\n"
        f'for i in range({lines}): print(r * 40, i)"\n'
        f"out = launch(['-c', code], 2, timeout={TIMEOUT}, keep_lines={kept})\n"
        f"json.dump(out, open({str(tmp_path / 'out.json')!r}, 'w'))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", driver],
        capture_output=True,
        text=True,
        timeout=2 * TIMEOUT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    echoed = run.stdout.splitlines()
    bad = [x for x in echoed if not re.fullmatch(r"\[([01])\] \1{40} \d+", x)]
    assert not bad, bad[:5]
    for rank in "01":
        got = [int(x.split()[-1]) for x in echoed if x.startswith(f"[{rank}]")]
        assert got == list(range(lines))
    out = json.loads((tmp_path / "out.json").read_text())
    assert [o[-1] for o in out] == [f"{r * 40} {lines - 1}" for r in "01"]
    assert [len(o) for o in out] == [kept, kept]


def test_the_kept_output_is_bounded_by_default():
    code = "for i in range(5000): print('line', i)"
    (out,) = launch(["-c", code], 1, timeout=TIMEOUT, echo=False)
    assert len(out) == 1000 and out[0] == "line 4000" and out[-1] == "line 4999"
    (out,) = launch(["-c", code], 1, timeout=TIMEOUT, echo=False, keep_lines=None)
    assert len(out) == 5000


def test_the_rank_that_failed_first_is_named(tmp_path):
    # Rank 1 exits with 3; rank 0 exits with 4 as soon as rank 1 is gone (its
    # failure seen): rank 1 is the one named, though rank 0 has the lower rank.
    code = (
        "import os, pathlib, sys, time\n"
        f"here = pathlib.Path({str(tmp_path)!r})\n"
        "if os.environ['SAMX_PROCESS_ID'] == '1':\n"
        "    (here / 'pid').write_text(str(os.getpid()))\n"
        "    sys.exit(3)\n"
        "while not (here / 'pid').exists(): time.sleep(0.01)\n"
        "stat = pathlib.Path('/proc', (here / 'pid').read_text(), 'stat')\n"
        "def alive():\n"
        "    try: return stat.read_text().rpartition(')')[2].split()[0] != 'Z'\n"
        "    except (FileNotFoundError, ProcessLookupError): return False\n"
        "while alive(): time.sleep(0.001)\n"
        "time.sleep(0.01)\n"  # then at once (the old launcher polled every 50 ms)
        "sys.exit(4)\n"
    )
    for _ in range(3):
        with pytest.raises(LaunchError, match=r"rank 1 exited with exit status 3"):
            launch(["-c", code], 2, timeout=TIMEOUT, echo=False)
        (tmp_path / "pid").unlink()


@pytest.mark.parametrize(
    "rank_1", ["sys.exit(0)", "time.sleep(600)"], ids=["exits-0-early", "hangs"]
)
def test_a_rank_that_never_reaches_initialize_is_named(rank_1):
    # Rank 0 waits in initialize() for rank 1, which never comes, and fails
    # when initialize() times out: rank 1 is the one named, not rank 0.
    code = (
        "import os, sys, time\n"
        f"if os.environ['SAMX_PROCESS_ID'] == '1': {rank_1}\n"
        "from samx.runtime.launch import initialize\n"
        "initialize(timeout=3)\n"
    )
    with pytest.raises(
        LaunchError, match=r"rank 1 never reached `initialize\(\)`"
    ) as e:
        launch(["-c", code], 2, cpu_devices=1, timeout=TIMEOUT, echo=False, grace=1)
    assert e.value.failed == 1 and not e.value.timed_out, e.value
    assert e.value.returncodes[0] != 0, e.value


def test_an_uncaught_exception_runs_the_atexit_handlers(tmp_path):
    # initialize()'s excepthook ends the process at once (not after
    # jax.distributed's shutdown barrier), but after the program's atexit
    # handlers: e.g. an orbax async save's finalisation.
    code = (
        "import atexit, os, pathlib\n"
        "from samx.runtime.launch import initialize\n"
        "rank, n = initialize()\n"
        f"path = pathlib.Path({str(tmp_path)!r}, f'atexit{{rank}}')\n"
        "atexit.register(path.write_text, 'ran')\n"
        "import jax, jax.numpy as jnp, numpy as np\n"
        "from jax.sharding import Mesh, NamedSharding, PartitionSpec as P\n"
        "mesh = Mesh(np.array(jax.devices()), ('data',))\n"
        "x = jax.make_array_from_process_local_data(\n"
        "    NamedSharding(mesh, P('data')), np.ones(2, np.float32))\n"
        "if rank == 1: raise ValueError('bad input on rank 1')\n"
        "jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)"
        ".block_until_ready()\n"
    )
    with pytest.raises(
        LaunchError, match=r"(?s)rank 1 exited with exit status 1 .*bad input"
    ) as e:
        launch(["-c", code], 2, cpu_devices=2, timeout=TIMEOUT, echo=False, grace=1)
    assert not e.value.timed_out
    assert (tmp_path / "atexit1").read_text() == "ran"
