"""Naming a device that is not there: the error lists the devices, and for a
CPU index past the last, says how to get more CPU devices."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samx
from samx.runtime import Trainer, calibrate_ascent_batch

HINT = r'`jax.config.update\("jax_num_cpu_devices", {}\)`.*before JAX first runs'


def test_a_missing_cpu_device_says_how_to_get_it():
    # The tests run with 8 CPU devices: "cpu:9" needs 10.
    with pytest.raises(
        ValueError, match=r"available: cpu:0.*cpu:7 .*" + HINT.format(10)
    ):
        Trainer(samx.async_sam(optax.sgd(0.1)), lambda p, b: 0.0, ascent_device="cpu:9")
    with pytest.raises(ValueError, match=r"slow_device='cpu:8'.*" + HINT.format(9)):
        calibrate_ascent_batch(
            lambda p, b: jnp.sum(b["x"] @ p),
            jnp.zeros(2),
            {"x": np.ones((4, 2), np.float32)},
            slow_device="cpu:8",
        )


@pytest.mark.parametrize("device", ["gpu:1", "cpu:-1", "cpu:", "cpu:x"])
def test_no_cpu_hint_for_other_names(device):
    with pytest.raises(ValueError, match="is not a device here") as error:
        Trainer(samx.async_sam(optax.sgd(0.1)), lambda p, b: 0.0, descent_device=device)
    assert "jax_num_cpu_devices" not in str(error.value)


def test_cpu_1_in_a_fresh_process_names_the_config_line():
    # What a new user meets: JAX's default of one CPU device, and "cpu:1".
    code = (
        "import optax, samx\n"
        "from samx.runtime import Trainer\n"
        "try:\n"
        "    Trainer(samx.async_sam(optax.sgd(0.1)), lambda p, b: 0.0,"
        " ascent_device='cpu:1')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert "available: cpu:0 (or a `jax.Device`)." in out
    assert 'jax.config.update("jax_num_cpu_devices", 2)' in out
