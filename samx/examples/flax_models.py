"""A small CNN with BatchNorm for the 8x8 digits, in Flax NNX and in Linen.

Both have the same architecture: Conv 3x3 (16 channels) -> BatchNorm -> ReLU ->
Conv 3x3 (32) -> BatchNorm -> ReLU -> global mean pool -> Dense (10). Inputs
may be flat 64-vectors (as :func:`samx.examples.data.load_digits` gives them)
or ``(N, 8, 8, 1)`` images. Batches are ``{"x": images, "y": int labels}``.

Needs Flax (``pip install "samx[examples]"``); ``import samx`` does not load it.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from samx.examples.models import cross_entropy

# BatchNorm's running-average momentum: the digits have few steps per epoch.
_MOMENTUM = 0.9


def as_images(x: jax.Array) -> jax.Array:
    """``(N, 64)`` digits as ``(N, 8, 8, 1)`` images; images pass unchanged."""
    x = jnp.asarray(x)
    if x.ndim == 2:
        if x.shape[1] != 64:
            raise ValueError(
                f"flat digits must have 64 features, got an array of shape {x.shape}."
            )
        return x.reshape(x.shape[0], 8, 8, 1)
    if x.ndim != 4:
        raise ValueError(
            f"expected (N, 64) or (N, 8, 8, 1) digits, got shape {x.shape}."
        )
    return x


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The fraction of rows whose arg-max logit is the label."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


class CNN(nnx.Module):
    """The digits CNN in Flax NNX.

    ``model.train()`` (the state after construction) normalises with the batch
    statistics and updates the running averages; ``model.eval()`` uses the
    running averages.

    Args:
      num_classes: the number of outputs.
      rngs: ``nnx.Rngs`` for the initialisation.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = CNN(rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((4, 64))).shape
      (4, 10)
    """

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(16, momentum=_MOMENTUM, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(32, momentum=_MOMENTUM, rngs=rngs)
        self.head = nnx.Linear(32, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.bn1(self.conv1(as_images(x))))
        h = jax.nn.relu(self.bn2(self.conv2(h)))
        return self.head(jnp.mean(h, axis=(1, 2)))


def nnx_loss(model: CNN, batch: dict) -> jax.Array:
    """Mean cross-entropy of an NNX model on ``batch = {"x": ..., "y": ...}``."""
    return cross_entropy(model(batch["x"]), batch["y"])


class LinenCNN(nn.Module):
    """The digits CNN in Flax Linen; its BatchNorm statistics are ``batch_stats``.

    Attributes:
      num_classes: the number of outputs.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params, batch_stats = linen_init(jax.random.key(0))
      >>> logits = LinenCNN().apply(
      ...     {"params": params, "batch_stats": batch_stats}, jnp.zeros((4, 64)),
      ...     train=False)
      >>> logits.shape
      (4, 10)
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        h = as_images(x)
        for features in (16, 32):
            h = nn.Conv(features, (3, 3))(h)
            h = nn.BatchNorm(use_running_average=not train, momentum=_MOMENTUM)(h)
            h = jax.nn.relu(h)
        return nn.Dense(self.num_classes)(jnp.mean(h, axis=(1, 2)))


def linen_init(key: jax.Array, model: LinenCNN | None = None) -> tuple[Any, Any]:
    """``(params, batch_stats)`` of a :class:`LinenCNN` for 8x8x1 digits."""
    model = LinenCNN() if model is None else model
    variables = model.init(key, jnp.zeros((1, 8, 8, 1)), train=False)
    return variables["params"], variables["batch_stats"]


def linen_loss(
    params: Any, batch_stats: Any, batch: dict, model: LinenCNN | None = None
) -> tuple[jax.Array, Any]:
    """Train-mode mean cross-entropy and the updated ``batch_stats``.

    The signature of a loss with state,
    ``loss_fn(params, model_state, batch) -> (loss, new_model_state)``, as
    :class:`samx.runtime.Trainer` takes with ``has_state=True``.
    """
    model = LinenCNN() if model is None else model
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        batch["x"],
        train=True,
        mutable=["batch_stats"],
    )
    return cross_entropy(logits, batch["y"]), updates["batch_stats"]


def linen_logits(
    params: Any, batch_stats: Any, x: jax.Array, model: LinenCNN | None = None
) -> jax.Array:
    """Eval-mode logits (running BatchNorm averages) of a :class:`LinenCNN`."""
    model = LinenCNN() if model is None else model
    return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
