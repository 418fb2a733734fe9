"""Bad input to every public function gives a clear error, raised at the API.

One table: each case is a callable, its arguments, the exception type and a
regex that must appear in the message, naming the argument in the caller's
terms. Every error must also be raised by samx itself (the innermost frame of
the traceback is a samx source file), not deep inside JAX or optax: errors
raised at trace time inside ``jit`` count, when samx raises them.

Cases that fail because the fix belongs to a file this test does not own are
marked ``xfail(strict=True)`` with the fix in the reason; they turn into
failures (XPASS) once it lands, and the mark must then go.
"""

import dataclasses
import pathlib
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state as flax_train_state
from jax.sharding import Mesh

import samx
import samx.flax
import samx.runtime.launch
from samx import runtime

SAMX_DIR = pathlib.Path(samx.__file__).resolve().parent

PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
GRADS = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
BATCH = {"x": np.ones((8, 3), np.float32), "y": np.ones((8, 2), np.float32)}


def _loss(params, batch):
    pred = batch["x"] @ params["w"] + params["b"][None, :]
    return jnp.mean(jnp.square(pred - batch["y"]))


def _ones_grad_fn(params, i):
    del i
    return jax.tree.map(jnp.ones_like, params)


def _returning(tree):
    return lambda params, i: tree


FACTORIES = {"sam": samx.sam, "async_sam": samx.async_sam, "sampa": samx.sampa}


def _update(name, updates=GRADS, state=None, params=PARAMS, **kwargs):
    """``tx.update`` of a fresh transform; ``grad_fn`` defaults to a valid one."""
    tx = FACTORIES[name](optax.sgd(0.1))
    if state is None:
        state = tx.init(PARAMS)
    kwargs.setdefault("grad_fn", _ones_grad_fn)
    return tx.update(updates, state, params, **kwargs)


def _update_in_jit(name, updates):
    tx = FACTORIES[name](optax.sgd(0.1))
    step = jax.jit(lambda u, s, p: tx.update(u, s, p, grad_fn=_ones_grad_fn))
    return step(updates, tx.init(PARAMS), PARAMS)


def _init(name, params):
    return FACTORIES[name](optax.sgd(0.1)).init(params)


def _trainer_step(name, batch, loss_fn=_loss, **trainer_kwargs):
    trainer = runtime.Trainer(
        FACTORIES[name](optax.sgd(0.1)), loss_fn, **trainer_kwargs
    )
    return trainer.step(trainer.init(PARAMS), batch)


def _has_state_step(loss_fn):
    trainer = runtime.Trainer(samx.sam(optax.sgd(0.1)), loss_fn, has_state=True)
    return trainer.step(trainer.init(PARAMS, {"n": jnp.zeros(())}), BATCH)


def _trainer_step_with(state_of, batch=BATCH):
    trainer = runtime.Trainer(samx.async_sam(optax.sgd(0.1)), _loss)
    return trainer.step(state_of(trainer.init(PARAMS)), batch)


def _step_a_donated_state(name):
    """Steps the state the first step was given: that step donated it."""
    trainer = runtime.Trainer(FACTORIES[name](optax.sgd(0.1)), _loss)
    state = trainer.init(PARAMS)
    trainer.step(state, BATCH)
    return trainer.step(state, BATCH)


def _step_a_foreign_state(state_of, **trainer_kwargs):
    """A Trainer stepping a state another Trainer made (``state_of(PARAMS)``)."""
    trainer = runtime.Trainer(samx.async_sam(optax.sgd(0.1)), _loss, **trainer_kwargs)
    trainer.init(PARAMS)
    return trainer.step(state_of(), BATCH)


def _stepped_state(name, **trainer_kwargs):
    """A state after one step of a Trainer of ``FACTORIES[name]``."""
    trainer = runtime.Trainer(FACTORIES[name](optax.sgd(0.1)), _loss, **trainer_kwargs)
    return trainer.step(trainer.init(PARAMS), BATCH)[0]


def _trainer_init(name, params, model_state=None, **trainer_kwargs):
    trainer = runtime.Trainer(FACTORIES[name](optax.sgd(0.1)), _loss, **trainer_kwargs)
    return trainer.init(params, model_state)


def _points(tx, updates, opt_state, params=PARAMS, **extra_args):
    return runtime.grad_fn_points(tx, updates, opt_state, params, **extra_args)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict
    exception: type[Exception]
    match: str
    xfail: str | None = None  # the fix, in a file this test does not own

    def param(self):
        marks = (
            [pytest.mark.xfail(strict=True, reason=self.xfail)] if self.xfail else []
        )
        return pytest.param(self, id=self.id, marks=marks)


def _case(id, fn, args, kwargs, exception, match, xfail=None):
    return Case(id, fn, args, kwargs, exception, match, xfail)


# -- the transforms: construction ----------------------------------------------


def _construction_cases(name):
    f = FACTORIES[name]
    fn = rf"samx\.{name}"
    sgd = optax.sgd(0.1)
    cases = [
        _case(
            "base-none", f, (None,), {}, TypeError, r"\(base=\.\.\.\)`.*got NoneType"
        ),
        _case(
            "base-factory", f, (optax.sgd,), {}, TypeError, r"\(base=\.\.\.\)`.*factory"
        ),
        _case("rho-negative", f, (sgd,), {"rho": -0.1}, ValueError, r"\(rho=.*-0\.1"),
        _case("rho-nan", f, (sgd,), {"rho": float("nan")}, ValueError, r"\(rho="),
        _case("rho-str", f, (sgd,), {"rho": "0.1"}, TypeError, r"\(rho=.*got str"),
        _case(
            "rho-vector",
            f,
            (sgd,),
            {"rho": jnp.ones(2)},
            TypeError,
            r"\(rho=.*shape \(2,\)",
        ),
        _case(
            "rho-schedule-negative",
            f,
            (sgd,),
            {"rho": optax.linear_schedule(0.1, -0.1, 100)},
            ValueError,
            r"\(rho=\.\.\.\)` at step 100 must be finite and in \[0\.0, inf\]",
        ),
        _case(
            "rho-schedule-vector",
            f,
            (sgd,),
            {"rho": lambda count: jnp.ones(2)},
            TypeError,
            r"\(rho=\.\.\.\)` at step 0 must be a scalar",
        ),
        _case(
            "rho-callable-not-a-schedule",
            f,
            (sgd,),
            {"rho": lambda: 0.1},
            TypeError,
            r"\(rho=\.\.\.\)` is callable, so it is taken as a schedule",
        ),
        _case("eps-negative", f, (sgd,), {"eps": -1.0}, ValueError, r"\(eps=.*-1\.0"),
        _case("eps-schedule", f, (sgd,), {"eps": lambda c: 0.1}, TypeError, r"\(eps="),
    ]
    if name == "sampa":
        cases += [
            _case("lam-above-1", f, (sgd,), {"lam": 1.5}, ValueError, r"\(lam=.*1\.5"),
            _case("lam-negative", f, (sgd,), {"lam": -0.5}, ValueError, r"\(lam="),
            _case("lam-str", f, (sgd,), {"lam": "a"}, TypeError, r"\(lam=.*got str"),
            _case(
                "lam-schedule-above-1",
                f,
                (sgd,),
                {"lam": optax.linear_schedule(0.0, 2.0, 1000)},
                ValueError,
                r"\(lam=\.\.\.\)` at step 1000 must be finite and in \[0\.0, 1\.0\]",
            ),
        ]
    else:
        cases += [
            _case("eta-negative", f, (sgd,), {"eta": -1.0}, ValueError, r"\(eta="),
            _case(
                "adaptive-str",
                f,
                (sgd,),
                {"adaptive": "no"},
                TypeError,
                r"\(adaptive=.*True or False.*got str",
            ),
            _case(
                "mask-without-adaptive",
                f,
                (sgd,),
                {"mask": {"w": True, "b": False}},
                ValueError,
                r"\(mask=.*adaptive=True",
            ),
        ]
    # every message names the argument as the caller wrote it: `samx.sam(rho=...)`
    return [
        dataclasses.replace(c, id=f"{name}-{c.id}", match=f"`{fn}{c.match}")
        for c in cases
    ]


# -- the transforms: init and update -------------------------------------------


def _update_cases(name):
    fn = rf"samx\.{name}"
    result = r"the result of `grad_fn(\(_, 0\))?`"
    wrong_w = {"w": jnp.ones(3), "b": jnp.ones(2)}
    int_grads = jax.tree.map(lambda x: x.astype(jnp.int32), GRADS)
    cases = [
        _case(
            "init-params-none",
            _init,
            (name, None),
            {},
            ValueError,
            rf"{fn}: `init` needs the current `params`.*got None",
        ),
        _case(
            "init-params-str-leaf",
            _init,
            (name, {"w": "abc"}),
            {},
            TypeError,
            rf"{fn}: `params` leaf \['w'\] must be an array.*got str",
        ),
        _case(
            "update-params-none",
            _update,
            (name,),
            {"params": None},
            ValueError,
            rf"{fn}: `update` needs the current `params`",
        ),
        _case(
            "update-params-str-leaf",
            _update,
            (name,),
            {"params": {"w": "a", "b": "b"}},
            TypeError,
            rf"{fn}: `params` leaf \['b'\] must be an array.*got str",
        ),
        _case(
            "update-state-of-another-transform",
            _update,
            (name,),
            {"state": optax.sgd(0.1).init(PARAMS)},
            TypeError,
            rf"{fn}: `update` needs the state that this transform's `init` returned",
        ),
        _case(
            "grad_fn-missing",
            _update,
            (name,),
            {"grad_fn": None},
            ValueError,
            rf"{fn}: `update` needs the keyword argument `grad_fn`",
        ),
        _case(
            "grad_fn-not-callable",
            _update,
            (name,),
            {"grad_fn": GRADS},
            TypeError,
            rf"{fn}: `grad_fn` must be callable.*got dict",
        ),
        _case(  # a gradient of the params alone: no batch index
            "grad_fn-batchless",
            _update,
            (name,),
            {"grad_fn": lambda p: GRADS},
            TypeError,
            rf"{fn}: `grad_fn` is called as `grad_fn\(params, i\)`.*\(p\)",
        ),
        _case(
            "grad_fn-returns-wrong-tree",
            _update,
            (name,),
            {"grad_fn": _returning({"w": GRADS["w"]})},
            ValueError,
            rf"{fn}: {result} does not have the tree structure of `params`",
        ),
        _case(
            "grad_fn-returns-loss-and-grads",
            _update,
            (name,),
            {"grad_fn": _returning((jnp.zeros(()), GRADS))},
            ValueError,
            rf"{fn}: {result} .*`\(loss, grads\)` pair",
        ),
        _case(
            "grad_fn-returns-wrong-shape",
            _update,
            (name,),
            {"grad_fn": _returning(wrong_w)},
            ValueError,
            rf"{fn}: {result} leaf \['w'\] has shape \(3,\), but `params` has"
            r" shape \(3, 2\)",
        ),
        _case(
            "grad_fn-returns-int-dtype",
            _update,
            (name,),
            {"grad_fn": _returning(int_grads)},
            TypeError,
            rf"{fn}: {result} leaf \['b'\] has dtype int32, but `params` has float32",
        ),
    ]
    if name != "sampa":  # sampa does not use `updates`
        cases += [
            _case(
                "updates-wrong-tree",
                _update,
                (name,),
                {"updates": {"w": GRADS["w"]}},
                ValueError,
                rf"{fn}: `updates` does not have the tree structure of `params`",
            ),
            _case(
                "updates-wrong-shape",
                _update,
                (name,),
                {"updates": wrong_w},
                ValueError,
                rf"{fn}: `updates` leaf \['w'\] has shape \(3,\)",
            ),
            _case(
                "updates-wrong-shape-in-jit",
                _update_in_jit,
                (name, wrong_w),
                {},
                ValueError,
                rf"{fn}: `updates` leaf \['w'\] has shape \(3,\)",
            ),
            _case(
                "updates-int-dtype",
                _update,
                (name,),
                {"updates": int_grads},
                TypeError,
                rf"{fn}: `updates` leaf \['b'\] has dtype int32",
            ),
        ]
    return [dataclasses.replace(c, id=f"{name}-{c.id}") for c in cases]


# -- diagnostics -----------------------------------------------------------------

_COS = samx.diagnostics.staleness_cosine
_COS_NAME = r"samx\.diagnostics\.staleness_cosine"
DIAGNOSTICS_CASES = [
    _case(
        "staleness_cosine-different-trees",
        _COS,
        (GRADS, {"w": GRADS["w"]}),
        {},
        ValueError,
        rf"{_COS_NAME}: `fresh` does not have the tree structure of `stale`",
    ),
    _case(
        "staleness_cosine-different-shapes",
        _COS,
        (GRADS, {"w": jnp.ones((2, 3)), "b": jnp.ones(2)}),
        {},
        ValueError,
        rf"{_COS_NAME}: `fresh` leaf \['w'\] has shape \(2, 3\)",
    ),
    _case(
        "staleness_cosine-str-leaves",
        _COS,
        ({"a": "x"}, {"a": "y"}),
        {},
        TypeError,
        rf"{_COS_NAME}: `stale` leaf \['a'\] must be an array",
    ),
    _case(
        "staleness_cosine-eps-negative",
        _COS,
        (GRADS, GRADS),
        {"eps": -1.0},
        ValueError,
        r"staleness_cosine\(eps=\.\.\.\)",
    ),
]

# -- the runtime -------------------------------------------------------------------

_T = runtime.Trainer
_ASYNC = samx.async_sam(optax.sgd(0.1))
_DEVICES = r"available: cpu:0, cpu:1"
_NOT_A_SCALAR = lambda p, b: b["x"] @ p["w"]  # noqa: E731
_RAGGED = {"x": np.ones((8, 3), np.float32), "y": np.ones((7, 2), np.float32)}
_SCALAR_LEAF = {"x": np.float32(1.0), "y": np.ones((8, 2), np.float32)}

