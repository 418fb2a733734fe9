"""The runtime: samx's two gradients placed on two devices, data parallel on a mesh.

Imports the pure transforms, never the other way round: ``import samx`` does
not load this module. ``samx.runtime.launch``, the launcher for several local
processes under ``jax.distributed``, is a module of its own, loaded on demand.
"""

from samx.runtime._calibrate import AscentBatchCalibration as AscentBatchCalibration
from samx.runtime._calibrate import calibrate_ascent_batch as calibrate_ascent_batch
from samx.runtime._checkpoint import abstract_state as abstract_state
from samx.runtime._mesh import batch_sharding as batch_sharding
from samx.runtime._mesh import make_data_parallel_step as make_data_parallel_step
from samx.runtime._mesh import replicated as replicated
from samx.runtime._points import grad_fn_points as grad_fn_points
from samx.runtime._trainer import Trainer as Trainer
from samx.runtime._trainer import TrainerState as TrainerState
from samx.runtime._trainer import method_of as method_of

__all__ = (
    "AscentBatchCalibration",
    "Trainer",
    "TrainerState",
    "abstract_state",
    "batch_sharding",
    "calibrate_ascent_batch",
    "grad_fn_points",
    "make_data_parallel_step",
    "method_of",
    "replicated",
)
