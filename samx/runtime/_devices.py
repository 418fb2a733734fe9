"""Resolving the devices the runtime places its computations on."""

from typing import Any

import jax


def available() -> list[str]:
    """This process's devices, as ``platform:index`` strings."""
    names = []
    for backend in ("cpu", "gpu", "tpu"):
        try:
            names += [
                f"{d.platform}:{i}"
                for i, d in enumerate(jax.local_devices(backend=backend))
            ]
        except RuntimeError:  # the backend is not present
            pass
    return names


def resolve(arg: str, device: Any) -> jax.Device:
    """A ``jax.Device`` of this process from a device, ``"cpu"``, ``"gpu:1"``...

    ``"cpu:1"`` is this process's second CPU device (under ``jax.distributed``
    the processes' devices are numbered apart).

    Raises:
      ValueError: naming ``arg`` and listing the available devices.
    """
    if isinstance(device, jax.Device):
        if device.process_index != jax.process_index():
            raise ValueError(
                f"`{arg}={device!r}` is a device of process {device.process_index},"
                f" not of this one ({jax.process_index()}); available here:"
                f" {', '.join(available())}."
            )
        return device
    if isinstance(device, str):
        platform, colon, index = device.partition(":")
        # Only "platform" or "platform:N" with N >= 0: "cpu:-1" or "" must not
        # silently pick some device.
        if platform and (index.isdecimal() or not colon):
            try:
                devices = jax.local_devices(backend=platform)
                return devices[int(index) if colon else 0]
            except (RuntimeError, ValueError, IndexError):
                pass
    raise ValueError(
        f"`{arg}={device!r}` is not a device here; available:"
        f" {', '.join(available())} (or a `jax.Device`).{_cpu_hint(device)}"
    )


def _cpu_hint(device: Any) -> str:
    """How to get ``"cpu:N"`` when this process has fewer CPU devices."""
    if not isinstance(device, str) or not device.startswith("cpu:"):
        return ""
    index = device.removeprefix("cpu:")
    if not index.isdecimal():
        return ""
    return (
        f" JAX makes one CPU device unless told otherwise: for {device!r}, call"
        f' `jax.config.update("jax_num_cpu_devices", {int(index) + 1})` right'
        " after `import jax`, before JAX first runs."
    )


def second_accelerator() -> jax.Device | None:
    """This process's second device, if it is an accelerator."""
    devices = jax.local_devices()
    if len(devices) > 1 and devices[1].platform != "cpu":
        return devices[1]
    return None
