"""samx.runtime.Trainer: same trajectory as the pure transform, placed, async."""

import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _testing import async_sam_reference, count_compilations, mlp_problem, pure_step
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import samx
from samx.runtime import Trainer, calibrate_ascent_batch, method_of

CPU0, CPU1 = jax.devices("cpu")[:2]
ASCENT = 8  # AsyncSAM's ascent batch, of a batch of 32


def _devices(tree):
    return {d for x in jax.tree.leaves(tree) for d in x.devices()}


def _numpy_batches(sample, n, seed=1):
    return [
        jax.tree.map(np.asarray, sample(k))
        for k in jax.random.split(jax.random.key(seed), n)
    ]


def _pure_trajectory(tx, method, params, loss, batches, pairing="paired"):
    """The pure transform in one jit, fed the batches of ``pairing`` by hand."""
    step = jax.jit(pure_step(tx, method, loss, ASCENT, pairing))
    state, prev, out = tx.init(params), batches[0], []
    for batch in batches:
        params, state = step(params, state, prev, batch)
        prev = batch
        out.append(params)
    return out


TRANSFORMS = {
    "sam": lambda: samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05),
    "async_sam": lambda: samx.async_sam(optax.sgd(0.1, momentum=0.9), rho=0.05),
    "sampa-0": lambda: samx.sampa(optax.sgd(0.1, momentum=0.9), rho=0.1, lam=0.0),
    "sampa-0.2": lambda: samx.sampa(optax.adam(1e-2), rho=0.1, lam=0.2),
    "plain": lambda: optax.adam(1e-2),
}


PLACEMENTS = [
    pytest.param(name, two, vmap, id=f"{name}-{where}")
    for name in sorted(TRANSFORMS)
    for two, vmap, where in [
        (True, None, "cpu0+cpu1"),
        (False, False, "cpu0"),
        (False, True, "cpu0-vmap"),
    ]
    if not vmap or name.startswith("sampa")
]


def _assert_trajectory(trainer, batches, expected, two_devices, method):
    state = trainer.init(expected["params0"])
    with jax.transfer_guard("disallow"):
        for t, batch in enumerate(batches):
            state, metrics = trainer.step(state, batch)
            assert _devices(state.params) == {CPU0}
            assert metrics["grad_norm"].devices() == {CPU0}
            if method in ("async_sam", "sampa"):
                where = CPU1 if two_devices else CPU0
                assert metrics["ascent_grad_norm"].devices() == {where}
            for x, y in zip(
                jax.tree.leaves(state.params),
                jax.tree.leaves(expected["trajectory"][t]),
                strict=True,
            ):
                np.testing.assert_allclose(
                    x, y, rtol=1e-5, atol=1e-5, err_msg=f"step {t}"
                )
    assert int(state.step) == len(batches)


@pytest.mark.parametrize("pairing", ["paired", "unpaired"])
@pytest.mark.parametrize("name, two_devices, vmap", PLACEMENTS)
def test_trajectory_equals_the_pure_transform(name, two_devices, vmap, pairing):
    params, loss, sample = mlp_problem(jax.random.key(0), batch=32)
    batches = _numpy_batches(sample, 12)
    tx = TRANSFORMS[name]()
    method = method_of(tx.init(params))
    trainer = Trainer(
        tx,
        loss,
        descent_device=CPU0,
        ascent_device=CPU1 if two_devices else CPU0,
        ascent_batch_size=ASCENT if method == "async_sam" else None,
        sampa_vmap=vmap,
        pairing=pairing,
    )
    expected = _pure_trajectory(
        TRANSFORMS[name](), method, params, loss, batches, pairing
    )
    _assert_trajectory(
        trainer,
        batches,
        {"params0": params, "trajectory": expected},
        two_devices,
        method,
    )