TRAINER_CASES = [
    _case("tx-none", _T, (None, _loss), {}, TypeError, r"`Trainer\(tx=\.\.\.\)`"),
    _case("tx-factory", _T, (optax.sgd, _loss), {}, TypeError, r"Trainer\(tx="),
    _case(
        "loss_fn-not-callable",
        _T,
        (_ASYNC, "mse"),
        {},
        TypeError,
        r"`Trainer\(loss_fn=\.\.\.\)` must be callable.*got str",
    ),
    *[
        _case(
            f"ascent_batch_size-{size}",
            _T,
            (_ASYNC, _loss),
            {"ascent_batch_size": size},
            ValueError,
            rf"`Trainer\(ascent_batch_size=\.\.\.\)` must be an int >= 1.*{size}",
        )
        for size in (0, -4, 2.5)
    ],
    _case(
        "ascent_batch_size-bool",
        _T,
        (_ASYNC, _loss),
        {"ascent_batch_size": True},
        ValueError,
        r"`Trainer\(ascent_batch_size=\.\.\.\)` must be an int >= 1.*True",
    ),
    *[
        _case(
            f"{arg}-{device}",
            _T,
            (_ASYNC, _loss),
            {arg: device},
            ValueError,
            rf"`{arg}='{device}'` is not a device here; {_DEVICES}",
        )
        for arg, device in [
            ("descent_device", "gpu"),
            ("descent_device", "cpu:99"),
            ("descent_device", "cpu:-1"),
            ("descent_device", ""),
            ("ascent_device", "tpu:0"),
            ("ascent_device", "cpu:"),
        ]
    ],
    _case(
        "init-has_state-without-model_state",
        _trainer_init,
        ("sam", PARAMS),
        {"has_state": True},
        ValueError,
        r"`Trainer\(has_state=True\)` needs `init\(params, model_state\)`",
    ),
    _case(  # raised by the transform's own init, inside the Trainer's jit
        "init-params-none",
        _trainer_init,
        ("sam", None),
        {},
        ValueError,
        r"samx\.sam: `init` needs the current `params`",
    ),
    _case(
        "init-ascent_batch_size-for-sam",
        _trainer_init,
        ("sam", PARAMS),
        {"ascent_batch_size": 4},
        ValueError,
        r"`Trainer\(ascent_batch_size=\.\.\.\)` is AsyncSAM's ascent batch",
    ),
    _case(
        "step-batch-none",
        _trainer_step,
        ("async_sam", None),
        {},
        ValueError,
        r"must be a pytree of arrays with a leading batch axis, got a tree with no"
        r" leaves",
    ),
    *[
        _case(
            f"step-{name}-batch-without-leading-axis",
            _trainer_step,
            (name, _SCALAR_LEAF),
            {},
            ValueError,
            r"`samx\.runtime\.Trainer\.step\(batch=\.\.\.\)` must have a leading batch"
            r" axis on every leaf; \['x'\] is a scalar",
        )
        for name in FACTORIES
    ],
    _case(
        "step-batch-leaves-of-different-sizes",
        _trainer_step,
        ("sampa", _RAGGED),
        {},
        ValueError,
        r"`samx\.runtime\.Trainer\.step\(batch=\.\.\.\)`: every leaf must have the"
        r" same leading batch size; \['x'\] has 8, \['y'\] has 7",
    ),
    *[
        _case(
            f"step-ascent_batch_size-larger-than-batch-{where}",
            _trainer_step,
            ("async_sam", BATCH),
            {"ascent_batch_size": 16, "ascent_device": device},
            ValueError,
            r"`Trainer\(ascent_batch_size=16\)` is larger than the batch \(8\)",
        )
        for where, device in [("two-devices", "cpu:1"), ("one-device", "cpu:0")]
    ],
    _case(
        "step-loss-not-a-scalar",
        _trainer_step,
        ("sam", BATCH),
        {"loss_fn": _NOT_A_SCALAR},
        ValueError,
        r"`loss_fn` must return a scalar loss.*shape \(8, 2\)",
    ),
    _case(
        "step-has_state-loss-not-a-pair",
        _has_state_step,
        (lambda p, s, b: _loss(p, b),),
        {},
        ValueError,
        r"`loss_fn\(params, model_state, batch\)` must return"
        r" `\(loss, new_model_state\)`",
    ),
    _case(
        "step-state-is-params",
        _trainer_step_with,
        (lambda state: state.params,),
        {},
        TypeError,
        r"Trainer\.step\(state=\.\.\.\)",
    ),
    *[
        _case(  # donated by the step it was given to
            f"step-donated-state-{name}",
            _step_a_donated_state,
            (name,),
            {},
            ValueError,
            r"`samx\.runtime\.Trainer\.step\(state=\.\.\.\)`: this state's arrays"
            r" were deleted: a step donates the state it is given",
        )
        for name in ("sam", "async_sam", "sampa")
    ],
    _case(  # e.g. a checkpoint of another transform, restored
        "step-state-of-another-transform",
        _step_a_foreign_state,
        (lambda: _stepped_state("sam"),),
        {},
        ValueError,
        r"this optimizer state is sam's \(paired\), but this Trainer trains"
        r" async_sam \(paired\): was it saved with another transform\?",
    ),
    _case(
        "step-state-of-another-pairing",
        _step_a_foreign_state,
        (lambda: _stepped_state("async_sam"),),
        {"pairing": "unpaired"},
        ValueError,
        r"`samx\.runtime\.Trainer\.step\(state=\.\.\.\)` holds a previous batch,"
        r" which this Trainer's async_sam \(unpaired\) does not use",
    ),
    _case(
        "step-state-on-another-device",
        _step_a_foreign_state,
        (lambda: _stepped_state("async_sam", descent_device="cpu:1"),),
        {"descent_device": "cpu:0"},
        ValueError,
        r"`samx\.runtime\.Trainer\.step\(state=\.\.\.\)`: its `step` lies on"
        r" \[CpuDevice\(id=1\)\], but this Trainer keeps it on \[CpuDevice\(id=0\)\]",
    ),
]
_CAL = runtime.calibrate_ascent_batch
_CAL_NAME = r"`calibrate_ascent_batch"
CALIBRATE_CASES = [
    _case(
        "loss_fn-not-callable",
        _CAL,
        (None, PARAMS, BATCH),
        {},
        TypeError,
        rf"{_CAL_NAME}\(loss_fn=\.\.\.\)` must be callable",
    ),
    *[
        _case(
            f"repeats-{r}",
            _CAL,
            (_loss, PARAMS, BATCH),
            {"repeats": r},
            ValueError,
            rf"{_CAL_NAME}\(repeats=\.\.\.\)` must be an int >= 1, got {r}",
        )
        for r in (0, -1, 1.5, True)
    ],
    _case(
        "params-none",
        _CAL,
        (_loss, None, BATCH),
        {},
        ValueError,
        rf"{_CAL_NAME}\(params=\.\.\.\)`.*got None",
    ),
    _case(
        "has_state-without-model_state",
        _CAL,
        (lambda p, s, b: (_loss(p, b), s), PARAMS, BATCH),
        {"has_state": True},
        ValueError,
        rf"{_CAL_NAME}\(has_state=True\)` needs `model_state=\.\.\.`",
    ),
    _case(
        "fast_device-gpu",
        _CAL,
        (_loss, PARAMS, BATCH),
        {"fast_device": "gpu"},
        ValueError,
        rf"`fast_device='gpu'` is not a device here; {_DEVICES}",
    ),
    _case(
        "slow_device-cpu:99",
        _CAL,
        (_loss, PARAMS, BATCH),
        {"slow_device": "cpu:99"},
        ValueError,
        rf"`slow_device='cpu:99'` is not a device here; {_DEVICES}",
    ),
    _case(
        "batch-without-leading-axis",
        _CAL,
        (_loss, PARAMS, _SCALAR_LEAF),
        {},
        ValueError,
        r"must have a leading batch axis on every leaf; \['x'\] is a scalar",
    ),
    _case(
        "batch-leaves-of-different-sizes",
        _CAL,
        (_loss, PARAMS, _RAGGED),
        {},
        ValueError,
        r"every leaf must have the same leading batch size; \['x'\] has 8",
    ),
    _case(
        "loss-not-a-scalar",
        _CAL,
        (_NOT_A_SCALAR, PARAMS, BATCH),
        {"repeats": 1},
        ValueError,
        r"`loss_fn` must return a scalar loss.*shape \(8, 2\)",
    ),
]

_SAMPA = samx.sampa(optax.sgd(0.1))
POINTS_CASES = [
    _case(
        "tx-not-a-transform",
        _points,
        ("sampa", None, None),
        {},
        TypeError,
        r"`samx\.runtime\.grad_fn_points\(tx=\.\.\.\)` must be an optax transform",
    ),
    _case(
        "grad_fn-passed",
        _points,
        (_SAMPA, None, _SAMPA.init(PARAMS)),
        {"grad_fn": _ones_grad_fn},
        TypeError,
        r"grad_fn_points` passes its own `grad_fn`",
    ),
    _case(
        "params-none",
        _points,
        (_SAMPA, None, _SAMPA.init(PARAMS)),
        {"params": None},
        ValueError,
        r"samx\.sampa: `update` needs the current `params`",
    ),
    _case(
        "opt_state-of-another-transform",
        _points,
        (_SAMPA, None, optax.sgd(0.1).init(PARAMS)),
        {},
        TypeError,
        r"samx\.sampa: `update` needs the state that this transform's `init`",
    ),
]

METHOD_OF_CASES = [
    _case(
        "two-samx-transforms",
        runtime.method_of,
        (optax.chain(samx.sam(optax.sgd(0.1)), _SAMPA).init(PARAMS),),
        {},
        ValueError,
        r"one sharpness-aware transform.*\['sam', 'sampa'\]",
    ),
    _case(
        "the-transform-not-its-state",
        runtime.method_of,
        (_SAMPA,),
        {},
        TypeError,
        r"method_of\(opt_state=\.\.\.\).*tx\.init\(params\)",
    ),
]

EVALUATION_PLAN_CASES = [
    _case(
        "pairing-unknown",
        samx.evaluation_plan,
        (samx.async_sam(optax.sgd(0.1)).init(PARAMS),),
        {"pairing": "lagged"},
        ValueError,
        r"`samx\.evaluation_plan\(pairing=\.\.\.\)` must be 'paired'.*got 'lagged'",
    ),
    _case(
        "method-unknown",
        samx.evaluation_plan,
        (optax.sgd(0.1).init(PARAMS),),
        {"method": "adam"},
        ValueError,
        r"`samx\.evaluation_plan\(method=\.\.\.\)` must be None.*'sam'.*got 'adam'",
    ),
    _case(
        "the-transform-not-its-state",
        samx.evaluation_plan,
        (_SAMPA,),
        {},
        TypeError,
        r"method_of\(opt_state=\.\.\.\).*tx\.init\(params\)",
    ),
]
LIST_BATCH = {"x": np.ones((8, 3)).tolist(), "y": np.ones((8, 2), np.float32)}
PAIRING_AND_LIST_CASES = [
    _case(
        "pairing-unknown",
        runtime.Trainer,
        (_SAMPA, _loss),
        {"pairing": "previous"},
        ValueError,
        r"`Trainer\(pairing=\.\.\.\)` must be 'paired'",
    ),
    _case(
        "batch-of-lists",
        _trainer_step,
        ("sam", LIST_BATCH),
        {},
        TypeError,
        r"`samx\.runtime\.Trainer\.step\(batch=\.\.\.\)` must be a pytree of arrays;"
        r" \['x'\]\[0\]\[0\] is a Python number inside a list.*np\.asarray",
    ),
]


def _prefixed(prefix, cases):
    return [dataclasses.replace(c, id=f"{prefix}-{c.id}") for c in cases]


def _lit(text):
    """A regex that matches ``text`` literally."""
    return re.escape(text)


# -- gradient accumulation and the non-finite guard ------------------------------

_GRAD = jax.grad(_loss)
_MB = r"samx\.microbatched"


def _microbatched(k, batch, fn=_GRAD, jit=False):
    accumulated = samx.microbatched(fn, k)
    return (jax.jit(accumulated) if jit else accumulated)(PARAMS, batch)


MICROBATCHED_CASES = [
    *[
        _case(
            f"num_microbatches-{k!r}",
            samx.microbatched,
            (_GRAD, k),
            {},
            ValueError,
            rf"`{_MB}\(num_microbatches=\.\.\.\)` must be an int >= 1, got"
            + _lit(f" {k!r}."),
        )
        for k in (0, -2, 2.5, True, "2", None)
    ],
    _case(
        "fn-not-callable",
        samx.microbatched,
        (None, 2),
        {},
        TypeError,
        rf"`{_MB}\(fn=\.\.\.\)` must be a function `fn\(params, batch\)`.*NoneType",
    ),
    _case(  # the transform, not a function of a batch
        "fn-a-transform",
        samx.microbatched,
        (optax.sgd(0.1), 2),
        {},
        TypeError,
        rf"`{_MB}\(fn=\.\.\.\)`.*got GradientTransformationExtraArgs",
    ),
    *[
        _case(
            f"batch-not-divisible{'-in-jit' if jit else ''}",
            _microbatched,
            (3, BATCH),
            {"jit": jit},
            ValueError,
            rf"{_MB}: the batch size 8 is not divisible by num_microbatches=3",
        )
        for jit in (False, True)
    ],
    _case(
        "batch-none",
        _microbatched,
        (2, None),
        {},
        ValueError,
        rf"{_MB}: `batch` has no array leaves",
    ),
    _case(
        "batch-scalar-leaf",
        _microbatched,
        (2, {"x": np.float32(1.0), "y": BATCH["y"]}),
        {},
        ValueError,
        rf"{_MB}: .*leaf \['x'\] is a scalar",
    ),
    _case(
        "batch-str-leaf",
        _microbatched,
        (2, {"x": "abc", "y": BATCH["y"]}),
        {},
        TypeError,
        rf"{_MB}: every leaf of `batch` must be an array, but leaf \['x'\] is a str",
    ),
    _case(
        "batch-leaves-of-different-sizes",
        _microbatched,
        (2, {"x": BATCH["x"], "y": BATCH["y"][:7]}),
        {},
        ValueError,
        rf"{_MB}: .*leaf \['x'\] has 8 and leaf \['y'\] has 7",
    ),
    _case(
        "fn-returns-int",
        _microbatched,
        (2, BATCH),
        {"fn": lambda p, b: jnp.sum(b["x"]).astype(jnp.int32)},
        TypeError,
        rf"{_MB}: `fn` must return floating arrays to average, but its output"
        r" has dtype int32",
    ),
]

