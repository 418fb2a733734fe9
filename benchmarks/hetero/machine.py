"""The sizes of a run, its devices, the machine (part 1) and the CNN problem."""

import contextlib
import importlib.metadata
import os
import re
from typing import NamedTuple

import jax
import numpy as np
from step_time import machine, problem

from samx.examples.stepwise import device_name


class Sizes(NamedTuple):
    """The sizes of a run."""

    image: int  # the CNN's inputs: image x image x 3
    blocks: int  # residual blocks per stage (3: ResNet-20)
    batch: int
    rounds: int  # timed rounds per loop, at most
    inner: int  # steps per timing
    repeats: int  # calibration timings per candidate
    timeline_steps: int
    epochs: int  # time to accuracy
    digits_batch: int
    widths: tuple[int, ...]  # the sweep: the CNN's first-stage channels
    more_widths: tuple[int, ...]  # the sweep, then, while its share allows
    sweep_rounds: int  # timed rounds per width, at most


FULL = Sizes(32, 3, 128, 30, 5, 10, 6, 30, 64, (16, 32, 64), (128, 256), 10)
SMOKE = Sizes(8, 0, 16, 3, 2, 2, 3, 1, 64, (2,), (4,), 3)


def devices() -> tuple[jax.Device, jax.Device]:
    """``(accelerator, host CPU)``; without an accelerator cpu:0 and cpu:1 stand in."""
    descent = jax.devices()[0]
    cpus = jax.devices("cpu")
    if descent.platform != "cpu":
        return descent, cpus[0]
    return descent, cpus[1] if len(cpus) > 1 else cpus[0]


def slug(descent: jax.Device, smoke: bool) -> str:
    """The machine's name in file names, e.g. ``nvidia-h200``."""
    if descent.platform == "cpu":
        name = f"cpu-{os.cpu_count()}core"
    else:
        name = re.sub(r"[^a-z0-9]+", "-", descent.device_kind.lower()).strip("-")
    return name + ("-smoke" if smoke else "")


def machine_info(descent: jax.Device, host: jax.Device, sizes: Sizes) -> dict:
    """The machine, the versions and the sizes the figures come from."""
    versions = {}
    for package in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    info = machine()
    info.update(
        accelerator=None if descent.platform == "cpu" else descent.device_kind,
        descent_device=device_name(descent),
        host_device=device_name(host),
        stand_in=descent.platform == "cpu",
        versions=versions,
        default_matmul_precision=str(
            getattr(jax.config, "jax_default_matmul_precision", "unknown")
        ),
        sizes=sizes._asdict(),
        dtype="float32",
    )
    return info


def cnn(sizes: Sizes, width: int = 16):
    """``(params, loss)`` of the CNN with ``width`` first-stage channels (16:
    ResNet-20 size)."""
    params, _, loss = problem(
        "resnet20", 1, 0, 0, sizes.image, sizes.blocks, cnn_width=width
    )
    return params, loss


def parameter_count(params) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(params))


def synthetic_batches(sizes: Sizes, count: int = 4):
    """``(params, loss, [NumPy batches])`` of the ResNet-20-size CNN."""
    params, loss = cnn(sizes)
    rng = np.random.default_rng(0)
    shape = (sizes.batch, sizes.image, sizes.image, 3)
    batches = [
        {
            "x": rng.standard_normal(shape, dtype=np.float32),
            "y": rng.integers(0, 10, sizes.batch).astype(np.int32),
        }
        for _ in range(count)
    ]
    return params, loss, batches