@pytest.mark.parametrize("pairing", ["paired", "unpaired"])
@pytest.mark.parametrize("two_devices", [True, False])
def test_async_sam_equals_a_hand_written_reference(two_devices, pairing):
    # AsyncSAM written out from ALGORITHMS.md (no samx in the reference), b' < b:
    # paired, the descent of step t runs on B_{t-1}, where a_{t-1} came from.
    params, loss, sample = mlp_problem(jax.random.key(0), batch=32)
    batches = _numpy_batches(sample, 12)
    base = lambda: optax.sgd(0.1, momentum=0.9)  # noqa: E731
    trainer = Trainer(
        samx.async_sam(base(), rho=0.05),
        loss,
        descent_device=CPU0,
        ascent_device=CPU1 if two_devices else CPU0,
        ascent_batch_size=ASCENT,
        pairing=pairing,
    )
    expected = async_sam_reference(
        base(), params, loss, batches, rho=0.05, ascent=ASCENT, pairing=pairing
    )
    _assert_trajectory(
        trainer,
        batches,
        {"params0": params, "trajectory": expected},
        two_devices,
        "async_sam",
    )
    other = async_sam_reference(
        base(),
        params,
        loss,
        batches,
        rho=0.05,
        ascent=ASCENT,
        pairing="unpaired" if pairing == "paired" else "paired",
    )
    assert np.abs(other[-1]["layer0"]["w"] - expected[-1]["layer0"]["w"]).max() > 1e-4


@pytest.mark.parametrize("name", ["async_sam", "sampa-0.2", "sam"])
def test_no_recompilation_after_the_first_step(name):
    params, loss, sample = mlp_problem(jax.random.key(0), batch=32)
    batches = _numpy_batches(sample, 5)
    tx = TRANSFORMS[name]()
    trainer = Trainer(
        tx,
        loss,
        descent_device=CPU0,
        ascent_device=CPU1,
        ascent_batch_size=ASCENT if name == "async_sam" else None,
    )
    state, _ = trainer.step(trainer.init(params), batches[0])
    with count_compilations() as compiled:
        for batch in batches[1:]:
            state, _ = trainer.step(state, batch)
        jax.block_until_ready(state)
    assert compiled == []


def _big_problem():
    """An MLP whose step takes long enough to tell dispatch from completion."""
    params, loss, sample = mlp_problem(
        jax.random.key(0), sizes=(256, 1024, 1024, 1024, 10), batch=512
    )
    return params, loss, _numpy_batches(sample, 4)


@pytest.mark.parametrize("name", ["async_sam", "sampa-0.2"])
def test_a_step_returns_before_its_computation_finishes(name):
    params, loss, batches = _big_problem()
    trainer = Trainer(
        TRANSFORMS[name](),
        loss,
        descent_device=CPU0,
        ascent_device=CPU1,
        ascent_batch_size=128 if name == "async_sam" else None,
    )
    state = trainer.init(params)
    for batch in batches[:2]:  # compile every piece
        state, _ = trainer.step(state, batch)
    jax.block_until_ready(state)
    ratios = []
    for batch in batches[2:]:
        start = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        dispatched = time.perf_counter() - start
        jax.block_until_ready((state, metrics))
        ratios.append(dispatched / (time.perf_counter() - start))
    assert min(ratios) < 0.3, f"dispatch / completion: {ratios}"


def test_model_state_comes_from_the_descent_pass_only():
    # The "model state" records the first parameter at which the pass ran.
    params = jnp.array([1.0, -2.0])
    batch = {"x": np.ones((4, 2), np.float32)}

    def loss_fn(p, model_state, batch):
        loss = jnp.mean(jnp.square(batch["x"] @ p))
        return loss, {"seen": p[0] + 0.0 * model_state["seen"]}

    for name, two in [("sam", False), ("async_sam", True), ("sampa-0.2", True)]:
        seen = []

        def grad_fn_for(batch, seen=seen):
            def grad_fn(p, i):
                if i == 0:
                    seen.append(p[0])
                return jax.grad(lambda q: loss_fn(q, {"seen": 0.0}, batch)[0])(p)

            return grad_fn

        tx = TRANSFORMS[name]()
        trainer = Trainer(
            tx,
            loss_fn,
            has_state=True,
            descent_device=CPU0,
            ascent_device=CPU1 if two else CPU0,
            ascent_batch_size=2 if name == "async_sam" else None,
        )
        state = trainer.init(params, {"seen": jnp.zeros(())})
        pure, pure_state = params, tx.init(params)
        for _ in range(3):
            state, _ = trainer.step(state, batch)
            g = jax.grad(lambda q: loss_fn(q, {"seen": 0.0}, batch)[0])(pure)
            fraction = {"ascent_fraction": 2 / 4} if name == "async_sam" else {}
            updates, pure_state = tx.update(
                g, pure_state, pure, grad_fn=grad_fn_for(batch), **fraction
            )
            pure = optax.apply_updates(pure, updates)
            np.testing.assert_allclose(state.model_state["seen"], seen[-1], rtol=1e-6)
        assert not np.isclose(seen[-1], pure[0])  # the descent point is perturbed