_SKIP = r"samx\.skip_nonfinite"


def _skip_update(inner=None, state_of=None, **kwargs):
    inner = samx.sam(optax.sgd(0.1)) if inner is None else inner
    tx = samx.skip_nonfinite(inner)
    state = tx.init(PARAMS) if state_of is None else state_of(inner)
    kwargs.setdefault("grad_fn", _ones_grad_fn)
    updates = kwargs.pop("updates", GRADS)
    return tx.update(updates, state, PARAMS, **kwargs)


SKIP_NONFINITE_CASES = [
    *[
        _case(
            f"inner-{what}",
            samx.skip_nonfinite,
            (inner,),
            {},
            TypeError,
            rf"`{_SKIP}\(inner=\.\.\.\)` must be an optax transform.*got {got}",
        )
        for what, inner, got in [
            ("none", None, "NoneType"),
            ("factory", optax.sgd, "function"),
            ("a-state", samx.sam(optax.sgd(0.1)).init(PARAMS), "SAMState"),
        ]
    ],
    _case(
        "init-params-none",
        lambda: samx.skip_nonfinite(samx.sam(optax.sgd(0.1))).init(None),
        (),
        {},
        ValueError,
        r"samx\.sam: `init` needs the current `params`",
    ),
    _case(
        "update-the-inner-state",
        _skip_update,
        (),
        {"state_of": lambda inner: inner.init(PARAMS)},
        TypeError,
        rf"{_SKIP}: `update` needs the state that this transform's `init` returned"
        r" \(a `samx\.SkipNonfiniteState`\), got SAMState",
    ),
    _case(
        "update-state-of-another-transform",
        _skip_update,
        (optax.sgd(0.1),),
        {"state_of": lambda inner: optax.adam(0.1).init(PARAMS)},
        TypeError,
        rf"{_SKIP}: `update` needs the state .*got tuple",
    ),
    _case(  # forwarded to the inner transform, which names itself
        "update-grad_fn-missing",
        _skip_update,
        (),
        {"grad_fn": None},
        ValueError,
        r"samx\.sam: `update` needs the keyword argument `grad_fn`",
    ),
    _case(
        "update-updates-wrong-shape",
        _skip_update,
        (),
        {"updates": {"w": jnp.ones(3), "b": jnp.ones(2)}},
        ValueError,
        r"samx\.sam: `updates` leaf \['w'\] has shape \(3,\)",
    ),
]

# -- the diagnostics -------------------------------------------------------------

D = samx.diagnostics
_KEY = jax.random.key(0)
_ALPHAS = jnp.linspace(-1.0, 1.0, 3)
_INT_PARAMS = {"w": jnp.ones((3, 2), jnp.int32), "b": jnp.ones(2, jnp.int32)}
_STR_PARAMS = {"w": "w", "b": "b"}
_WRONG_W = {"w": jnp.ones(3), "b": jnp.ones(2)}


def _closed_loss(params):
    return _loss(params, BATCH)


def _not_a_scalar(params):
    return params["w"]


def _a_pair(params):
    return _closed_loss(params), params


def _int_loss(params):
    return jnp.sum(params["w"]).astype(jnp.int32)


def _diag_name(name, arg):
    return rf"`samx\.diagnostics\.{name}\({arg}=\.\.\.\)`"


def _loss_fn_cases(name, call):
    """The bad losses every diagnostic that takes a ``loss_fn`` rejects."""
    n = lambda arg: _diag_name(name, arg)  # noqa: E731
    return [
        _case("loss_fn-none", call, (None,), {}, TypeError, n("loss_fn") + ".*None"),
        _case("loss_fn-str", call, ("mse",), {}, TypeError, n("loss_fn") + ".*str"),
        _case(  # the Trainer's loss(params, batch): the batch is not closed over
            "loss_fn-takes-a-batch",
            call,
            (_loss,),
            {},
            TypeError,
            n("loss_fn") + r" is called as `loss_fn\(params\)`.*_loss\(params, batch\)",
        ),
        _case(
            "loss-not-a-scalar",
            call,
            (_not_a_scalar,),
            {},
            ValueError,
            n("loss_fn") + r" must return a scalar, got shape \(3, 2\)",
        ),
        _case(
            "loss-a-pair",
            call,
            (_a_pair,),
            {},
            TypeError,
            n("loss_fn") + r" must return a scalar array, got tuple",
        ),
        _case(
            "loss-int",
            call,
            (_int_loss,),
            {},
            TypeError,
            n("loss_fn") + r" must return a floating-point scalar.*int32",
        ),
    ]


def _params_cases(name, call):
    n = _diag_name(name, "params")
    return [
        _case("params-none", call, (None,), {}, ValueError, n + ".* at least one"),
        _case("params-empty", call, ({},), {}, ValueError, n + ".* at least one"),
        _case(
            "params-int",
            call,
            (_INT_PARAMS,),
            {},
            TypeError,
            n + r" must be a tree of floating-point arrays, but leaf \['b'\] is int32",
        ),
        _case(
            "params-str",
            call,
            (_STR_PARAMS,),
            {},
            TypeError,
            n + r".*leaf \['b'\] is str",
        ),
    ]


def _sharpness(loss_fn=_closed_loss, params=PARAMS, rho=0.05, **kwargs):
    return D.sharpness(loss_fn, params, rho, **kwargs)


def _eigen(loss_fn=_closed_loss, params=PARAMS, key=_KEY, **kwargs):
    return D.hessian_top_eigenvalue(loss_fn, params, key, **kwargs)


def _direction(key=_KEY, params=PARAMS, **kwargs):
    return D.filter_normalized_direction(key, params, **kwargs)


def _slice(loss_fn=_closed_loss, params=PARAMS, d=GRADS, alphas=_ALPHAS, **kwargs):
    return D.loss_slice_1d(loss_fn, params, d, alphas, **kwargs)


def _surface(
    loss_fn=_closed_loss, params=PARAMS, d1=GRADS, d2=GRADS, alphas=_ALPHAS, **kw
):
    betas = kw.pop("betas", _ALPHAS)
    return D.loss_surface_2d(loss_fn, params, d1, d2, alphas, betas, **kw)


def _count_cases(name, call, arg, low):
    n = _diag_name(name, arg)
    return [
        _case(
            f"{arg}-{low - 1}",
            call,
            (),
            {arg: low - 1},
            ValueError,
            n + rf" must be >= {low}, got {low - 1}",
        ),
        _case(f"{arg}-bool", call, (), {arg: True}, TypeError, n + ".* got bool"),
        _case(f"{arg}-float", call, (), {arg: 2.0}, TypeError, n + ".* got float"),
    ]


def _with_kw(cases, arg):
    """``cases`` whose single positional argument is passed as ``arg=...``."""
    return [
        dataclasses.replace(c, args=(), kwargs={arg: c.args[0]}) if c.args else c
        for c in cases
    ]


_SH, _EIG, _DIR = "sharpness", "hessian_top_eigenvalue", "filter_normalized_direction"
_SL, _SU = "loss_slice_1d", "loss_surface_2d"
DIAGNOSTICS_MORE_CASES = [
    *_prefixed(
        _SH,
        [
            *_with_kw(_loss_fn_cases(_SH, _sharpness), "loss_fn"),
            *_with_kw(_params_cases(_SH, _sharpness), "params"),
            _case(
                "rho-negative",
                _sharpness,
                (),
                {"rho": -0.1},
                ValueError,
                _diag_name(_SH, "rho") + r" must be finite and in \[0\.0, inf\]",
            ),
            _case(
                "rho-str",
                _sharpness,
                (),
                {"rho": "0.1"},
                TypeError,
                _diag_name(_SH, "rho") + ".*got str",
            ),
            _case(
                "rho-vector",
                _sharpness,
                (),
                {"rho": jnp.ones(2)},
                TypeError,
                _diag_name(_SH, "rho") + r" must be a scalar.*\(2,\)",
            ),
            *_count_cases(_SH, _sharpness, "num_steps", 0),
            _case(
                "step_size-negative",
                _sharpness,
                (),
                {"step_size": -1.0},
                ValueError,
                _diag_name(_SH, "step_size"),
            ),
            _case(
                "eps-negative",
                _sharpness,
                (),
                {"eps": -1.0},
                ValueError,
                _diag_name(_SH, "eps"),
            ),
        ],
    ),
    *_prefixed(
        _EIG,
        [
            *_with_kw(_loss_fn_cases(_EIG, _eigen), "loss_fn"),
            *_with_kw(_params_cases(_EIG, _eigen), "params"),
            *[
                _case(
                    f"key-{what}",
                    _eigen,
                    (),
                    {"key": key},
                    TypeError,
                    _diag_name(_EIG, "key") + rf" must be a single PRNG key.*{got}",
                )
                for what, key, got in [
                    ("none", None, "NoneType"),
                    ("int", 0, "int"),
                    ("float-array", jnp.ones(2), "float32"),
                    ("two-keys", jax.random.split(_KEY), r"key<fry> and shape \(2,\)"),
                ]
            ],
            _case(
                "params-and-key-swapped",
                D.hessian_top_eigenvalue,
                (_closed_loss, _KEY, PARAMS),
                {},
                TypeError,
                _diag_name(_EIG, "params") + r".*but it is key<fry>",
            ),
            *_count_cases(_EIG, _eigen, "num_iters", 1),
        ],
    ),
    *_prefixed(
        _DIR,
        [
            *_with_kw(_params_cases(_DIR, _direction), "params"),
            _case(
                "key-none",
                _direction,
                (),
                {"key": None},
                TypeError,
                _diag_name(_DIR, "key") + ".*got NoneType",
            ),
            _case(
                "key-and-params-swapped",
                D.filter_normalized_direction,
                (PARAMS, _KEY),
                {},
                TypeError,
                _diag_name(_DIR, "key") + ".*got dict",
            ),
            *[
                _case(
                    f"ignore_1d-{type(v).__name__}",
                    _direction,
                    (),
                    {"ignore_1d": v},
                    TypeError,
                    _diag_name(_DIR, "ignore_1d") + rf" must be a bool, got {got}",
                )
                for v, got in [("yes", "str"), (1, "int"), (None, "NoneType")]
            ],
        ],
    ),
    *_prefixed(
        _SL,
        [
            *_with_kw(_loss_fn_cases(_SL, _slice), "loss_fn"),
            *_with_kw(_params_cases(_SL, _slice), "params"),
            _case(
                "direction-wrong-tree",
                _slice,
                (),
                {"d": {"w": GRADS["w"]}},
                ValueError,
                r"samx\.diagnostics\.loss_slice_1d: `direction` does not have the"
                r" tree structure of `params`",
            ),
            _case(
                "direction-none",
                _slice,
                (),
                {"d": None},
                ValueError,
                r"`direction` does not have the tree structure of `params`",
            ),
            _case(
                "direction-wrong-shape",
                _slice,
                (),
                {"d": _WRONG_W},
                ValueError,
                r"`direction` leaf \['w'\] has shape \(3,\), but `params` has shape"
                r" \(3, 2\)",
            ),
            _case(
                "direction-int",
                _slice,
                (),
                {"d": _INT_PARAMS},
                TypeError,
                r"`direction` leaf \['b'\] has dtype int32",
            ),
            _case(
                "direction-str",
                _slice,
                (),
                {"d": _STR_PARAMS},
                TypeError,
                r"`direction` leaf \['b'\] must be an array",
            ),
            *[
                _case(
                    f"alphas-{what}",
                    _slice,
                    (),
                    {"alphas": alphas},
                    error,
                    _diag_name(_SL, "alphas") + " must be a 1-D array of step sizes"
                    f".*{got}",
                )
                for what, alphas, error, got in [
                    ("2d", jnp.ones((2, 2)), ValueError, r"shape \(2, 2\)"),
                    ("scalar", 0.5, ValueError, r"shape \(\)"),
                    ("str", "abc", TypeError, "got str"),
                    ("none", None, TypeError, "got NoneType"),
                    ("list-of-str", ["a", "b"], TypeError, "got list of non-numbers"),
                    ("bool", jnp.array([True, False]), TypeError, "dtype bool"),
                ]
            ],
            *_count_cases(_SL, _slice, "batch_size", 1),
        ],
    ),
    *_prefixed(
        _SU,
        [
            *_with_kw(_loss_fn_cases(_SU, _surface), "loss_fn"),
            *_with_kw(_params_cases(_SU, _surface), "params"),
            _case(
                "d1-wrong-tree",
                _surface,
                (),
                {"d1": {"w": GRADS["w"]}},
                ValueError,
                r"samx\.diagnostics\.loss_surface_2d: `d1` does not have the tree"
                r" structure of `params`",
            ),
            _case(
                "d2-wrong-shape",
                _surface,
                (),
                {"d2": _WRONG_W},
                ValueError,
                r"`d2` leaf \['w'\] has shape \(3,\)",
            ),
            _case(
                "d1-int",
                _surface,
                (),
                {"d1": _INT_PARAMS},
                TypeError,
                r"`d1` leaf \['b'\] has dtype int32",
            ),
            _case(
                "alphas-scalar",
                _surface,
                (),
                {"alphas": 1.0},
                ValueError,
                _diag_name(_SU, "alphas") + r".*shape \(\)",
            ),
            _case(
                "betas-2d",
                _surface,
                (),
                {"betas": _ALPHAS[None]},
                ValueError,
                _diag_name(_SU, "betas") + r".*shape \(1, 3\)",
            ),
            _case(
                "betas-str",
                _surface,
                (),
                {"betas": "ab"},
                TypeError,
                _diag_name(_SU, "betas") + ".*got str",
            ),
            *_count_cases(_SU, _surface, "batch_size", 1),
        ],
    ),
]

