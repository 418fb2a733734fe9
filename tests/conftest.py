"""Test configuration: two CPU devices and strict numerics, set before JAX starts."""

import jax

# Eight CPU devices, so that the multi-device paths (two-device runtime, data
# parallel on a mesh) run on every machine.
jax.config.update("jax_num_cpu_devices", 8)
# Catch silent broadcasting. (Strict dtype promotion is checked per test with
# `jax.numpy_dtype_promotion("strict")`: optax itself is not clean under it.)
jax.config.update("jax_numpy_rank_promotion", "raise")
