"""The headline on an accelerator: AsyncSAM's ascent on the host CPU, SAMPa fused.

One process, one command. On a machine with an accelerator it measures, in
this order, and writes each part to ``DIR/<machine>.json`` as soon as it is
done (so an interrupted run leaves what it had):

1. the machine: the accelerator, the host CPU model and cores, jax and jaxlib;
2. AsyncSAM's ascent batch b', calibrated on the CNN
   (:func:`samx.runtime.calibrate_ascent_batch`: candidate b' on the host CPU
   timed against the descent gradient on the accelerator, with the transfers
   between them; whether b' hides behind the descent);
3. time per step relative to SGD, on a ResNet-20-size CNN (no normalisation
   layers) on synthetic 32x32x3 float32 data, batch 128: SGD, SAM, AsyncSAM
   through the Trainer with the descent on the accelerator and the ascent on
   the host CPU at the calibrated b', b/4 and b/8, AsyncSAM with both
   gradients on the accelerator, SAMPa fused by ``vmap`` on the accelerator
   and as two gradients in one jit; and the Trainer against the pure
   single-jit step for each. Every loop is fed NumPy batches and dispatches
   one step per call; the loops take turns (interleaved), everything is
   compiled and run before the clock starts, and each figure is the median
   over rounds of a few steps;
4. a measured timeline of a few AsyncSAM steps (:mod:`samx.examples.timeline`:
   when the CPU ascent and the accelerator descent finish, and whether they
   overlap);
5. time to accuracy: the Flax (linen) CNN with BatchNorm on digits with 40%
   label noise, SGD, SAM, AsyncSAM (b/4, its ascent on the host CPU) and SAMPa
   through the Trainer, test accuracy against training wall time;
6. the model-size sweep: the CNN of part 3 at first-stage widths 16, 32 and
   64 channels, then 128 and 256 while its share of the budget allows; per
   width the parameter count, the calibration (descent seconds, host seconds
   per ascent example, transfer seconds, b', whether b' ``hides`` behind the
   descent) and AsyncSAM (its ascent on the host CPU at that b') against SGD,
   timed as in part 3: up to which model size the host CPU pays.

Every row names where each of its gradients ran. It also writes
``DIR/<machine>.md`` (the tables) and PNG plots. ``--budget-s`` bounds the
run: each part has a share of it, and at the limit the run stops and writes
what it has (also on SIGTERM or Ctrl-C). Exit status: 0 complete, 3 stopped
by the budget, 130 interrupted.

``--smoke`` runs the same code with tiny sizes on two CPU devices (cpu:0
stands in for the accelerator, cpu:1 for the host CPU), in well under a
minute; the tests run it. Its figures say nothing about an accelerator.

The parts live in ``benchmarks/hetero/`` (one module each); this file is the
command.

Usage:
  PYTHONPATH=. python3 benchmarks/heterogeneous.py --out DIR [--budget-s 225]
  python benchmarks/heterogeneous.py --smoke --out DIR
"""

import contextlib
import os
import sys
import tempfile

import jax
from hetero.cli import main, parse_args

__all__ = ["main", "parse_args"]


if __name__ == "__main__":
    if "--smoke" not in sys.argv[1:]:
        # Identical computations (the Trainers' descent and update at each b')
        # compile once. Optional: a jax without this setting runs without it.
        with contextlib.suppress(AttributeError, ValueError):
            jax.config.update(
                "jax_compilation_cache_dir",
                os.path.join(tempfile.gettempdir(), "samx-heterogeneous-cache"),
            )
    if "--smoke" in sys.argv[1:]:
        # Set before JAX starts: two CPU devices (cpu:1 stands in for the host
        # CPU), and XLA's cheapest CPU code generation, which halves the smoke
        # run's compilation time; its timings mean nothing anyway.
        jax.config.update("jax_num_cpu_devices", 2)
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0"
    status = main()
    if status:
        # Stopped in the middle of device work: XLA's threads may still be
        # running it, and tearing the interpreter down under them can crash.
        # Everything is written; leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
