"""samx: sharpness-aware optimizers for JAX, as optax transforms.

``import samx`` loads the pure transforms only; the two-device runtime, the
Flax helpers and the examples are separate modules that are imported on
demand.
"""

import importlib.metadata as _metadata

from samx import diagnostics as diagnostics
from samx._accumulate import microbatched as microbatched
from samx._async_sam import AsyncSAMState as AsyncSAMState
from samx._async_sam import async_sam as async_sam
from samx._nonfinite import SkipNonfiniteState as SkipNonfiniteState
from samx._nonfinite import skip_nonfinite as skip_nonfinite
from samx._perturb import all_but_biases as all_but_biases
from samx._plan import Evaluation as Evaluation
from samx._plan import EvaluationPlan as EvaluationPlan
from samx._plan import evaluation_plan as evaluation_plan
from samx._sam import SAMState as SAMState
from samx._sam import sam as sam
from samx._sampa import SAMPaState as SAMPaState
from samx._sampa import sampa as sampa

try:
    __version__ = _metadata.version("samx")
except _metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = (
    "AsyncSAMState",
    "Evaluation",
    "EvaluationPlan",
    "SAMPaState",
    "SAMState",
    "SkipNonfiniteState",
    "all_but_biases",
    "async_sam",
    "diagnostics",
    "evaluation_plan",
    "microbatched",
    "sam",
    "sampa",
    "skip_nonfinite",
)
