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
