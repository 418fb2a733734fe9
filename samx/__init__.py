"""samx: sharpness-aware optimizers for JAX, as optax transforms.

``import samx`` loads the pure transforms only; the two-device runtime, the
Flax helpers and the examples are separate modules that are imported on
demand.
"""

import importlib.metadata as _metadata

from samx._sam import SAMState as SAMState
from samx._sam import sam as sam

try:
    __version__ = _metadata.version("samx")
except _metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = (
    "SAMState",
    "sam",
)
