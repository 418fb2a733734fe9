"""Flax helpers for the samx transforms: NNX and linen, BatchNorm done right.

``import samx.flax`` imports Flax (``import samx`` does not) and needs Flax
0.12.7 or newer (``pip install 'samx[flax]'``): with an older one it raises an
``ImportError`` that names the version. The helpers turn
a model and a loss into what a samx transform needs, the gradients and a
``grad_fn(params, i)``, for ``nnx.Optimizer`` (:func:`nnx_grads`,
:func:`nnx_train_step`, :func:`make_nnx_train_step`) and for linen's
``TrainState`` (:class:`TrainState`, :func:`apply_gradients`,
:func:`linen_grads`, :func:`linen_train_step`, :func:`make_linen_train_step`),
and :class:`Trainer`, which trains an NNX model on the two-device runtime
(:class:`samx.runtime.Trainer`), with AsyncSAM's ascent batch from
:func:`calibrate_ascent_batch`.
The method is found in the optimizer state, so the same step works for
``samx.sam``, ``samx.async_sam``, ``samx.sampa`` and any other optax
transform.

**The BatchNorm rule.** A sharpness-aware step runs the model forward more
than once (SAM at ``x`` and at ``x + e``; SAMPa at ``x~`` and at ``y``). The
running statistics, and any other model state that is not a parameter (RNG
counts, counters), come from ONE pass only: the descent pass, the one at
``grad_fn(_, 0)`` (for SAMPa the pass at the perturbed point ``x~``, as the
official code keeps; for a plain optax transform the pass at ``x``). Every
other pass runs in the same training mode, from the model state of the start of
the step, and its state updates are discarded. This is the only behaviour of
the helpers. Updating the statistics in both passes, one after the other, is
the most common bug of SAM implementations.

**Non-finite statistics.** If the descent pass leaves a NaN or an infinity
in any floating-point model state (a corrupt batch, an overflow at the
perturbed point), the model state of the start of the step is kept, so one bad
batch does not poison the running statistics for ever; wrap the transform in
:func:`samx.skip_nonfinite` to skip the parameter update of such a step too.

The descent pass runs inside ``tx.update``; its new state is captured in the
same trace and written after the update. Wrappers that call ``tx.update``
under ``lax.cond`` are therefore not supported: the helpers raise a
``RuntimeError`` for them. Around a samx transform, ``optax.MultiSteps`` and
``optax.apply_if_finite`` are refused earlier, with a ``ValueError`` that names
``samx.microbatched`` and ``samx.skip_nonfinite``.
"""

from samx import _versions

# Before the helpers import Flax: an older Flax fails here, naming the version.
_versions.require("flax", _versions.FLAX, "samx.flax", "flax")

from samx.flax._calibrate import calibrate_ascent_batch as calibrate_ascent_batch
from samx.flax._common import DescentGradFn as DescentGradFn
from samx.flax._linen import TrainState as TrainState
from samx.flax._linen import apply_gradients as apply_gradients
from samx.flax._linen import linen_grads as linen_grads
from samx.flax._linen import linen_train_step as linen_train_step
from samx.flax._linen import make_linen_train_step as make_linen_train_step
from samx.flax._nnx import make_nnx_train_step as make_nnx_train_step
from samx.flax._nnx import nnx_grads as nnx_grads
from samx.flax._nnx import nnx_train_step as nnx_train_step
from samx.flax._trainer import Trainer as Trainer

__all__ = (
    "DescentGradFn",
    "TrainState",
    "Trainer",
    "apply_gradients",
    "calibrate_ascent_batch",
    "linen_grads",
    "linen_train_step",
    "make_linen_train_step",
    "make_nnx_train_step",
    "nnx_grads",
    "nnx_train_step",
)
