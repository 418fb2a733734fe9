"""Flax NNX: AsyncSAM's system-aware ascent batch, timed on the model."""

from collections.abc import Callable
from typing import Any

from flax import nnx

from samx import _plan, runtime
from samx.flax import _common, _trainer

# calibrate_ascent_batch's arguments that come from the model here.
_FROM_THE_MODEL = ("model_state", "has_state")


def calibrate_ascent_batch(
    model: nnx.Module,
    loss_fn: Callable[..., Any],
    batch: Any,
    *,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    **kwargs: Any,
) -> runtime.AscentBatchCalibration:
    r""":func:`samx.runtime.calibrate_ascent_batch` for an NNX model.

    Chooses AsyncSAM's ascent batch ``b'`` for :class:`samx.flax.Trainer`,
    from the model and the loss that Trainer takes. The model is split as the
    Trainer splits it, into its parameters (the variables ``wrt`` selects) and
    the rest (BatchNorm statistics, RNG counts and keys), and each timed
    gradient is the Trainer's pass: a fresh model merged from both inside the
    jit, in the mode the model is in (training mode, usually), differentiated
    with respect to the parameters. The model passed in is not changed. The
    timing and the choice are the runtime's: see
    :func:`samx.runtime.calibrate_ascent_batch`, to which ``kwargs`` go.

    Args:
      model: the ``nnx.Module``, in the mode it trains in.
      loss_fn: ``loss_fn(model, batch) -> loss``, a scalar, or ``(loss, aux)``
        with ``has_aux``: the loss :class:`samx.flax.Trainer` takes.
      batch: a batch of the size the training uses.
      wrt: the ``nnx`` filter of the trained variables; default ``nnx.Param``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      **kwargs: the options of :func:`samx.runtime.calibrate_ascent_batch`:
        ``fast_device`` (a device, or the ``jax.sharding.Mesh`` the Trainer
        trains on), ``slow_device``, ``repeats``, ``batch_axis``. Not
        ``model_state`` or ``has_state``: the model state is the model's.
        Under ``jax.distributed`` every process calls it with its own part
        of the batch, and the processes agree on one b' (the smallest they
        chose; see :func:`samx.runtime.calibrate_ascent_batch`).

    Returns:
      The :class:`samx.runtime.AscentBatchCalibration`, with every time it
      measured; pass its ``ascent_batch_size`` to
      ``samx.flax.Trainer(ascent_batch_size=...)``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax, samx, samx.flax
      >>> from flax import nnx
      >>> model = nnx.Sequential(
      ...     nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> def loss_fn(model, batch):
      ...     return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
      >>> x, y = np.ones((64, 3), np.float32), np.zeros((64, 4), np.float32)
      >>> batch = {"x": x, "y": y}
      >>> c = samx.flax.calibrate_ascent_batch(model, loss_fn, batch, repeats=3)
      >>> c.batch_size, 1 <= c.ascent_batch_size <= 64
      (64, True)
      >>> trainer = samx.flax.Trainer(
      ...     model, samx.async_sam(optax.sgd(0.1), rho=0.05), loss_fn,
      ...     ascent_batch_size=c.ascent_batch_size)
      >>> print(model.layers[1].mean[...])  # the calibration did not train it
      [0. 0. 0. 0.]

    References:
      Jo, Lim, Lee, `Asynchronous Sharpness-Aware Minimization For Fast and
      Accurate Deep Learning <https://arxiv.org/abs/2503.11147>`_, 2025
    """
    fn = "samx.flax.calibrate_ascent_batch"
    _trainer.check_model(fn, model)
    _common.check_loss_fn(fn, loss_fn)
    _trainer.check_signature(fn, loss_fn)
    _common.check_flag(fn, "has_aux", has_aux)
    for name in _FROM_THE_MODEL:
        if name in kwargs:
            raise TypeError(
                f"`{fn}({name}=...)` is not taken: the model state is the model's"
                " own (every variable `wrt` does not select). Pass the model"
                f" only; `{name}` is for `samx.runtime.calibrate_ascent_batch`."
            )
    graphdef, params, rest = _trainer.split_model(fn, model, wrt)
    if _trainer.is_abstract(fn, params, rest):
        raise ValueError(
            f"`{fn}(model=...)` is abstract (`nnx.eval_shape`): timing needs a"
            " model with arrays."
        )
    _plan.check_batch(fn, "batch", batch)
    return runtime.calibrate_ascent_batch(
        _trainer.runtime_loss(fn, loss_fn, graphdef, wrt, has_aux),
        params,
        batch,
        model_state=rest,
        has_state=True,
        **kwargs,
    )