# -- the runtime: checkpoints, meshes, data parallel ----------------------------

_MESH = Mesh(np.array(jax.devices()), ("data",))
_MESH_2D = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
_BATCH_6 = {"x": BATCH["x"][:6], "y": BATCH["y"][:6]}
_BATCH_7 = {"x": BATCH["x"][:7], "y": BATCH["y"][:7]}
_STR_BATCH = {"x": "abc", "y": BATCH["y"]}


def _abstract(name="sampa", params=PARAMS, model_state=None, **kwargs):
    trainer_kwargs = kwargs.pop("trainer_kwargs", {})
    trainer = runtime.Trainer(FACTORIES[name](optax.sgd(0.1)), _loss, **trainer_kwargs)
    return runtime.abstract_state(trainer, params, model_state, **kwargs)


ABSTRACT_STATE_CASES = [
    _case(
        "trainer-none",
        runtime.abstract_state,
        (None, PARAMS),
        {},
        TypeError,
        r"`abstract_state\(trainer=\.\.\.\)` must be a `samx\.runtime\.Trainer`,"
        r" got NoneType",
    ),
    _case(
        "trainer-a-transform",
        runtime.abstract_state,
        (_SAMPA, PARAMS),
        {},
        TypeError,
        r"`abstract_state\(trainer=\.\.\.\)`.*got GradientTransformationExtraArgs",
    ),
    _case(
        "sampa-without-batch",
        _abstract,
        (),
        {},
        ValueError,
        r"`abstract_state\(batch=\.\.\.\)` is required for sampa",
    ),
    _case(
        "params-none",
        _abstract,
        (),
        {"params": None},
        ValueError,
        r"samx\.sampa: `init` needs the current `params`",
    ),
    _case(
        "params-str-leaf",
        _abstract,
        ("sam",),
        {"params": {"w": "w"}},
        TypeError,
        r"samx\.runtime\.Trainer: `params` leaf \['w'\] must be an array.*got str",
    ),
    _case(
        "has_state-without-model_state",
        _abstract,
        ("sam",),
        {"trainer_kwargs": {"has_state": True}},
        ValueError,
        r"`Trainer\(has_state=True\)` needs `init\(params, model_state\)`",
    ),
    _case(
        "batch-scalar-leaf",
        _abstract,
        (),
        {"batch": _SCALAR_LEAF},
        ValueError,
        r"must have a leading batch axis on every leaf; \['x'\] is a scalar",
    ),
    _case(
        "batch-str-leaf",
        _abstract,
        (),
        {"batch": _STR_BATCH},
        TypeError,
        r"must be a pytree of arrays; \['x'\] is a str",
    ),
    _case(
        "batch-leaves-of-different-sizes",
        _abstract,
        (),
        {"batch": _RAGGED},
        ValueError,
        r"every leaf must have the same leading batch size; \['x'\] has 8",
    ),
    _case(
        "mesh-batch-not-divisible",
        _abstract,
        (),
        {"batch": _BATCH_6, "trainer_kwargs": {"descent_device": _MESH}},
        ValueError,
        r"`samx\.runtime\.abstract_state\(batch=\.\.\.\)`: the batch size 6 is not"
        r" divisible by"
        r" the 8 devices of the mesh axis 'data'",
    ),
]


def _mesh_cases(name, fn):
    return [
        _case(
            f"mesh-{what}",
            fn,
            (mesh,),
            {},
            TypeError,
            rf"`samx\.runtime\.{name}\(mesh=\.\.\.\)` must be a `jax\.sharding\.Mesh`"
            rf".*got {got}",
        )
        for what, mesh, got in [
            ("none", None, "NoneType"),
            ("a-device-list", jax.devices(), "list"),
            ("a-device", jax.devices()[0], type(jax.devices()[0]).__name__),
        ]
    ]


REPLICATED_CASES = _mesh_cases("replicated", runtime.replicated)
BATCH_SHARDING_CASES = [
    *_mesh_cases("batch_sharding", runtime.batch_sharding),
    *[
        _case(
            f"axis-{what}",
            runtime.batch_sharding,
            (_MESH, axis),
            {},
            ValueError,
            r"`samx\.runtime\.batch_sharding\(axis=\.\.\.\)` must name an axis of the"
            r" mesh.*\('data',\), got " + _lit(repr(axis)),
        )
        for what, axis in [
            ("not-in-the-mesh", "batch"),
            ("int", 0),
            ("none", None),
            ("tuple-with-a-missing-axis", ("data", "model")),
        ]
    ],
]

_DP = r"samx\.runtime\.make_data_parallel_step"
_SAM = samx.sam(optax.sgd(0.1))


def _dp_step(
    tx=_SAM,
    batch=BATCH,
    *,
    loss_fn=_loss,
    mesh=_MESH,
    params=PARAMS,
    opt_state=None,
    **kwargs,
):
    step = runtime.make_data_parallel_step(tx, loss_fn, mesh, **kwargs)
    return step(params, tx.init(PARAMS) if opt_state is None else opt_state, batch)


DATA_PARALLEL_CASES = [
    *[
        _case(
            f"tx-{what}",
            runtime.make_data_parallel_step,
            (tx, _loss, _MESH),
            {},
            TypeError,
            rf"`{_DP}\(tx=\.\.\.\)` must be an optax transform.*got {got}",
        )
        for what, tx, got in [
            ("none", None, "NoneType"),
            ("factory", optax.sgd, "function"),
            ("a-state", _SAM.init(PARAMS), "SAMState"),
        ]
    ],
    _case(
        "loss_fn-not-callable",
        runtime.make_data_parallel_step,
        (_SAM, "mse", _MESH),
        {},
        TypeError,
        rf"`{_DP}\(loss_fn=\.\.\.\)` must be callable.*got str",
    ),
    *[
        _case(
            f"mesh-{what}",
            runtime.make_data_parallel_step,
            (_SAM, _loss, mesh),
            {},
            TypeError,
            rf"`{_DP}\(mesh=\.\.\.\)` must be a `jax\.sharding\.Mesh`, got {got}",
        )
        for what, mesh, got in [("none", None, "NoneType"), ("list", [0], "list")]
    ],
    *[
        _case(
            f"axis-{what}",
            runtime.make_data_parallel_step,
            (_SAM, _loss, _MESH),
            {"axis": axis},
            ValueError,
            rf"`{_DP}`: the batch axis {_lit(repr(axis))} is not an axis of the mesh,"
            r" whose axes are \('data',\)",
        )
        for what, axis in [("not-in-the-mesh", "batch"), ("int", 0)]
    ],
    *[
        _case(
            f"m_sharpness-{what}",
            runtime.make_data_parallel_step,
            (_SAM, _loss, _MESH),
            {"m_sharpness": value},
            TypeError,
            rf"`{_DP}\(m_sharpness=\.\.\.\)` must be a bool, got {_lit(repr(value))}",
        )
        for what, value in [("str", "yes"), ("int", 1)]
    ],
    *[
        _case(
            f"step-batch-not-divisible-{where}",
            _dp_step,
            (),
            {"batch": _BATCH_6, "mesh": mesh},
            ValueError,
            r"`make_data_parallel_step\(\.\.\.\)\(batch=\.\.\.\)`: the batch size 6 is"
            rf" not divisible by the {n} devices"
            r" of the mesh axis 'data'",
        )
        for where, mesh, n in [("1d-mesh", _MESH, 8), ("2d-mesh", _MESH_2D, 4)]
    ],
    _case(
        "step-batch-none",
        _dp_step,
        (),
        {"batch": None},
        ValueError,
        r"must be a pytree of arrays with a leading batch axis, got a tree with no"
        r" leaves",
    ),
    _case(
        "step-batch-scalar-leaf",
        _dp_step,
        (),
        {"batch": _SCALAR_LEAF},
        ValueError,
        r"must have a leading batch axis on every leaf; \['x'\] is a scalar",
    ),
    _case(
        "step-batch-str-leaf",
        _dp_step,
        (),
        {"batch": _STR_BATCH},
        TypeError,
        r"must be a pytree of arrays; \['x'\] is a str",
    ),
    _case(
        "step-batch-leaves-of-different-sizes",
        _dp_step,
        (),
        {"batch": _RAGGED},
        ValueError,
        r"every leaf must have the same leading batch size; \['x'\] has 8",
    ),
    *[
        _case(
            f"step-{name}",
            _dp_step,
            (FACTORIES[name](optax.sgd(0.1)),),
            {},
            ValueError,
            rf"`{_DP}` runs samx\.sam and plain optax transforms, got '{name}'",
        )
        for name in ("async_sam", "sampa")
    ],
    *[
        _case(
            f"step-m_sharpness-{name}",
            _dp_step,
            (tx,),
            {"m_sharpness": True},
            ValueError,
            rf"`{_DP}\(m_sharpness=True\)` is defined for samx\.sam.*got a '{name}'",
        )
        for name, tx in [("async_sam", _ASYNC), ("plain", optax.sgd(0.1))]
    ],
    _case(
        "step-loss-not-a-scalar",
        _dp_step,
        (),
        {"loss_fn": _NOT_A_SCALAR},
        ValueError,
        r"`loss_fn` must return a scalar loss.*shape \(8, 2\)",
    ),
    _case(
        "step-opt_state-is-the-transform",
        _dp_step,
        (),
        {"opt_state": _SAM},
        TypeError,
        r"`method_of\(opt_state=\.\.\.\)` takes the optimizer state",
    ),
    _case(
        "step-opt_state-of-another-transform",
        _dp_step,
        (),
        {"opt_state": optax.sgd(0.1).init(PARAMS)},
        TypeError,
        r"samx\.sam: `update` needs the state that this transform's `init`",
    ),
    *[
        _case(
            f"step-params-none{'-m_sharpness' if m else ''}",
            _dp_step,
            (),
            {"params": None, "m_sharpness": m},
            ValueError,
            rf"{_DP}: `step` needs the current `params`, a tree of arrays, got None",
        )
        for m in (False, True)
    ],
    _case(
        "step-params-str-leaf",
        _dp_step,
        (),
        {"params": {"w": "w", "b": "b"}},
        TypeError,
        rf"{_DP}: `params` leaf \['b'\] must be an array",
    ),
]

TRAINER_MESH_CASES = [
    *[
        _case(
            f"batch_axis-{what}",
            _T,
            (_SAM, _loss),
            {"descent_device": _MESH, "batch_axis": axis},
            ValueError,
            rf"`Trainer`: the batch axis {_lit(repr(axis))} is not an axis of the"
            r" mesh, whose axes are \('data',\)",
        )
        for what, axis in [("not-in-the-mesh", "batch"), ("int", 0)]
    ],
    _case(
        "batch_axis-without-a-mesh",
        _T,
        (_SAM, _loss),
        {"batch_axis": "data"},
        ValueError,
        r"`Trainer\(batch_axis=\.\.\.\)` needs `descent_device` to be a"
        r" `jax\.sharding\.Mesh`, got None",
    ),
    _case(
        "descent_device-a-device-list",
        _T,
        (_SAM, _loss),
        {"descent_device": jax.devices()[:2]},
        ValueError,
        r"`descent_device=\[.*\]` is not a device here",
    ),
    _case(
        "ascent_device-a-mesh",
        _T,
        (_ASYNC, _loss),
        {"ascent_device": _MESH},
        ValueError,
        r"`ascent_device=Mesh\(.*\)` is not a device here",
    ),
    _case(
        "has_state-str",
        _T,
        (_SAM, _loss),
        {"has_state": "yes"},
        TypeError,
        r"`Trainer\(has_state=\.\.\.\)` must be True or False, got str 'yes'",
    ),
    _case(
        "sampa_vmap-int",
        _T,
        (_SAMPA, _loss),
        {"sampa_vmap": 1},
        TypeError,
        r"`Trainer\(sampa_vmap=\.\.\.\)` must be True, False or None, got int 1",
    ),
    _case(
        "init-params-str-leaf",
        _trainer_init,
        ("sam", {"w": "w"}),
        {},
        TypeError,
        r"samx\.runtime\.Trainer: `params` leaf \['w'\] must be an array",
    ),
    _case(
        "step-batch-str-leaf",
        _trainer_step,
        ("sam", _STR_BATCH),
        {},
        TypeError,
        r"must be a pytree of arrays; \['x'\] is a str",
    ),
    *[
        _case(
            f"step-{name}-mesh-batch-not-divisible",
            _trainer_step,
            (name, _BATCH_6),
            {"descent_device": _MESH},
            ValueError,
            r"`samx\.runtime\.Trainer\.step\(batch=\.\.\.\)`: the batch size 6 is not"
            r" divisible by"
            r" the 8 devices of the mesh axis 'data'",
        )
        for name in FACTORIES
    ],
    _case(
        "step-2d-mesh-batch-not-divisible-along-model",
        _trainer_step,
        ("sam", _BATCH_7),
        {"descent_device": _MESH_2D, "batch_axis": "model"},
        ValueError,
        r"the batch size 7 is not divisible by the 2 devices of the mesh axis"
        r" 'model'",
    ),
]

