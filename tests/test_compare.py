"""The main job's command line: a tiny run and clear messages for bad options."""

import json
import subprocess
import sys

import pytest

from samx.examples import compare
from samx.examples.data import load_digits, symmetric_noise


def test_tiny_run_prints_a_table_and_writes_results_and_plots(capsys, tmp_path):
    argv = ["--quick", "--epochs", "2", "--no-progress", "--out", str(tmp_path)]
    assert compare.main(argv + ["--optimizers", "sgd,sam,async_sam,sampa"]) == 0
    out = capsys.readouterr().out
    for label in ("SGD", "SAM", "AsyncSAM (b/4)", "SAMPa-0.2"):
        assert f"| {label} |" in out
    assert "40% symmetric label noise" in out
    record = json.loads((tmp_path / "results.json").read_text())
    assert set(record["runs"]) == {"sgd", "sam", "async_sam", "sampa"}
    run = record["runs"]["sam"][0]
    assert len(run["curve"]) == 2 and 0.0 <= run["test_accuracy"] <= 1.0
    for name in ("accuracy_vs_time.png", "final_accuracy.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizers", "sgd,adamw"], "unknown adamw"),
        (["--noise", "1.5"], "--noise must be in [0, 1]"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--epochs", "-1"], "--epochs must be >= 1"),
        (["--epochs", "many"], "invalid int value"),
    ],
)
def test_bad_options_exit_with_a_message_not_a_traceback(argv, message):
    out = subprocess.run(
        [sys.executable, "-m", "samx.examples.compare", *argv],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_noise_flips_exactly_the_requested_fraction():
    data = load_digits(noise=0.4, seed=1)
    flipped = (data.y_train != data.clean_train).mean()
    assert abs(flipped - 0.4) < 1e-3
    assert set(data.y_train.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="noise"):
        symmetric_noise(data.y_train, -0.1, 10, None)


def test_the_trainer_loop_trains_as_the_scan_loop_does():
    """On an accelerator the main job steps through the Trainer; on a CPU it
    runs an epoch per lax.scan. Both see the same batches in the same pairing,
    so they reach the same test accuracy (to an example: they round apart)."""
    argv = ["--quick", "--epochs", "1", "--no-progress"]
    argv += ["--optimizers", "sgd,optax_sam,async_sam"]
    assert compare.resolve_loop("auto") == "scan"  # a CPU-only machine
    scan = compare.run(compare.parse_args(argv))
    trainer_args = compare.parse_args([*argv, "--loop", "trainer"])
    trainer = compare.run(trainer_args)
    assert trainer_args.loop == "trainer"
    n_test = len(load_digits().y_test)
    for name, runs in scan.items():
        (a,), (b,) = runs, trainer[name]
        assert a.steps == b.steps and len(b.curve) == 1
        assert abs(a.test_accuracy - b.test_accuracy) <= 1 / n_test + 1e-6, name
    note = compare.table(trainer, 0.4, "trainer")
    assert "through samx.runtime.Trainer" in note
    assert "AsyncSAM's ascent on the host CPU" in note