def test_defaults_place_everything_on_the_default_device_without_a_gpu():
    params, loss, sample = mlp_problem(jax.random.key(0), batch=16)
    batch = _numpy_batches(sample, 1)[0]
    for name in ("async_sam", "sampa-0.2"):
        trainer = Trainer(TRANSFORMS[name](), loss)
        assert trainer.descent_device == jax.devices()[0]
        state, metrics = trainer.step(trainer.init(params), batch)
        assert _devices(state.params) == {jax.devices()[0]}
        assert metrics["ascent_grad_norm"].devices() == {jax.devices()[0]}


def test_method_is_found_through_chains_and_injected_hyperparameters():
    params = jnp.zeros(3)
    wrapped = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(samx.async_sam)(optax.sgd(0.1), rho=0.05),
    )
    assert method_of(wrapped.init(params)) == "async_sam"
    assert method_of(optax.sgd(0.1).init(params)) == "plain"
    both = optax.chain(samx.sam(optax.sgd(0.1)), samx.sampa(optax.sgd(0.1)))
    with pytest.raises(ValueError, match="one sharpness-aware transform"):
        method_of(both.init(params))


def test_state_is_a_pytree_that_round_trips():
    params, loss, sample = mlp_problem(jax.random.key(0), batch=16)
    batches = _numpy_batches(sample, 4)
    trainer = Trainer(TRANSFORMS["sampa-0.2"](), loss)
    state = trainer.init(params)
    for batch in batches[:2]:
        state, _ = trainer.step(state, batch)
    leaves, treedef = jax.tree.flatten(state)
    restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
    restored = jax.device_put(restored, trainer.descent_device)
    a, _ = trainer.step(state, batches[2])
    b, _ = trainer.step(restored, batches[2])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


# --- calibration ---------------------------------------------------------------


def _fake_timings(monkeypatch, descent, ascent, transfer=0.0):
    """Replaces the clock: the descent takes ``descent`` s, b' takes ascent(b'),
    the transfers (both ways) ``transfer``."""
    calls = []
    monkeypatch.setattr(
        "samx.runtime._calibrate._transfer_seconds",
        lambda params, fast, slow, repeats: transfer,
    )

    def fake(fn, args, repeats):
        examples = jax.tree.leaves(args[2])[0]
        (device,) = examples.devices()
        size = examples.shape[0]
        calls.append((device, size))
        return descent if device == CPU0 else ascent(size)

    monkeypatch.setattr("samx.runtime._calibrate._median_seconds", fake)
    return calls