# -- samx.flax: NNX ----------------------------------------------------------------

_FB = {"x": np.ones((4, 3), np.float32), "y": np.ones((4, 2), np.float32)}
_FB_SCALAR = {"x": np.float32(1.0), "y": _FB["y"]}
_FB_STR = {"x": "abc", "y": _FB["y"]}
_FB_RAGGED = {"x": _FB["x"], "y": _FB["y"][:3]}


def _nnx_loss(model, batch):
    return jnp.mean(jnp.square(model(batch["x"]) - batch["y"]))


def _nnx_pair(model, batch):
    return _nnx_loss(model, batch), model(batch["x"])


def _nnx_not_a_scalar(model, batch):
    return model(batch["x"])


def _nnx_int_loss(model, batch):
    return jnp.sum(model(batch["x"])).astype(jnp.int32)


def _nnx_model_and_optimizer(name="sam"):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = FACTORIES[name](optax.sgd(0.1)) if name in FACTORIES else optax.sgd(0.1)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _nnx_call(fn_name, method="sam", batch=_FB, loss_fn=_nnx_loss, swap=None, **kw):
    """Calls ``samx.flax.<fn_name>`` on a fresh model; ``swap`` edits the args."""
    model, optimizer = _nnx_model_and_optimizer(method)
    if swap is not None:
        model, optimizer = swap(model, optimizer)
    if fn_name == "nnx_grads":
        return samx.flax.nnx_grads(loss_fn, model, optimizer, batch, **kw)
    return samx.flax.nnx_train_step(model, optimizer, batch, loss_fn, **kw)


def _common_flax_cases(name, call, state_arg):
    """The cases NNX and linen share; ``call(method, **kw)`` runs ``name``."""
    fn = rf"samx\.flax\.{name}"
    return [
        _case(
            "loss_fn-not-callable",
            call,
            (),
            {"loss_fn": "mse"},
            TypeError,
            rf"`{fn}\(loss_fn=\.\.\.\)` must be callable, got str",
        ),
        _case(
            "has_aux-str",
            call,
            (),
            {"has_aux": "yes"},
            TypeError,
            rf"`{fn}\(has_aux=\.\.\.\)` must be True or False, got str 'yes'",
        ),
        _case(
            "batch-none",
            call,
            (),
            {"batch": None},
            ValueError,
            rf"`{fn}\(batch=\.\.\.\)` must be a pytree of arrays with a leading batch"
            " axis, got a tree with no leaves",
        ),
        _case(
            "batch-scalar-leaf",
            call,
            (),
            {"batch": _FB_SCALAR},
            ValueError,
            rf"`{fn}\(batch=\.\.\.\)` must have a leading batch axis on every leaf;"
            r" \['x'\] is a scalar",
        ),
        _case(
            "batch-str-leaf",
            call,
            (),
            {"batch": _FB_STR},
            TypeError,
            rf"`{fn}\(batch=\.\.\.\)` must be a pytree of arrays; \['x'\] is a str",
        ),
        _case(
            "batch-leaves-of-different-sizes",
            call,
            (),
            {"batch": _FB_RAGGED},
            ValueError,
            rf"`{fn}\(batch=\.\.\.\)`: every leaf must have the same leading batch"
            r" size; \['x'\] has 4, \['y'\] has 3",
        ),
        *[
            _case(
                f"prev_batch-missing-{method}",
                call,
                (method,),
                {},
                ValueError,
                rf"`{fn}\(prev_batch=\.\.\.\)` is required: samx\.{method}"
                r" \(pairing='paired'\).*or pairing='unpaired'",
            )
            for method in ("async_sam", "sampa")
            if name.endswith("_grads")  # the train steps keep the previous batch
        ],
        _case(
            "pairing-unknown",
            call,
            ("async_sam",),
            {"pairing": "lagged"},
            ValueError,
            rf"`{fn}\(pairing=\.\.\.\)` must be 'paired'.*got 'lagged'",
        ),
        *[
            _case(
                f"{arg}-with-{method}",
                call,
                (method,),
                {arg: value},
                ValueError,
                rf"`{fn}\({arg}=\.\.\.\)` .*the optimizer's transform {want}",
            )
            for arg, value, method, want in [
                ("prev_batch", _FB, "sam", r"\('sam', pairing='paired'\) evaluates no"),
                (
                    "prev_batch",
                    _FB,
                    "plain",
                    r"\('plain', pairing='paired'\) evaluates",
                ),
                ("ascent_batch_size", 2, "sam", r"is 'sam', not samx\.async_sam"),
                ("ascent_batch", _FB, "sampa", r"is 'sampa', not samx\.async_sam"),
            ]
        ],
        *[
            _case(
                f"ascent_batch_size-{size!r}",
                call,
                ("async_sam",),
                {"ascent_batch_size": size},
                ValueError,
                rf"`{fn}\(ascent_batch_size=\.\.\.\)` must be an int in \[1, 4\] \(the"
                rf" batch size\), got {_lit(repr(size))}",
            )
            for size in (0, 5, -1, True, 2.0)
        ],
        _case(
            "ascent_batch-and-ascent_batch_size",
            call,
            ("async_sam",),
            {"ascent_batch": _FB, "ascent_batch_size": 2},
            ValueError,
            rf"`{fn}`: pass `ascent_batch` or `ascent_batch_size`, not both",
        ),
        _case(
            "ascent_batch-scalar-leaf",
            call,
            ("async_sam",),
            {"ascent_batch": _FB_SCALAR},
            ValueError,
            rf"`{fn}\(ascent_batch=\.\.\.\)` must have a leading batch axis",
        ),
        _case(
            "prev_batch-leaves-of-different-sizes",
            call,
            ("sampa",),
            {"prev_batch": _FB_RAGGED},
            ValueError,
            rf"`{fn}\(prev_batch=\.\.\.\)`: every leaf must have the same leading",
        ),
        *[
            _case(
                f"{state_arg}-{what}",
                call,
                (),
                {"swap": swap},
                TypeError,
                rf"`{fn}\({state_arg}=\.\.\.\)` must be .*got {got}",
            )
            for what, swap, got in _STATE_SWAPS[state_arg](name)
        ],
    ]


def _optimizer_swaps(name):
    swaps = [
        (
            "the-transform",
            lambda m, o: (m, o.tx),
            "(the transform )?GradientTransformationExtraArgs",
        ),
        ("none", lambda m, o: (m, None), "None"),
        ("the-model", lambda m, o: (m, m), "Linear"),
    ]
    if name == "nnx_train_step":  # it needs the nnx.Optimizer itself
        swaps.append(("its-state", lambda m, o: (m, o.opt_state), "SAMState"))
    return swaps


def _train_state_swaps(name):
    return [
        ("none", lambda s: None, "NoneType"),
        ("the-params", lambda s: s.params, "dict"),
        ("the-transform", lambda s: s.tx, "GradientTransformationExtraArgs"),
    ]


_STATE_SWAPS = {"optimizer": _optimizer_swaps, "state": _train_state_swaps}


def _nnx_cases(name):
    fn = rf"samx\.flax\.{name}"
    call = lambda method="sam", **kw: _nnx_call(name, method, **kw)  # noqa: E731
    cases = [
        *_common_flax_cases(name, call, "optimizer"),
        *[
            _case(
                f"model-{what}",
                call,
                (),
                {"swap": lambda m, o, model=model: (model, o)},
                TypeError,
                rf"`{fn}\(model=\.\.\.\)` must be an `nnx\.Module`, got {got}",
            )
            for what, model, got in [
                ("a-dict", {"w": jnp.ones(2)}, "dict"),
                ("a-linen-module", nn.Dense(2), "Dense"),
            ]
        ],
        _case(
            "loss-not-a-scalar",
            call,
            (),
            {"loss_fn": _nnx_not_a_scalar},
            ValueError,
            rf"{fn}: `loss_fn` must return a scalar loss, got an array of shape"
            r" \(4, 2\)",
        ),
        _case(
            "loss-int",
            call,
            (),
            {"loss_fn": _nnx_int_loss},
            TypeError,
            rf"{fn}: `loss_fn` must return a floating-point loss, got dtype int32",
        ),
        _case(
            "loss-a-pair-without-has_aux",
            call,
            (),
            {"loss_fn": _nnx_pair},
            ValueError,
            rf"{fn}: `loss_fn` must return a scalar loss, got a tuple \(did you mean"
            r" `has_aux=True`\?\)",
        ),
        _case(
            "has_aux-without-a-pair",
            call,
            (),
            {"has_aux": True},
            ValueError,
            rf"{fn}: with `has_aux=True`, `loss_fn` must return a pair `\(loss, aux\)`,"
            r" got an array of shape \(\)",
        ),
    ]
    return [dataclasses.replace(c, id=f"{name}-{c.id}") for c in cases]


# the swaps for the NNX optimizer take (model, optimizer); linen's take the state
def _make_nnx_step(method="sam", batch=_FB, swap=None, make_kw=None, **kw):
    model, optimizer = _nnx_model_and_optimizer(method)
    if swap is not None:
        model, optimizer = swap(model, optimizer)
    kw.setdefault("prev_batch", None)
    step = samx.flax.make_nnx_train_step(
        kw.pop("loss_fn", _nnx_loss), **(make_kw or {})
    )
    return step(model, optimizer, batch, **kw)


_MK_NNX = r"samx\.flax\.make_nnx_train_step"
_STEP_NNX = r"samx\.flax\.nnx_train_step"
MAKE_NNX_CASES = [
    _case(
        "loss_fn-none",
        samx.flax.make_nnx_train_step,
        (None,),
        {},
        TypeError,
        rf"`{_MK_NNX}\(loss_fn=\.\.\.\)` must be callable, got NoneType",
    ),
    _case(
        "has_aux-str",
        samx.flax.make_nnx_train_step,
        (_nnx_loss,),
        {"has_aux": "y"},
        TypeError,
        rf"`{_MK_NNX}\(has_aux=\.\.\.\)` must be True or False",
    ),
    *[
        _case(
            f"ascent_batch_size-{size!r}",
            samx.flax.make_nnx_train_step,
            (_nnx_loss,),
            {"ascent_batch_size": size},
            ValueError,
            rf"`{_MK_NNX}\(ascent_batch_size=\.\.\.\)` must be an int >= 1 or None,"
            rf" got {_lit(repr(size))}",
        )
        for size in (0, -2, True, 2.5)
    ],
    _case(
        "step-ascent_batch_size-larger-than-the-batch",
        _make_nnx_step,
        ("async_sam",),
        {"make_kw": {"ascent_batch_size": 8}},
        ValueError,
        rf"`{_STEP_NNX}\(ascent_batch_size=\.\.\.\)` must be an int in \[1, 4\]",
    ),
    _case(
        "step-prev_batch-with-sam",
        _make_nnx_step,
        (),
        {"prev_batch": _FB},
        ValueError,
        rf"`{_STEP_NNX}\(prev_batch=\.\.\.\)` is the previous step's batch",
    ),
    _case(
        "step-batch-scalar-leaf",
        _make_nnx_step,
        (),
        {"batch": _FB_SCALAR},
        ValueError,
        rf"`{_STEP_NNX}\(batch=\.\.\.\)` must have a leading batch axis",
    ),
    _case(
        "step-model-a-dict",
        _make_nnx_step,
        (),
        {"swap": lambda m, o: ({"w": jnp.ones(2)}, o)},
        TypeError,
        rf"`{_STEP_NNX}\(model=\.\.\.\)` must be an `nnx\.Module`",
    ),
    _case(
        "step-optimizer-its-state",
        _make_nnx_step,
        (),
        {"swap": lambda m, o: (m, o.opt_state)},
        TypeError,
        rf"`{_STEP_NNX}\(optimizer=\.\.\.\)` must be an `nnx\.Optimizer`, got"
        " SAMState",
    ),
    _case(
        "step-loss-not-a-scalar",
        _make_nnx_step,
        (),
        {"loss_fn": _nnx_not_a_scalar},
        ValueError,
        rf"{_STEP_NNX}: `loss_fn` must return a scalar loss",
    ),
]

# -- samx.flax: linen ------------------------------------------------------------

_DENSE = nn.Dense(2)
_LINEN_PARAMS = {
    "kernel": jnp.zeros((3, 2), jnp.float32),
    "bias": jnp.zeros(2, jnp.float32),
}


def _linen_loss(params, batch_stats, batch):
    out = _DENSE.apply({"params": params}, batch["x"])
    return jnp.mean(jnp.square(out - batch["y"])), batch_stats


def _train_state(method="sam", **kwargs):
    tx = FACTORIES[method](optax.sgd(0.1)) if method in FACTORIES else optax.sgd(0.1)
    return samx.flax.TrainState.create(
        apply_fn=_DENSE.apply, params=_LINEN_PARAMS, tx=tx, **kwargs
    )


def _linen_call(fn_name, method="sam", batch=_FB, loss_fn=_linen_loss, swap=None, **kw):
    state = _train_state(method)
    if swap is not None:
        state = swap(state)
    if fn_name == "linen_grads":
        return samx.flax.linen_grads(loss_fn, state, batch, **kw)
    return samx.flax.linen_train_step(state, batch, loss_fn, **kw)


