"""Part 5: time to accuracy through the Trainer.

The Flax (linen) CNN with BatchNorm on digits with 40% label noise: SGD, SAM,
AsyncSAM (b/4, its ascent on the host CPU) and SAMPa, test accuracy against
training wall time.
"""

import time

import jax

from samx.examples import flax_models
from samx.examples.data import load_digits
from samx.examples.flax_train import LEARNING_RATE
from samx.examples.stepwise import describe, fit, trainer_stepper
from samx.examples.train import METHODS, RunResult, base_optimizer

# SGD and one of each samx transform.
ACCURACY_METHODS = ("sgd", "sam", "async_sam", "sampa")


def time_to_accuracy(run, descent, host, sizes):
    data = load_digits(noise=0.4, seed=0)
    steps = sizes.epochs * (data.x_train.shape[0] // sizes.digits_batch)
    x_test, y_test = jax.device_put((data.x_test, data.y_test), descent)

    @jax.jit
    def test_accuracy(params, batch_stats):
        logits = flax_models.linen_logits(params, batch_stats, x_test)
        return flax_models.accuracy(logits, y_test)

    results, out = {}, {}

    def save():
        run.part(
            "time_to_accuracy",
            {
                "model": "samx.examples.flax_models.LinenCNN (BatchNorm)",
                "data": "digits, 40% symmetric label noise, seed 0",
                "epochs": sizes.epochs,
                "batch_size": sizes.digits_batch,
                "methods": out,
            },
        )

    took = 0.0  # the last method's run, compilation included
    for name in ACCURACY_METHODS:
        if run.left("time_to_accuracy") <= took:
            run.log(f"time to accuracy: out of its share of the budget before {name}")
            out[name] = {"skipped": "budget"}
            save()
            continue
        took = time.perf_counter()
        method = METHODS[name]
        params, batch_stats = flax_models.linen_init(jax.random.key(0))
        tx = method.wrap(base_optimizer(LEARNING_RATE, steps))
        plan = method.plan(jax.eval_shape(tx.init, params))
        stepper = trainer_stepper(
            method,
            tx,
            flax_models.linen_loss,
            params,
            batch_size=sizes.digits_batch,
            model_state=batch_stats,
            descent_device=descent,
            # The plan says which ascent belongs on the host CPU (AsyncSAM's).
            ascent_device=host if plan.ascent_placement == "host" else None,
        )
        _, curve, seconds, n = fit(
            stepper,
            data,
            epochs=sizes.epochs,
            batch_size=sizes.digits_batch,
            seed=0,
            evaluate=lambda s, st=stepper: test_accuracy(
                st.params(s), st.model_state(s)
            ),
        )
        took = time.perf_counter() - took
        results[name] = [RunResult(name, 0, curve[-1][1], seconds, n, curve)]
        out[name] = {
            "label": method.label,
            "gradients": [g._asdict() for g in stepper.gradients],
            "where": describe(stepper.gradients),
            "train_seconds": seconds,
            "steps": n,
            "curve": curve,
            "test_accuracy": curve[-1][1],
        }
        save()
        run.log(
            f"time to accuracy: {name} {curve[-1][1]:.3f} after {seconds:.2f} s"
            f" ({describe(stepper.gradients)})"
        )
    return results
