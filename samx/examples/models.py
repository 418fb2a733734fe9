"""A plain-JAX MLP classifier: parameters are a dict of arrays."""

import jax
import jax.numpy as jnp


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> dict:
    """He-initialised weights and zero biases for layer sizes ``sizes``."""
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"dense{i}": {
            "w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m),
            "b": jnp.zeros((n,)),
        }
        for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    }


def mlp(params: dict, x: jax.Array) -> jax.Array:
    """Logits of the MLP: ReLU between layers."""
    n = len(params)
    for i in range(n):
        layer = params[f"dense{i}"]
        x = x @ layer["w"] + layer["b"][None, :]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels."""
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))


def _conv(x: jax.Array, w: jax.Array, stride: int = 1) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def init_resnet20(
    key: jax.Array, num_classes: int = 10, width: int = 16, blocks: int = 3
) -> dict:
    """A ResNet-20-size CNN for 32x32x3 inputs (about 0.27M parameters).

    Three stages of ``blocks`` residual blocks (two 3x3 convolutions each) with
    ``width``, ``2 * width`` and ``4 * width`` channels, a 1x1 projection where
    the shape changes, no normalisation layers (a benchmark model). With the
    default three blocks per stage it has ResNet-20's 19 convolutions and
    head; fewer make a smaller network of the same shape, for smoke runs.
    """
    keys = iter(jax.random.split(key, 64))

    def he(shape):
        fan_in = shape[0] * shape[1] * shape[2] if len(shape) == 4 else shape[0]
        return jax.random.normal(next(keys), shape) * jnp.sqrt(2.0 / fan_in)

    params = {"stem": he((3, 3, 3, width))}
    channels = width
    for stage, out in enumerate((width, 2 * width, 4 * width)):
        for block in range(blocks):
            p = {"conv1": he((3, 3, channels, out)), "conv2": he((3, 3, out, out))}
            p["conv2"] = p["conv2"] * 0.1  # start close to the identity
            if channels != out:
                p["proj"] = he((1, 1, channels, out))
            params[f"stage{stage}_block{block}"] = p
            channels = out
    params["head"] = {"w": he((channels, num_classes)), "b": jnp.zeros((num_classes,))}
    return params


def resnet20(params: dict, x: jax.Array) -> jax.Array:
    """Logits of :func:`init_resnet20`'s network on NHWC images."""
    h = jax.nn.relu(_conv(x, params["stem"]))
    blocks = sum(key.startswith("stage0_") for key in params)
    for stage in range(3):
        for block in range(blocks):
            p = params[f"stage{stage}_block{block}"]
            stride = 2 if stage > 0 and block == 0 else 1
            y = jax.nn.relu(_conv(h, p["conv1"], stride))
            y = _conv(y, p["conv2"])
            shortcut = _conv(h, p["proj"], stride) if "proj" in p else h
            h = jax.nn.relu(y + shortcut)
    h = jnp.mean(h, axis=(1, 2))
    return h @ params["head"]["w"] + params["head"]["b"][None, :]