def _linen_cases(name):
    fn = rf"samx\.flax\.{name}"
    call = lambda method="sam", **kw: _linen_call(name, method, **kw)  # noqa: E731
    cases = [
        *_common_flax_cases(name, call, "state"),
        _case(
            "state-flax-TrainState-without-batch_stats",
            call,
            (),
            {
                "swap": lambda s: flax_train_state.TrainState.create(
                    apply_fn=s.apply_fn, params=s.params, tx=s.tx
                )
            },
            TypeError,
            rf"`{fn}\(state=\.\.\.\)` needs a `batch_stats` field",
        ),
        _case(
            "loss-without-batch_stats",
            call,
            (),
            {"loss_fn": lambda p, s, b: _linen_loss(p, s, b)[0]},
            ValueError,
            rf"{fn}: `loss_fn` must return `\(loss, new_batch_stats\)`, got an array"
            r" of shape \(\)",
        ),
        _case(
            "loss-not-a-scalar",
            call,
            (),
            {"loss_fn": lambda p, s, b: (_DENSE.apply({"params": p}, b["x"]), s)},
            ValueError,
            rf"{fn}: `loss_fn` must return a scalar loss, got an array of shape"
            r" \(4, 2\)",
        ),
        _case(
            "loss-returns-the-mutable-collections",
            call,
            (),
            {"loss_fn": lambda p, s, b: (_linen_loss(p, s, b)[0], {"batch_stats": s})},
            ValueError,
            rf"{fn}: `loss_fn` returned the whole mutable-collections dict",
        ),
        _case(
            "new_batch_stats-wrong-tree",
            call,
            (),
            {"loss_fn": lambda p, s, b: (_linen_loss(p, s, b)[0], {"m": jnp.ones(2)})},
            ValueError,
            rf"{fn}: the `new_batch_stats` returned by `loss_fn` does not have the"
            r" tree structure of `state\.batch_stats`",
        ),
        _case(
            "has_aux-without-aux",
            call,
            (),
            {"has_aux": True},
            ValueError,
            rf"{fn}: with `has_aux=True`, `loss_fn` must return"
            r" `\(loss, \(new_batch_stats, aux\)\)`",
        ),
        _case(  # a state with no `prev_batch` field cannot keep it
            "prev_batch-missing-without-a-prev_batch-field",
            call,
            ("sampa",),
            {
                "swap": lambda s: _StatsOnlyState.create(
                    apply_fn=s.apply_fn, params=s.params, tx=s.tx
                )
            },
            ValueError,
            rf"`{fn}\(prev_batch=\.\.\.\)` is required: samx\.sampa",
        ),
    ]
    return [dataclasses.replace(c, id=f"{name}-{c.id}") for c in cases]


class _StatsOnlyState(flax_train_state.TrainState):
    batch_stats: Any = None


def _make_linen_step(method="sam", batch=_FB, swap=None, make_kw=None, **kw):
    state = _train_state(method)
    if swap is not None:
        state = swap(state)
    step = samx.flax.make_linen_train_step(_linen_loss, **(make_kw or {}))
    return step(state, batch, **kw)


_MK_LINEN = r"samx\.flax\.make_linen_train_step"
_STEP_LINEN = r"samx\.flax\.linen_train_step"
MAKE_LINEN_CASES = [
    _case(
        "loss_fn-str",
        samx.flax.make_linen_train_step,
        ("mse",),
        {},
        TypeError,
        rf"`{_MK_LINEN}\(loss_fn=\.\.\.\)` must be callable, got str",
    ),
    _case(
        "has_aux-int",
        samx.flax.make_linen_train_step,
        (_linen_loss,),
        {"has_aux": 1},
        TypeError,
        rf"`{_MK_LINEN}\(has_aux=\.\.\.\)` must be True or False, got int 1",
    ),
    _case(
        "ascent_batch_size-0",
        samx.flax.make_linen_train_step,
        (_linen_loss,),
        {"ascent_batch_size": 0},
        ValueError,
        rf"`{_MK_LINEN}\(ascent_batch_size=\.\.\.\)` must be an int >= 1 or None",
    ),
    _case(
        "step-state-the-params",
        _make_linen_step,
        (),
        {"swap": lambda s: s.params},
        TypeError,
        rf"`{_STEP_LINEN}\(state=\.\.\.\)` must be a flax `TrainState`.*got dict",
    ),
    _case(
        "step-prev_batch-with-sam",
        _make_linen_step,
        (),
        {"prev_batch": _FB},
        ValueError,
        rf"`{_STEP_LINEN}\(prev_batch=\.\.\.\)` is the previous step's batch",
    ),
    _case(
        "step-batch-scalar-leaf",
        _make_linen_step,
        (),
        {"batch": _FB_SCALAR},
        ValueError,
        rf"`{_STEP_LINEN}\(batch=\.\.\.\)` must have a leading batch axis",
    ),
]

_LINEN_GRADS = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}
_AG = r"samx\.flax\.apply_gradients"


def _apply(grads=_LINEN_GRADS, method="sam", swap=None, **kw):
    state = _train_state(method)
    if swap is not None:
        state = swap(state)
    if method != "plain":
        kw.setdefault("grad_fn", lambda p, i: _LINEN_GRADS)
    return samx.flax.apply_gradients(state, grads, **kw)


APPLY_GRADIENTS_CASES = [
    *[
        _case(
            f"state-{what}",
            _apply,
            (),
            {"swap": swap},
            TypeError,
            rf"`{_AG}\(state=\.\.\.\)` must be a flax `TrainState`.*got {got}",
        )
        for what, swap, got in _train_state_swaps("apply_gradients")
    ],
    _case(
        "grads-wrong-tree",
        _apply,
        ({"kernel": _LINEN_GRADS["kernel"]},),
        {},
        ValueError,
        rf"{_AG}: `grads` does not have the tree structure of `state\.params`",
    ),
    _case(
        "grads-none",
        _apply,
        (None,),
        {},
        ValueError,
        rf"{_AG}: `grads` does not have the tree structure of `state\.params`",
    ),
    _case(
        "grads-a-loss-and-grads-pair",
        _apply,
        ((jnp.zeros(()), _LINEN_GRADS),),
        {},
        ValueError,
        r"It looks like a `\(loss, grads\)` pair",
    ),
    *[
        _case(
            f"grads-wrong-shape-{method}",
            _apply,
            ({"kernel": jnp.ones(3), "bias": jnp.ones(2)},),
            {"method": method},
            ValueError,
            rf"{_AG}: `grads` leaf \['kernel'\] has shape \(3,\), but `state\.params`"
            r" has shape \(3, 2\)",
        )
        for method in ("sam", "plain")
    ],
    _case(
        "grads-int",
        _apply,
        ({"kernel": jnp.ones((3, 2), jnp.int32), "bias": jnp.ones(2, jnp.int32)},),
        {},
        TypeError,
        rf"{_AG}: `grads` leaf \['bias'\] has dtype int32",
    ),
    _case(
        "grads-str",
        _apply,
        ({"kernel": "k", "bias": "b"},),
        {},
        TypeError,
        rf"{_AG}: `grads` leaf \['bias'\] must be an array",
    ),
    _case(
        "grads-overwrite_with_gradient",
        _apply,
        ({"_overwrite_with_gradient": {}, **_LINEN_GRADS},),
        {},
        NotImplementedError,
        rf"{_AG}: Flax's `_overwrite_with_gradient` parameters are not supported",
    ),
    _case(
        "grad_fn-missing",
        _apply,
        (),
        {"grad_fn": None},
        ValueError,
        r"samx\.sam: `update` needs the keyword argument `grad_fn`",
    ),
    _case(
        "grad_fn-not-callable",
        _apply,
        (),
        {"grad_fn": _LINEN_GRADS},
        TypeError,
        r"samx\.sam: `grad_fn` must be callable",
    ),
]

_TS = r"samx\.flax\.TrainState\.create"
TRAIN_STATE_CASES = [
    *[
        _case(
            f"create-tx-{what}",
            samx.flax.TrainState.create,
            (),
            {"apply_fn": _DENSE.apply, "params": _LINEN_PARAMS, "tx": tx},
            TypeError,
            rf"`{_TS}\(tx=\.\.\.\)` must be an optax transform.*got {got}",
        )
        for what, tx, got in [
            ("none", None, "NoneType"),
            ("factory", optax.sgd, "function"),
            ("a-state", _SAM.init(PARAMS), "SAMState"),
        ]
    ],
    _case(
        "create-params-none",
        samx.flax.TrainState.create,
        (),
        {"apply_fn": _DENSE.apply, "params": None, "tx": _SAM},
        ValueError,
        rf"`{_TS}\(params=\.\.\.\)` must be the model's parameters.*got None",
    ),
    _case(
        "create-params-str-leaf",
        samx.flax.TrainState.create,
        (),
        {"apply_fn": _DENSE.apply, "params": {"w": "w"}, "tx": optax.sgd(0.1)},
        TypeError,
        rf"{_TS}: `params` leaf \['w'\] must be an array",
    ),
]


def _descent_grad_fn(attribute):
    model, optimizer = _nnx_model_and_optimizer("sam")
    _, grad_fn = samx.flax.nnx_grads(_nnx_loss, model, optimizer, _FB)
    return getattr(grad_fn, attribute)


def _descent_under_cond():
    # A wrapper of one's own that calls tx.update under lax.cond (optax's
    # apply_if_finite and MultiSteps are refused before, by samx itself).
    inner = samx.sam(optax.sgd(0.1))

    def update(updates, state, params=None, **extra_args):
        def run(_):
            return inner.update(updates, state, params, **extra_args)

        return jax.lax.cond(True, run, run, None)

    tx = optax.GradientTransformationExtraArgs(inner.init, update)
    state = samx.flax.TrainState.create(
        apply_fn=_DENSE.apply, params=_LINEN_PARAMS, tx=tx
    )
    grads, grad_fn = samx.flax.linen_grads(_linen_loss, state, _FB)
    return samx.flax.apply_gradients(state, grads, grad_fn=grad_fn)


DESCENT_GRAD_FN_CASES = [
    *[
        _case(
            f"{attribute}-before-the-update",
            _descent_grad_fn,
            (attribute,),
            {},
            RuntimeError,
            rf"samx\.flax\.nnx_grads: `grad_fn\.{attribute}` is the descent pass's"
            r" and is available only after the optimizer has called",
        )
        for attribute in ("loss", "aux", "value", "model_state")
    ],
    _case(
        "descent-pass-under-lax-cond",
        _descent_under_cond,
        (),
        {},
        RuntimeError,
        r"samx\.flax\.linen_grads: the optimizer called `grad_fn\(_, 0\)` \(the"
        r" descent pass\) inside a JAX transform of its own",
    ),
]


_ABB = r"`samx\.all_but_biases\(names=\.\.\.\)` must be a non-empty tuple of strings"
ALL_BUT_BIASES_CASES = [
    _case(
        "names-str", samx.all_but_biases, (PARAMS,), {"names": "bias"}, TypeError, _ABB
    ),
    _case(
        "names-empty", samx.all_but_biases, (PARAMS,), {"names": ()}, TypeError, _ABB
    ),
    _case(
        "names-int", samx.all_but_biases, (PARAMS,), {"names": (0,)}, TypeError, _ABB
    ),
]


# -- the local multi-process launcher ----------------------------------------------

_LAUNCH = samx.runtime.launch.launch
_L = r"`samx\.runtime\.launch\.launch"

LAUNCH_CASES = [
    _case(
        "argv-a-string",
        _LAUNCH,
        ("train.py",),
        {"timeout": 9},
        TypeError,
        _L + r"\(argv=\.\.\.\)` must be a non-empty list of strings",
    ),
    _case(
        "argv-empty",
        _LAUNCH,
        ([],),
        {"timeout": 9},
        TypeError,
        _L + r"\(argv=\.\.\.\)` must be a non-empty list of strings.*got \[\]",
    ),
    _case(
        "argv-with-a-number",
        _LAUNCH,
        (["t.py", 3],),
        {"timeout": 9},
        TypeError,
        _L + r"\(argv=\.\.\.\)`.*\['train\.py'",
    ),
    _case(
        "num-processes-0",
        _LAUNCH,
        (["t.py"], 0),
        {"timeout": 9},
        ValueError,
        _L + r"\(num_processes=\.\.\.\)` must be an int >= 1, got 0",
    ),
    _case(
        "num-processes-float",
        _LAUNCH,
        (["t.py"], 2.0),
        {"timeout": 9},
        ValueError,
        _L + r"\(num_processes=\.\.\.\)` must be an int >= 1",
    ),
    _case(
        "timeout-0",
        _LAUNCH,
        (["t.py"],),
        {"timeout": 0},
        ValueError,
        _L + r"\(timeout=\.\.\.\)` must be a number of seconds > 0, got 0",
    ),
    _case(
        "timeout-a-string",  # None is valid: no timeout
        _LAUNCH,
        (["t.py"],),
        {"timeout": "9"},
        ValueError,
        _L + r"\(timeout=\.\.\.\)` must be a number of seconds",
    ),
    _case(
        "keep-lines-0",
        _LAUNCH,
        (["t.py"],),
        {"keep_lines": 0},
        ValueError,
        _L + r"\(keep_lines=\.\.\.\)` must be an int >= 1, got 0",
    ),
    _case(
        "cpu-devices-0",
        _LAUNCH,
        (["t.py"],),
        {"timeout": 9, "cpu_devices": 0},
        ValueError,
        _L + r"\(cpu_devices=\.\.\.\)` must be an int >= 1",
    ),
    _case(
        "grace-negative",
        _LAUNCH,
        (["t.py"],),
        {"timeout": 9, "grace": -1},
        ValueError,
        _L + r"\(grace=\.\.\.\)` must be a number of seconds > 0",
    ),
    _case(
        "on-output-not-callable",
        _LAUNCH,
        (["t.py"],),
        {"timeout": 9, "on_output": "print"},
        TypeError,
        _L + r"\(on_output=\.\.\.\)` must be callable",
    ),
    _case(
        "env-not-strings",
        _LAUNCH,
        (["t.py"],),
        {"timeout": 9, "env": {"A": 1}},
        TypeError,
        _L + r"\(env=\.\.\.\)` must be a dict of strings",
    ),
]

