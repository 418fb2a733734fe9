"""The toy of the SAMPa paper (Figure 1): ``f(x) = ||x||^2`` and five SAMs.

SAM and SAMPa-lambda run through samx's transforms. RandSAM and OptSAM, the
two naive ways of making SAM's gradients parallel that the paper shows to
fail, are small reference implementations here (they are not samx methods):

- RandSAM perturbs along a random direction, ``rho * e / ||e||`` with ``e``
  Gaussian, a new ``e`` every step;
- OptSAM perturbs along the previous perturbed gradient ``grad f(x~_{t-1})``.

With a decaying step ``eta_t = eta0 / sqrt(t + 1)`` SAM and SAMPa keep going
down while RandSAM and OptSAM stall orders of magnitude higher.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import samx

# The settings of tests/test_sampa.py's toy check.
DIM, ETA0, RHO, STEPS = 5, 0.05, 0.05, 4000

METHODS = ("SAM", "SAMPa-0", "SAMPa-0.5", "RandSAM", "OptSAM")


def f(x: jax.Array) -> jax.Array:
    """The objective, ``||x||^2``."""
    return jnp.sum(jnp.square(x))


def grad_f(x: jax.Array) -> jax.Array:
    """Its gradient, ``2 x``."""
    return 2.0 * x


def decaying_step(eta0: float = ETA0) -> Callable[[jax.Array], jax.Array]:
    """The step size ``eta_t = eta0 / sqrt(t + 1)``, an optax schedule."""

    def schedule(t):
        return eta0 / jnp.sqrt(jnp.asarray(t, jnp.float32) + 1.0)

    return schedule


def run_transform(
    tx: optax.GradientTransformationExtraArgs, x0: jax.Array, steps: int
) -> jax.Array:
    """``f(x_t)`` after each of ``steps`` steps of a samx transform from ``x0``.

    ``updates`` is the gradient at ``x_t`` and ``grad_fn(p, i)`` the exact
    gradient at ``p`` (the toy has no batches).
    """

    def step(carry, _):
        x, state = carry
        updates, state = tx.update(grad_f(x), state, x, grad_fn=lambda p, i: grad_f(p))
        x = optax.apply_updates(x, updates)
        return (x, state), f(x)

    _, history = jax.lax.scan(step, (x0, tx.init(x0)), length=steps)
    return history


def rand_sam(
    x0: jax.Array, key: jax.Array, steps: int, *, eta0: float = ETA0, rho: float = RHO
) -> jax.Array:
    """RandSAM: ``x <- x - eta_t grad f(x + rho e / ||e||)``, ``e`` Gaussian.

    Returns ``f(x_t)`` after each step.
    """
    lr = decaying_step(eta0)

    def step(x, inputs):
        t, k = inputs
        e = jax.random.normal(k, x.shape)
        x = x - lr(t) * grad_f(x + rho * e / jnp.linalg.norm(e))
        return x, f(x)

    keys = jax.random.split(key, steps)
    _, history = jax.lax.scan(step, x0, (jnp.arange(steps), keys))
    return history


def opt_sam(
    x0: jax.Array, steps: int, *, eta0: float = ETA0, rho: float = RHO
) -> jax.Array:
    """OptSAM: perturb along the previous perturbed gradient ``grad f(x~_{t-1})``.

    Returns ``f(x_t)`` after each step; the first step is a plain gradient step
    (the previous perturbed gradient starts at zero).
    """
    lr = decaying_step(eta0)

    def step(carry, t):
        x, previous = carry
        norm = jnp.linalg.norm(previous) + 1e-12
        perturbed_grad = grad_f(x + rho * previous / norm)
        x = x - lr(t) * perturbed_grad
        return (x, perturbed_grad), f(x)

    _, history = jax.lax.scan(step, (x0, jnp.zeros_like(x0)), jnp.arange(steps))
    return history


def figure1_curves(
    steps: int = STEPS,
    *,
    dim: int = DIM,
    eta0: float = ETA0,
    rho: float = RHO,
    seed: int = 0,
    rand_seeds: int = 8,
) -> dict[str, np.ndarray]:
    """The curves of the paper's Figure 1: ``f(x_t)`` for the five methods.

    All start from the same Gaussian ``x0``, with the decaying step
    ``eta_t = eta0 / sqrt(t + 1)`` and radius ``rho``. RandSAM's curve is the
    mean over ``rand_seeds`` random sequences (it is noisy).

    Args:
      steps: the number of steps, ``>= 1``.
      dim: the dimension of ``x``.
      eta0: the initial step size.
      rho: the perturbation radius of every method.
      seed: seeds ``x0`` and RandSAM's directions.
      rand_seeds: RandSAM runs averaged, ``>= 1``.

    Returns:
      ``{method: f(x_t) for t = 1..steps}`` as float32 NumPy arrays, keyed by
      the names in :data:`METHODS`.

    Examples:
      >>> curves = figure1_curves(steps=4000)
      >>> tuple(curves) == METHODS, curves["SAM"].shape
      (True, (4000,))
      >>> converged = max(curves[m][-1] for m in ("SAM", "SAMPa-0", "SAMPa-0.5"))
      >>> bool(min(curves["RandSAM"][-1], curves["OptSAM"][-1]) > 100 * converged)
      True

    References:
      Xie, Pethick, Cevher, `SAMPa: Sharpness-aware Minimization Parallelized
      <https://arxiv.org/abs/2410.10683>`_, NeurIPS 2024 (Figure 1)
    """
    for name, value in (("steps", steps), ("rand_seeds", rand_seeds), ("dim", dim)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(
                f"`figure1_curves({name}=...)` must be an int >= 1, got {value!r}."
            )

    @jax.jit
    def curves(key):
        k0, k1 = jax.random.split(key)
        x0 = jax.random.normal(k0, (dim,))
        lr = decaying_step(eta0)
        rand = jax.vmap(lambda k: rand_sam(x0, k, steps, eta0=eta0, rho=rho))(
            jax.random.split(k1, rand_seeds)
        )
        return {
            "SAM": run_transform(samx.sam(optax.sgd(lr), rho), x0, steps),
            "SAMPa-0": run_transform(samx.sampa(optax.sgd(lr), rho, 0.0), x0, steps),
            "SAMPa-0.5": run_transform(samx.sampa(optax.sgd(lr), rho, 0.5), x0, steps),
            "RandSAM": jnp.mean(rand, axis=0),
            "OptSAM": opt_sam(x0, steps, eta0=eta0, rho=rho),
        }

    result = curves(jax.random.key(seed))
    return {name: np.asarray(result[name]) for name in METHODS}
