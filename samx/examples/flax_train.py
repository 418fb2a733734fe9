"""Training and evaluation drivers for the Flax CNNs, used by the notebooks.

:func:`train_nnx` trains :class:`samx.examples.flax_models.CNN` through an
``nnx.Optimizer`` and :func:`samx.flax.make_nnx_train_step`, or on two devices
through :class:`samx.flax.Trainer`;
:func:`train_linen` trains :class:`samx.examples.flax_models.LinenCNN` through
a :class:`samx.flax.TrainState` and :func:`samx.flax.make_linen_train_step`.
Both take a method of :data:`samx.examples.train.METHODS` (its radius and
base optimizer: SGD with momentum, weight decay and a cosine schedule) and
record the test accuracy, in eval mode, after each epoch. :func:`nnx_eval_loss`
turns a trained NNX model into the ``loss_fn(params) -> scalar`` that
:mod:`samx.diagnostics` takes.

Needs Flax (``pip install "samx[examples]"``); ``import samx`` does not load it.
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import samx.flax
from samx import _plan
from samx.examples import flax_models
from samx.examples.data import Dataset
from samx.examples.train import METHODS, Method, base_optimizer

# The CNN's peak learning rate (the MLP's is 0.01). On digits with 40% label
# noise, 100 epochs, seeds 0-2 and rho = SAM_RHO: SGD 0.89-0.91 test accuracy,
# SAM 0.94, SAMPa-0.2 0.94-0.96 (at 0.2, SGD 0.83-0.87; at 0.05 after 60
# epochs, every method 0.92-0.94: SGD does not fit the noise yet).
LEARNING_RATE = 0.1

# The methods the samx.flax helpers run: SGD and samx's transforms. Not
# optax.contrib.sam, whose state the helpers do not recognise (they would call
# it as a plain optax transform, without its `grad_fn`).
FLAX_METHODS = tuple(name for name, m in METHODS.items() if m.convention is None)


@dataclasses.dataclass
class History:
    """What one run recorded, one entry per epoch.

    Attributes:
      method: the method's name in :data:`samx.examples.train.METHODS`.
      label: its human-readable name.
      seconds: training wall time at the end of each epoch, since the start
        (compilation and evaluation excluded).
      test_accuracy: test accuracy after each epoch, in eval mode (BatchNorm
        running averages).
      train_loss: the mean descent-pass loss of each epoch, on noisy labels.
      steps: the number of training steps.
    """

    method: str
    label: str
    seconds: list[float] = dataclasses.field(default_factory=list)
    test_accuracy: list[float] = dataclasses.field(default_factory=list)
    train_loss: list[float] = dataclasses.field(default_factory=list)
    steps: int = 0

    @property
    def final_accuracy(self) -> float:
        """The test accuracy after the last epoch."""
        return self.test_accuracy[-1]


def _method(fn: str, method_name: str) -> Method:
    if method_name not in FLAX_METHODS:
        raise ValueError(
            f"`{fn}(method_name=...)` must be one of {', '.join(FLAX_METHODS)},"
            f" got {method_name!r}."
        )
    return METHODS[method_name]


def _check_sizes(fn: str, data: Dataset, epochs: int, batch_size: int) -> None:
    if not isinstance(data, Dataset):
        raise TypeError(
            f"`{fn}(data=...)` must be a samx.examples.data.Dataset (from"
            f" load_digits), got {type(data).__name__}."
        )
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"`{fn}({name}=...)` must be an int, got {value!r}.")
        if value < 1:
            raise ValueError(f"`{fn}({name}=...)` must be >= 1, got {value}.")
    n = data.x_train.shape[0]
    if batch_size > n:
        raise ValueError(
            f"`{fn}(batch_size=...)` must be at most the {n} training examples,"
            f" got {batch_size}."
        )


def _loop_options(method: Method, opt_state: Any, batch_size: int) -> dict:
    """The step options of the method's plan: pairing, AsyncSAM's ascent batch."""
    options = {"pairing": method.pairing}
    if method.plan(opt_state).uses(_plan.ASCENT):
        options["ascent_batch_size"] = method.ascent_batch_size(batch_size)
    return options


def _fit(
    method: Method,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    step: Callable[[dict], jax.Array],
    evaluate: Callable[[], jax.Array],
) -> History:
    """The loop: shuffled minibatches, the clock, one sync per epoch.

    ``step(batch)`` trains on one batch and returns the descent loss (on the
    device); the previous batch, where the method needs it, is kept by the
    optimizer, the train state or the Trainer. ``evaluate()`` returns the test
    accuracy. Both have been compiled by the caller, so the clock times
    training only.
    """
    n = data.x_train.shape[0]
    steps_per_epoch = n // batch_size
    rng = np.random.default_rng(seed)
    history = History(method=method.name, label=method.label)
    seconds = 0.0
    for _ in range(epochs):
        order = rng.permutation(n)[: steps_per_epoch * batch_size]
        xs = jnp.asarray(data.x_train[order].reshape(steps_per_epoch, batch_size, -1))
        ys = jnp.asarray(data.y_train[order].reshape(steps_per_epoch, batch_size))
        start = time.perf_counter()
        total = jnp.zeros((), jnp.float32)
        for i in range(steps_per_epoch):
            total = total + step({"x": xs[i], "y": ys[i]})
        total = float(total)  # the only host sync of the epoch
        seconds += time.perf_counter() - start
        history.seconds.append(seconds)
        history.train_loss.append(total / steps_per_epoch)
        history.test_accuracy.append(float(evaluate()))
        history.steps += steps_per_epoch
    return history


def _first_batch(data: Dataset, batch_size: int) -> dict:
    return {
        "x": jnp.asarray(data.x_train[:batch_size]),
        "y": jnp.asarray(data.y_train[:batch_size]),
    }


def train_nnx(
    method_name: str,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int = 64,
    seed: int = 0,
    learning_rate: float = LEARNING_RATE,
    descent_device: Any = None,
    ascent_device: Any = None,
) -> tuple[flax_models.CNN, History]:
    """Trains the NNX CNN with a method, on one device or on two.

    The model is :class:`samx.examples.flax_models.CNN` initialised from
    ``nnx.Rngs(seed)``, the transform ``tx = METHODS[method_name].wrap(base)``,
    ``base`` being :func:`samx.examples.train.base_optimizer` over all the
    steps (AsyncSAM's ascent batch is the first quarter of each batch). By
    default the steps are :func:`samx.flax.make_nnx_train_step` with an
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)``, on the default device; with
    ``descent_device`` or ``ascent_device`` they are
    :meth:`samx.flax.Trainer.step`, which places the ascent role of
    AsyncSAM's and SAMPa's evaluation plan on ``ascent_device``. Either way
    AsyncSAM's and SAMPa's descent pass uses the previous step's batch, as
    their plan says, and the BatchNorm statistics come from the descent pass
    only: the same algorithm. There are ``len(data.x_train) // batch_size``
    shuffled batches per epoch, the same ones for every method with the same
    ``seed``.

    Args:
      method_name: a key of :data:`samx.examples.train.METHODS` in
        :data:`FLAX_METHODS` (``"sgd"``, ``"sam"``, ``"asam"``,
        ``"async_sam"``, ``"sampa0"``, ``"sampa"``).
      data: a :class:`samx.examples.data.Dataset`, e.g. ``load_digits()``.
      epochs: the number of passes over the training set.
      batch_size: the minibatch size.
      seed: seeds the initialisation and the batch order.
      learning_rate: the base optimizer's peak learning rate.
      descent_device: train through :class:`samx.flax.Trainer`, the descent
        on this device (a device or a name such as ``"cpu:0"``).
      ascent_device: train through :class:`samx.flax.Trainer`, the ascent
        role on this device (e.g. ``"cpu:1"``).

    Returns:
      ``(model, history)``: the trained model, in train mode, and a
      :class:`History` (whose label names the two devices of a Trainer run).

    Examples:
      A run takes seconds (a compilation per method), so this is not a doctest::

        from samx.examples import data, flax_train
        digits = data.load_digits(noise=0.4)
        model, history = flax_train.train_nnx("sam", digits, epochs=5)
        print(history.final_accuracy)
    """
    fn = "samx.examples.flax_train.train_nnx"
    method = _method(fn, method_name)
    _check_sizes(fn, data, epochs, batch_size)
    steps = epochs * (data.x_train.shape[0] // batch_size)
    model = flax_models.CNN(rngs=nnx.Rngs(seed))
    tx = method.wrap(base_optimizer(learning_rate, steps))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    options = _loop_options(method, jax.eval_shape(tx.init, params), batch_size)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    # Compile the step and the evaluation before the clock starts.
    first = _first_batch(data, batch_size)
    warm = nnx.clone(model)
    warm.eval()
    jax.block_until_ready(_nnx_accuracy(warm, x_test, y_test))
    if descent_device is None and ascent_device is None:
        step, trained, devices = _one_device(model, tx, options, first)
    else:
        step, trained, devices = _trainer_steps(
            model, tx, options, first, descent_device, ascent_device
        )

    def evaluate() -> jax.Array:
        model = nnx.clone(trained())
        model.eval()  # the running averages
        return _nnx_accuracy(model, x_test, y_test)

    history = _fit(
        method,
        data,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        step=step,
        evaluate=evaluate,
    )
    if devices:
        history.label += f" ({devices})"
    return trained(), history


@nnx.jit
def _nnx_accuracy(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    """The accuracy of ``model`` on ``(x, y)``; compiled once for every run."""
    return flax_models.accuracy(model(x), y)


def _one_device(model: nnx.Module, tx: Any, options: dict, first: dict) -> tuple:
    """``(step, trained model, None)`` through ``nnx.Optimizer``, compiled."""
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    train_step = samx.flax.make_nnx_train_step(flax_models.nnx_loss, **options)
    # The optimizer keeps the previous batch: the copies' stays with them.
    jax.block_until_ready(train_step(nnx.clone(model), nnx.clone(optimizer), first))

    def step(batch: dict) -> jax.Array:
        return train_step(model, optimizer, batch)["loss"]

    return step, lambda: model, None


def _trainer_steps(
    model: nnx.Module,
    tx: Any,
    options: dict,
    first: dict,
    descent_device: Any,
    ascent_device: Any,
) -> tuple:
    """``(step, trained model, "descent+ascent")`` through the Trainer, compiled."""
    trainer = samx.flax.Trainer(
        model,
        tx,
        flax_models.nnx_loss,
        descent_device=descent_device,
        ascent_device=ascent_device,
        **options,
    )
    start = jax.tree.map(jnp.copy, trainer.state)  # a step donates the state
    jax.block_until_ready(trainer.step(first))
    trainer.state = start  # the state holds the whole run: start it again

    def step(batch: dict) -> jax.Array:
        return trainer.step(batch)["loss"]

    runtime = trainer.runtime
    where = runtime.descent_device, runtime.ascent_device_for(trainer.plan)
    devices = "+".join(f"{d.platform}:{d.id}" for d in where)
    return step, lambda: trainer.model, devices


def train_linen(
    method_name: str,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int = 64,
    seed: int = 0,
    learning_rate: float = LEARNING_RATE,
) -> tuple[samx.flax.TrainState, History]:
    """Trains the linen CNN with a method through a ``samx.flax.TrainState``.

    The linen counterpart of :func:`train_nnx`, with the same settings, batch
    order and method calls: :class:`samx.examples.flax_models.LinenCNN`
    initialised from ``jax.random.key(seed)``, a :class:`samx.flax.TrainState`
    holding its ``batch_stats``, and :func:`samx.flax.make_linen_train_step`
    over :func:`samx.examples.flax_models.linen_loss`.

    Args:
      method_name: a name in :data:`FLAX_METHODS`.
      data: a :class:`samx.examples.data.Dataset`.
      epochs: the number of passes over the training set.
      batch_size: the minibatch size.
      seed: seeds the initialisation and the batch order.
      learning_rate: the base optimizer's peak learning rate.

    Returns:
      ``(state, history)``: the final :class:`samx.flax.TrainState` and a
      :class:`History`.

    Examples:
      Not a doctest (a run takes seconds)::

        from samx.examples import data, flax_train
        state, history = flax_train.train_linen(
            "sampa", data.load_digits(), epochs=5)
    """
    fn = "samx.examples.flax_train.train_linen"
    method = _method(fn, method_name)
    _check_sizes(fn, data, epochs, batch_size)
    steps = epochs * (data.x_train.shape[0] // batch_size)
    params, batch_stats = flax_models.linen_init(jax.random.key(seed))
    state = samx.flax.TrainState.create(
        apply_fn=flax_models.LinenCNN().apply,
        params=params,
        batch_stats=batch_stats,
        tx=method.wrap(base_optimizer(learning_rate, steps)),
    )
    options = _loop_options(method, state.opt_state, batch_size)
    train_step = samx.flax.make_linen_train_step(flax_models.linen_loss, **options)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    @jax.jit
    def test_accuracy(params: Any, batch_stats: Any) -> jax.Array:
        logits = flax_models.linen_logits(params, batch_stats, x_test)
        return flax_models.accuracy(logits, y_test)

    def step(batch: dict) -> jax.Array:
        nonlocal state
        state, metrics = train_step(state, batch)  # the state keeps prev_batch
        return metrics["loss"]

    def evaluate() -> jax.Array:
        return test_accuracy(state.params, state.batch_stats)

    first = _first_batch(data, batch_size)
    jax.block_until_ready(train_step(state, first))  # compile only
    jax.block_until_ready(evaluate())

    history = _fit(
        method,
        data,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        step=step,
        evaluate=evaluate,
    )
    return state, history


_NHWC = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def conv_as_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Any,
    padding: Any,
    lhs_dilation: Any = None,
    rhs_dilation: Any = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """``jax.lax.conv_general_dilated`` as one matmul over the image patches.

    For the 2-D convolutions of ``nnx.Conv`` (NHWC inputs, HWIO kernels,
    unit strides and dilations, one feature group, ``"SAME"``, ``"VALID"`` or
    explicit padding): the shifted copies of the padded input are stacked and
    multiplied by the flattened kernel, which gives the same result. Other
    convolutions go to ``jax.lax.conv_general_dilated``. XLA:CPU runs a
    convolution inside a loop (``lax.fori_loop``, ``lax.map``: the diagnostics'
    iterations) far slower than the same convolution outside one, and a matmul
    does not have that problem. Pass it as ``nnx.Conv(...,
    conv_general_dilated=conv_as_matmul)``; :func:`nnx_eval_loss` does.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
      >>> k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
      >>> dn = jax.lax.conv_dimension_numbers(
      ...     x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
      >>> want = jax.lax.conv_general_dilated(
      ...     x, k, (1, 1), "SAME", dimension_numbers=dn)
      >>> got = conv_as_matmul(x, k, (1, 1), "SAME", dimension_numbers=dn)
      >>> bool(jnp.allclose(got, want, atol=1e-4))
      True
    """
    ones = (1, 1)
    simple = (
        lhs.ndim == 4
        and rhs.ndim == 4
        and dimension_numbers == _NHWC
        and tuple(window_strides) == ones
        and tuple(lhs_dilation or ones) == ones
        and tuple(rhs_dilation or ones) == ones
        and feature_group_count == 1
        and not kwargs.get("preferred_element_type")
    )
    if simple and isinstance(padding, str):
        simple = padding in ("SAME", "VALID")
        if padding == "SAME":
            padding = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in rhs.shape[:2]]
        elif padding == "VALID":
            padding = [(0, 0), (0, 0)]
    if not simple:
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )
    kh, kw, cin, cout = rhs.shape
    x = jnp.pad(lhs, [(0, 0), *[tuple(p) for p in padding], (0, 0)])
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    patches = jnp.concatenate(
        [x[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)],
        axis=-1,
    )  # (N, H, W, kh * kw * C), in the kernel's (i, j, c) order
    return jnp.dot(patches, rhs.reshape(kh * kw * cin, cout), precision=precision)


def nnx_eval_loss(
    model: nnx.Module,
    batch: dict,
    loss: Callable[[Any, dict], jax.Array] = flax_models.nnx_loss,
    *,
    matmul_convs: bool = True,
) -> tuple[Callable[[Any], jax.Array], Any]:
    """An NNX model as ``loss_fn(params) -> scalar`` for :mod:`samx.diagnostics`.

    Splits an eval-mode copy of ``model`` into its graph, its parameters
    (``nnx.Param``) and the rest (BatchNorm running averages), and returns a
    loss of the parameters alone that merges them back with the fixed rest and
    evaluates ``loss(model, batch)``: BatchNorm normalises with the running
    averages, so the loss is a deterministic function of the parameters.
    ``model`` itself is not changed. With ``matmul_convs``, the copy's
    ``nnx.Conv`` layers compute with :func:`conv_as_matmul` (the same values;
    the diagnostics loop over the loss, where XLA:CPU convolutions are slow).

    Args:
      model: an ``nnx.Module`` with ``.eval()``, e.g. a trained
        :class:`samx.examples.flax_models.CNN`.
      batch: the fixed evaluation batch, ``{"x": ..., "y": ...}``.
      loss: ``loss(model, batch) -> scalar``.
      matmul_convs: compute the convolutions as matmuls over patches.

    Returns:
      ``(loss_fn, params)``: the loss of the parameters and the model's
      parameters as a pure ``nnx.State`` of arrays, for instance for
      ``samx.diagnostics.sharpness(loss_fn, params, rho)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from samx.examples import flax_models
      >>> model = flax_models.CNN(rngs=nnx.Rngs(0))
      >>> batch = {"x": jax.random.normal(jax.random.key(0), (4, 64)),
      ...          "y": jnp.arange(4)}
      >>> loss_fn, params = nnx_eval_loss(model, batch)
      >>> model.eval()  # the same loss as the model in eval mode
      >>> bool(jnp.allclose(loss_fn(params), flax_models.nnx_loss(model, batch)))
      True
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(
            "`samx.examples.flax_train.nnx_eval_loss(model=...)` must be an"
            f" `nnx.Module`, got {type(model).__name__}."
        )
    copy = nnx.clone(model)
    copy.eval()
    if matmul_convs:
        for _, module in nnx.iter_modules(copy):
            if isinstance(module, nnx.Conv):
                module.conv_general_dilated = conv_as_matmul
    graphdef, params, rest = nnx.split(copy, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)

    def loss_fn(p: Any) -> jax.Array:
        return loss(nnx.merge(graphdef, p, rest), batch)

    return loss_fn, params