_INIT = r"`samx\.runtime\.launch\.initialize"

INITIALIZE_CASES = [
    _case(
        "outside-the-launcher",
        samx.runtime.launch.initialize,
        (),
        {},
        RuntimeError,
        _INIT + r"\(\)` reads SAMX_COORDINATOR_ADDRESS.*python -m"
        r" samx\.runtime\.launch -n N",
    ),
    _case(
        "timeout-0",
        samx.runtime.launch.initialize,
        (),
        {"timeout": 0},
        ValueError,
        _INIT + r"\(timeout=\.\.\.\)` must be an int >= 1, got 0",
    ),
]


# -- samx.flax.Trainer -------------------------------------------------------------

_FT = r"samx\.flax\.Trainer"


def _flax_trainer(method="sam", model=None, loss_fn=_nnx_loss, **kwargs):
    tx = FACTORIES[method](optax.sgd(0.1)) if method in FACTORIES else optax.sgd(0.1)
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0)) if model is None else model
    return samx.flax.Trainer(model, tx, loss_fn, **kwargs)


def _flax_trainer_step(method="sam", batch=_FB, **kwargs):
    return _flax_trainer(method, **kwargs).step(batch)


def _flax_trainer_set_state(state_of):
    trainer = _flax_trainer()
    trainer.state = state_of(trainer)


def _flax_set_prev_batch(dtype):
    """AsyncSAM's state after a step, its previous batch cast to ``dtype``."""
    trainer = _flax_trainer("async_sam")
    trainer.step(_FB)
    state = trainer.state
    prev = jax.tree.map(lambda x: x.astype(dtype), state.prev_batch)
    trainer.state = state._replace(prev_batch=prev)


def _abstract_linear():
    return nnx.eval_shape(lambda: nnx.Linear(3, 2, rngs=nnx.Rngs(0)))


def _runtime_style_loss(params, model_state, batch):
    return _loss(params, batch), model_state


FLAX_TRAINER_CASES = [
    *[
        _case(
            f"flax-model-{what}",
            _flax_trainer,
            (),
            {"model": model},
            TypeError,
            rf"`{_FT}\(model=\.\.\.\)` must be an `nnx\.Module`, got {got}",
        )
        for what, model, got in [
            ("a-dict", {"w": jnp.ones(2)}, r"dict\.$"),
            ("a-linen-module", nn.Dense(2), r"Dense\. For a linen model, use"),
        ]
    ],
    _case(
        "flax-loss_fn-not-callable",
        _flax_trainer,
        (),
        {"loss_fn": "mse"},
        TypeError,
        rf"`{_FT}\(loss_fn=\.\.\.\)` must be callable, got str",
    ),
    *[
        _case(
            f"flax-loss_fn-{what}",
            _flax_trainer,
            (),
            {"loss_fn": loss_fn},
            TypeError,
            rf"`{_FT}\(loss_fn=\.\.\.\)` must be callable as `loss_fn\(model,"
            rf" batch\)`.*its signature is {_lit(signature)}",
        )
        for what, loss_fn, signature in [
            (
                "of-params-model_state-and-batch",
                _runtime_style_loss,
                "(params, model_state, batch)",
            ),
            ("of-one-argument", lambda model: 0.0, "(model)"),
        ]
    ],
    _case(
        "flax-loss-not-a-scalar",
        _flax_trainer_step,
        (),
        {"loss_fn": _nnx_not_a_scalar},
        ValueError,
        rf"{_FT}\.step: `loss_fn` must return a scalar loss, got an array of shape"
        r" \(4, 2\)",
    ),
    _case(
        "flax-loss-a-pair-without-has_aux",
        _flax_trainer_step,
        ("async_sam",),
        {"loss_fn": _nnx_pair},
        ValueError,
        rf"{_FT}\.step: `loss_fn` must return a scalar loss, got a tuple \(did you"
        r" mean `has_aux=True`\?\)",
    ),
    _case(
        "flax-has_aux-str",
        _flax_trainer,
        (),
        {"has_aux": "yes"},
        TypeError,
        rf"`{_FT}\(has_aux=\.\.\.\)` must be True or False, got str 'yes'",
    ),
    *[
        _case(
            f"flax-wrt-{what}",
            _flax_trainer,
            (),
            {"wrt": wrt},
            ValueError,
            rf"`{_FT}\(wrt=\.\.\.\)` selects no variable of the model, got"
            rf" {_lit(repr(wrt))}",
        )
        for what, wrt in [("BatchStat", nnx.BatchStat), ("none", None)]
    ],
    _case(
        "flax-wrt-not-a-filter",
        _flax_trainer,
        (),
        {"wrt": 3.5},
        TypeError,
        rf"`{_FT}\(wrt=\.\.\.\)` must be an nnx filter, e\.g\. `nnx\.Param`, got 3\.5",
    ),
    *[
        _case(
            f"flax-batch-{what}",
            _flax_trainer_step,
            (),
            {"batch": batch},
            error,
            rf"`{_FT}\.step\(batch=\.\.\.\)`{match}",
        )
        for what, batch, error, match in [
            (
                "leaves-of-different-sizes",
                _FB_RAGGED,
                ValueError,
                r": every leaf must have the same leading batch size; \['x'\] has"
                r" 4, \['y'\] has 3",
            ),
            ("scalar-leaf", _FB_SCALAR, ValueError, " must have a leading batch axis"),
            ("str-leaf", _FB_STR, TypeError, r" must be a pytree of arrays; \['x'\]"),
            ("none", None, ValueError, " must be a pytree of arrays"),
        ]
    ],
    _case(
        "flax-tx-none",
        samx.flax.Trainer,
        (nnx.Linear(3, 2, rngs=nnx.Rngs(0)), None, _nnx_loss),
        {},
        TypeError,
        r"`Trainer\(tx=\.\.\.\)` must be an optax transform",
    ),
    _case(
        "flax-ascent_batch_size-with-sam",
        _flax_trainer,
        (),
        {"ascent_batch_size": 2},
        ValueError,
        r"`Trainer\(ascent_batch_size=\.\.\.\)` is AsyncSAM's ascent batch",
    ),
    _case(
        "flax-ascent_batch_size-with-sam-on-an-abstract-model",
        _flax_trainer,
        (),
        {"ascent_batch_size": 2, "model": _abstract_linear()},
        ValueError,
        r"`Trainer\(ascent_batch_size=\.\.\.\)` is AsyncSAM's ascent batch",
    ),
    _case(
        "flax-ascent_batch_size-larger-than-the-batch",
        _flax_trainer_step,
        ("async_sam",),
        {"ascent_batch_size": 8},
        ValueError,
        r"`Trainer\(ascent_batch_size=8\)` is larger than the batch \(4\)",
    ),
    _case(
        "flax-pairing-unknown",
        _flax_trainer,
        ("async_sam",),
        {"pairing": "lagged"},
        ValueError,
        r"`Trainer\(pairing=\.\.\.\)` must be 'paired'.*got 'lagged'",
    ),
    _case(
        "flax-descent_device-unknown",
        _flax_trainer,
        (),
        {"descent_device": "tpu:7"},
        ValueError,
        r"descent_device",
    ),
    _case(
        "flax-state-a-dict",
        _flax_trainer_set_state,
        (lambda t: {"params": t.state.params},),
        {},
        TypeError,
        rf"`{_FT}\.state` must be a `samx\.runtime\.TrainerState`.*got dict",
    ),
    _case(
        "flax-state-of-another-model",
        _flax_trainer_set_state,
        (lambda t: _flax_trainer(model=nnx.Linear(3, 5, rngs=nnx.Rngs(0))).state,),
        {},
        ValueError,
        rf"`{_FT}\.state`: its `params` does not have the tree structure, shapes"
        " and dtypes of this Trainer's",
    ),
    _case(
        "flax-state-of-another-transform",
        _flax_trainer_set_state,
        (lambda t: _flax_trainer("sampa").state,),
        {},
        ValueError,
        rf"`{_FT}\.state`: its `opt_state` does not",
    ),
    _case(
        "flax-state-abstract",
        _flax_trainer_set_state,
        (lambda t: t.abstract_state(),),
        {},
        ValueError,
        rf"`{_FT}\.state` must hold arrays, got an abstract state",
    ),
    *[
        _case(
            f"flax-abstract-model-{what}-before-a-state-is-assigned",
            call,
            (),
            {},
            ValueError,
            rf"{_FT}: this Trainer was built on an abstract model \(`nnx\.eval_shape`\)"
            " and has no state yet",
        )
        for what, call in [
            ("step", lambda: _flax_trainer(model=_abstract_linear()).step(_FB)),
            ("model", lambda: _flax_trainer(model=_abstract_linear()).model),
        ]
    ],
    _case(
        "flax-abstract_state-without-batch",
        lambda: _flax_trainer("async_sam").abstract_state(),
        (),
        {},
        ValueError,
        r"`abstract_state\(batch=\.\.\.\)` is required for async_sam",
    ),
    _case(  # found at once, not at the next step
        "flax-state-on-another-device",
        _flax_trainer_set_state,
        (lambda t: jax.device_put(t.state, jax.devices("cpu")[1]),),
        {},
        ValueError,
        rf"`{_FT}\.state`: its `step` lies on \[CpuDevice\(id=1\)\], but this"
        r" Trainer keeps it on \[CpuDevice\(id=0\)\]",
    ),
    _case(
        "flax-state-donated",
        _flax_trainer_set_state,
        (lambda t: [t.state, t.step(_FB)][0],),
        {},
        ValueError,
        rf"`{_FT}\.state`: this state's arrays were deleted",
    ),
    _case(
        "flax-state-prev_batch-of-another-dtype",
        lambda: _flax_set_prev_batch(np.float16),
        (),
        {},
        ValueError,
        rf"`{_FT}\.state`: its `prev_batch` does not have the tree structure,"
        r" shapes and dtypes of the batches this Trainer trains on",
    ),
]


# -- optax wrappers that misuse a samx transform: MultiSteps, apply_if_finite ----

_WRAPPERS = {
    "multisteps": (lambda tx: optax.MultiSteps(tx, 2), r"optax\.MultiSteps"),
    "apply_if_finite": (
        lambda tx: optax.apply_if_finite(tx, 3),
        r"optax\.apply_if_finite",
    ),
    "skip_multisteps": (
        lambda tx: samx.skip_nonfinite(optax.MultiSteps(tx, 2)),
        r"optax\.MultiSteps",
    ),
    "chain_multisteps": (
        lambda tx: optax.MultiSteps(optax.chain(optax.clip(1.0), tx), 2),
        r"optax\.MultiSteps",
    ),
}
_WRAPPER_FIX = {
    r"optax\.MultiSteps": r"samx\.microbatched",
    r"optax\.apply_if_finite": r"samx\.skip_nonfinite",
}


def _wrapped_update(name, wrapper):
    """The plain optax loop: ``tx.update`` in the user's own ``jax.jit``."""
    tx = _WRAPPERS[wrapper][0](FACTORIES[name](optax.sgd(0.1)))

    @jax.jit
    def step(state):
        grads = jax.grad(_loss)(PARAMS, BATCH)
        return tx.update(
            grads, state, PARAMS, grad_fn=lambda p, i: jax.grad(_loss)(p, BATCH)
        )

    return step(tx.init(PARAMS))


def _wrapped_trainer_step(name, wrapper):
    tx = _WRAPPERS[wrapper][0](FACTORIES[name](optax.sgd(0.1)))
    trainer = runtime.Trainer(tx, _loss)
    return trainer.step(trainer.init(PARAMS), BATCH)


def _wrapped_flax_trainer_step(name, wrapper):
    tx = _WRAPPERS[wrapper][0](FACTORIES[name](optax.sgd(0.1)))
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    return samx.flax.Trainer(model, tx, _nnx_loss).step(_FB)


def _wrapped_nnx_step(name, wrapper):
    tx = _WRAPPERS[wrapper][0](FACTORIES[name](optax.sgd(0.1)))
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    return samx.flax.make_nnx_train_step(_nnx_loss)(model, optimizer, _FB)


WRAPPER_CASES = [
    _case(
        # the plain loop's cases are named after the transform, its public name
        (f"{name}-update" if prefix == "update" else prefix)
        + f"-inside-{wrapper}-{name}",
        call,
        (name, wrapper),
        {},
        ValueError,
        rf"samx\.{name} cannot run inside `{_WRAPPERS[wrapper][1]}`.*"
        + _WRAPPER_FIX[_WRAPPERS[wrapper][1]],
    )
    for prefix, call in (
        ("update", _wrapped_update),
        ("Trainer", _wrapped_trainer_step),
        ("Trainer-flax", _wrapped_flax_trainer_step),
        ("make_nnx_train_step", _wrapped_nnx_step),
    )
    for wrapper in _WRAPPERS
    for name in FACTORIES
]

# -- one batch size per run: a smaller last batch of an epoch --------------------

_FULL = {"x": np.ones((16, 3), np.float32), "y": np.ones((16, 2), np.float32)}
_SHORT = {"x": _FULL["x"][:8], "y": _FULL["y"][:8]}  # still divides the mesh
_SHORT_BATCH = (
    r"`{fn}\(batch=\.\.\.\)` has 8 examples, but this run's batches have 16: every"
    r" batch must have the same size\. Drop the last, smaller batch of an epoch"
    r" \(`drop_remainder=True`.*`drop_last=True`.*or pad it to 16 examples"
)


def _tx_of(method):
    return FACTORIES[method](optax.sgd(0.1)) if method in FACTORIES else optax.sgd(0.1)