def _calibrate_recording_warnings(loss, params, sample):
    """calibrate_ascent_batch from cpu:0 to cpu:1, and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = calibrate_ascent_batch(
            loss,
            params,
            _numpy_batches(sample, 1)[0],
            fast_device=CPU0,
            slow_device=CPU1,
        )
    return c, caught


def _largest_hidden(batch, descent, ascent, transfer=0.0):
    """The largest power of two b' <= batch with ascent(b') + transfer <=
    descent, else 1."""
    fits = [
        2**k for k in range(batch.bit_length()) if ascent(2**k) + transfer <= descent
    ]
    return max(fits, default=1)


@pytest.mark.parametrize(
    "batch, ascent",
    [
        (64, lambda b: 0.006 + 0.0005 * b),  # fixed cost: 8, where b t_f/t_s gives 16
        (64, lambda b: 0.0001 * b),  # the whole batch hides: 64
        (64, lambda b: 0.02 + b),  # even one example is slower: 1
        (48, lambda b: 0.0004 * b),  # not a power of two: 16 (of 1..32)
        (40, lambda b: 0.001 * b),  # exactly the descent's time hides: 8
        (1, lambda b: 0.001 * b),
    ],
)
def test_calibration_picks_the_largest_power_of_two_that_hides(
    monkeypatch, batch, ascent
):
    params, loss, sample = mlp_problem(jax.random.key(0), batch=batch)
    calls = _fake_timings(monkeypatch, 0.008, ascent)
    c, caught = _calibrate_recording_warnings(loss, params, sample)
    assert len(caught) == (0 if c.hides else 1)  # the warning when b' = 1 does not
    assert c.ascent_batch_size == _largest_hidden(batch, 0.008, ascent)
    assert calls[0] == (CPU0, batch)  # the descent: the whole batch, fast device
    timed = [size for device, size in calls[1:]]
    assert all(device == CPU1 for device, _ in calls[1:])
    assert len(set(timed)) == len(timed) <= 4  # bisection: few compilations
    assert c.ascent_seconds == {b: ascent(b) for b in sorted(timed)}
    assert c.ascent_batch_size in c.ascent_seconds
    assert c.descent_seconds == 0.008 and c.batch_size == batch
    assert c.fast_seconds_per_example == pytest.approx(0.008 / batch)
    b_ = c.ascent_batch_size
    assert c.slow_seconds_per_example == pytest.approx(ascent(b_) / b_)
    assert (c.fast_device, c.slow_device) == (CPU0, CPU1)
    assert c.transfer_seconds == 0.0
    assert c.hides == (ascent(b_) <= 0.008)


@pytest.mark.parametrize(
    "transfer, expected", [(0.0, 8), (0.002, 4), (0.005, 2), (0.0065, 1), (0.01, 1)]
)
def test_calibration_counts_the_transfers(monkeypatch, transfer, expected):
    # The ascent of b' takes 0.001 * b' on cpu:1, the descent 0.008 on cpu:0:
    # without transfers b' = 8 hides; every transfer second takes examples off.
    params, loss, sample = mlp_problem(jax.random.key(0), batch=64)
    _fake_timings(monkeypatch, 0.008, lambda b: 0.001 * b, transfer)
    c, caught = _calibrate_recording_warnings(loss, params, sample)
    assert c.ascent_batch_size == expected
    assert expected == _largest_hidden(64, 0.008, lambda b: 0.001 * b, transfer)
    assert c.transfer_seconds == transfer
    hides = 0.001 * expected + transfer <= 0.008
    assert c.hides == hides
    mine = [w for w in caught if "does not hide" in str(w.message)]
    assert len(mine) == (0 if hides else 1)
    if not hides:  # the measured times and the alternatives, in the warning
        message = str(mine[0].message)
        assert "1 ms" in message and f"{transfer * 1e3:.3g} ms" in message
        assert "8 ms" in message and "SAMPa" in message and "b/4" in message
        assert "ascent_device='cpu:0'" in message
        assert mine[0].filename == __file__


def test_calibration_times_real_transfers_between_two_devices():
    params, loss, sample = mlp_problem(jax.random.key(0), batch=16)
    batch = _numpy_batches(sample, 1)[0]
    with warnings.catch_warnings():  # whether it hides depends on the machine
        warnings.simplefilter("ignore")
        c = calibrate_ascent_batch(
            loss, params, batch, fast_device=CPU0, slow_device=CPU1, repeats=3
        )
        same = calibrate_ascent_batch(
            loss, params, batch, fast_device=CPU0, slow_device=CPU0, repeats=3
        )
    assert c.transfer_seconds > 0 and isinstance(c.hides, bool)
    assert same.transfer_seconds == 0.0


def test_calibration_times_the_sharded_descent_on_a_mesh(monkeypatch):
    # fast_device=mesh: the descent timed is the Trainer's on that mesh (the
    # batch split along its axis, the parameters replicated), and a Trainer on
    # the mesh takes the result. The clock is made up (b' = 4 hides); each
    # timed gradient still runs once.
    mesh = Mesh(np.array(jax.devices("cpu")[:4]), ("data",))
    params, loss, sample = mlp_problem(jax.random.key(0), batch=16)
    batches = _numpy_batches(sample, 3)
    real, timed = samx.runtime._calibrate._median_seconds, []

    def clock(fn, args, repeats):
        real(fn, args, 1)
        timed.append(jax.tree.map(lambda x: x.sharding, args))
        examples = jax.tree.leaves(args[2])[0]
        return 1.0 if len(examples.devices()) > 1 else 0.2 * examples.shape[0]

    monkeypatch.setattr("samx.runtime._calibrate._median_seconds", clock)
    c = calibrate_ascent_batch(loss, params, batches[0], fast_device=mesh)
    descent = timed[0]
    assert {x.spec for x in jax.tree.leaves(descent[2])} == {P("data")}
    assert {x.spec for x in jax.tree.leaves(descent[0])} == {P()}
    assert {x.mesh for x in jax.tree.leaves(descent)} == {mesh}
    assert (c.fast_device, c.ascent_batch_size, c.hides) == (mesh, 4, True)
    tx = TRANSFORMS["async_sam"]()
    trainer = Trainer(tx, loss, descent_device=mesh, ascent_batch_size=c)
    by_hand = Trainer(tx, loss, descent_device=mesh, ascent_batch_size=4)
    ours = _trajectory(trainer, params, batches)
    theirs = _trajectory(by_hand, params, batches)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(x, y)

    def slow_clock(fn, args, repeats):  # even b' = 1 is slower than the descent
        return 1.0 if len(jax.tree.leaves(args[2])[0].devices()) > 1 else 2.0

    monkeypatch.setattr("samx.runtime._calibrate._median_seconds", slow_clock)
    with pytest.warns(UserWarning, match=r"Trainer\(\.\.\., ascent_device='cpu:0'\)"):
        c = calibrate_ascent_batch(loss, params, batches[0], fast_device=mesh)
    assert (c.ascent_batch_size, c.hides) == (1, False)
    with pytest.raises(ValueError, match=r"the batch axis 'model' is not an axis"):
        calibrate_ascent_batch(
            loss, params, batches[0], fast_device=mesh, batch_axis="model"
        )
    with pytest.raises(ValueError, match=r"\(batch_axis=\.\.\.\)` needs `fast_dev"):
        calibrate_ascent_batch(loss, params, batches[0], batch_axis="data")


def _calibration(b=8, b_=2, hides=True, fast=CPU0, slow=CPU1):
    """A calibration as calibrate_ascent_batch returns one, its times made up."""
    return samx.runtime.AscentBatchCalibration(
        batch_size=b,
        ascent_batch_size=b_,
        fast_seconds_per_example=0.001,
        slow_seconds_per_example=0.002,
        fast_device=fast,
        slow_device=slow,
        descent_seconds=0.008,
        ascent_seconds={b_: 0.004 if hides else 0.02},
        transfer_seconds=0.001,
        hides=hides,
    )


def _trajectory(trainer, params, batches):
    state = trainer.init(params)
    for batch in batches:
        state, _ = trainer.step(state, batch)
    return state.params


def test_the_trainer_takes_a_calibration_as_its_ascent_batch():
    params, loss, sample = mlp_problem(jax.random.key(0), batch=8)
    batches = _numpy_batches(sample, 3)
    devices = {"descent_device": CPU0, "ascent_device": CPU1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calibrated = Trainer(
            TRANSFORMS["async_sam"](), loss, ascent_batch_size=_calibration(), **devices
        )
    assert caught == [] and calibrated.calibration == _calibration()
    assert calibrated.ascent_batch_size == 2
    by_hand = Trainer(TRANSFORMS["async_sam"](), loss, ascent_batch_size=2, **devices)
    ours = _trajectory(calibrated, params, batches)
    theirs = _trajectory(by_hand, params, batches)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(x, y)
    assert by_hand.calibration is None


def test_a_calibration_that_does_not_hide_warns_once_when_the_trainer_is_built():
    params, loss, sample = mlp_problem(jax.random.key(0), batch=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(
            TRANSFORMS["async_sam"](),
            loss,
            descent_device=CPU0,
            ascent_device=CPU1,
            ascent_batch_size=_calibration(b_=1, hides=False),
        )
        _trajectory(trainer, params, _numpy_batches(sample, 3))  # steps: no more
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "does not hide" in message and "20 + 1 ms" in message
    assert caught[0].filename == __file__


def test_a_calibration_for_other_devices_or_batches_is_a_clear_error():
    params, loss, sample = mlp_problem(jax.random.key(0), batch=8)
    tx = TRANSFORMS["async_sam"]()
    with pytest.raises(ValueError, match=r"timed .* as the descent device"):
        Trainer(tx, loss, descent_device=CPU1, ascent_batch_size=_calibration())
    with pytest.raises(ValueError, match=r"timed .* as the ascent device"):
        Trainer(
            tx,
            loss,
            descent_device=CPU0,
            ascent_device=CPU0,
            ascent_batch_size=_calibration(),
        )
    # The default ascent device (the host CPU, cpu:0 here) is known at init.
    trainer = Trainer(tx, loss, descent_device=CPU0, ascent_batch_size=_calibration())
    with pytest.raises(ValueError, match=r"`ascent_device` is"):
        trainer.init(params)
    trainer = Trainer(
        tx,
        loss,
        descent_device=CPU0,
        ascent_device=CPU1,
        ascent_batch_size=_calibration(b=16),
    )
    state = trainer.init(params)
    with pytest.raises(ValueError, match=r"b' = 2 for batches of 16: calibrate on"):
        trainer.step(state, _numpy_batches(sample, 1)[0])


def test_calibration_reports_timings_consistent_with_its_choice():
    params, loss, sample = mlp_problem(jax.random.key(0), batch=64)
    batch = _numpy_batches(sample, 1)[0]
    with warnings.catch_warnings():  # whether it hides depends on the machine
        warnings.simplefilter("ignore")
        c = calibrate_ascent_batch(
            loss, params, batch, fast_device=CPU0, slow_device=CPU1, repeats=3
        )
    assert c.batch_size == 64
    assert 1 <= c.ascent_batch_size <= 64
    assert c.ascent_batch_size & (c.ascent_batch_size - 1) == 0
    assert c.descent_seconds > 0 and all(t > 0 for t in c.ascent_seconds.values())
    # Every timed b' up to the chosen one hid behind the descent, every larger
    # one did not (b' = 1 is chosen even when it does not hide).
    for size, seconds in c.ascent_seconds.items():
        assert size & (size - 1) == 0 and size <= 64
        hides = seconds + c.transfer_seconds <= c.descent_seconds
        assert hides == (size <= c.ascent_batch_size) or size == 1
    assert c.hides == (
        c.ascent_seconds[c.ascent_batch_size] + c.transfer_seconds <= c.descent_seconds
    )
    assert (c.fast_device, c.slow_device) == (CPU0, CPU1)


def test_calibration_bad_input():
    params, loss, sample = mlp_problem(jax.random.key(0), batch=8)
    batch = _numpy_batches(sample, 1)[0]
    with pytest.raises(ValueError, match="repeats"):
        calibrate_ascent_batch(loss, params, batch, repeats=0)
    with pytest.raises(ValueError, match=r"slow_device='tpu:3'.*available: cpu:0"):
        calibrate_ascent_batch(loss, params, batch, slow_device="tpu:3")
    with pytest.raises(TypeError, match="loss_fn"):
        calibrate_ascent_batch("loss", params, batch)


# --- bad input -----------------------------------------------------------------


def test_a_device_that_does_not_exist_lists_the_available_ones():
    tx = TRANSFORMS["async_sam"]()
    with pytest.raises(ValueError, match=r"descent_device='gpu'.*cpu:0, cpu:1"):
        Trainer(tx, lambda p, b: 0.0, descent_device="gpu")
    with pytest.raises(ValueError, match=r"ascent_device='cpu:9'"):
        Trainer(tx, lambda p, b: 0.0, ascent_device="cpu:9")
    assert Trainer(tx, lambda p, b: 0.0, ascent_device="cpu:1")._ascent_arg == CPU1


def test_bad_ascent_batch_size():
    params, loss, sample = mlp_problem(jax.random.key(0), batch=16)
    batch = _numpy_batches(sample, 1)[0]
    with pytest.raises(ValueError, match="ascent_batch_size"):
        Trainer(TRANSFORMS["async_sam"](), loss, ascent_batch_size=0)
    trainer = Trainer(
        TRANSFORMS["async_sam"](), loss, ascent_batch_size=32, ascent_device=CPU1
    )
    with pytest.raises(
        ValueError, match=r"ascent_batch_size=32.*larger than the batch"
    ):
        trainer.step(trainer.init(params), batch)
    with pytest.raises(ValueError, match="AsyncSAM's ascent batch"):
        Trainer(TRANSFORMS["sam"](), loss, ascent_batch_size=4).init(params)


def test_batch_leaves_with_different_leading_sizes():
    params, loss, _ = mlp_problem(jax.random.key(0), batch=16)
    trainer = Trainer(TRANSFORMS["sam"](), loss)
    bad = {"x": np.zeros((16, 8), np.float32), "y": np.zeros((15, 4), np.float32)}
    with pytest.raises(
        ValueError, match=r"same leading batch size; \['x'\] has 16, \['y'\] has 15"
    ):
        trainer.step(trainer.init(params), bad)


@pytest.mark.parametrize("name", ["async_sam", "sampa-0.2"])
def test_a_batch_whose_size_changes_gets_a_clear_error(name):
    params, loss, sample = mlp_problem(jax.random.key(0), batch=16)
    batch = _numpy_batches(sample, 1)[0]
    trainer = Trainer(TRANSFORMS[name](), loss, ascent_device=CPU1)
    state, _ = trainer.step(trainer.init(params), batch)
    smaller = jax.tree.map(lambda x: x[:8], batch)
    with pytest.raises(ValueError, match=r"has 8 examples, but this run's .* 16"):
        trainer.step(state, smaller)
    # A new Trainer on the kept state: the kept batch gives the size.
    other = Trainer(TRANSFORMS[name](), loss, ascent_device=CPU1)
    other.init(params)
    with pytest.raises(ValueError, match=r"has 8 examples, but this run's .* 16"):
        other.step(state, smaller)
    state, _ = trainer.step(state, batch)  # the run goes on at its own size


def test_the_first_batch_after_init_sets_the_size():
    params, loss, sample = mlp_problem(jax.random.key(0), batch=16)
    batch = _numpy_batches(sample, 1)[0]
    smaller = jax.tree.map(lambda x: x[:8], batch)
    trainer = Trainer(TRANSFORMS["sam"](), loss)
    with pytest.raises(ValueError, match=r"has 16 examples, but this run's .* 8"):
        state, _ = trainer.step(trainer.init(params), smaller)
        trainer.step(state, batch)
    state, _ = trainer.step(trainer.init(params), batch)  # a new run, a new size
    trainer.step(state, batch)


def test_bad_pairing():
    with pytest.raises(ValueError, match=r"`Trainer\(pairing=...\)` must be 'paired'"):
        Trainer(TRANSFORMS["async_sam"](), lambda p, b: 0.0, pairing="lagged")


def test_loss_must_be_a_scalar_and_callable():
    params = jnp.zeros(3)
    batch = {"x": np.ones((4, 3), np.float32)}
    trainer = Trainer(TRANSFORMS["sam"](), lambda p, b: b["x"] @ p)
    with pytest.raises(ValueError, match=r"scalar loss.*shape \(4,\)"):
        trainer.step(trainer.init(params), batch)
    with pytest.raises(TypeError, match="loss_fn"):
        Trainer(TRANSFORMS["sam"](), "mse")
    with pytest.raises(TypeError, match="optax transform"):
        Trainer(optax.sgd, lambda p, b: 0.0)
    with pytest.raises(ValueError, match="model_state"):
        Trainer(TRANSFORMS["sam"](), lambda p, s, b: (0.0, s), has_state=True).init(
            params
        )


def test_async_sam_unscaled_radius_equals_the_reference_on_two_devices():
    # rho_scaling="none": the paper's radius at every b' (b' = ASCENT < 32).
    params, loss, sample = mlp_problem(jax.random.key(0), batch=32)
    batches = _numpy_batches(sample, 10)
    base = lambda: optax.sgd(0.1, momentum=0.9)  # noqa: E731
    trainer = Trainer(
        samx.async_sam(base(), rho=0.05, rho_scaling="none"),
        loss,
        descent_device=CPU0,
        ascent_device=CPU1,
        ascent_batch_size=ASCENT,
    )
    kwargs = dict(rho=0.05, ascent=ASCENT, pairing="paired")
    expected = async_sam_reference(
        base(), params, loss, batches, **kwargs, scaling="none"
    )
    _assert_trajectory(
        trainer, batches, {"params0": params, "trajectory": expected}, True, "async_sam"
    )
    scaled = async_sam_reference(base(), params, loss, batches, **kwargs)
    assert np.abs(scaled[-1]["layer0"]["w"] - expected[-1]["layer0"]["w"]).max() > 1e-4


@pytest.mark.parametrize("two_devices", [True, False])
def test_a_new_batch_size_after_init_gets_its_own_radius(two_devices):
    # b'/b sets AsyncSAM's radius: a Trainer re-initialised for batches of 16
    # (b' = 8 of 16) must not keep the b'/b of its earlier batches of 32.
    params, loss, sample = mlp_problem(jax.random.key(0), batch=32)
    batches = _numpy_batches(sample, 6)
    small = [jax.tree.map(lambda x: x[:16], b) for b in batches]

    def trainer():
        return Trainer(
            samx.async_sam(optax.sgd(0.1, momentum=0.9), rho=0.05),
            loss,
            descent_device=CPU0,
            ascent_device=CPU1 if two_devices else CPU0,
            ascent_batch_size=ASCENT,
        )

    reused = trainer()
    state = reused.init(params)
    for batch in batches:
        state, _ = reused.step(state, batch)
    state = reused.init(params)
    for batch in small:
        state, _ = reused.step(state, batch)
    expected = async_sam_reference(
        optax.sgd(0.1, momentum=0.9),
        params,
        loss,
        small,
        rho=0.05,
        ascent=ASCENT,
        pairing="paired",
    )
    for x, y in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(expected[-1]), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


# --- donation ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sam", "async_sam", "sampa-0.2"])
def test_a_step_donates_the_state_it_is_given_and_nothing_else(name):
    params, loss, sample = mlp_problem(jax.random.key(0), batch=16)
    batches = [jax.device_put(b) for b in _numpy_batches(sample, 3)]
    trainer = Trainer(TRANSFORMS[name](), loss)
    state = trainer.init(params)
    first = state
    for batch in batches:
        state, _ = trainer.step(state, batch)
    # The state given to the first step is used up; the caller's parameters,
    # its batches and the kept previous batch are not.
    assert all(x.is_deleted() for x in jax.tree.leaves(first))
    assert not any(x.is_deleted() for x in jax.tree.leaves((params, batches, state)))
    # Without donation, the same trajectory, and the old state stays usable.
    keeper = Trainer(TRANSFORMS[name](), loss, donate=False)
    kept = keeper.init(params)
    first = kept
    for batch in batches:
        kept, _ = keeper.step(kept, batch)
    assert not any(x.is_deleted() for x in jax.tree.leaves(first))
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(kept), strict=True):
        np.testing.assert_array_equal(x, y)


def test_plan_is_found_from_its_argument_and_checked_against_the_trainers():
    params, loss, _ = mlp_problem(jax.random.key(0), batch=16)
    trainer = Trainer(TRANSFORMS["async_sam"](), loss)
    with pytest.raises(ValueError, match=r"no plan yet; call `init` first"):
        trainer.plan()
    state = trainer.init(params)
    assert trainer.plan() == trainer.plan(state.opt_state)
    assert trainer.plan().method == "async_sam"
    other = samx.sam(optax.sgd(0.1)).init(params)
    with pytest.raises(ValueError, match=r"this optimizer state is sam's"):
        trainer.plan(other)  # the old code returned async_sam's plan
