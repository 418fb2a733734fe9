"""Test configuration: CPU devices, strict numerics and fast compiles, set before
JAX starts.

The suite compiles about a thousand small programs and runs each for a few
steps, so compilation is most of its time. Unless ``SAMX_TEST_XLA=default``:

- XLA's CPU backend compiles at optimization level 0 (about 1.5x faster
  compiles on these programs; the references compare to 1e-5, which holds at
  either level);
- a compilation cache in a directory of this session (removed at its end)
  lets a test reuse a program that another test, or another pytest-xdist
  worker, already compiled: the same program gives the same executable.

Both reach the processes that tests start (notebook kernels, the
``jax.distributed`` workers), through the environment.
"""

import os
import shutil
import tempfile

_CACHE = "SAMX_TEST_JAX_CACHE"
_FAST = os.environ.get("SAMX_TEST_XLA", "fast") != "default"
if _FAST:
    _flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0"

import jax  # noqa: E402  (after XLA_FLAGS)

# Eight CPU devices, so that the multi-device paths (two-device runtime, data
# parallel on a mesh) run on every machine.
jax.config.update("jax_num_cpu_devices", 8)
# Catch silent broadcasting. (Strict dtype promotion is checked per test with
# `jax.numpy_dtype_promotion("strict")`: optax itself is not clean under it.)
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
    if not _FAST:
        return
    # The main process makes the directory; pytest-xdist's workers, started
    # after this hook, inherit it through the environment.
    if not hasattr(config, "workerinput") and _CACHE not in os.environ:
        os.environ[_CACHE] = tempfile.mkdtemp(prefix="samx-test-jax-cache-")
        config._samx_cache = os.environ[_CACHE]
    cache = os.environ.get(_CACHE)
    if cache:
        for name, value in (
            ("jax_compilation_cache_dir", cache),
            ("jax_persistent_cache_min_compile_time_secs", 0),
            ("jax_persistent_cache_min_entry_size_bytes", 0),
        ):
            jax.config.update(name, value)
            os.environ[name.upper()] = str(value)  # for the processes tests start


def pytest_unconfigure(config):
    cache = getattr(config, "_samx_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