def _short_trainer(method):
    trainer = runtime.Trainer(_tx_of(method), _loss)
    state, _ = trainer.step(trainer.init(PARAMS), _FULL)
    return trainer.step(state, _SHORT)


def _short_flax_trainer(method):
    trainer = _flax_trainer(method)
    trainer.step(_FULL)
    return trainer.step(_SHORT)


def _short_make_nnx(method):
    model, optimizer = _nnx_model_and_optimizer(method)
    step = samx.flax.make_nnx_train_step(_nnx_loss)
    step(model, optimizer, _FULL)
    return step(model, optimizer, _SHORT)


def _short_nnx_step(method, jit=False):
    model, optimizer = _nnx_model_and_optimizer(method)
    step = samx.flax.nnx_train_step
    if jit:
        step = nnx.jit(step, static_argnames="loss_fn")
    step(model, optimizer, _FULL, loss_fn=_nnx_loss)
    return step(model, optimizer, _SHORT, loss_fn=_nnx_loss)


def _short_make_linen(method):
    step = samx.flax.make_linen_train_step(_linen_loss)
    state, _ = step(_train_state(method), _FULL)
    return step(state, _SHORT)


def _short_linen_step(method, jit=False):
    step = samx.flax.linen_train_step
    if jit:
        step = jax.jit(step, static_argnames="loss_fn")
    state, _ = step(_train_state(method), _FULL, loss_fn=_linen_loss)
    return step(state, _SHORT, loss_fn=_linen_loss)


def _short_data_parallel(method):
    tx = _tx_of(method)
    step = runtime.make_data_parallel_step(tx, _loss, _MESH)
    params, opt_state, _ = step(PARAMS, tx.init(PARAMS), _FULL)
    return step(params, opt_state, _SHORT)


_ALL_METHODS = ("sgd", "sam", "async_sam", "sampa")
_T_STEP = r"samx\.runtime\.Trainer\.step"
_DP_STEP = r"make_data_parallel_step\(\.\.\.\)"
_KEEPING = ("async_sam", "sampa")  # their plan keeps the previous batch
SHORT_BATCH_CASES = [
    _case(
        f"{prefix}-short-last-batch-{method}",
        call,
        (method, *args),
        {},
        ValueError,
        _SHORT_BATCH.format(fn=fn),
    )
    for prefix, call, args, fn, methods in (
        ("Trainer", _short_trainer, (), _T_STEP, _ALL_METHODS),
        ("Trainer-flax", _short_flax_trainer, (), rf"{_FT}\.step", _ALL_METHODS),
        ("make_nnx_train_step", _short_make_nnx, (), _STEP_NNX, _ALL_METHODS),
        ("make_linen_train_step", _short_make_linen, (), _STEP_LINEN, _ALL_METHODS),
        ("make_data_parallel_step", _short_data_parallel, (), _DP_STEP, ("sgd", "sam")),
        ("nnx_train_step", _short_nnx_step, (), _STEP_NNX, _KEEPING),
        ("nnx_train_step-jit", _short_nnx_step, (True,), _STEP_NNX, _KEEPING),
        ("linen_train_step", _short_linen_step, (), _STEP_LINEN, _KEEPING),
        ("linen_train_step-jit", _short_linen_step, (True,), _STEP_LINEN, _KEEPING),
    )
    for method in methods
]

# -- samx.flax.calibrate_ascent_batch --------------------------------------------

_CAL_FLAX = samx.flax.calibrate_ascent_batch
_CF = r"`samx\.flax\.calibrate_ascent_batch"


def _cal_flax(model=None, loss_fn=_nnx_loss, batch=_FB, **kwargs):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0)) if model is None else model
    return _CAL_FLAX(model, loss_fn, batch, **kwargs)


CALIBRATE_FLAX_CASES = [
    _case(
        "flax-model-a-dict",
        _cal_flax,
        (),
        {"model": {"w": jnp.ones(2)}},
        TypeError,
        rf"{_CF}\(model=\.\.\.\)` must be an `nnx\.Module`, got dict",
    ),
    _case(
        "flax-model-linen",
        _cal_flax,
        (),
        {"model": nn.Dense(2)},
        TypeError,
        rf"{_CF}\(model=\.\.\.\)` must be an `nnx\.Module`.*For a linen model",
    ),
    _case(
        "flax-model-abstract",
        _cal_flax,
        (),
        {"model": _abstract_linear()},
        ValueError,
        rf"{_CF}\(model=\.\.\.\)` is abstract \(`nnx\.eval_shape`\)",
    ),
    _case(
        "flax-loss_fn-none",
        _cal_flax,
        (),
        {"loss_fn": None},
        TypeError,
        rf"{_CF}\(loss_fn=\.\.\.\)` must be callable, got NoneType",
    ),
    _case(
        "flax-loss_fn-of-params-model_state-batch",
        _cal_flax,
        (),
        {"loss_fn": _runtime_style_loss},
        TypeError,
        rf"{_CF}\(loss_fn=\.\.\.\)` must be callable as `loss_fn\(model, batch\)`",
    ),
    _case(
        "flax-loss-not-a-scalar",
        _cal_flax,
        (),
        {"loss_fn": _nnx_not_a_scalar, "repeats": 1},
        ValueError,
        r"samx\.flax\.calibrate_ascent_batch: `loss_fn` must return a scalar loss",
    ),
    _case(
        "flax-loss-a-pair-without-has_aux",
        _cal_flax,
        (),
        {"loss_fn": _nnx_pair, "repeats": 1},
        ValueError,
        r"must return a scalar loss, got a tuple \(did you mean `has_aux=True`\?\)",
    ),
    _case(
        "flax-has_aux-str",
        _cal_flax,
        (),
        {"has_aux": "yes"},
        TypeError,
        rf"{_CF}\(has_aux=\.\.\.\)` must be True or False",
    ),
    *[
        _case(
            f"flax-{name}-given",
            _cal_flax,
            (),
            {name: value},
            TypeError,
            rf"{_CF}\({name}=\.\.\.\)` is not taken: the model state is the model's",
        )
        for name, value in (("model_state", {}), ("has_state", True))
    ],
    _case(
        "flax-wrt-selects-nothing",
        _cal_flax,
        (),
        {"wrt": nnx.BatchStat},
        ValueError,
        rf"{_CF}\(wrt=\.\.\.\)` selects no variable of the model",
    ),
    _case(
        "flax-batch-scalar-leaf",
        _cal_flax,
        (),
        {"batch": _FB_SCALAR},
        ValueError,
        rf"{_CF}\(batch=\.\.\.\)` must have a leading batch axis",
    ),
    _case(
        "flax-batch-ragged",
        _cal_flax,
        (),
        {"batch": _FB_RAGGED},
        ValueError,
        rf"{_CF}\(batch=\.\.\.\)`: every leaf must have the same leading batch size",
    ),
    _case(
        "flax-repeats-0",
        _cal_flax,
        (),
        {"repeats": 0},
        ValueError,
        r"`calibrate_ascent_batch\(repeats=\.\.\.\)` must be an int >= 1, got 0",
    ),
    _case(
        "flax-slow_device-cpu:99",
        _cal_flax,
        (),
        {"slow_device": "cpu:99"},
        ValueError,
        rf"`slow_device='cpu:99'` is not a device here; {_DEVICES}",
    ),
]


# -- Trainer(ascent_batch_size=calibration) for other devices or batches ---------

_CPU0, _CPU1 = jax.devices("cpu")[:2]


def _calibrated_trainer(b=8, fast=_CPU0, slow=_CPU1, step=False, **devices):
    calibration = runtime.AscentBatchCalibration(
        batch_size=b,
        ascent_batch_size=2,
        fast_seconds_per_example=0.001,
        slow_seconds_per_example=0.002,
        fast_device=fast,
        slow_device=slow,
        descent_seconds=0.008,
        ascent_seconds={2: 0.004},
        transfer_seconds=0.001,
        hides=True,
    )
    trainer = runtime.Trainer(
        samx.async_sam(optax.sgd(0.1)), _loss, ascent_batch_size=calibration, **devices
    )
    state = trainer.init(PARAMS)
    return trainer.step(state, BATCH) if step else state


def _injected_callable_mask():
    tx = optax.inject_hyperparams(samx.sam)(
        optax.sgd(0.1), adaptive=True, mask=samx.all_but_biases
    )
    return tx.update(GRADS, tx.init(PARAMS), PARAMS, grad_fn=_ones_grad_fn)


INJECTED_MASK_CASES = [
    _case(
        "injected-callable-mask-without-static-args",
        _injected_callable_mask,
        (),
        {},
        ValueError,
        r"samx\.sam: `mask` must be a tree of bools.*It is a scalar, True:.*"
        r"static_args=\(\"mask\",\)",
    ),
]


_CAL = r"`Trainer\(ascent_batch_size=calibration\)` timed"
CALIBRATION_CASES = [
    _case(
        "calibration-descent-device",
        _calibrated_trainer,
        (),
        {"descent_device": _CPU1, "ascent_device": _CPU1},
        ValueError,
        _CAL + r" .* as the descent device \(`fast_device`\).*calibrate with",
    ),
    _case(
        "calibration-ascent-device",
        _calibrated_trainer,
        (),
        {"descent_device": _CPU0, "ascent_device": _CPU0},
        ValueError,
        _CAL + r" .* as the ascent device \(`slow_device`\).*calibrate with",
    ),
    _case(
        "calibration-default-ascent-device",
        _calibrated_trainer,
        (),
        {"descent_device": _CPU0},
        ValueError,
        _CAL + r" .* as the ascent device",
    ),
    _case(
        "calibration-batch-size",
        _calibrated_trainer,
        (),
        {"b": 16, "step": True, "descent_device": _CPU0, "ascent_device": _CPU1},
        ValueError,
        r"has 8 examples, but `Trainer\(ascent_batch_size=calibration\)` chose"
        r" b' = 2 for batches of 16: calibrate on a batch of the size",
    ),
]

CASES = [
    *(c for name in FACTORIES for c in _construction_cases(name)),
    *_prefixed("all_but_biases", ALL_BUT_BIASES_CASES),
    *(c for name in FACTORIES for c in _update_cases(name)),
    *DIAGNOSTICS_CASES,
    *_prefixed("Trainer", TRAINER_CASES),
    *_prefixed("calibrate_ascent_batch", CALIBRATE_CASES),
    *_prefixed("grad_fn_points", POINTS_CASES),
    *_prefixed("method_of", METHOD_OF_CASES),
    *_prefixed("evaluation_plan", EVALUATION_PLAN_CASES),
    *_prefixed("Trainer", PAIRING_AND_LIST_CASES),
    *_prefixed("microbatched", MICROBATCHED_CASES),
    *_prefixed("skip_nonfinite", SKIP_NONFINITE_CASES),
    *DIAGNOSTICS_MORE_CASES,
    *_prefixed("abstract_state", ABSTRACT_STATE_CASES),
    *_prefixed("replicated", REPLICATED_CASES),
    *_prefixed("batch_sharding", BATCH_SHARDING_CASES),
    *_prefixed("make_data_parallel_step", DATA_PARALLEL_CASES),
    *_prefixed("Trainer", TRAINER_MESH_CASES),
    *(c for name in ("nnx_grads", "nnx_train_step") for c in _nnx_cases(name)),
    *_prefixed("make_nnx_train_step", MAKE_NNX_CASES),
    *(c for name in ("linen_grads", "linen_train_step") for c in _linen_cases(name)),
    *_prefixed("make_linen_train_step", MAKE_LINEN_CASES),
    *_prefixed("apply_gradients", APPLY_GRADIENTS_CASES),
    *_prefixed("TrainState", TRAIN_STATE_CASES),
    *_prefixed("DescentGradFn", DESCENT_GRAD_FN_CASES),
    *_prefixed("launch", LAUNCH_CASES),
    *_prefixed("initialize", INITIALIZE_CASES),
    *_prefixed("Trainer", FLAX_TRAINER_CASES),
    *SHORT_BATCH_CASES,
    *_prefixed("calibrate_ascent_batch", CALIBRATE_FLAX_CASES),
    *WRAPPER_CASES,
    *_prefixed("Trainer", CALIBRATION_CASES),
    *_prefixed("sam", INJECTED_MASK_CASES),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input_raises_a_clear_error_at_the_api(case):
    with pytest.raises(case.exception, match=case.match) as excinfo:
        case.fn(*case.args, **case.kwargs)
    raised_in = pathlib.Path(excinfo.traceback[-1].path).resolve()
    assert SAMX_DIR in raised_in.parents, (
        f"raised in {raised_in}, not in samx: {excinfo.value}"
    )


# Public functions added at the same time as this table, their cases still to
# be written; a name leaves the set once it has cases. Keep it empty.
NOT_COVERED_YET: set[str] = set()
MODULES = (samx, samx.diagnostics, runtime, samx.flax, samx.runtime.launch)


def _public_functions():
    """Every public function and class of samx, but modules and result tuples."""
    return {
        n
        for module in MODULES
        for n in module.__all__
        if callable(getattr(module, n))
        and not isinstance(getattr(module, n), type(samx))  # not a module
        and not (
            isinstance(getattr(module, n), type)
            and issubclass(getattr(module, n), (tuple, Exception))
        )  # states, results and exceptions
    }


def test_the_table_covers_every_public_function():
    """A new public function or class needs its bad-input cases here."""
    covered = {c.id.split("-")[0] for c in CASES}
    assert covered <= _public_functions()
    assert _public_functions() - covered - NOT_COVERED_YET == set()


def test_the_walk_sees_every_module():
    """The walk above reaches the diagnostics and the Flax helpers."""
    public = _public_functions()
    assert {"sharpness", "loss_surface_2d", "abstract_state", "nnx_grads"} <= public
    assert {"TrainState", "DescentGradFn"} <= public
    assert not {"HessianEigen", "TrainerState", "SAMState"} & public
